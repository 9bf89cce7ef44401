"""Prompt rendering, training tokenization and stop ids: one definition for training and serving.

For ChatGLM3 tokenizers everything is built the way the original `build_chat_input` /
`build_single_message` builds it: role token + encode(metadata + "\\n") + encode(content),
each part encoded separately and never scanned for special tokens. (The tokenizer's
chat_template renders the same ids for ordinary text, but a string template cannot stop a
user from typing "<|assistant|>" into content; the per-part encoding can.) Other families
use their own chat template the same way: template pieces may hold special tokens, message
text never does (see _render_template).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from service.core.errors import InvalidInput
from service.models.chatglm3 import ROLES, STOP_TOKENS, is_chatglm3_tokenizer

IGNORE_INDEX = -100
# End-of-turn tokens of common chat templates, added to eos for other families.
_OTHER_END_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _msg(m: Any) -> tuple[str, str, str]:
    """(role, content, metadata) from a dict or a ChatMessage-like object."""
    if isinstance(m, Mapping):
        role, content, meta = m.get("role"), m.get("content"), m.get("metadata") or ""
    else:
        role, content, meta = getattr(m, "role", None), getattr(m, "content", None), \
            getattr(m, "metadata", None) or ""
    if role not in ROLES:
        raise InvalidInput(f"unknown role {role!r}; expected one of {', '.join(ROLES)}",
                           param="messages")
    if not isinstance(content, str):
        raise InvalidInput("message content must be a string", param="messages")
    return role, content, str(meta)


def _as_dicts(messages: Sequence[Any]) -> list[dict[str, str]]:
    out = []
    for m in messages:
        role, content, meta = _msg(m)
        d = {"role": role, "content": content}
        if meta:
            d["metadata"] = meta
        out.append(d)
    return out


def encode_text(tokenizer, text: str) -> list[int]:
    """Plain text -> ids, no special prefix, special-token strings treated as text (as ChatGLM3)."""
    if not text:
        return []
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))


def _cmd(tokenizer, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


def _glm_message(tokenizer, role: str, content: str, meta: str) -> list[int]:
    # build_single_message: [<|role|>] + encode(f"{metadata}\n") + encode(content)
    return [_cmd(tokenizer, f"<|{role}|>")] + encode_text(tokenizer, f"{meta}\n") + \
        encode_text(tokenizer, content)


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end a reply: for ChatGLM3 eos, <|user|>, <|observation|> (as the original chat)."""
    if is_chatglm3_tokenizer(tokenizer):
        return [_cmd(tokenizer, t) for t in STOP_TOKENS]
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for i in (eos if isinstance(eos, list) else [eos]):
        if i is not None and i not in ids:
            ids.append(i)
    vocab = tokenizer.get_vocab()
    for t in _OTHER_END_TOKENS:
        if t in vocab and vocab[t] not in ids:
            ids.append(vocab[t])
    return ids


def render_chat(tokenizer, messages: Sequence[Any], add_generation_prompt: bool = True) -> list[int]:
    """Prompt ids for a conversation; for ChatGLM3 equal to the original build_chat_input."""
    if is_chatglm3_tokenizer(tokenizer):
        ids = [_cmd(tokenizer, "[gMASK]"), _cmd(tokenizer, "sop")]
        for m in messages:
            ids += _glm_message(tokenizer, *_msg(m))
        if add_generation_prompt:
            ids.append(_cmd(tokenizer, "<|assistant|>"))
        return ids
    msgs = _as_dicts(messages)
    if getattr(tokenizer, "chat_template", None):
        return _render_template(tokenizer, msgs, add_generation_prompt)
    # Base models without a template: a plain, documented transcript format, all of it text.
    text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs)
    if add_generation_prompt:
        text += "assistant:"
    return list(tokenizer.encode(text, add_special_tokens=True, split_special_tokens=True))


# Noncharacters (never in interchange text) that mark where the template put each content.
_OPEN, _CLOSE = "\ufdd0", "\ufdd1"


