"""Per-request behaviour: stop strings, seeds, sampling knobs, max_tokens, queue bound,
timeouts, cancelled streams."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from inference_helpers import FIXTURE, PROMPTS, engine_settings, generate_with_ids, publish, request, run
from service.core.errors import InvalidInput, QueueFull, RequestTimeout
from service.core.registry import AdapterRegistry
from service.inference.engine import InferenceEngine
from service.inference.sampling import SamplingState


@pytest.fixture(scope="module")
def engine(tmp_path_factory, base_fp32):
    registry = AdapterRegistry(tmp_path_factory.mktemp("registry"))
    publish(registry, base_fp32, tenant="t1", name="a1", seed=7)
    settings = engine_settings(tmp_path_factory.mktemp("data"), FIXTURE, max_seq_len=128)
    engine = InferenceEngine(settings, registry)
    run(engine.start())
    yield engine
    run(engine.stop())


@pytest.fixture
def slow_decode(engine, monkeypatch):
    """Make every decode step take at least `delay` seconds (the tiny model is too fast to
    observe timeouts and cancellation otherwise); returns a list whose length is the number
    of decode steps run since."""
    def apply(delay: float) -> list:
        orig = engine._runner.decode
        steps: list[None] = []

        def slow(*a, **kw):
            time.sleep(delay)
            steps.append(None)
            return orig(*a, **kw)
        monkeypatch.setattr(engine._runner, "decode", slow)
        return steps
    return apply


async def _wait_until(predicate, timeout: float, what: str) -> None:
    """Poll on the event loop (the engine answers on it) until predicate() holds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.01)


async def _wait_idle(engine, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = engine.stats()
        if st["running"] == 0 and st["queue_depth"] == 0:
            return st
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine not idle: {engine.stats()}")


def test_stop_strings_trim_and_never_leak(engine):
    full = run(engine.generate(request(PROMPTS[4], "a1", max_tokens=30))).text
    # A stop string from the middle of the greedy answer (clean characters only).
    i = next(i for i in range(4, len(full) - 2) if "\ufffd" not in full[i:i + 2] and full.find(full[i:i + 2]) == i)
    stop = full[i:i + 2]
    res, _, deltas = run(generate_with_ids(engine, request(PROMPTS[4], "a1", max_tokens=30,
                                                           stop=["never-there", stop])))
    assert res.finish_reason == "stop"
    assert res.text == full[:i] == "".join(deltas)
    assert not any(stop in d for d in deltas)
    assert res.completion_tokens < 30


def test_max_tokens_and_usage(engine):
    res = run(engine.generate(request(PROMPTS[0], max_tokens=5)))
    assert (res.finish_reason, res.completion_tokens) == ("length", 5)
    assert res.prompt_tokens > 0 and res.adapter == "__base__"


def test_stats_time_the_decode_steps(engine):
    """A request of 6 tokens: its prefill gives the first, five decode steps the rest; the
    steps after the first completion are timed (beside the prefill or plain). (Only a lower
    bound on the count: a request another test left decoding would add its own steps.)"""
    engine.step_times.reset()
    run(engine.generate(request(PROMPTS[0], max_tokens=6)))
    timed = engine.stats()["step_ms"]
    assert sum(kind["n"] for kind in timed.values()) >= 1
    assert all(kind["p50"] > 0 and kind["max"] >= kind["p50"] for kind in timed.values())


def test_prompt_too_long_is_refused(engine):
    with pytest.raises(InvalidInput) as err:
        run(engine.generate(request("字" * 400)))
    assert err.value.param == "messages"


def test_base_model_name_means_base(engine):
    a = run(engine.generate(request(PROMPTS[1], engine.base_model_name, max_tokens=8)))
    b = run(engine.generate(request(PROMPTS[1], max_tokens=8)))
    assert a.text == b.text and a.adapter == "__base__"


def test_seed_reproducible_alone_and_in_a_batch(engine):
    kw = dict(max_tokens=20, temperature=1.0, top_p=1.0)
    one = run(engine.generate(request(PROMPTS[0], "a1", seed=42, **kw))).text
    two = run(engine.generate(request(PROMPTS[0], "a1", seed=42, **kw))).text
    other = run(engine.generate(request(PROMPTS[0], "a1", seed=43, **kw))).text
    greedy = run(engine.generate(request(PROMPTS[0], "a1", max_tokens=20))).text
    assert one == two and one != other and one != greedy

    async def batch():
        noise = [engine.generate(request(p, "a1", seed=i, **kw)) for i, p in enumerate(PROMPTS)]
        return await asyncio.gather(engine.generate(request(PROMPTS[0], "a1", seed=42, **kw)), *noise)
    assert run(batch())[0].text == one
    # top_k=1 is greedy whatever the temperature.
    assert run(engine.generate(request(PROMPTS[0], "a1", seed=5, top_k=1, **kw))).text == greedy


def test_repetition_penalty_matches_transformers(engine, base_fp32, tokenizer):
    from service.models import render_chat, stop_token_ids

    ids = render_chat(tokenizer, [{"role": "user", "content": PROMPTS[0]}])
    res, got, _ = run(generate_with_ids(engine, request(PROMPTS[0], max_tokens=20, repetition_penalty=1.5)))
    with torch.no_grad():
        out = base_fp32.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=20, do_sample=False, repetition_penalty=1.5,
                                 eos_token_id=stop_token_ids(tokenizer), pad_token_id=0)
    want = [t for t in out[0, len(ids):].tolist() if t not in stop_token_ids(tokenizer)]
    assert got == want
    plain = run(engine.generate(request(PROMPTS[0], max_tokens=20))).text
    assert res.text != plain


