"""Data-parallel training through the service's own launch path (issue 5, item 5).

Runs the same job spec twice through `workers.training.run_training`, the function the Celery
task calls: once with `n_gpus=1` (in this process) and once with `n_gpus=2` (the worker's
torchrun launch: two ranks, gradients all-reduced over NCCL). Same rows, same seed, same
effective batch, so the loss curves should agree up to bf16 reduction-order noise, and the
2-GPU run should take about half the time per step.

On a GPU host: the ChatGLM3-6B-shaped random checkpoint (bench/reference/seed_recipe_bench.py's
shape, shared at /tmp/glm6b) in NF4 with bf16 compute. `--tiny` runs the same thing on CPU
(gloo) with the tiny fixture, as a smoke test of the script itself.

    python bench/multi_gpu.py                 # needs 2 GPUs; writes $OUT/multi_gpu.json
    python bench/multi_gpu.py --tiny          # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
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
    print(json.dumps({key: value}, default=str), flush=True)


class Recorder:
    """The Progress protocol the worker uses: keeps progress points and events."""

    def __init__(self):
        self.points: list[dict] = []
        self.events: list[str] = []
        self.t0 = time.perf_counter()

    def event(self, message, *, level="info", data=None):
        self.events.append(message)
        print(f"[event] {message}", flush=True)

    def progress(self, p, trained_tokens):
        self.points.append({"step": p.step, "loss": p.loss, "t": time.perf_counter() - self.t0,
                            "label_tokens_per_s": p.label_tokens_per_second, "tokens_per_s": p.tokens_per_second})

    def should_stop(self):
        return False


def train(base: str, convs: list, work: Path, n_gpus: int, device: str, args) -> dict:
    from service.core.domain import TrainingSpec
    from workers.training import TrainingRun, run_training

    spec = TrainingSpec(max_steps=args.steps, batch_size=args.batch, learning_rate=2e-4, lora_r=8, seed=7,
                        checkpoint_steps=10_000, eval_max_samples=0, n_gpus=n_gpus)
    rec_ = Recorder()
    t = time.perf_counter()
    out = run_training(TrainingRun(job_id=f"ftjob-dp{n_gpus}", tenant="bench", base_model_ref=base, spec=spec,
                                   train_conversations=convs, work_dir=work / f"job-{n_gpus}", device=device,
                                   models_cache_dir=work / "models", keep_checkpoints=False), rec_)
    wall = time.perf_counter() - t
    pts = rec_.points
    # Throughput as the training loop measures it per logging step (rank 0's clock; the
    # 2-GPU run's points reach us in batches, so our own timestamps would mean nothing).
    label_tps = [p["label_tokens_per_s"] for p in pts if p["step"] > args.warmup and p["label_tokens_per_s"]]
    return {"n_gpus": n_gpus, "steps": out.report.steps, "wall_s": round(wall, 1),
            "median_label_tokens_per_s": round(statistics.median(label_tps), 1) if label_tps else None,
            "label_tokens_per_s": label_tps,
            "losses": [round(p["loss"], 5) for p in pts],
            "plan_events": [m for m in rec_.events if "plan" in m.lower() or "launch" in m.lower()],
            "trained_tokens": out.report.trained_tokens,
            # rank 0's own figures: label tok/s over the run, peak GPU memory (per rank)
            "throughput": out.report.throughput,
            "adapter_files": sorted(p.name for p in Path(out.adapter_dir).iterdir())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--checkpoint", default="/tmp/glm6b")
    args = ap.parse_args()
    if not args.tiny:
        assert torch.cuda.device_count() >= 2, "needs two GPUs (use --tiny for a CPU smoke run)"
    import serving  # bench/serving.py builds the 6B-shaped base with the fixture's ChatGLM3 tokenizer

    work = Path(tempfile.mkdtemp(prefix="multi-gpu-"))
    base = serving.build_base(type("A", (), {"tiny": args.tiny, "work": str(work), "checkpoint": args.checkpoint})())
    device = "cpu" if args.tiny else "cuda"
    rec("env", {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "args": vars(args)})
    rows = [json.loads(line) for line in (ROOT / "service/data/advertisegen_sample.jsonl").read_text().splitlines()
            if line.strip()]
    convs = [[{"role": "user", "content": r["content"]}, {"role": "assistant", "content": r["summary"]}] for r in rows]

    one = train(base, convs, work, 1, device, args)
    rec("one_gpu", one)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    two = train(base, convs, work, 2, device, args)
    rec("two_gpus", two)
    diffs = [abs(a - b) / max(abs(a), 1e-9) for a, b in zip(one["losses"], two["losses"])]
    rec("comparison", {
        "max_rel_loss_diff": round(max(diffs), 5) if diffs else None,
        "throughput_ratio": round(two["median_label_tokens_per_s"] / one["median_label_tokens_per_s"], 2)
        if one["median_label_tokens_per_s"] and two["median_label_tokens_per_s"] else None})
    out = os.environ.get("OUT")
    if out:
        Path(out, "multi_gpu.json").write_text(json.dumps(RESULTS, indent=1, default=str))


if __name__ == "__main__":
    main()
