"""Serving benchmark of tuneserve's InferenceEngine (issue 4).

On a GPU: a ChatGLM3-6B-shaped GLM with random weights (the shape
bench/reference/seed_recipe_bench.py builds, sharing its /tmp/glm6b checkpoint), loaded
in NF4 with bf16 compute, r=8 LoRA adapters on q/k/v published into a real registry, then:

  single_stream     tokens/s of one stream (base, and with an adapter)
  concurrent        tokens/s of 32 concurrent streams over 8 adapters (continuous batching),
                    and (concurrent_large) of 128 streams over 32 adapters
  bnb_*             with --compare-bnb: the same rows first with bitsandbytes' NF4 kernels
                    (the previous path), in the same process
  floor             with --kernel-floor: bench/kernels.py's step floor, ours vs bnb vs bf16
  hot_load          registry -> GPU load of a fresh r=8 adapter (read + sha256 + parse +
                    upload), p50/p99, idle and while 32 streams decode
  cold_ttft         time to first token of a request for a never-loaded adapter

Decode measurements ignore stop tokens (a random model would stop at random), so every
stream produces exactly max_tokens tokens. Every figure is the second of two identical
runs (the first captures CUDA graphs); the first is reported as *_first_run.

    python bench/serving.py                       # GPU, writes $OUT/serving.json
    python bench/serving.py --tiny                # CPU smoke run on the tiny fixture
    python bench/serving.py --seed-baseline       # also runs the seed recipe's serving part first

Results: JSON with the card, library versions, date, settings and engine stats.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

RESULTS: dict = {}


def rec(key: str, value) -> None:
    RESULTS[key] = value
    print(json.dumps({key: value}), flush=True)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


# --------------------------------------------------------------------------------------
# model + tokenizer
# --------------------------------------------------------------------------------------
def build_base(args) -> str:
    """A directory the engine loads: random GLM weights + the ChatGLM3-format tokenizer of
    the tiny fixture (ids < 65024, so it renders prompts for the big model too)."""
    from service.models import resolve_base_model

    fixture = ROOT / "api_tests" / "fixtures" / "chatglm3-tiny"
    if args.tiny:
        return str(fixture)  # the engine converts it itself
    tiny = resolve_base_model(str(fixture), Path(args.work) / "models")
    sys.path.insert(0, str(ROOT / "bench" / "reference"))
    from seed_recipe_bench import build_random_checkpoint  # the seed bench's exact shape

    build_random_checkpoint(args.checkpoint)
    serve = Path(args.work) / "glm6b-serve"
    if not (serve / "config.json").exists():
        serve.mkdir(parents=True, exist_ok=True)
        for f in Path(args.checkpoint).iterdir():
            if not (serve / f.name).exists():
                (serve / f.name).symlink_to(f.resolve())
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (Path(tiny) / name).exists():
                shutil.copy(Path(tiny) / name, serve / name)
    return str(serve)


def write_adapter(out: Path, shapes: dict[str, tuple[int, int]], *, r: int, seed: int) -> Path:
    """A PEFT LoRA pair on disk (fp32 weights, as PEFT saves QLoRA adapters)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (fan_in, fan_out) in shapes.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, fan_in, generator=g) * 0.01
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) * 0.01
    save_file(tensors, str(out / "adapter_model.safetensors"))
    targets = sorted({n.rsplit(".", 1)[-1] for n in shapes})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
        "target_modules": targets, "bias": "none", "use_dora": False, "use_rslora": False,
        "fan_in_fan_out": False, "modules_to_save": None}))
    return out


def publish_adapters(engine, registry, names: list[str], *, r: int, seed0: int, work: Path) -> None:
    shapes = engine._runner.shapes
    targets = sorted({n.rsplit(".", 1)[-1] for n in shapes})
    for i, name in enumerate(names):
        src = write_adapter(work / "src" / name, shapes, r=r, seed=seed0 + i)
        registry.publish(tenant="bench", name=name, source_dir=src, manifest={
            "base_model": engine.base_model_name, "target_modules": targets, "r": r, "lora_alpha": 2 * r})
        shutil.rmtree(src)


# --------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------
def req(adapter: str, max_tokens: int, prompt: str):
    from service.core.domain import ChatMessage, GenerationRequest, SamplingParams

    return GenerationRequest(tenant="bench", adapter=adapter, messages=[ChatMessage(role="user", content=prompt)],
                             params=SamplingParams(max_tokens=max_tokens, temperature=0.0), timeout_s=3600)


