"""A base whose positions are learned and limited (GPT-2, here n_positions=48 with
TUNESERVE_MAX_SEQ_LEN=96), issue 11 item 7: the engine's context is the smaller of the two, a
too-long prompt is refused with context_length_exceeded, a reply that would pass the limit
ends with finish_reason "length" (no position past the table is ever looked up: on CUDA that
would be a device-side assert killing the process), and a request whose prefill fails ends
alone, never the requests batched with it."""
from __future__ import annotations

import asyncio
import time

import pytest
from inference_helpers import accepted_together, engine_settings, request, run
from tiny_bases import build_base

from service.core.domain import ChatMessage, GenerationRequest, SamplingParams
from service.core.errors import InvalidInput, ServiceUnavailable
from service.core.registry import AdapterRegistry
from service.inference.engine import InferenceEngine

N_POSITIONS = 48


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    base = build_base("gpt2", tmp_path_factory.mktemp("models") / "gpt2-tiny", n_positions=N_POSITIONS)
    # NF4 as served: bitsandbytes turns GPT-2's Conv1D projections into Linear4bit layers.
    settings = engine_settings(tmp_path_factory.mktemp("data"), base, max_seq_len=96, load_in_4bit=True)
    engine = InferenceEngine(settings, AdapterRegistry(tmp_path_factory.mktemp("registry")))
    run(engine.start())
    yield engine
    run(engine.stop())


@pytest.fixture
def positions_seen(gpt2, monkeypatch):
    """Every position id the model's position table is asked for (a forward hook on wpe)."""
    import torch
    wpe = next(m for n, m in _modules(gpt2) if n.endswith("wpe") and isinstance(m, torch.nn.Embedding))
    assert wpe.num_embeddings == N_POSITIONS
    seen: list[int] = []
    handle = wpe.register_forward_pre_hook(lambda _m, args: seen.append(int(args[0].max())))
    yield seen
    handle.remove()


def _modules(engine):
    for obj in (getattr(engine._runner, "model", None), getattr(engine._runner, "inner", None)):
        if obj is not None:
            return list(obj.named_modules())
    raise AssertionError("runner exposes no model")


def _prompt(engine, n_tokens: int) -> str:
    """A user message whose rendered prompt is exactly n_tokens long."""
    from service.models import render_chat
    words = ["fox"] * n_tokens
    while True:
        text = " ".join(words)
        n = len(render_chat(engine.tokenizer, [{"role": "user", "content": text}]))
        if n == n_tokens:
            return text
        assert n > n_tokens, "could not hit the length"
        words.pop()


def test_the_context_is_the_models_position_limit(gpt2):
    assert gpt2.max_seq_len == N_POSITIONS
    assert gpt2.stats()["max_seq_len"] == N_POSITIONS
    with pytest.raises(InvalidInput) as err:
        run(gpt2.generate(request(_prompt(gpt2, N_POSITIONS))))
    assert err.value.code == "context_length_exceeded" and err.value.param == "messages"
    asked = GenerationRequest(tenant="t1", adapter="__base__",
                              messages=[ChatMessage(role="user", content=_prompt(gpt2, 40))],
                              params=SamplingParams(max_tokens=30, temperature=0.0), max_tokens_field="max_tokens")
    with pytest.raises(InvalidInput) as err:
        run(gpt2.generate(asked))
    assert err.value.code == "context_length_exceeded" and err.value.param == "max_tokens"


def test_a_reply_reaching_the_limit_ends_with_length_and_spares_its_neighbour(gpt2, positions_seen):
    short = request("hello world", max_tokens=12)
    alone = run(gpt2.generate(short))

    async def together():
        return await asyncio.gather(gpt2.generate(request(_prompt(gpt2, 40), max_tokens=40)), gpt2.generate(short))
    long_res, short_res = run(together())
    assert long_res.finish_reason in ("length", "stop")
    # Positions 0..47 are all the model reads; the last token is sampled from position 47's
    # logits and never fed back, so prompt + reply may hold one token more than the table.
    assert long_res.prompt_tokens + long_res.completion_tokens <= N_POSITIONS + 1
    assert (short_res.text, short_res.finish_reason) == (alone.text, alone.finish_reason)
    assert positions_seen and max(positions_seen) <= N_POSITIONS - 1


