"""Why `_nf4_mma` runs where it runs: per launch config, time (CUDA graph over weight copies
that defeat L2), registers, spills, shared memory, and the PTX instruction mix of the
compiled kernel; with --ncu-one, a plain launch loop for Nsight Compute to profile.

    python bench/mma_probe.py [--out PATH]                   # GPU only
    ncu -k regex:_nf4_mma --launch-skip 3 --launch-count 1 python bench/mma_probe.py --ncu-one CFG_JSON
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from kernels import graph_time, quantized  # noqa: E402

SHAPES = [(4096, 4096), (4096, 27392), (13696, 4096)]


def compiled(fn) -> list:
    kernels = []
    for entry in getattr(fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        kernels.extend(cache.values())
    return kernels


def ptx_mix(ptx: str) -> dict:
    ops = collections.Counter()
    for line in ptx.splitlines():
        m = re.match(r"\s*(?:@%p\d+\s+)?([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)*)", line)
        if m and not line.strip().startswith(("//", ".", "$")):
            ops[m.group(1).split(".")[0]] += 1
    return dict(ops.most_common(25))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--ncu-one", default=None, help="MmaConfig as JSON: plain launches for ncu")
    args = ap.parse_args()
    from service.inference import kernels as K
    from service.inference.kernels import nf4 as N

    if args.ncu_one:
        cfg = K.MmaConfig(**json.loads(args.ncu_one))
        p = quantized(4096, 4096)
        o = K.operands(p)
        for m in (1, 32):
            x = torch.randn(m, 4096, dtype=torch.bfloat16, device="cuda")
            y = torch.empty(m, 4096, dtype=torch.bfloat16, device="cuda")
            for _ in range(5):
                K.launch_mma(x, o, y, None, dataclasses.replace(cfg, block_m=max(16, cfg.block_m if m > 1 else 16)))
        torch.cuda.synchronize()
        return
    results = []
    weights = {}
    for (k, n) in SHAPES:
        copies = max(2, int(300e6 // (n * k // 2)))
        ws = [quantized(n, k) for _ in range(copies)]
        weights[(k, n)] = [K.operands(p) for p in ws]
    base = dict(num_warps=4, num_stages=3, target_programs=264)
    variants = []
    for m in (1, 8, 32):
        bm = 16 if m <= 16 else 32
        variants += [
            (m, "swap_bn256", K.MmaConfig(block_n=256, block_m=bm, **base)),
            (m, "swap_bn128", K.MmaConfig(block_n=128, block_m=bm, **base)),
            (m, "swap_bn64", K.MmaConfig(block_n=64, block_m=bm, **base)),
            (m, "swap_bn128_one_code", K.MmaConfig(block_n=128, block_m=bm, split_code=False, **base)),
            (m, "noswap_bm16_bn128", K.MmaConfig(block_n=128, block_m=bm, swap=False, **base)),
            (m, "noswap_bm64_bn128", K.MmaConfig(block_n=128, block_m=64, swap=False, **base)),
            (m, "noswap_bm64_bn256", K.MmaConfig(block_n=256, block_m=64, swap=False, **base)),
            (m, "noswap_bm64_bn128_w8", K.MmaConfig(block_n=128, block_m=64, swap=False, num_warps=8,
                                                    num_stages=3, target_programs=264)),
            (m, "noswap_bm64_bn128_one_code", K.MmaConfig(block_n=128, block_m=64, swap=False, split_code=False,
                                                          **base)),
        ]
    seen = set()
    for m, label, cfg in variants:
        row = dict(m=m, label=label, cfg=cfg.__dict__)
        before = {id(k) for k in compiled(N._nf4_mma)}
        for (k, n), opss in weights.items():
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            try:
                t = graph_time(lambda: [K.launch_mma(x, o, y, None, cfg) for o in opss]) / len(opss)
                row[f"{k}x{n}_us"] = round(t * 1e6, 2)
                row[f"{k}x{n}_GBps"] = round((n * k / 2) / t / 1e9)
            except Exception as e:  # noqa: BLE001
                row[f"{k}x{n}_error"] = repr(e)[:300]
        new = [kk for kk in compiled(N._nf4_mma) if id(kk) not in before and id(kk) not in seen]
        for kk in new:
            seen.add(id(kk))
        if new:
            kk = new[0]
            row.update(n_regs=kk.n_regs, n_spills=kk.n_spills, shared=getattr(kk.metadata, "shared", None),
                       ptx_mix=ptx_mix(kk.asm.get("ptx", "")), variants_compiled=len(new))
        results.append(row)
        print(json.dumps(row), flush=True)
    path = Path(args.out or Path(os.environ.get("OUT", ROOT / "bench" / "results")) / "mma_probe.json")
    path.write_text(json.dumps(results, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