def _render_template(tokenizer, msgs: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    """The tokenizer's chat template, with message text encoded as plain text: the template's
    own pieces may hold special tokens, what users typed never does (a typed "<|eot_id|>" is
    the characters, not the control token). The template renders each content between two
    markers, so where every content lies in the text is known. When no special token falls
    inside a content, the ids are the template's own (whole text tokenized at once); else the
    pieces are tokenized separately, template text with special tokens and contents with
    encode_text, as the ChatGLM3 path builds its parts."""
    marked = []
    for m in msgs:
        clean = {k: (v.replace(_OPEN, "").replace(_CLOSE, "") if isinstance(v, str) else v) for k, v in m.items()}
        clean["content"] = f"{_OPEN}{clean['content']}{_CLOSE}"
        marked.append(clean)
    rendered = tokenizer.apply_chat_template(marked, add_generation_prompt=add_generation_prompt, tokenize=False)
    head, *parts = rendered.split(_OPEN)
    pieces: list[tuple[str, bool]] = [(head.replace(_CLOSE, ""), False)]  # (text, is message content)
    for part in parts:
        content, sep, rest = part.partition(_CLOSE)
        if not sep:  # a template that cut a content apart: the lone piece is template text
            content, rest = "", content
        pieces += [(content, True), (rest.replace(_CLOSE, ""), False)]
    pieces = [(t, c) for t, c in pieces if t]
    whole = _whole_if_contents_plain(tokenizer, pieces)
    if whole is not None:
        return whole
    ids: list[int] = []
    for text, is_content in pieces:
        ids += encode_text(tokenizer, text) if is_content else tokenizer.encode(text, add_special_tokens=False)
    return ids


def _whole_if_contents_plain(tokenizer, pieces: list[tuple[str, bool]]) -> list[int] | None:
    """Ids of the whole text if no special token lies inside a content piece (fast tokenizers,
    which report offsets), else None."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    text = "".join(t for t, _ in pieces)
    spans, at = [], 0
    for t, is_content in pieces:
        if is_content:
            spans.append((at, at + len(t)))
        at += len(t)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    special = set(tokenizer.all_special_ids) | {i for i, tok in tokenizer.added_tokens_decoder.items()
                                                if getattr(tok, "special", False)}
    for tid, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        if tid in special and any(start < e and s < end for s, e in spans):
            return None
    return list(enc["input_ids"])


def tokenize_chat(tokenizer, messages: Sequence[Any], max_len: int) -> tuple[list[int], list[int]]:
    """Training ids in the served chat format; loss only on what the assistant must generate.

    ChatGLM3 (the scheme of ChatGLM3's own finetune_demo): `[gMASK] sop`, every message
    rendered as at inference, eos at the end. Labeled: each assistant reply (the "\\n" after
    `<|assistant|>` and the content, i.e. exactly what generation produces after the prompt)
    plus the one token that closes it: the next role token (`<|user|>`/`<|observation|>`, which
    are stop ids) or the final eos. Everything else is -100. Multi-turn conversations
    train on every assistant turn. Truncated to max_len.
    """
    if not messages:
        raise InvalidInput("conversation has no messages", param="messages")
    if is_chatglm3_tokenizer(tokenizer):
        ids = [_cmd(tokenizer, "[gMASK]"), _cmd(tokenizer, "sop")]
        mask = [False, False]
        for m in messages:
            role, content, meta = _msg(m)
            part = _glm_message(tokenizer, role, content, meta)
            ids += part
            mask += [role == "assistant"] * len(part)
        ids.append(tokenizer.eos_token_id)
        # Shift by one: a token is labeled when the token before it belongs to a reply. This
        # drops the role token <|assistant|> (prompt) and adds the token closing each reply.
        mask = [False] + mask
        labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, mask)]
        return ids[:max_len], labels[:max_len]

    # Other families: label the span each assistant turn adds to the rendered prefix.
    msgs = _as_dicts(messages)
    ids = render_chat(tokenizer, msgs, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = render_chat(tokenizer, msgs[:i], add_generation_prompt=True) if i else []
        upto = render_chat(tokenizer, msgs[: i + 1], add_generation_prompt=False)
        if upto[: len(before)] == before and ids[: len(upto)] == upto:
            labels[len(before): len(upto)] = upto[len(before):]
    if tokenizer.eos_token_id is not None and msgs[-1]["role"] == "assistant" \
            and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids[:max_len], labels[:max_len]


def tokenize_plain(tokenizer, content: str, summary: str, max_source_length: int,
                   max_target_length: int) -> tuple[list[int], list[int]]:
    """The lecture's format: `[gMASK] sop + content + summary + eos`, labels -100 over the
    content and the two prefix tokens. Content is cut to max_source_length-2 tokens and the
    summary to max_target_length-1 (room for the prefix and eos), as in the lecture notebook."""
    if max_source_length < 3 or max_target_length < 2:
        raise InvalidInput("max_source_length must be >= 3 and max_target_length >= 2",
                           param="max_source_length")
    eos = tokenizer.eos_token_id
    if is_chatglm3_tokenizer(tokenizer):
        q = encode_text(tokenizer, content)[: max_source_length - 2]
        a = encode_text(tokenizer, summary)[: max_target_length - 1]
        prefix = [_cmd(tokenizer, "[gMASK]"), _cmd(tokenizer, "sop")]
        ids = prefix + q + a + [eos]
        labels = [IGNORE_INDEX] * (len(q) + 2) + a + [eos]
        return ids, labels
    q = list(tokenizer.encode(content, add_special_tokens=True, split_special_tokens=True))[:max_source_length]
    a = encode_text(tokenizer, summary)[: max_target_length - 1] + ([eos] if eos is not None else [])
    return q + a, [IGNORE_INDEX] * len(q) + a
