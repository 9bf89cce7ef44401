"""NF4 matmul kernels on the GPU: correctness against bitsandbytes, config sweep, step floor.

One call does everything, baseline included (same card, same process):

  check   every shape/dtype/layout case: each of our kernels and bitsandbytes' own
          matmul_4bit against two float64 references (NF4 weights in float32, and the
          bf16-rounded copy dequantize_4bit returns): relative errors side by side
  sweep   `_nf4_mma` launch configs per (rows, projection shape), each timed as a CUDA
          graph over enough weight copies to defeat the 60 MB L2; then, for the best one,
          the cost of exactness (one bf16 code instead of hi + lo) and of table loads
  floor   every NF4 matmul of one ChatGLM3-6B decode step (28 layers x 4 projections,
          2.86 GB packed) in one CUDA graph: ours (best swept configs and the shipped
          defaults) vs bitsandbytes vs dense bf16, rows 1/8/32/128

    python bench/kernels.py [--quick] [--out PATH]      # GPU only; JSON to $OUT/kernels.json
"""
from __future__ import annotations

import argparse
import dataclasses
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
    import copy

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
        # Two references: NF4 in float32 (bitsandbytes' dequantization before its cast) and the
        # bf16-rounded copy dequantize_4bit returns (what a QLoRA forward multiplies with).
        qs32 = copy.copy(p.quant_state)
        qs32.dtype = torch.float32
        w32 = F.dequantize_4bit(p.data, qs32).double()
        wd = F.dequantize_4bit(p.data, p.quant_state).double()
        exact32 = x.double() @ w32.T + (b.double() if bias else 0)
        exact16 = x.double() @ wd.T + (b.double() if bias else 0)
        y = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        ops = K.operands(p)
        outs = dict(entry=K.nf4_matmul(x, p, b), mma=K.launch_mma(x, ops, y.clone(), b),
                    mma_one_code=K.launch_mma(x, ops, y.clone(), b, K.MmaConfig(split_code=False)),
                    mma_two_dots=K.launch_mma(x, ops, y.clone(), b, dataclasses.replace(K.mma_config(m), pair=False)),
                    gemv=K.launch_gemv(x, ops, y.clone(), b), gemm=K.launch_gemm(x, ops, y.clone(), b),
                    bnb=bnb.matmul_4bit(x, p.t(), bias=b, quant_state=p.quant_state),
                    rounded32=exact32.to(dtype), rounded16=exact16.to(dtype))
        torch.cuda.synchronize()
        row = dict(m=m, n=n, k=k, nested=nested, dtype=str(dtype).split(".")[-1], blocksize=bs, bias=bias)
        for name, out in outs.items():
            for ref_name, ref in (("w32", exact32), ("w16", exact16)):
                row[f"{name}_rel_{ref_name}"] = float(f"{((out.double() - ref).norm() / ref.norm()).item():.3g}")
            row[f"{name}_nan"] = bool(torch.isnan(out).any())
        worst = max(worst, row["mma_rel_w32"] / max(row["rounded32_rel_w32"], 1e-7))
        rows.append(row)
    rec("check", rows)
    rec("check_worst_mma_rel_over_rounding", round(worst, 3))


