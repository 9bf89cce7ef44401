"""NF4 matmul kernels on the GPU: correctness against bitsandbytes, config sweep, step floor.

One call does everything, baseline included (same card, same process):

  check   every shape/dtype/layout case: our kernels vs bitsandbytes' dequantize_4bit +
          an fp32 matmul (bit-equal fraction, relative error), and bitsandbytes' own
          matmul_4bit's error on the same case for scale
  sweep   launch configs per (rows, projection shape), each timed as a CUDA graph over
          enough weight copies to defeat the 60 MB L2
  floor   every NF4 matmul of one ChatGLM3-6B decode step (28 layers x 4 projections,
          2.86 GB packed) in one CUDA graph: ours (best swept configs and the shipped
          defaults) vs bitsandbytes vs dense bf16, rows 1/8/32/128

    python bench/kernels.py [--quick] [--out PATH]      # GPU only; JSON to $OUT/kernels.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

RESULTS: dict = {}
# ChatGLM3-6B per layer: (in, out) of query_key_value, dense, dense_h_to_4h, dense_4h_to_h.
SHAPES = [(4096, 4608), (4096, 4096), (4096, 27392), (13696, 4096)]
LAYERS = 28


def rec(key, value):
    RESULTS[key] = value
    print(json.dumps({key: value}), flush=True)


def quantized(n: int, k: int, *, nested=True, dtype=torch.bfloat16, blocksize=64):
    import bitsandbytes as bnb

    w = torch.randn(n, k, dtype=dtype, device="cuda") * 0.02
    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=nested,
                          blocksize=blocksize, quant_storage=torch.uint8)
    return p.to("cuda")  # quantizes


def graph_time(fn, reps: int = 20) -> float:
    """Seconds per call of fn, replayed as one CUDA graph (median of 5 timings)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / reps)
    del g
    return sorted(times)[2]


def check(quick: bool) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from service.inference import kernels as K

    cases = []
    for (k, n) in [(4096, 4608), (13696, 4096), (256, 40), (13696, 72), (512, 1000), (192, 33)]:
        for m in (1, 2, 3, 8, 17, 32, 64, 100, 128):
            cases.append((m, n, k, True, torch.bfloat16, 64, False))
    cases += [(5, 300, 1024, False, torch.bfloat16, 64, True), (1, 300, 1024, True, torch.float16, 64, True),
              (24, 300, 1024, True, torch.float16, 128, True), (1, 300, 1024, True, torch.bfloat16, 256, True),
              (33, 300, 1024, False, torch.float32, 64, True)]
    rows = []
    worst = 0.0
    for (m, n, k, nested, dtype, bs, bias) in cases[: 12 if quick else None]:
        p = quantized(n, k, nested=nested, dtype=dtype, blocksize=bs)
        x = torch.randn(m, k, dtype=dtype, device="cuda")
        b = torch.randn(n, dtype=dtype, device="cuda") if bias else None
        wd = F.dequantize_4bit(p.data, p.quant_state)
        exact = x.float() @ wd.float().T + (b.float() if bias else 0)
        ref = exact.to(dtype)
        y = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        ops = K.operands(p)
        out = K.nf4_matmul(x, p, b)
        ours_g = K.launch_gemv(x, ops, y.clone(), b)
        ours_m = K.launch_gemm(x, ops, y.clone(), b)
        lib = bnb.matmul_4bit(x, p.t(), bias=b, quant_state=p.quant_state)
        torch.cuda.synchronize()

        def rel(a):
            return ((a.double() - exact.double()).norm() / exact.double().norm()).item()
        row = dict(m=m, n=n, k=k, nested=nested, dtype=str(dtype).split(".")[-1], blocksize=bs, bias=bias,
                   entry_rel=rel(out), gemv_rel=rel(ours_g), gemm_rel=rel(ours_m), bnb_rel=rel(lib),
                   ref_rounding_rel=rel(ref),
                   gemv_equal=(ours_g == ref).float().mean().item(), gemm_equal=(ours_m == ref).float().mean().item(),
                   nan=bool(torch.isnan(out).any() or torch.isnan(ours_g).any() or torch.isnan(ours_m).any()))
        worst = max(worst, row["entry_rel"] / max(row["ref_rounding_rel"], 1e-7))
        rows.append(row)
    rec("check", rows)
    rec("check_worst_entry_rel_over_rounding", round(worst, 3))


