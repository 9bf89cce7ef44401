"""The CUDA path: NF4 base with bf16 compute on the GPU, decode steps replayed as CUDA
graphs. Same correctness bar as on the CPU: mixed batches equal requests alone, graphs
equal eager, and nothing silently falls back to the CPU or to eager decoding."""
from __future__ import annotations

import asyncio

import pytest
import torch

from inference_helpers import FIXTURE, PROMPTS, engine_settings, publish, request, run
from service.core.domain import BASE_ADAPTER
from service.core.registry import AdapterRegistry
from service.inference.engine import InferenceEngine

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = [(PROMPTS[0], "g1"), (PROMPTS[1], "g2"), (PROMPTS[2], BASE_ADAPTER), (PROMPTS[3], "g3"),
         (PROMPTS[0], "g2"), (PROMPTS[4], "g1")]


@pytest.fixture(scope="module")
def gpu_engine(tmp_path_factory, base_fp32):
    registry = AdapterRegistry(tmp_path_factory.mktemp("registry"))
    for i, name in enumerate(["g1", "g2", "g3"]):
        publish(registry, base_fp32, tenant="t1", name=name, seed=300 + i, r=[4, 8, 2][i])
    settings = engine_settings(tmp_path_factory.mktemp("data"), FIXTURE, device="cuda", load_in_4bit=True,
                               cuda_graphs=True, max_batch_size=8, max_seq_len=256)
    engine = InferenceEngine(settings, registry)
    run(engine.start())
    yield engine
    run(engine.stop())


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_cuda_graphs_mixed_batch_equals_alone_and_eager(gpu_engine):
    engine = gpu_engine
    runner = engine._runner
    assert runner.device.type == "cuda" and runner.dtype == torch.bfloat16
    assert engine.stats()["device"].startswith("cuda")
    reqs = [request(p, a, max_tokens=32) for p, a in CASES]

    async def ids_of(r):
        s = await engine.stream(r)
        async for _ in s:
            pass
        return s.token_ids

    async def together():
        tasks = []
        for i, r in enumerate(reqs):
            tasks.append(asyncio.create_task(ids_of(r)))
            await asyncio.sleep(0.005 * (i % 2))
        return await asyncio.gather(*tasks)

    # Every step padded to the full 8 rows, alone or not: the same kernels (bitsandbytes'
    # dequantize + GEMM) for every row, so any difference would be rows leaking into each
    # other (slots, masks, LoRA columns), not rounding.
    runner.min_decode_rows = runner.num_slots
    try:
        alone = [run(ids_of(r)) for r in reqs]
        mixed = run(together())
        st = engine.stats()
        assert st["cuda_graphs"] is True and st["captured_graphs"] > 0  # no silent eager fallback
        runner.use_graphs = False
        try:
            eager_alone = [run(ids_of(r)) for r in reqs]
        finally:
            runner.use_graphs = True
    finally:
        runner.min_decode_rows = 1
    assert mixed == alone
    # Graph replay runs the very kernels eager decoding runs on the same (padded) shapes.
    assert eager_alone == alone
    assert len({tuple(alone[0]), tuple(alone[4]), tuple(alone[5])}) >= 2  # adapters change answers

    # One row alone takes the fused 4-bit GEMV, which rounds differently in bf16: a near-tie
    # of this random tiny model may flip a greedy token. Same first token, and most answers
    # identical; exact batch invariance at any row count is proven on the CPU in fp32.
    single = [run(ids_of(r)) for r in reqs]
    prefixes = [_common_prefix(a, m) for a, m in zip(single, alone)]
    print("common prefix, 1-row GEMV vs 8-row GEMM:", prefixes)
    assert min(prefixes) >= 1, prefixes


def test_cuda_sampling_seeded_and_cancel(gpu_engine):
    engine = gpu_engine
    kw = dict(max_tokens=24, temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.1)
    a = run(engine.generate(request(PROMPTS[0], "g1", seed=11, **kw))).text
    b = run(engine.generate(request(PROMPTS[0], "g1", seed=11, **kw))).text
    assert a == b

    async def cancel():
        s = await engine.stream(request(PROMPTS[1], "g2", max_tokens=200))
        async for _ in s:
            break
        await s.aclose()
        for _ in range(100):
            if engine.stats()["running"] == 0:
                return True
            await asyncio.sleep(0.01)
        return False
    assert run(cancel())
    mem = engine.stats()["memory"]
    assert mem["gpu_allocated_bytes"] > 0 and mem["kv_cache_bytes"] > 0