def sweep_mma(quick: bool) -> dict:
    """`_nf4_mma` launch configs per (rows, shape). Returns {(k, n, m): (seconds, MmaConfig)}."""


    from service.inference import kernels as K

    best: dict = {}
    table = []
    row_counts = (1, 8, 32, 128) if not quick else (1, 32)
    weights = {}
    for (k, n) in SHAPES:
        copies = max(2, int(300e6 // (n * k // 2)))  # > L2 several times over
        ws = [quantized(n, k) for _ in range(copies)]
        weights[(k, n)] = (ws, [K.operands(p) for p in ws])
    for m in row_counts:
        base = K.mma_config(m)
        variants = []
        for bn, nw, st in itertools.product((64, 128, 256), (4, 8), (2, 3, 4)):
            if bn == 256 and base.block_m >= 64:
                continue
            for target in (132, 264, 528):
                variants.append(dataclasses.replace(base, block_n=bn, num_warps=nw, num_stages=st,
                                                    target_programs=target))
        if quick:
            variants = variants[::5]
        per_cfg: dict = {}
        for cfg in variants:
            for (k, n) in SHAPES:
                ws, opss = weights[(k, n)]
                x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
                y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
                try:
                    t = graph_time(lambda: [K.launch_mma(x, o, y, None, cfg) for o in opss]) / len(opss)
                except Exception as e:  # noqa: BLE001 - a config the compiler refuses
                    table.append(dict(k=k, n=n, m=m, cfg=cfg.__dict__, error=repr(e)[:300]))
                    continue
                table.append(dict(k=k, n=n, m=m, cfg=cfg.__dict__, us=round(t * 1e6, 2),
                                  GBps=round((n * k / 2) / t / 1e9), split=K.mma_split(opss[0], m, cfg)[0]))
                per_cfg.setdefault(cfg, {})[(k, n)] = t
                if (k, n, m) not in best or t < best[(k, n, m)][0]:
                    best[(k, n, m)] = (t, cfg)
        # The effect of the two exactness/lookup choices on the best config of each shape.
        for (k, n) in SHAPES:
            t0, cfg0 = best[(k, n, m)]
            ws, opss = weights[(k, n)]
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            for label, cfg in (("table_loads", dataclasses.replace(cfg0, lut_asm=False)),
                               ("one_code", dataclasses.replace(cfg0, split_code=False)),
                               ("default", base)):
                t = graph_time(lambda: [K.launch_mma(x, o, y, None, cfg) for o in opss]) / len(opss)
                table.append(dict(k=k, n=n, m=m, variant=label, cfg=cfg.__dict__, us=round(t * 1e6, 2),
                                  GBps=round((n * k / 2) / t / 1e9), vs_best=round(t / t0, 3)))
            print(f"best k={k} n={n} m={m}: {cfg0} {t0*1e6:.1f} us {(n*k/2)/t0/1e9:.0f} GB/s", flush=True)
        complete = {c: sum(v.values()) for c, v in per_cfg.items() if len(v) == len(SHAPES)}
        if complete:
            c = min(complete, key=complete.get)
            rec(f"mma_best_uniform_m{m}", dict(cfg=c.__dict__, step_shapes_us=round(complete[c] * 1e6, 2)))
    rec("mma_sweep", table)
    rec("mma_sweep_best", [dict(k=k, n=n, m=m, cfg=cfg.__dict__, us=round(t * 1e6, 2),
                                GBps=round((n * k / 2) / t / 1e9)) for (k, n, m), (t, cfg) in best.items()])
    del weights
    torch.cuda.empty_cache()
    return best


def _weight_copies():
    """Per shape, enough NF4 weight copies to defeat the 60 MB L2 (and their kernel operands)."""
    from service.inference import kernels as K

    weights = {}
    for (k, n) in SHAPES:
        copies = max(2, int(300e6 // (n * k // 2)))
        ws = [quantized(n, k) for _ in range(copies)]
        weights[(k, n)] = (ws, [K.operands(p) for p in ws])
    return weights


def mma_variants() -> None:
    """The tensor-core kernel's default (one K=64 dot per step on joined codes) next to the two
    K=32 dots on even/odd activation columns it replaced and to the serial split-K reduction,
    all four step shapes, 1-128 rows; then a one-row config sweep."""
    from service.inference import kernels as K

    weights = _weight_copies()
    rows = []
    for m in (1, 8, 16, 32, 64, 128):
        base = K.mma_config(m)
        totals = {}
        for label, cfg in (("default", base), ("two_dots", dataclasses.replace(base, pair=False)),
                           ("serial_reduce", dataclasses.replace(base, serial_reduce=True))):
            total = 0.0
            for (k, n) in SHAPES:
                ws, opss = weights[(k, n)]
                x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
                y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
                total += graph_time(lambda: [K.launch_mma(x, o, y, None, cfg) for o in opss]) / len(opss)
            totals[label] = total
        rows.append(dict(m=m, default_us=round(totals["default"] * 1e6, 2),
                         two_dots_us=round(totals["two_dots"] * 1e6, 2),
                         serial_reduce_us=round(totals["serial_reduce"] * 1e6, 2),
                         speedup=round(totals["two_dots"] / totals["default"], 3)))
        print(rows[-1], flush=True)
    rec("mma_variants", rows)
    # One row: does any one-dot config beat bitsandbytes' GEMV (2.94 ms a step, 105 us a layer)?
    one_row = []
    for bn, nw, target, serial in itertools.product((64, 128, 256), (4, 8), (528, 1056, 2112), (False, True)):
        cfg = dataclasses.replace(K.mma_config(1), block_n=bn, num_warps=nw, target_programs=target,
                                  serial_reduce=serial)
        total = 0.0
        try:
            for (k, n) in SHAPES:
                ws, opss = weights[(k, n)]
                x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
                y = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
                total += graph_time(lambda: [K.launch_mma(x, o, y, None, cfg) for o in opss]) / len(opss)
        except Exception as e:  # noqa: BLE001 - a config the compiler refuses
            one_row.append(dict(cfg=cfg.__dict__, error=repr(e)[:200]))
            continue
        one_row.append(dict(cfg=cfg.__dict__, layer_us=round(total * 1e6, 2)))
        print(one_row[-1], flush=True)
    rec("mma_one_row_sweep", one_row)
    del weights
    torch.cuda.empty_cache()


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
    from service.core.config import Settings

    fields = Settings.model_fields
    served = (fields["nf4_kernel_min_rows"].default, fields["nf4_kernel_max_rows"].default)
    rec("floor_served_rows", served)
    for m in (1, 2, 8, 16, 32, 64, 128):
        xs = {k: torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for k in (4096, 13696)}

        def bnb_step():
            for p, _, k, _ in ws:
                bnb.matmul_4bit(xs[k], p.t(), quant_state=p.quant_state)

        def ours_step():  # what the engine runs by default: ours inside the setting's row range
            for p, o, k, _ in ws:
                K.nf4_matmul(xs[k], p, ops=o, min_rows=served[0], max_rows=served[1])

        def previous_step():  # last round's kernels: GEMV at 1-2 rows, 3-D tile GEMM above
            for p, o, k, n in ws:
                y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
                (K.launch_gemv if m <= K.GEMV_MAX_ROWS else K.launch_gemm)(xs[k], o, y, None)

        def tuned_step():
            for p, o, k, n in ws:
                entry = best.get((k, n, m))
                y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
                K.launch_mma(xs[k], o, y, None, entry[1] if entry else None)

        row = dict(rows=m, weight_GB=round(nbytes / 1e9, 3))
        def exact_step():  # hi + lo codes (exact float32 NF4), every row count
            cfg = dataclasses.replace(K.mma_config(m), split_code=True)
            for p, o, k, n in ws:
                y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
                K.launch_mma(xs[k], o, y, None, cfg)

        # ours_tuned without a sweep = ours (one code) at every row count, bitsandbytes never
        steps = [("bitsandbytes", bnb_step), ("ours_default", ours_step), ("ours_tuned", tuned_step),
                 ("ours_exact_codes", exact_step)]
        if m <= 32:
            steps.append(("previous", previous_step))
        for name, fn in steps:
            t = graph_time(fn, reps=10)
            row[f"{name}_ms"] = round(t * 1e3, 3)
            row[f"{name}_GBps"] = round(nbytes / t / 1e9)
        row["speedup_default_vs_bnb"] = round(row["bitsandbytes_ms"] / row["ours_default_ms"], 2)
        row["speedup_tuned_vs_bnb"] = round(row["bitsandbytes_ms"] / row["ours_tuned_ms"], 2)
        row["HBM_fraction_default"] = round(nbytes / (row["ours_default_ms"] / 1e3) / 4.8e12, 3)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--lora-only", action="store_true", help="only the multi-LoRA kernels' step timing")
    ap.add_argument("--skip-lora", action="store_true")
    ap.add_argument("--variants", action="store_true", help="the tensor-core kernel's default vs its two-dot form")
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
                ("sweep", lambda: best.update({} if args.skip_sweep else sweep_mma(args.quick))),
                ("variants", lambda: mma_variants() if args.variants else None),
                ("floor", lambda: floor(best)), ("lora", lora)]
    if args.lora_only:
        sections = [("lora", lora)]
    elif args.skip_lora:
        sections = sections[:-1]
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
