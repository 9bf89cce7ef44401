"""Adapter cache: refusal of mismatched / tampered adapters, republish, single load under
concurrency, LRU eviction under a byte budget, in-use adapters never evicted, loading beside
decoding, preload + pin."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from inference_helpers import FIXTURE, PROMPTS, engine_settings, publish, request, run
from service.core.errors import AdapterMismatch, IntegrityError, NotFound, ServiceUnavailable
from service.core.registry import AdapterRegistry
from service.inference.engine import InferenceEngine

# fp32 tiny model, LoRA on q/k/v of 3 layers: (64+64 + 64+32 + 64+32) * 3 layers * 4 bytes.
BYTES_PER_RANK = 3840


def _start(tmp_path_factory, registry, **kw):
    engine = InferenceEngine(engine_settings(tmp_path_factory.mktemp("data"), FIXTURE, **kw), registry)
    run(engine.start())
    assert engine._runner.bytes_per_column == BYTES_PER_RANK
    return engine


@pytest.fixture(scope="module")
def registry(tmp_path_factory, base_fp32):
    reg = AdapterRegistry(tmp_path_factory.mktemp("registry"))
    for i, name in enumerate(["a", "b", "c"]):
        publish(reg, base_fp32, tenant="t1", name=name, seed=10 + i, r=4)
    return reg


@pytest.fixture(scope="module")
def engine(tmp_path_factory, registry):
    """Room for exactly two rank-4 adapters on the 'GPU'."""
    engine = _start(tmp_path_factory, registry, adapter_gpu_budget_bytes=8 * BYTES_PER_RANK)
    yield engine
    run(engine.stop())


def _resident(engine):
    return {(a["name"], a["version"]) for a in engine.stats()["adapters"]["resident"]}


def _answer(engine, adapter, prompt=PROMPTS[0], max_tokens=12, **kw):
    return run(engine.generate(request(prompt, adapter, max_tokens=max_tokens, **kw)))


def test_mismatched_adapters_are_refused(engine, registry, base_fp32):
    publish(registry, base_fp32, tenant="t1", name="other-base", seed=1, base_model_name="THUDM/chatglm3-6b")
    publish(registry, base_fp32, tenant="t1", name="o-proj", seed=2, targets=["o_proj"])
    # Manifest claims q/k/v, weights are on the MLP: the weights decide.
    publish(registry, base_fp32, tenant="t1", name="liar", seed=3, targets=["down_proj"],
            manifest_targets=["q_proj"])
    # Same base name, but trained on a base whose config differs (the trainer writes
    # service.models.base_model_fingerprint into every manifest).
    publish(registry, base_fp32, tenant="t1", name="other-config", seed=6, base_model_fingerprint="0" * 64)
    for name, needle in (("other-base", "trained on base"), ("o-proj", "o_proj"), ("liar", "down_proj"),
                         ("other-config", "fingerprint")):
        with pytest.raises(AdapterMismatch) as err:
            _answer(engine, name)
        assert needle in err.value.message and err.value.status_code == 409
    with pytest.raises(NotFound):
        _answer(engine, "no-such-adapter")
    with pytest.raises(NotFound):  # another tenant's adapter does not exist for t2
        _answer(engine, "a", tenant="t2")
    # Nothing of them reached the GPU (other tests of this module's engine may have left
    # their own adapters resident), and the base still answers.
    refused = {"other-base", "o-proj", "liar", "other-config", "no-such-adapter"}
    assert not {n for n, _ in _resident(engine)} & refused, _resident(engine)
    assert _answer(engine, "__base__").finish_reason == "length"


def test_tampered_adapter_is_refused(engine, registry, base_fp32):
    publish(registry, base_fp32, tenant="t1", name="tampered", seed=4)
    path, _ = registry.resolve("t1", "tampered")
    data = bytearray((path / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        _answer(engine, "tampered")


def test_adapter_larger_than_budget_is_refused(engine, registry, base_fp32):
    publish(registry, base_fp32, tenant="t1", name="huge", seed=5, r=16)
    with pytest.raises(ServiceUnavailable) as err:
        _answer(engine, "huge")
    assert "budget" in err.value.message


def test_republished_adapter_serves_new_weights(engine, registry, base_fp32):
    publish(registry, base_fp32, tenant="t1", name="re", seed=21)
    publish(registry, base_fp32, tenant="t1", name="re-v2-twin", seed=22)  # v2's weights, other name
    v1 = _answer(engine, "re")
    assert v1.adapter_version == 1
    publish(registry, base_fp32, tenant="t1", name="re", seed=22)
    v2 = _answer(engine, "re")
    assert v2.adapter_version == 2
    assert v2.text == _answer(engine, "re-v2-twin").text != v1.text
    assert ("re", 1) not in _resident(engine)  # the stale version left the GPU


def test_concurrent_first_requests_load_once(engine, registry, base_fp32):
    publish(registry, base_fp32, tenant="t1", name="popular", seed=31)
    before = engine.stats()["adapters"]

    async def go():
        return await asyncio.gather(*[engine.generate(request(PROMPTS[i % 3], "popular", max_tokens=8))
                                      for i in range(12)])
    results = run(go())
    after = engine.stats()["adapters"]
    assert after["loads"] - before["loads"] == 1
    assert after["uploads"] - before["uploads"] == 1
    delta = {k: after[k] - before[k] for k in ("misses", "hits", "joined_load")}
    assert delta["misses"] + delta["hits"] == 12
    assert delta["misses"] - delta["joined_load"] == 1  # exactly one request started the load
    for i, r in enumerate(results):
        assert r.text == results[i % 3].text


def test_lru_eviction_under_a_tiny_budget(engine):
    first_a = _answer(engine, "a").text
    _answer(engine, "b")
    assert {"a", "b"} <= {n for n, _ in _resident(engine)}
    before = engine.stats()["adapters"]
    _answer(engine, "c")  # budget holds two: "a" (least recently used) goes
    st = engine.stats()["adapters"]
    assert {n for n, _ in _resident(engine)} == {"b", "c"}
    assert st["evictions"] > before["evictions"]
    assert st["gpu_bytes_used"] <= st["gpu_budget_bytes"] == 8 * BYTES_PER_RANK
    # Back from the CPU tier (no registry read), same answer.
    again = _answer(engine, "a")
    st2 = engine.stats()["adapters"]
    assert again.text == first_a
    assert st2["loads"] == st["loads"] and st2["cpu_hits"] == st["cpu_hits"] + 1


def test_adapters_in_use_are_never_evicted(engine):
    from harness import DecodeStepper

    expected = {n: _answer(engine, n, max_tokens=40).text for n in ("a", "b", "c")}

    async def go():
        # a and b fill the budget and keep decoding (held after 2 steps); c must wait for one
        # of them to finish instead of evicting an adapter in use.
        with DecodeStepper(engine._runner) as stepper:
            ta = asyncio.create_task(engine.generate(request(PROMPTS[0], "a", max_tokens=40)))
            tb = asyncio.create_task(engine.generate(request(PROMPTS[0], "b", max_tokens=40)))
            target = stepper.grant(2)
            end = time.monotonic() + 120
            while not stepper.ran(target):
                assert time.monotonic() < end and not (ta.done() or tb.done())
                await asyncio.sleep(0.002)
            assert engine.stats()["running"] == 2
            tc = asyncio.create_task(engine.generate(request(PROMPTS[0], "c", max_tokens=40)))
            stepper.open()
            return await asyncio.gather(ta, tb, tc)
    _answer(engine, "a"), _answer(engine, "b")  # make a and b resident first
    ra, rb, rc = run(go())
    assert (ra.text, rb.text, rc.text) == (expected["a"], expected["b"], expected["c"])


def test_loading_runs_beside_decoding(engine, registry, base_fp32, monkeypatch):
    """A slow registry read does not pause a running stream: the adapter's verify blocks
    until the base stream has delivered 10 more tokens, which it can only do if decoding
    goes on beside the load (else the wait times out). No timing involved: the base stream
    is held at its 2nd decode step until the load has begun, so it is still running then."""
    from harness import DecodeGate

    publish(registry, base_fp32, tenant="t1", name="slowload", seed=41)
    orig_verify = registry.verify
    load_started, load_may_finish = threading.Event(), threading.Event()

    def slow_verify(*a, **kw):
        load_started.set()
        assert load_may_finish.wait(60), "the base stream made no progress while the adapter loaded"
        return orig_verify(*a, **kw)
    monkeypatch.setattr(registry, "verify", slow_verify)
    gate = DecodeGate(engine._runner, hold_at=2)
    monkeypatch.setattr(engine._runner, "decode", gate)

    async def until(predicate, what):
        end = time.monotonic() + 60
        while not predicate():
            assert time.monotonic() < end, f"timed out waiting for {what}"
            await asyncio.sleep(0.01)

    async def go():
        stream = await engine.stream(request(PROMPTS[1], max_tokens=100, stop=["\x00never"]))
        deltas: list[str] = []

        async def consume():
            async for d in stream:
                deltas.append(d)
        task = asyncio.create_task(consume())
        await until(gate.held.is_set, "the base stream to be decoding")
        loading = asyncio.create_task(engine.generate(request(PROMPTS[0], "slowload", max_tokens=4)))
        await until(load_started.is_set, "the adapter load to start")
        gate.release()
        at_start = len(stream.token_ids)
        await until(lambda: len(stream.token_ids) >= at_start + 10 or stream.finish_reason,
                    "base tokens during the load")
        during = len(stream.token_ids) - at_start
        load_may_finish.set()
        loaded = await loading
        await task
        return loaded, during, stream
    try:
        loaded, during, stream = run(go())
    finally:
        gate.release()
        load_may_finish.set()
    assert during >= 10, f"only {during} base tokens while the adapter loaded (stream ended: {stream.finish_reason})"
    assert loaded.finish_reason == "length" and loaded.adapter == "slowload"
    assert stream.finish_reason == "length"


def test_preload_pins_adapters(tmp_path_factory, registry):
    engine = _start(tmp_path_factory, registry, adapter_gpu_budget_bytes=8 * BYTES_PER_RANK,
                    preload_adapters=["t1/a"])
    try:
        st = engine.stats()["adapters"]
        assert [(a["name"], a["pinned"]) for a in st["resident"]] == [("a", True)]
        _answer(engine, "b")
        _answer(engine, "c")  # evicts b, never the pinned a
        assert {n for n, _ in _resident(engine)} == {"a", "c"}
    finally:
        run(engine.stop())


def test_deleted_adapter_leaves_the_gpu(engine, registry, base_fp32):
    publish(registry, base_fp32, tenant="t1", name="doomed", seed=41)
    _answer(engine, "doomed")
    assert "doomed" in {n for n, _ in _resident(engine)}
    used = engine.stats()["adapters"]["gpu_bytes_used"]
    registry.delete("t1", "doomed")
    engine.evict_adapter("t1", "doomed")
    # The decode thread frees columns at the start of each iteration; the iteration that
    # serves this request has run after the delete was marked.
    _answer(engine, "__base__")
    st = engine.stats()["adapters"]
    assert "doomed" not in {n for n, _ in _resident(engine)}
    assert st["gpu_bytes_used"] == used - 4 * BYTES_PER_RANK
    with pytest.raises(NotFound):
        _answer(engine, "doomed")
