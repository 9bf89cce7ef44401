"""Issue 2's GPU proof: the training core for 20 steps and the engine answering a chat, on a
ChatGLM3-6B-shaped random-weight model in NF4 (the shape bench/reference/seed_recipe_bench.py
builds, shared at /tmp/glm6b), bf16 compute, everything on the GPU (no silent CPU fallback).

    python bench/gpu_smoke.py            # writes $OUT/gpu_smoke.json
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

RESULTS: dict = {}


def rec(key, value):
    RESULTS[key] = value
    print(json.dumps({key: value}), flush=True)


class StepTimer:
    """Progress callback: records loss and wall time per logging step; asserts the GPU is used."""

    def __init__(self):
        self.points = []
        self.t0 = time.perf_counter()

    def event(self, message, *, level="info", data=None):
        print(f"[event] {message}", flush=True)

    def progress(self, p, trained_tokens):
        self.points.append({"step": p.step, "loss": p.loss, "t": time.perf_counter() - self.t0,
                            "tokens_per_s": p.tokens_per_second,
                            "label_tokens_per_s": p.label_tokens_per_second})

    def should_stop(self):
        return False


def main():
    assert torch.cuda.is_available(), "this script proves the GPU path; no CUDA device found"
    import serving  # bench/serving.py: builds the 6B-shaped base with the fixture's ChatGLM3 tokenizer

    work = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    args = type("A", (), {"tiny": False, "work": str(work), "checkpoint": "/tmp/glm6b"})()
    base = serving.build_base(args)
    rec("env", {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__})

    # ---- training core, 20 steps -------------------------------------------------------
    from service.core.domain import TrainingSpec
    from workers.training import TrainingRun, run_training

    rows = [json.loads(line) for line in (ROOT / "service/data/advertisegen_sample.jsonl").read_text().splitlines() if line.strip()]
    convs = [[{"role": "user", "content": r["content"]}, {"role": "assistant", "content": r["summary"]}] for r in rows]
    spec = TrainingSpec(max_steps=20, batch_size=16, learning_rate=2e-4, lora_r=8, checkpoint_steps=1000,
                        eval_max_samples=0)
    timer = StepTimer()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    outcome = run_training(TrainingRun(job_id="ftjob-gpusmoke", tenant="bench", base_model_ref=base, spec=spec,
                                       train_conversations=convs, work_dir=work / "job", device="cuda",
                                       models_cache_dir=work / "models", keep_checkpoints=False), timer)
    wall = time.perf_counter() - t
    steps = timer.points
    step_times = [b["t"] - a["t"] for a, b in zip(steps, steps[1:])]
    rec("training", {"steps": outcome.report.steps, "wall_s": round(wall, 1),
                     "median_step_s": round(sorted(step_times)[len(step_times) // 2], 3) if step_times else None,
                     "first_loss": steps[0]["loss"] if steps else None, "last_loss": steps[-1]["loss"] if steps else None,
                     "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                     "plan": outcome.report.memory_plan, "trained_tokens": outcome.report.trained_tokens,
                     "adapter_files": sorted(p.name for p in outcome.adapter_dir.iterdir())})
    import gc
    gc.collect(); torch.cuda.empty_cache()

    # ---- engine answering a chat with that adapter ------------------------------------
    from service.core.config import Settings
    from service.core.domain import ChatMessage, GenerationRequest, SamplingParams
    from service.core.registry import AdapterRegistry
    from service.inference.engine import InferenceEngine

    registry = AdapterRegistry(work / "adapters")
    manifest = registry.publish(tenant="bench", name="smoke", source_dir=outcome.adapter_dir, manifest=outcome.adapter.manifest_fields(outcome.report))
    settings = Settings(data_dir=work / "data", base_model=base, device="cuda", max_batch_size=8, max_seq_len=512)

    async def chat():
        engine = InferenceEngine(settings, registry, base_model_ref=base, device="cuda")
        torch.cuda.reset_peak_memory_stats()
        await engine.start()
        out = {}
        for adapter in ("__base__", manifest.name):
            req = GenerationRequest(tenant="bench", adapter=adapter,
                                    messages=[ChatMessage(role="user", content="类型#裙*材质#蕾丝")],
                                    params=SamplingParams(max_tokens=32, temperature=0.0))
            t0 = time.perf_counter()
            res = await engine.generate(req)
            out[adapter] = {"completion_tokens": res.completion_tokens, "finish": res.finish_reason,
                            "seconds": round(time.perf_counter() - t0, 3)}
        stats = engine.stats()
        out["device"] = stats.get("device")
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        # No silent CPU fallback: the base weights must live on the GPU.
        out["weights_on_cuda"] = all(p.device.type == "cuda" for p in engine._runner.model.parameters()) \
            if hasattr(engine, "_runner") else None
        await engine.stop()
        return out

    rec("engine_chat", asyncio.run(chat()))
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_smoke.json").write_text(json.dumps(RESULTS, indent=1, default=str))


if __name__ == "__main__":
    main()