def test_a_failing_prefill_ends_only_its_own_request(gpt2, monkeypatch):
    poisoned = _prompt(gpt2, 20)
    from service.models import render_chat
    poisoned_ids = render_chat(gpt2.tokenizer, [{"role": "user", "content": poisoned}])
    from harness import DecodeGate

    runner = gpt2._runner
    orig_prefill = runner.prefill
    batches: list[int] = []

    def prefill(slots, prompts, hw):
        batches.append(len(slots))
        if any(list(p) == poisoned_ids for p in prompts):
            raise IndexError("index out of range in self")
        return orig_prefill(slots, prompts, hw)
    monkeypatch.setattr(runner, "prefill", prefill)
    healthy = request("hello world", max_tokens=6)
    expected = run(gpt2.generate(healthy)).text
    # The loop is held in the busy request's first decode step until both requests have been
    # admitted (queued), so its next prefill takes them together (not a sleep long enough here).
    gate = DecodeGate(runner, hold_at=1)
    monkeypatch.setattr(runner, "decode", gate)

    async def until(predicate, what):
        end = time.monotonic() + 60
        while not predicate():
            assert time.monotonic() < end, f"timed out waiting for {what}"
            await asyncio.sleep(0.005)

    async def go():
        busy = asyncio.ensure_future(gpt2.generate(request("the quick brown fox", max_tokens=30)))
        await until(gate.held.is_set, "the busy request's first decode step")
        both = asyncio.gather(gpt2.generate(request(poisoned, max_tokens=6)), gpt2.generate(healthy),
                              return_exceptions=True)
        await until(lambda: gpt2.stats()["queue_depth"] == 2, "both requests queued")
        gate.release()
        return await both, await busy
    (bad, good), busy = run(go())
    assert isinstance(bad, ServiceUnavailable) and "prefill failed" in str(bad)
    assert not isinstance(good, BaseException) and good.text == expected
    assert busy.finish_reason in ("length", "stop")
    assert 2 in batches, f"the two requests were never prefilled together: {batches}"
    assert not gate.hold_timed_out


DECODE_LIMIT = 28  # positions the failing hook below refuses in a decode step


@pytest.fixture
def decode_fails_past_limit(gpt2):
    """The model itself raises (as GPT-2 did past its table) in any decode step holding a row
    at position >= DECODE_LIMIT: the failure comes from one row's data, not from a stub.
    Yields the row counts of the steps that raised."""
    import torch
    wpe = next(m for n, m in _modules(gpt2) if n.endswith("wpe") and isinstance(m, torch.nn.Embedding))
    failed_rows: list[int] = []

    def hook(_m, args):
        positions = args[0]
        if positions.shape[-1] == 1 and int(positions.max()) >= DECODE_LIMIT:
            failed_rows.append(positions.shape[0])
            raise IndexError("index out of range in self")
    handle = wpe.register_forward_pre_hook(hook)
    yield failed_rows
    handle.remove()


def test_a_failing_decode_ends_only_its_own_request(gpt2, decode_fails_past_limit):
    from service.models import render_chat
    healthy = [request("hello world", max_tokens=12), request("a red coat", max_tokens=12),
               request("one line", max_tokens=12, temperature=0.8, seed=7)]
    for h in healthy:  # none of them reaches the failing positions
        n_prompt = len(render_chat(gpt2.tokenizer, [{"role": "user", "content": h.messages[0].content}]))
        assert n_prompt + h.params.max_tokens <= DECODE_LIMIT
    alone = [run(gpt2.generate(h)) for h in healthy]
    assert decode_fails_past_limit == []
    # Its 5th decode step reads position 28, while the others still need tokens.
    assert all(a.completion_tokens > 5 for a in alone), [a.completion_tokens for a in alone]
    culprit = request(_prompt(gpt2, DECODE_LIMIT - 4), max_tokens=12)
    splits = gpt2.counters["decode_steps_split"]

    bad, *good = run(accepted_together(gpt2, [culprit, *healthy]))
    assert isinstance(bad, ServiceUnavailable) and "decode failed: index out of range" in str(bad)
    assert [(g.text, g.finish_reason, g.completion_tokens) for g in good] == \
        [(a.text, a.finish_reason, a.completion_tokens) for a in alone]
    # Refused first in the step shared by all four, which was then split (the culprit
    # refused again alone).
    assert max(decode_fails_past_limit) == 4 and decode_fails_past_limit[-1] == 1, decode_fails_past_limit
    assert gpt2.counters["decode_steps_split"] == splits + 1
    assert run(gpt2.generate(healthy[0])).text == alone[0].text  # the engine keeps serving
