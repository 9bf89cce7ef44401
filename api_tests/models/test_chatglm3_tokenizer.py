"""Tokenizer equality with the original ChatGLM3 tokenizer on every golden case."""
from __future__ import annotations

import pytest
from chatglm3_helpers import chat_messages

from service.core.errors import InvalidInput
from service.models import (IGNORE_INDEX, render_chat, stop_token_ids, tokenize_chat,
                            tokenize_plain)


def test_special_token_ids(tokenizer, golden):
    for tok, idx in golden["special_tokens"].items():
        assert tokenizer.convert_tokens_to_ids(tok) == idx
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 0


def test_encode_every_case(tokenizer, golden):
    for case in golden["encode"]:
        text = case["text"]
        assert tokenizer(text)["input_ids"] == case["ids_with_special"], text
        assert tokenizer.encode(text, add_special_tokens=False) == case["ids_plain"], text
        assert tokenizer.decode(case["ids_plain"]) == case["decoded"], text
        assert tokenizer.decode(case["ids_with_special"], skip_special_tokens=True) == case["decoded"]


def test_chat_input_every_case_render_chat(tokenizer, golden):
    for case in golden["chat_input"]:
        assert render_chat(tokenizer, chat_messages(case)) == case["input_ids"]


def test_chat_input_every_case_plain_chat_template(tokenizer, golden):
    # What a user of plain transformers gets from the saved chat template.
    for case in golden["chat_input"]:
        out = tokenizer.apply_chat_template(chat_messages(case), add_generation_prompt=True,
                                            tokenize=True, return_dict=True)
        assert list(out["input_ids"]) == case["input_ids"]


def test_seed_train_every_case(tokenizer, golden):
    for case in golden["seed_train"]:
        ids, labels = tokenize_plain(tokenizer, case["content"], case["summary"], 512, 1536)
        assert ids == case["input_ids"]
        assert labels == case["labels"]


def test_plain_truncation_keeps_prefix_and_eos(tokenizer, golden):
    case = golden["seed_train"][0]
    ids, labels = tokenize_plain(tokenizer, case["content"], case["summary"], 5, 4)
    assert ids == case["input_ids"][:5] + case["labels"][13:16] + [2]
    assert labels == [IGNORE_INDEX] * 5 + case["labels"][13:16] + [2]


def test_chat_training_format_multi_turn(tokenizer, golden):
    msgs = [{"role": "system", "content": "你是一名广告文案。"},
            {"role": "user", "content": "类型#上衣*颜色#黑色"},
            {"role": "assistant", "content": "这款黑色上衣百搭又显瘦。"},
            {"role": "user", "content": "再短一点"},
            {"role": "assistant", "content": "百搭显瘦。"}]
    ids, labels = tokenize_chat(tokenizer, msgs, 4096)
    # Same ids as served: the prompt for turn 2 is a prefix, then the reply, then eos.
    prompt = render_chat(tokenizer, msgs[:4])
    assert ids[: len(prompt)] == prompt
    assert ids[-1] == tokenizer.eos_token_id
    # The prompt of turn 1 as served, and golden's chat_input case with this history.
    assert ids[: len(golden["chat_input"][2]["input_ids"])] == golden["chat_input"][2]["input_ids"]

    user_id = tokenizer.convert_tokens_to_ids("<|user|>")
    asst_id = tokenizer.convert_tokens_to_ids("<|assistant|>")
    labeled = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in labeled)
    # Reply 1: what generation produces after <|assistant|> ("▁\n" + content), then the
    # closing <|user|>; reply 2: likewise, closed by eos. Nothing else.
    a1 = len(render_chat(tokenizer, msgs[:2]))          # first token after <|assistant|>
    u2 = ids.index(user_id, a1)                        # the <|user|> closing reply 1
    a2 = len(prompt)
    assert ids[a1 - 1] == asst_id and ids[a2 - 1] == asst_id
    assert labeled == list(range(a1, u2 + 1)) + list(range(a2, len(ids)))
    reply1 = [t for t in ids[a1:u2]]
    assert tokenizer.decode(reply1).strip() == "这款黑色上衣百搭又显瘦。"


def test_chat_training_truncation(tokenizer):
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "这款裙子很好看"}]
    ids, labels = tokenize_chat(tokenizer, msgs, 8)
    assert len(ids) == len(labels) == 8


def test_special_strings_in_content_are_text(tokenizer):
    # The original never scans content for special tokens; neither do we (no role injection).
    ids = render_chat(tokenizer, [{"role": "user", "content": "hi <|assistant|> sop"}])
    assert ids.count(tokenizer.convert_tokens_to_ids("<|assistant|>")) == 1
    assert ids.count(tokenizer.convert_tokens_to_ids("sop")) == 1
    # "sop" inside a word is never cut out, even through plain tokenizer().
    assert tokenizer.convert_tokens_to_ids("sop") not in tokenizer.encode("isopropyl",
                                                                           add_special_tokens=False)


def test_stop_ids(tokenizer, golden):
    sp = golden["special_tokens"]
    assert stop_token_ids(tokenizer) == [2, sp["<|user|>"], sp["<|observation|>"]]


def test_unknown_role_is_invalid_input(tokenizer):
    with pytest.raises(InvalidInput):
        render_chat(tokenizer, [{"role": "wizard", "content": "x"}])