def test_sampler_top_k_top_p_and_distribution():
    vocab = 6
    state = SamplingState(num_slots=3, vocab=vocab, device=torch.device("cpu"))
    probs = torch.tensor([0.45, 0.3, 0.15, 0.05, 0.03, 0.02])
    logits = probs.log()[None].repeat(3, 1)
    slots = torch.arange(3)
    counts = torch.zeros(3, vocab)
    for seed in range(3000):
        for s, (k, p) in enumerate([(0, 1.0), (2, 1.0), (0, 0.7)]):
            state.set_slot(s, temperature=1.0, top_p=p, top_k=k, penalty=1.0, seed=seed, prompt_ids=[])
        tok = state.sample(logits, slots, [0, 1, 2])
        counts[torch.arange(3), tok] += 1
    freq = counts / counts.sum(1, keepdim=True)
    assert torch.allclose(freq[0], probs, atol=0.03)          # plain sampling follows the distribution
    assert freq[1, 2:].sum() == 0 and abs(freq[1, 0] - 0.6) < 0.04  # top_k=2: renormalised top two
    assert freq[2, 2:].sum() == 0                             # top_p=0.7: 0.45+0.3 reaches it
    # Same seed and counter -> same token, whatever else is in the batch.
    state.set_slot(0, temperature=1.0, top_p=1.0, top_k=0, penalty=1.0, seed=99, prompt_ids=[])
    a = state.sample(logits[:1], slots[:1], [0]).item()
    b = state.sample(logits, slots, [0, 1, 2])[0].item()
    assert a == b


def test_queue_full_answers_retry_after(engine, slow_decode, monkeypatch):
    slow_decode(0.05)

    async def go():
        streams = [await engine.stream(request(p, max_tokens=60)) for p in PROMPTS[:4]]  # fill 4 slots
        await _wait_until(lambda: engine.stats()["running"] == 4, 60, "4 running requests")
        monkeypatch.setattr(engine.settings, "max_queue", 2)
        streams += [await engine.stream(request(PROMPTS[0], max_tokens=60)) for _ in range(2)]  # queued
        with pytest.raises(QueueFull) as err:
            await engine.stream(request(PROMPTS[0], max_tokens=60))
        assert err.value.retry_after >= 1 and err.value.status_code == 429
        for s in streams:
            await s.aclose()
        await _wait_idle(engine)
    run(go())


def test_timeout_before_first_token_raises(engine, slow_decode):
    slow_decode(0.05)

    async def go():
        # Keep every slot busy so the short request can only wait in the queue.
        busy = [await engine.stream(request(p, max_tokens=60)) for p in PROMPTS[:4]]
        with pytest.raises(RequestTimeout):
            await engine.generate(request(PROMPTS[0], timeout_s=0.2))
        for s in busy:
            await s.aclose()
        await _wait_idle(engine)
    run(go())
    assert engine.stats()["counters"]["finish_timeout"] >= 1