async def timed_stream(engine, request) -> dict:
    t0 = time.perf_counter()
    stream = await engine.stream(request)
    t_admit = time.perf_counter()
    async for _ in stream:
        pass
    end = time.perf_counter()
    res = stream.result
    # first_token_at / created_at are time.monotonic(); created_at is when stream() was called.
    first = stream.first_token_at - stream.created_at if stream.first_token_at else None
    return {"tokens": res.completion_tokens, "prompt_tokens": res.prompt_tokens, "admit_s": t_admit - t0,
            "ttft_s": first, "total_s": end - t0, "finish": res.finish_reason}


async def single_stream(engine, adapter: str, max_tokens: int, prompt: str) -> dict:
    r = await timed_stream(engine, req(adapter, max_tokens, prompt))
    decode_s = r["total_s"] - r["ttft_s"]
    r["decode_tokens_per_s"] = round((r["tokens"] - 1) / decode_s, 1) if decode_s > 0 else None
    r["tokens_per_s"] = round(r["tokens"] / r["total_s"], 1)
    return r


def compiled_variants() -> int:
    """Compiled variants of our NF4 kernel in this process (a rise in a timed run = a JIT
    compile inside the measurement)."""
    try:
        from service.inference.kernels import nf4
    except ImportError:
        return 0
    caches = getattr(nf4._nf4_mma, "device_caches", {})
    return sum(len(c[0] if isinstance(c, tuple) else c) for c in caches.values())


async def concurrent(engine, adapters: list[str], streams: int, max_tokens: int, prompt: str) -> dict:
    t0 = time.perf_counter()
    rs = await asyncio.gather(*[timed_stream(engine, req(adapters[i % len(adapters)], max_tokens, prompt))
                                for i in range(streams)])
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in rs)
    return {"streams": streams, "adapters": len(adapters), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_s": round(pct([r["ttft_s"] for r in rs], 50), 4),
            "ttft_max_s": round(max(r["ttft_s"] for r in rs), 4),
            "finish": sorted({r["finish"] for r in rs})}


async def hot_loads(engine, names: list[str]) -> dict:
    cache = engine._cache
    times = []
    for name in names:
        t0 = time.perf_counter()
        lease = await cache.acquire("bench", name, time.monotonic() + 600)
        times.append(time.perf_counter() - t0)
        lease.release()
    ms = [t * 1000 for t in times]
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 2), "p99_ms": round(pct(ms, 99), 2),
            "max_ms": round(max(ms), 2), "mean_ms": round(statistics.mean(ms), 2)}


async def cold_ttft(engine, names: list[str], prompt: str) -> dict:
    ttfts = []
    for name in names:
        r = await timed_stream(engine, req(name, 4, prompt))
        ttfts.append((r["admit_s"], r["ttft_s"]))
    # ttft_s counts from the stream's creation, i.e. it includes the adapter load.
    ms = [t * 1000 for _, t in ttfts]
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 2), "max_ms": round(max(ms), 2),
            "admit_p50_ms": round(pct([a * 1000 for a, _ in ttfts], 50), 2)}


def base_weight_bytes(model) -> int:
    """Bytes of the base's own weights: parameters (packed NF4 bytes included) and each NF4
    weight's quantization state (absmax codes, second-level absmax and code tables); not the
    LoRA pools or the KV cache (reported by the engine's stats)."""
    total, seen = 0, set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        for extra in (getattr(qs, "absmax", None), getattr(qs, "code", None),
                      getattr(getattr(qs, "state2", None), "absmax", None),
                      getattr(getattr(qs, "state2", None), "code", None)):
            if torch.is_tensor(extra):
                total += extra.numel() * extra.element_size()
    return total


KERNEL_GROUPS = [  # (group, substrings of a kernel name), first match wins
    ("nf4_ours", ("_nf4_mma", "_splitk_reduce")), ("nf4_bitsandbytes", ("gemv_4bit", "kDequantize", "gemm_4bit")),
    ("fused_norm_rotary", ("_rms_norm", "_rotate")), ("gemm_cublas", ("gemm", "gemv", "cutlass", "sm90_xmma", "splitK")),
    ("softmax", ("softmax",)), ("index_cat_copy", ("index", "cat", "copy", "scatter", "gather")),
    ("reduce", ("reduce",)), ("elementwise", ("elementwise", "vectorized", "unrolled")),
]


