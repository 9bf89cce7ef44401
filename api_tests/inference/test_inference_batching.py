"""Continuous batching of mixed adapters: answers in a shared batch equal answers alone, and
equal plain PEFT `generate` with the same adapter (the engine's LoRA math is PEFT's)."""
from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from harness import DecodeStepper
from inference_helpers import (FIXTURE, PROMPTS, accepted_together, engine_settings, generate_with_ids, peft_greedy, publish,
                               request, run, teacher_forced_batches)
from service.core.domain import BASE_ADAPTER
from service.core.registry import AdapterRegistry
from service.inference.engine import InferenceEngine

ADAPTERS = ["a1", "a2", "a3", "a4", "a5"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory, base_fp32):
    reg = AdapterRegistry(tmp_path_factory.mktemp("registry"))
    for i, name in enumerate(ADAPTERS):
        # Different ranks too: the column pool packs them without padding.
        publish(reg, base_fp32, tenant="t1", name=name, seed=100 + i, r=[4, 8, 2, 4, 6][i])
    return reg


def _engine(tmp_path_factory, tiny_base, registry, **kw):
    settings = engine_settings(tmp_path_factory.mktemp("data"), FIXTURE, **kw)
    engine = InferenceEngine(settings, registry)
    run(engine.start())
    return engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_base, registry):
    engine = _engine(tmp_path_factory, tiny_base, registry)
    yield engine
    run(engine.stop())


def _render(tokenizer, prompt):
    from service.models import render_chat
    return render_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)


async def _staggered(engine, reqs, steps_before_next):
    """Submit reqs in order; after request i, let the engine run steps_before_next[i] decode
    steps before the next one is submitted (0: together), so later requests join while earlier
    ones are decoding whatever the machine's speed."""
    with DecodeStepper(engine._runner) as stepper:
        tasks = []
        for req, n in zip(reqs, steps_before_next):
            tasks.append(asyncio.create_task(engine.generate(req)))
            if n:
                target = stepper.grant(n)
                deadline = time.monotonic() + 120
                # (or nothing left to decode: every request so far already ended)
                while not stepper.ran(target) and not all(t.done() for t in tasks):
                    assert time.monotonic() < deadline, f"the engine ran {stepper.steps} of {target} steps"
                    await asyncio.sleep(0.002)
        stepper.open()
        results = await asyncio.gather(*tasks)
    assert not stepper.timed_out
    return results


CASES = [(PROMPTS[0], "a1"), (PROMPTS[1], "a2"), (PROMPTS[2], BASE_ADAPTER), (PROMPTS[3], "a3"),
         (PROMPTS[0], "a2"), (PROMPTS[0], BASE_ADAPTER), (PROMPTS[4], "a1")]


def test_mixed_batch_equals_alone_and_peft(engine, registry, base_fp32, tokenizer):
    from service.models import stop_token_ids

    reqs = [request(p, a, max_tokens=24) for p, a in CASES]
    alone_ids = [run(generate_with_ids(engine, r)) for r in reqs]
    alone = [x[0] for x in alone_ids]
    before = dict(engine.stats()["counters"])
    mixed = run(_staggered(engine, reqs, [0, 2, 0, 4, 1, 0, 0]))
    after = engine.stats()["counters"]
    for (p, a), x, y in zip(CASES, alone, mixed):
        assert y.text == x.text, (p, a)
        assert (y.finish_reason, y.completion_tokens) == (x.finish_reason, x.completion_tokens)
        assert y.adapter == a and (y.adapter_version == 1) == (a != BASE_ADAPTER)
    # It really was batched: more than one row per decode step on average, several prefills.
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decode_rows"] - before["decode_rows"]
    assert rows / steps > 1.5
    assert after["prefill_batches"] - before["prefill_batches"] >= 2

    # The same answers as plain PEFT generate with that adapter (and the plain base).
    stops = stop_token_ids(tokenizer)
    for (p, a), (_, ids, _) in zip(CASES, alone_ids):
        adapter_dir = None if a == BASE_ADAPTER else registry.resolve("t1", a)[0]
        ref = peft_greedy(base_fp32, adapter_dir, _render(tokenizer, p), stops, 24)
        assert ids == ref, (p, a)

    # The adapters matter: one prompt, three different answers.
    by = {a: x.text for (p, a), x in zip(CASES, alone) if p == PROMPTS[0]}
    assert len({by["a1"], by["a2"], by[BASE_ADAPTER]}) == 3