def sweep(quick: bool, gemv_only: bool = False) -> dict:
    import triton

    from service.inference import kernels as K

    best: dict = {}
    table = []
    row_counts = (1,) if gemv_only else (1, 2, 4, 8, 16, 32, 64, 128) if not quick else (1, 8, 32)
    for (k, n) in SHAPES:
        copies = max(2, int(300e6 // (n * k // 2)))  # > L2 several times over
        ws = [quantized(n, k) for _ in range(copies)]
        opss = [K.operands(p) for p in ws]
        for m in row_counts:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            variants = []
            if gemv_only:
                for bn, un, nw, st in itertools.product((4, 8, 16), (8, 16), (2, 4), (2, 3, 4)):
                    variants.append(("gemv", K.LaunchConfig(block_n=bn, num_warps=nw, unroll=un, num_stages=st)))
                variants.append(("gemv", K.LaunchConfig(block_n=8, num_warps=4, unroll=8, round_weights=False)))
            elif m <= 4:
                for bn, nw, un in ((16, 4, 4), (32, 4, 4), (16, 4, 8), (32, 8, 4), (64, 8, 4), (8, 4, 8)):
                    variants.append(("gemv", K.LaunchConfig(block_n=bn, num_warps=nw, unroll=un)))
                variants.append(("gemv", K.LaunchConfig(block_n=32, num_warps=4, unroll=4, round_weights=False)))
            bm = min(max(16, triton.next_power_of_2(m)), 64)
            for bn, un, nw, st in () if gemv_only else ((32, 2, 4, 3), (64, 2, 4, 3), (128, 2, 8, 3), (32, 4, 4, 3), (64, 4, 4, 3),
                                   (64, 4, 8, 3), (16, 4, 4, 3)):
                variants.append(("gemm", K.LaunchConfig(block_n=bn, block_m=bm, num_warps=nw, num_stages=st,
                                                        unroll=un)))
            if quick:
                variants = variants[::3]
            for kind, cfg in variants:
                launch = K.launch_gemv if kind == "gemv" else K.launch_gemm
                try:
                    t = graph_time(lambda: [launch(x, o, y, None, cfg) for o in opss]) / copies
                except Exception as e:  # noqa: BLE001 - a config the compiler refuses
                    table.append(dict(k=k, n=n, m=m, kind=kind, cfg=cfg.__dict__, error=repr(e)[:200]))
                    continue
                gbps = (n * k / 2) / t / 1e9
                table.append(dict(k=k, n=n, m=m, kind=kind, cfg=cfg.__dict__, us=round(t * 1e6, 2), GBps=round(gbps)))
                key = (k, n, m)
                if key not in best or t < best[key][0]:
                    best[key] = (t, kind, cfg)
            t, kind, cfg = best[(k, n, m)]
            print(f"best k={k} n={n} m={m}: {kind} {cfg} {t*1e6:.1f} us {(n*k/2)/t/1e9:.0f} GB/s", flush=True)
        del ws, opss
        torch.cuda.empty_cache()
    rec("sweep", table)
    rec("sweep_best", [dict(k=k, n=n, m=m, kind=kind, cfg=cfg.__dict__, us=round(t * 1e6, 2),
                            GBps=round((n * k / 2) / t / 1e9)) for (k, n, m), (t, kind, cfg) in best.items()])
    return best


def floor(best: dict) -> None:
    """All NF4 matmuls of one decode step in one graph: ours vs bitsandbytes vs dense bf16."""
    import bitsandbytes as bnb

    from service.inference import kernels as K

    ws = []
    for _ in range(LAYERS):
        for (k, n) in SHAPES:
            p = quantized(n, k)
            ws.append((p, K.operands(p), k, n))
    nbytes = sum(p.data.numel() for p, _, _, _ in ws)
    out = []
    for m in (1, 8, 32, 128):
        xs = {k: torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for k in (4096, 13696)}

        def bnb_step():
            for p, _, k, _ in ws:
                bnb.matmul_4bit(xs[k], p.t(), quant_state=p.quant_state)

        def ours_step():
            for p, o, k, _ in ws:
                K.nf4_matmul(xs[k], p, ops=o)

        def tuned_step():
            for p, o, k, n in ws:
                entry = best.get((k, n, m))
                if entry is None:
                    K.nf4_matmul(xs[k], p, ops=o)
                    continue
                _, kind, cfg = entry
                y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
                (K.launch_gemv if kind == "gemv" else K.launch_gemm)(xs[k], o, y, None, cfg)

        row = dict(rows=m, weight_GB=round(nbytes / 1e9, 3))
        for name, fn in (("bitsandbytes", bnb_step), ("ours_default", ours_step), ("ours_tuned", tuned_step)):
            t = graph_time(fn, reps=10)
            row[f"{name}_ms"] = round(t * 1e3, 3)
            row[f"{name}_GBps"] = round(nbytes / t / 1e9)
        row["speedup_default_vs_bnb"] = round(row["bitsandbytes_ms"] / row["ours_default_ms"], 2)
        row["speedup_tuned_vs_bnb"] = round(row["bitsandbytes_ms"] / row["ours_tuned_ms"], 2)
        out.append(row)
        print(row, flush=True)
    del ws
    torch.cuda.empty_cache()
    # Dense bf16 (what a bf16 copy of the base would cost): 4 layers' weights, scaled to 28.
    dense = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(4) for (k, n) in SHAPES]
    for row in out:
        m = row["rows"]
        xs = {k: torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for k in (4096, 13696)}
        t = graph_time(lambda: [xs[w.shape[1]] @ w.T for w in dense], reps=10) * LAYERS / 4
        row["dense_bf16_ms"] = round(t * 1e3, 3)
    rec("floor", out)


def lora(rows_list=(1, 8, 32, 128)) -> None:
    """The multi-LoRA term of one decode step (q, k, v of 28 layers: 84 modules), PyTorch's
    GEMMs + multiply + add vs our shrink/expand kernels, each as one CUDA graph."""
    from service.inference.lora import LoRAContext, MultiLoRALinear

    shapes = [(4096, 4096), (4096, 256), (4096, 256)]  # ChatGLM3 q, k, v (2 KV heads of 128)
    out = []
    for hw in (8, 64):
        for m in rows_list:
            ctx = LoRAContext()
            layers = []
            for _ in range(LAYERS):
                for (k, n) in shapes:
                    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
                    layer = MultiLoRALinear(lin, "p", ctx)
                    layer.lora_A = torch.randn(256, k, device="cuda", dtype=torch.bfloat16) * 0.01
                    layer.lora_B = torch.randn(n, 256, device="cuda", dtype=torch.bfloat16) * 0.01
                    layer.enabled = True
                    layers.append((layer, k, n))
            ctx.mask = (torch.rand(m, 1, hw, device="cuda") < 0.5).to(torch.bfloat16)
            ctx.hw = hw
            xs = {k: torch.randn(m, 1, k, device="cuda", dtype=torch.bfloat16) for k in (4096,)}
            ys = {n: torch.randn(m, 1, n, device="cuda", dtype=torch.bfloat16) for n in (4096, 256)}

            def term():
                for layer, k, n in layers:
                    mask = ctx.mask
                    if ctx.kernels:
                        layer._add_lora_kernels(xs[k], ys[n], mask, hw)
                    else:
                        xa = torch.matmul(xs[k], layer.lora_A[:hw].t())
                        ys[n] + torch.matmul(xa * mask, layer.lora_B[:, :hw].t())
            row = dict(rows=m, hw=hw)
            for name, flag in (("torch", False), ("ours", True)):
                ctx.kernels = flag
                row[f"{name}_ms"] = round(graph_time(term, reps=10) * 1e3, 3)
            row["speedup"] = round(row["torch_ms"] / row["ours_ms"], 2)
            out.append(row)
            print(row, flush=True)
            del layers
    rec("lora_step", out)


def write_best_gemv(best: dict, path: str | None) -> None:
    """The one-row config with the least total time over the step's four shapes."""
    if not path:
        return
    table = RESULTS.get("sweep", [])
    totals: dict = {}
    for row in table:
        if row.get("m") == 1 and row.get("kind") == "gemv" and "us" in row:
            key = json.dumps(row["cfg"], sort_keys=True)
            totals.setdefault(key, []).append(row["us"])
    complete = {k: sum(v) for k, v in totals.items() if len(v) == len(SHAPES)}
    cfg = min(complete, key=complete.get)
    rec("best_gemv_config", dict(cfg=json.loads(cfg), step_shapes_us=round(complete[cfg], 2)))
    Path(path).write_text(cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--gemv-only", action="store_true", help="sweep one-row configs only")
    ap.add_argument("--lora-only", action="store_true", help="only the multi-LoRA kernels' step timing")
    ap.add_argument("--best-gemv-to", default=None, help="write the fastest one-row config (JSON) here")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "GPU only"
    import bitsandbytes
    import triton
    import transformers

    rec("meta", dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                     bitsandbytes=bitsandbytes.__version__, transformers=transformers.__version__,
                     date=datetime.now(timezone.utc).isoformat(timespec="seconds")))
    torch.manual_seed(0)
    t0 = time.time()
    best: dict = {}
    sections = [("check", lambda: check(args.quick)),
                ("sweep", lambda: best.update({} if args.skip_sweep else sweep(args.quick, args.gemv_only))),
                ("best_gemv", lambda: write_best_gemv(best, args.best_gemv_to)),
                ("floor", lambda: floor(best)), ("lora", lora)]
    if args.lora_only:
        sections = [("lora", lora)]
    for name, fn in sections:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - keep the other sections' results
            import traceback
            traceback.print_exc()
            rec(f"{name}_error", repr(e)[:500])
        rec(f"{name}_done_at_s", round(time.time() - t0, 1))
    rec("total_seconds", round(time.time() - t0, 1))
    path = Path(args.out or (Path(os.environ.get("OUT", ROOT / "bench" / "results")) / "kernels.json"))
    path.write_text(json.dumps(RESULTS, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