def profile_decode(engine, rows: int, kv_len: int = 256, hw: int = 8, reps: int = 5) -> dict:
    """Kernels of one eager decode step (the kernels a graph replays), grouped: count and GPU
    time per step. Runs the runner directly while the engine is idle (free slots only)."""
    runner = engine._runner
    hw = min(hw, runner.capacity)
    graphs, runner.use_graphs = runner.use_graphs, False
    try:
        with torch.no_grad():
            for _ in range(3):
                runner.decode(rows, kv_len, hw)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(reps):
                    runner.decode(rows, kv_len, hw)
                torch.cuda.synchronize()
    finally:
        runner.use_graphs = graphs
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    groups: dict[str, list] = {}
    by_name: dict[str, float] = {}
    for e in kernels:
        us = e.time_range.elapsed_us()
        group = next((g for g, keys in KERNEL_GROUPS if any(k in e.name for k in keys)), "other")
        acc = groups.setdefault(group, [0, 0.0])
        acc[0] += 1
        acc[1] += us
        by_name[e.name[:90]] = by_name.get(e.name[:90], 0.0) + us
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:10]
    return {"rows": rows, "kv_len": kv_len, "lora_columns": hw, "kernels_per_step": round(len(kernels) / reps, 1),
            "gpu_ms_per_step": round(sum(v[1] for v in groups.values()) / reps / 1e3, 3),
            "groups": {g: {"kernels": round(c / reps, 1), "ms": round(t / reps / 1e3, 3)} for g, (c, t) in
                       sorted(groups.items(), key=lambda kv: -kv[1][1])},
            "top_kernels_ms": {n: round(t / reps / 1e3, 3) for n, t in top}}