def test_teacher_forced_mixed_rows_equal_alone(engine):
    """The GPU test's row isolation check in fp32, with its tolerance measured here: float32
    kernels for a 4-row and a 1-row batch (and padded prompts) round differently, and by how
    much depends on the CPU.

    * noise: for each row i, the mixed batch's prompts all under row i's adapter, so row i
      runs in exactly the mixed batch's shapes and padding but no other adapter is there to
      leak; against row i alone;
    * signal: the same prompt and forced tokens under another adapter, which is where a row
      that saw another row's adapter would move.
    Each mixed row must be within a few times the noise of its alone answer (and of its
    reversed-slot answer), and the noise must be far below the signal, else nothing is shown."""
    rows = [(PROMPTS[0], "a1"), (PROMPTS[1], "a2"), (PROMPTS[2], None), (PROMPTS[0], "a3")]
    others = [(PROMPTS[0], "a3"), (PROMPTS[1], "a1"), (PROMPTS[2], "a1"), (PROMPTS[0], "a1")]
    n = len(rows)
    controls = [[(p, a) for p, _ in rows] for _, a in rows]  # control i: every prompt, adapter of row i
    cases = list(dict.fromkeys(rows + others + [c for batch in controls for c in batch]))
    at = {c: i for i, c in enumerate(cases)}
    runs = teacher_forced_batches(engine, "t1", cases, [[at[c]] for c in rows + others])
    alone, other = [r[0] for r in runs[:n]], [r[0] for r in runs[n:]]
    shaped = teacher_forced_batches(engine, "t1", cases, [[at[c] for c in rows], [at[c] for c in rows[::-1]]]
                                    + [[at[c] for c in batch] for batch in controls], common_width=True)
    mixed, mixed_reversed = shaped[0], shaped[1][::-1]
    control = [shaped[2 + i][i] for i in range(n)]

    def dist(x, y):
        return float((x - y).abs().max())
    noise = max(dist(c, a) for c, a in zip(control, alone))
    # Floor: one float32 rounding step of the logits, so a CPU whose kernels round both shapes
    # alike does not demand bit-identity.
    scale = max(float(a.abs().max()) for a in alone)
    tol = 4 * max(noise, torch.finfo(torch.float32).eps * scale)
    own = [dist(m, a) for m, a in zip(mixed, alone)]
    by_slot = [dist(m, r) for m, r in zip(mixed, mixed_reversed)]
    signal = [dist(o, a) for o, a in zip(other, alone)]
    print(f"teacher-forced max|logit diff|: shape noise {noise:.3g} (tol {tol:.3g}); mixed vs alone "
          f"{[f'{x:.3g}' for x in own]}; mixed vs control {[f'{dist(m, c):.3g}' for m, c in zip(mixed, control)]}; "
          f"reversed slots {[f'{x:.3g}' for x in by_slot]}; another adapter {[f'{x:.3g}' for x in signal]}")
    assert 100 * tol < min(signal), "shape noise too close to an adapter's effect to show isolation"
    assert max(own) <= tol, (own, tol)
    assert max(by_slot) <= tol, (by_slot, tol)
    assert dist(alone[0], alone[3]) > 100 * tol  # adapters matter: one prompt, a1 vs a3


def test_hundred_concurrent_requests_over_five_adapters(engine):
    combos = [(p, a) for a in ADAPTERS + [BASE_ADAPTER] for p in PROMPTS[:2]]
    expected = {c: run(engine.generate(request(c[0], c[1], max_tokens=10))).text for c in combos}
    assert len(set(expected.values())) == len(combos)  # every (adapter, prompt) answers differently
    rng = random.Random(7)
    picks = [combos[i % len(combos)] for i in range(100)]
    rng.shuffle(picks)

    async def go():
        return await asyncio.gather(*[engine.generate(request(p, a, max_tokens=10)) for p, a in picks])

    results = run(go())
    wrong = [(c, r.text) for c, r in zip(picks, results) if r.text != expected[c]]
    assert not wrong
    assert engine.stats()["running"] == 0 and engine.stats()["queue_depth"] == 0


def test_4bit_mixed_batch_equals_alone_and_peft(tmp_path_factory, tiny_base, registry, tokenizer):
    """The real QLoRA serving path: NF4 base (bitsandbytes on the CPU) + LoRA columns."""
    from service.models import load_model, stop_token_ids

    engine = _engine(tmp_path_factory, tiny_base, registry, load_in_4bit=True)
    try:
        cases = CASES[:5]
        reqs = [request(p, a, max_tokens=16) for p, a in cases]
        alone_ids = [run(generate_with_ids(engine, r)) for r in reqs]
        alone = [x[0] for x in alone_ids]
        mixed = run(_staggered(engine, reqs, [0, 2, 0, 2, 0]))
        assert [m.text for m in mixed] == [x.text for x in alone]
    finally:
        run(engine.stop())
    base4 = load_model(tiny_base, quantize_4bit=True, device="cpu")
    stops = stop_token_ids(tokenizer)
    for (p, a), (_, ids, _) in zip(cases, alone_ids):
        adapter_dir = None if a == BASE_ADAPTER else registry.resolve("t1", a)[0]
        ref = peft_greedy(base4, adapter_dir, _render(tokenizer, p), stops, 16)
        assert ids == ref, (p, a)