def test_timeout_mid_generation_finishes_with_timeout(engine, monkeypatch):
    """The engine is held at its 3rd decode step until the request's deadline has passed, so
    the timeout lands mid-generation whatever the machine's speed."""
    from harness import DecodeGate

    gate = DecodeGate(engine._runner, hold_at=3)
    monkeypatch.setattr(engine._runner, "decode", gate)

    async def go():
        task = asyncio.create_task(engine.generate(request(PROMPTS[0], max_tokens=100, timeout_s=0.5)))
        await _wait_until(gate.held.is_set, 60, "the engine to reach decode step 3")
        held_at = time.monotonic()  # after the request was admitted, so after its deadline started
        await _wait_until(lambda: time.monotonic() > held_at + 0.5, 60, "the request's deadline to pass")
        gate.release()
        return await task
    try:
        res = run(go())
    finally:
        gate.release()
    assert res.finish_reason == "timeout" and 0 < res.completion_tokens < 100
    run(_wait_idle(engine))


def test_cancelled_stream_frees_its_slot(engine, slow_decode):
    steps = slow_decode(0.03)
    got: list[str] = []

    async def consume(stream, n):
        async for d in stream:
            got.append(d)
            if len(got) == n:
                await asyncio.sleep(10)  # a slow client; cancelled below
        return got

    async def go():
        await _wait_idle(engine)  # requests an earlier test cancelled are counted before we start
        before = engine.stats()["counters"].get("finish_cancelled", 0)
        # 1) the consumer task is cancelled (what a client disconnect does to the SSE task)
        s1 = await engine.stream(request(PROMPTS[0], max_tokens=100))
        task = asyncio.create_task(consume(s1, 2))
        await _wait_until(lambda: len(got) == 2, 60, "two deltas")
        assert engine.stats()["running"] == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The stream hands the cancel to the engine from the task's done callback, which may
        # run after this await resumes: count steps from when the engine has it.
        await _wait_until(lambda: s1.finish_reason == "cancelled", 60, "the cancel to reach the engine")
        at_cancel = len(steps)
        await _wait_idle(engine)
        # Freed at the next step boundary: at most the step in flight and one more ran.
        assert len(steps) - at_cancel <= 2, len(steps) - at_cancel
        assert s1.finish_reason == "cancelled"
        # 2) the consumer closes the stream early
        s2 = await engine.stream(request(PROMPTS[1], "a1", max_tokens=100))
        async for _ in s2:
            break
        await s2.aclose()
        await _wait_idle(engine)
        after = engine.stats()
        assert after["counters"]["finish_cancelled"] - before == 2
        assert all(a["refs"] == 0 for a in after["adapters"]["resident"])  # adapter lease returned
        # The slot serves new requests.
        res = await engine.generate(request(PROMPTS[2], max_tokens=4))
        assert res.finish_reason == "length"
    run(go())


def test_stream_can_be_iterated_without_awaiting(engine):
    async def go():
        deltas = [d async for d in engine.stream(request(PROMPTS[0], max_tokens=6))]
        whole = await engine.generate(request(PROMPTS[0], max_tokens=6))
        assert "".join(deltas) == whole.text
        from service.core.errors import NotFound
        with pytest.raises(NotFound):  # admission errors surface on the first step
            async for _ in engine.stream(request(PROMPTS[0], "missing")):
                pass
    run(go())


class _CharTokenizer:
    """Token id = code point: lets TextTracker be tested character by character."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _track(text, stop=(), glm=False):
    from service.inference.streaming import TextTracker

    t = TextTracker(_CharTokenizer(), list(stop), chatglm3_reply=glm)
    deltas = [t.push(ord(c)) for c in text] + [t.flush()]
    assert "".join(deltas) == t.emitted
    return t.emitted, t.stopped, deltas


def test_text_tracker_stop_strings_and_chatglm3_reply_head():
    assert _track("abc STOP def", ["STOP"])[:2] == ("abc ", True)
    emitted, stopped, deltas = _track("abc STO", ["STOP"])  # a prefix is held, then released at the end
    assert (emitted, stopped) == ("abc STO", False) and deltas[-1] == "STO"
    assert _track("x<|a|b", ["|b", "<|a"])[0] == "x"        # the earliest stop wins
    # ChatGLM3 replies: an empty metadata line and the content's leading blanks are dropped,
    # a real metadata line (tool call) is kept, and a reply without one is not held back.
    assert _track(" \n hello", glm=True)[0] == "hello"
    assert _track("tool\n{}", glm=True)[0] == "tool\n{}"
    emitted, _, deltas = _track("plain answer without a head line", glm=True)
    assert emitted == "plain answer without a head line" and deltas[10] != ""
