"""After training: validation loss, and greedy generation on validation prompts with the base
(adapter disabled) and with the adapter, scored with BLEU-4 / ROUGE (metrics.py) and shown
side by side like the lecture's before/after comparison."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from workers.training.data import Example
from workers.training.metrics import METRIC_DESCRIPTIONS, corpus_scores
from workers.training.model import autocast, micro_batch_loss_and_correct
from workers.training.packing import micro_batches


@torch.no_grad()
def validation_metrics(model, examples: Sequence[Example], *, device: str, token_budget: int, packing: bool,
                       rows: int, pad_id: int, max_examples: int | None = None) -> tuple[float, float]:
    """(mean token cross-entropy, mean token accuracy) over the validation examples' label
    tokens (eval mode); the accuracy is the share of label tokens whose argmax logit is the
    target, from the same forward as the loss."""
    was = model.training
    model.eval()
    try:
        exs = list(examples[:max_examples] if max_examples else examples)
        total, correct, n = 0.0, 0, 0
        for mb in micro_batches(exs, packing=packing, token_budget=token_budget, rows=rows, pad_id=pad_id):
            mb = mb.to(device)
            with autocast(device):
                loss_sum, n_correct = micro_batch_loss_and_correct(model, mb)
            total += float(loss_sum)
            correct += int(n_correct)
            n += mb.n_label_tokens
        return total / max(n, 1), correct / max(n, 1)
    finally:
        model.train(was)


def prompts_and_references(conversations: Sequence[Sequence[dict]], limit: int) -> list[tuple[list[dict], str]]:
    """(history up to the last assistant turn, that turn's content) for conversations ending in a reply."""
    out = []
    for conv in conversations:
        if len(out) >= limit:
            break
        if len(conv) >= 2 and conv[-1].get("role") == "assistant":
            out.append((list(conv[:-1]), conv[-1]["content"]))
    return out


@torch.no_grad()
def generate(model, tokenizer, histories: Sequence[Sequence[dict]], *, device: str, max_new_tokens: int,
             max_prompt_tokens: int, batch_size: int = 8,
             after_batch: Callable[[int], None] | None = None) -> list[str]:
    """Greedy replies, batched with left padding (stop at the family's stop ids).
    `after_batch(n)` is called after each batch with the number of replies it produced (it may
    raise, e.g. Cancelled, to stop between batches)."""
    from service.models import render_chat, stop_token_ids

    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    prompts = [render_chat(tokenizer, h, add_generation_prompt=True)[-max_prompt_tokens:] for h in histories]
    # Longest first so each batch pads little; answers are put back in input order.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        L = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), L), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), L), dtype=torch.long)
        for r, i in enumerate(idx):
            p = prompts[i]
            ids[r, L - len(p):] = torch.tensor(p)
            mask[r, L - len(p):] = 1
        with autocast(device):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=pad, use_cache=True)
        for r, i in enumerate(idx):
            new = out[r, L:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stops), len(new))
            texts[i] = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
        if after_batch is not None:
            after_batch(len(idx))
    return texts


def before_after(model, tokenizer, conversations: Sequence[Sequence[dict]], *, device: str,
                 max_samples: int, max_new_tokens: int, max_prompt_tokens: int, split: str,
                 batch_size: int = 8, log: Callable[[str], None] | None = None,
                 on_replies: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Generate with the base and the adapter on the same prompts; metrics for both + the table.
    `on_replies(done, total)` follows every batch (total = 2 x prompts: base, then adapter); it
    is where a caller checks for a cancel (raising stops between batches)."""
    pairs = prompts_and_references(conversations, max_samples)
    if not pairs:
        return {"split": split, "n_samples": 0, "note": "no conversation ending in an assistant reply"}
    histories = [h for h, _ in pairs]
    refs = [r for _, r in pairs]
    total, done = 2 * len(pairs), 0

    def after_batch(n: int) -> None:
        nonlocal done
        done += n
        if on_replies is not None:
            on_replies(done, total)

    was = model.training
    model.eval()
    try:
        if log:
            log(f"evaluating on {len(pairs)} {split} prompts: base model")
        with model.disable_adapter():
            base = generate(model, tokenizer, histories, device=device, max_new_tokens=max_new_tokens,
                            max_prompt_tokens=max_prompt_tokens, batch_size=batch_size, after_batch=after_batch)
        if log:
            log(f"evaluating on {len(pairs)} {split} prompts: adapter")
        tuned = generate(model, tokenizer, histories, device=device, max_new_tokens=max_new_tokens,
                         max_prompt_tokens=max_prompt_tokens, batch_size=batch_size, after_batch=after_batch)
    finally:
        model.train(was)
    table = [{"prompt": next((m["content"] for m in reversed(h) if m.get("role") == "user"), ""),
              "reference": r, "base": b, "adapter": a}
             for h, r, b, a in zip(histories, refs, base, tuned)]
    return {"split": split, "n_samples": len(pairs), "generation": {"greedy": True,
                                                                    "max_new_tokens": max_new_tokens},
            "base": corpus_scores(base, refs), "adapter": corpus_scores(tuned, refs),
            "metric_descriptions": METRIC_DESCRIPTIONS, "before_after": table}


def eval_seconds_estimate(model, tokenizer, conversations: Sequence[Sequence[dict]], *, device: str,
                          max_samples: int, max_new_tokens: int, max_prompt_tokens: int,
                          batch_size: int, probe_tokens: int = 4) -> tuple[float, int]:
    """(seconds, replies) that before_after will take at most, from one timed batch of
    `probe_tokens` greedy tokens (every reply assumed to run to max_new_tokens: an upper bound
    the measured rate replaces once evaluation runs). (0.0, 0) when there is nothing to evaluate."""
    import time

    pairs = prompts_and_references(conversations, max_samples)
    if not pairs:
        return 0.0, 0
    histories = [h for h, _ in pairs][:batch_size]
    n = min(probe_tokens, max_new_tokens)
    was = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        generate(model, tokenizer, histories, device=device, max_new_tokens=n,
                 max_prompt_tokens=max_prompt_tokens, batch_size=batch_size)
        per_token = (time.perf_counter() - t0) / n
    finally:
        model.train(was)
    batches = -(-len(pairs) // batch_size)
    return 2 * batches * max_new_tokens * per_token, 2 * len(pairs)