def test_padded_static_decode_shapes_change_nothing(engine, monkeypatch):
    """The CUDA-graph shapes (rows, KV length and LoRA columns rounded up to buckets, idle
    rows decoded as padding) give the same answers as exact shapes."""
    reqs = [request(p, a, max_tokens=20) for p, a in CASES[:5]]
    exact = run(_staggered(engine, reqs, [0, 2, 0, 0, 0]))
    monkeypatch.setattr(engine._runner, "pad_shapes", True)
    padded = run(_staggered(engine, reqs, [0, 0, 2, 0, 0]))
    assert [r.text for r in padded] == [r.text for r in exact]
    assert engine._runner.decode_buckets(2, 70, 5) == (4, 96, 8)  # 96 = max_seq_len cap


@pytest.mark.parametrize("padded", [False, True])
def test_a_failing_decode_ends_only_its_own_request(engine, monkeypatch, padded):
    """Mixed adapters, exact and padded (CUDA-graph) shapes: a decode step that raises because
    of one row (here: the decoder refuses positions >= limit, as GPT-2 past its table) is
    retried in parts; only that row's request fails, the others decode the tokens they
    decode alone, seeded sampling included (the sampler did not move on the failed step)."""
    monkeypatch.setattr(engine._runner, "pad_shapes", padded)
    healthy = [request(PROMPTS[0], "a1", max_tokens=16), request(PROMPTS[1], BASE_ADAPTER, max_tokens=16),
               request(PROMPTS[2], "a3", max_tokens=16, temperature=0.9, seed=11)]
    culprit_prompt = " ".join([PROMPTS[1]] * 2)
    limit = len(_render(engine.tokenizer, culprit_prompt)) + 3  # reached at its 4th decode step
    for h in healthy:
        assert len(_render(engine.tokenizer, h.messages[0].content)) + 16 <= limit
    alone = [run(engine.generate(h)) for h in healthy]
    assert all(a.completion_tokens > 4 for a in alone), [a.completion_tokens for a in alone]
    failed_rows: list[int] = []

    def refuse_positions(_module, args, kwargs):
        positions = kwargs.get("position_ids")
        if positions is not None and positions.shape[-1] == 1 and int(positions.max()) >= limit:
            failed_rows.append(positions.shape[0])
            raise IndexError("index out of range in self")
    handle = engine._runner.inner.register_forward_pre_hook(refuse_positions, with_kwargs=True)
    try:
        bad, *good = run(accepted_together(engine, [request(culprit_prompt, "a2", max_tokens=16), *healthy]))
    finally:
        handle.remove()
    assert "decode failed: index out of range" in str(bad), bad
    assert [(g.text, g.finish_reason) for g in good] == [(a.text, a.finish_reason) for a in alone]
    # Refused first in the shared step, last alone (after its halves were retried).
    assert max(failed_rows) == 4 and failed_rows[-1] == 1, failed_rows
    assert engine.stats()["running"] == 0 and engine.stats()["queue_depth"] == 0


def test_all_linear_targets_match_peft(tmp_path_factory, base_fp32, tokenizer):
    """An engine told to serve LoRA on every Linear serves MLP/o_proj adapters exactly."""
    from service.models import stop_token_ids

    reg = AdapterRegistry(tmp_path_factory.mktemp("registry-all"))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
    publish(reg, base_fp32, tenant="t1", name="mlp", seed=77, r=4, targets=["o_proj", "gate_up_proj", "down_proj"])
    publish(reg, base_fp32, tenant="t1", name="every", seed=78, r=8, targets=targets)
    settings = engine_settings(tmp_path_factory.mktemp("data"), FIXTURE)
    engine = InferenceEngine(settings, reg, lora_targets="all-linear")
    run(engine.start())
    try:
        cases = [(PROMPTS[0], "mlp"), (PROMPTS[0], "every"), (PROMPTS[1], BASE_ADAPTER), (PROMPTS[1], "mlp")]
        alone = [run(generate_with_ids(engine, request(p, a, max_tokens=16))) for p, a in cases]
        mixed = run(_staggered(engine, [request(p, a, max_tokens=16) for p, a in cases], [0, 2, 0, 0]))
    finally:
        run(engine.stop())
    assert [m.text for m in mixed] == [x[0].text for x in alone]
    stops = stop_token_ids(tokenizer)
    for (p, a), (_, ids, _) in zip(cases, alone):
        adapter_dir = None if a == BASE_ADAPTER else reg.resolve("t1", a)[0]
        assert ids == peft_greedy(base_fp32, adapter_dir, _render(tokenizer, p), stops, 16), (p, a)