# --------------------------------------------------------------------------------------
async def run_engine(args, base: str, prefix: str, *, nf4_kernels: bool, full: bool,
                     lora_kernels: bool = False, compile: bool | None = None, fused_ops: bool = True,
                     decode_attention_kernel: bool | None = None) -> None:
    """One engine, measured. `prefix` names its rows (e.g. "bnb_" for bitsandbytes' kernels)."""
    from service.core.config import Settings
    from service.core.registry import AdapterRegistry
    from service.inference.engine import InferenceEngine

    work = Path(args.work) / prefix.strip("_")
    device = "cpu" if args.tiny else "cuda"
    streams_max = max(args.streams, args.large_streams if full else 0)
    settings = Settings(data_dir=work / "data", base_model=base, load_in_4bit=True, device=device,
                        max_batch_size=streams_max, max_seq_len=args.max_seq_len, max_queue=4096,
                        request_timeout_s=3600, cuda_graphs=not args.no_graphs,
                        torch_compile=args.compile if compile is None else compile,
                        adapter_gpu_budget_bytes=args.adapter_budget, nf4_kernels=nf4_kernels,
                        nf4_kernel_min_rows=args.nf4_min_rows, nf4_kernel_max_rows=args.nf4_max_rows,
                        lora_kernels=lora_kernels, fused_ops=fused_ops,
                        decode_attention_kernel=(args.decode_attention_kernel and prefix == ""
                                                 if decode_attention_kernel is None else decode_attention_kernel))
    registry = AdapterRegistry(work / "registry")
    engine = InferenceEngine(settings, registry)
    t0 = time.perf_counter()
    await engine.start()
    rec(f"{prefix}engine_start_s", round(time.perf_counter() - t0, 1))
    rec(f"{prefix}nf4_kernel_layers", engine._runner.nf4_kernel_layers)
    engine._stop_ids = frozenset()  # bench only: random weights would stop at random
    rec(f"{prefix}base_weight_gib", round(base_weight_bytes(engine._runner.model) / 2**30, 3))
    if device == "cuda":
        rec(f"{prefix}gpu_allocated_gib", round(torch.cuda.memory_allocated() / 2**30, 3))

    serving = [f"serve-{i}" for i in range(max(args.adapters, args.large_adapters if full else 0))]
    hot = [f"hot-{i}" for i in range(args.hot_loads)] if full else []
    hot_busy = [f"hotbusy-{i}" for i in range(max(4, args.hot_loads // 4))] if full else []
    cold = [f"cold-{i}" for i in range(args.cold)] if full else []
    publish_adapters(engine, registry, serving + hot + hot_busy + cold, r=args.rank, seed0=1, work=work)
    prompt = args.prompt

    # 1) one stream: base, adapter; graphs (if on) and eager
    for label, adapter in (("base", "__base__"), ("adapter", serving[0])):
        first = await single_stream(engine, adapter, args.tokens, prompt)
        second = await single_stream(engine, adapter, args.tokens, prompt)
        rec(f"{prefix}single_stream_{label}_first_run", first)
        rec(f"{prefix}single_stream_{label}", second)
    if args.only_single:
        await engine.stop()
        return

    # 2) many streams over many adapters
    small = serving[: args.adapters]
    rec(f"{prefix}concurrent_first_run", await concurrent(engine, small, args.streams, args.tokens, prompt))
    rec(f"{prefix}triton_variants_after_first_run", compiled_variants())
    engine.step_times.reset()
    rec(f"{prefix}concurrent", await concurrent(engine, small, args.streams, args.tokens, prompt))
    rec(f"{prefix}concurrent_step_ms", engine.stats()["step_ms"])
    rec(f"{prefix}triton_variants_after_second_run", compiled_variants())
    if full and args.large_streams:
        large = serving[: args.large_adapters]
        rec(f"{prefix}concurrent_large_first_run",
            await concurrent(engine, large, args.large_streams, args.tokens, prompt))
        rec(f"{prefix}concurrent_large", await concurrent(engine, large, args.large_streams, args.tokens, prompt))
    if device == "cuda" and args.profile:
        for rows in (1, args.streams):
            rec(f"{prefix}profile_rows{rows}", profile_decode(engine, rows))
    if not full:
        await engine.stop()
        del engine
        torch.cuda.empty_cache() if device == "cuda" else None
        return

    # 3) hot-load: idle, then while the batch decodes
    rec(f"{prefix}hot_load_idle", await hot_loads(engine, hot))
    engine.step_times.reset()
    busy = asyncio.create_task(concurrent(engine, small, args.streams, args.tokens, prompt))
    await asyncio.sleep(0.5)
    rec(f"{prefix}hot_load_while_decoding", await hot_loads(engine, hot_busy))
    rec(f"{prefix}concurrent_during_hot_loads", await busy)
    # Decode-step times in that window: plain steps vs steps beside an upload (or a prefill).
    steps = engine.stats()["step_ms"]
    plain = steps.get("plain", {}).get("p50")
    if plain:
        for kind in ("upload", "prefill"):
            if kind in steps:
                steps[kind]["max_over_plain_p50"] = round(steps[kind]["max"] / plain, 2)
    rec(f"{prefix}step_ms_during_hot_loads", steps)

    # 4) cold adapter: time to first token (load + prefill + first step)
    rec(f"{prefix}cold_adapter_ttft", await cold_ttft(engine, cold, prompt))

    stats = engine.stats()
    stats["adapters"].pop("resident", None)
    rec(f"{prefix}engine_stats", stats)
    await engine.stop()


async def main_async(args) -> None:
    base = build_base(args)
    if args.compare_bnb and not args.tiny:
        # The previous path (bitsandbytes' NF4 kernels), same process, same card, first.
        await run_engine(args, base, "bnb_", nf4_kernels=False, full=False, compile=False, fused_ops=False)
    if args.compare_unfused and not args.tiny:
        # Our NF4 kernels without the fused norm / rotary kernels, same process, before.
        await run_engine(args, base, "unfused_", nf4_kernels=not args.no_nf4_kernels, full=False,
                         lora_kernels=args.lora_kernels, fused_ops=False)
    if args.compare_opt_ins and not args.tiny:
        # Each opt-in setting on its own over the defaults (rows optin_<name>_*), same process.
        await run_engine(args, base, "optin_lora_kernels_", nf4_kernels=not args.no_nf4_kernels, full=False,
                         lora_kernels=True, decode_attention_kernel=False)
        await run_engine(args, base, "optin_decode_attention_", nf4_kernels=not args.no_nf4_kernels, full=False,
                         lora_kernels=args.lora_kernels, decode_attention_kernel=True)
    if args.compare_lora_torch and not args.tiny:
        # The default engine, but the LoRA term as PyTorch's GEMMs (the previous path for it).
        await run_engine(args, base, "lora_torch_", nf4_kernels=not args.no_nf4_kernels, full=False,
                         lora_kernels=False)
    await run_engine(args, base, "", nf4_kernels=not args.no_nf4_kernels, full=True,
                     lora_kernels=args.lora_kernels)
    if args.kernel_floor and not args.tiny:
        sys.path.insert(0, str(ROOT / "bench"))
        import kernels as kernel_bench

        kernel_bench.RESULTS = RESULTS
        kernel_bench.floor({})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny fixture")
    p.add_argument("--checkpoint", default="/tmp/glm6b", help="random 6B checkpoint dir (shared with the seed bench)")
    p.add_argument("--work", default=None, help="scratch dir (default: a temp dir)")
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/serving.json or bench/results/)")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--hot-loads", type=int, default=40)
    p.add_argument("--cold", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--adapter-budget", type=int, default=512 * 1024 * 1024)
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (then graphs)")
    p.add_argument("--compare-unfused", action="store_true",
                   help="before the main engine, the same engine without the fused norm/rotary kernels (rows unfused_*)")
    p.add_argument("--profile", action="store_true", help="kernels of one eager decode step per engine (torch.profiler)")
    p.add_argument("--only-single", action="store_true", help="stop after the one-stream measurements")
    p.add_argument("--seed-baseline", action="store_true",
                   help="first run bench/reference/seed_recipe_bench.py infer (same card, same checkpoint)")
    p.add_argument("--large-streams", type=int, default=128, help="the many-streams row (0: skip)")
    p.add_argument("--large-adapters", type=int, default=32)
    p.add_argument("--no-nf4-kernels", action="store_true", help="serve with bitsandbytes' NF4 kernels")
    from service.core.config import Settings

    p.add_argument("--no-lora-kernels", dest="lora_kernels", action="store_false",
                   default=Settings.model_fields["lora_kernels"].default,
                   help="the multi-LoRA term through PyTorch's GEMMs instead of our Triton kernels")
    p.add_argument("--decode-attention-kernel", action="store_true",
                   help="the main engine with the decode attention kernel (compare rows: without)")
    p.add_argument("--compare-opt-ins", action="store_true",
                   help="also engines with each opt-in kernel setting on (LoRA kernels, decode attention kernel)")
    p.add_argument("--compare-lora-torch", action="store_true",
                   help="also the default engine with the LoRA term through PyTorch's GEMMs (same process, before)")
    p.add_argument("--nf4-min-rows", type=int, default=Settings.model_fields["nf4_kernel_min_rows"].default,
                   help="rows from which our NF4 kernels serve (default: the setting's)")
    p.add_argument("--nf4-max-rows", type=int, default=Settings.model_fields["nf4_kernel_max_rows"].default,
                   help="rows up to which our NF4 kernels serve (default: the setting's)")
    p.add_argument("--compare-bnb", action="store_true",
                   help="first measure one stream and --streams with bitsandbytes' kernels (rows bnb_*)")
    p.add_argument("--kernel-floor", action="store_true",
                   help="last: every NF4 matmul of one step in a graph, ours vs bitsandbytes vs dense bf16")
    p.add_argument("--prompt", default="类型#裙*材质#蕾丝*风格#宫廷*图案#刺绣*衣样式#连衣裙 " * 3)
    args = p.parse_args()
    if args.tiny:
        args.tokens = min(args.tokens, 24)
        args.hot_loads = min(args.hot_loads, 10)
        args.cold = min(args.cold, 3)
        args.max_seq_len = min(args.max_seq_len, 256)
    elif not torch.cuda.is_available():
        sys.exit("no CUDA GPU: run with --tiny for the CPU smoke run")
    args.work = args.work or tempfile.mkdtemp(prefix="tuneserve-bench-")

    import bitsandbytes
    import peft
    import transformers
    rec("env", {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.tiny else "cpu",
                "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__,
                "args": {k: v for k, v in vars(args).items() if k != "prompt"}})
    if args.seed_baseline and not args.tiny:
        env = dict(os.environ)
        t = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "bench" / "reference" / "seed_recipe_bench.py"), "infer"],
                       check=False, env=env)
        rec("seed_baseline_seconds", round(time.perf_counter() - t, 1))
    asyncio.run(main_async(args))
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "serving.json" if os.environ.get("OUT")
                                           else ROOT / "bench" / "results" / ("serving_tiny_cpu.json" if args.tiny
                                                                              else "serving.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=1, ensure_ascii=False))
    print(f"\nwrote {out}")
    if not args.tiny:
        shutil.rmtree(args.work, ignore_errors=True)  # adapters + data (the checkpoint stays)


if __name__ == "__main__":
    main()
