"""Measure ChatGLM3 -> GLM conversion on a full-size (6.24 B) random ChatGLM3-6B checkpoint.

1. Generate, with our own code, a random checkpoint in ChatGLM3-6B's own format and exact
   config (28 layers, hidden 4096, ffn 13696, 32 heads, kv_channels 128, 2 groups, padded
   vocab 65024), streamed tensor by tensor into ~2 GB bf16 shards (never the whole model
   in memory); safetensors (default) or the `.bin` shards the real repository also ships.
2. Convert it with service.models.convert_chatglm3 in a child process; record wall time,
   peak RSS (the child's VmHWM, plus /proc sampling of anonymous vs file-backed RSS).
3. Check the result: every GlmForCausalLM parameter present with its shape (meta device),
   q/k/v of one layer equal to the source split.
4. Write bench/results/convert_chatglm3_<format>.json and delete both checkpoints.

    .venv/bin/python bench/convert_chatglm3.py [--format safetensors|bin] [--workdir /tmp/x]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from service.models.demo import (CHATGLM3_6B_CONFIG, _train_sentencepiece,  # noqa: E402
                                 chatglm3_tensor_shapes, iter_random_chatglm3_tensors)

GB = 1e9


def _nbytes(shape, dtype=torch.bfloat16) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.finfo(dtype).bits // 8


def generate(dst: Path, fmt: str, shard_bytes: float, num_layers: int = 28) -> dict:
    """Stream a random ChatGLM3-6B into shards; only one shard is ever held."""
    from safetensors.torch import save_file

    cfg = dict(CHATGLM3_6B_CONFIG, num_layers=num_layers)
    dst.mkdir(parents=True)
    # Plan shard boundaries from shapes first, so names can carry the shard count.
    plan, cur, size = [], [], 0
    for name, shape in chatglm3_tensor_shapes(cfg):
        b = _nbytes(shape)
        if cur and size + b > shard_bytes:
            plan.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += b
    plan.append(cur)
    n = len(plan)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    owner = {name: i for i, names in enumerate(plan) for name in names}
    weight_map, total, n_params = {}, 0, 0
    t0 = time.perf_counter()
    buf, cur_shard = {}, 0

    def flush(i):
        fname = f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}"
        if fmt == "safetensors":
            save_file(buf, str(dst / fname), metadata={"format": "pt"})
        else:
            torch.save(buf, dst / fname)
        weight_map.update({k: fname for k in buf})
        print(f"  wrote {fname} ({sum(t.numel() * 2 for t in buf.values()) / GB:.2f} GB)",
              file=sys.stderr, flush=True)

    for name, t in iter_random_chatglm3_tensors(cfg, torch.bfloat16, seed=0):
        if owner[name] != cur_shard:
            flush(cur_shard)
            buf, cur_shard = {}, owner[name]
        buf[name] = t
        total += t.numel() * t.element_size()
        if not name.endswith("inv_freq"):
            n_params += t.numel()
    flush(cur_shard)
    buf = {}
    (dst / f"{stem}.{ext}.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    (dst / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "ChatGLMTokenizer", "remove_space": False}))
    tmp = dst / "_sp"
    tmp.mkdir()
    corpus = [l for l in (ROOT / "service/data/advertisegen_sample.jsonl").read_text().splitlines()]
    shutil.move(str(_train_sentencepiece(corpus, tmp, 1000)), dst / "tokenizer.model")
    shutil.rmtree(tmp)
    return {"shards": n, "bytes": total, "params": n_params,
            "largest_shard_bytes": max(sum(_nbytes(s) for nm, s in chatglm3_tensor_shapes(cfg)
                                           if owner[nm] == i) for i in range(n)),
            "seconds": round(time.perf_counter() - t0, 1)}


CHILD = r"""
import json, sys, threading, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
peak = {"anon": 0, "file": 0, "rss": 0}
stop = False
def sample():
    while not stop:
        vals = {}
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssFile", "VmRSS"):
                vals[k] = int(v.split()[0]) * 1024
        peak["anon"] = max(peak["anon"], vals.get("RssAnon", 0))
        peak["file"] = max(peak["file"], vals.get("RssFile", 0))
        peak["rss"] = max(peak["rss"], vals.get("VmRSS", 0))
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
t_import = time.perf_counter()
from service.models import convert_chatglm3
t0 = time.perf_counter()
steps = []
convert_chatglm3(Path(sys.argv[1]), Path(sys.argv[2]),
                 progress=lambda d, t: steps.append([d, t, round(time.perf_counter() - t0, 2)]))
dt = time.perf_counter() - t0
stop = True
time.sleep(0.1)
# VmHWM: this process's peak resident set (the mm is new at exec, so unlike getrusage's
# maxrss it does not inherit the forking parent's size).
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": round(dt, 2), "import_seconds": round(t0 - t_import, 2),
                  "progress": steps, "peak_rss_bytes": hwm, "sampled_peak": peak}))
"""


def convert(src: Path, dst: Path) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), str(ROOT)],
                         check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_wall_seconds"] = round(wall, 2)
    return res


def verify(src: Path, dst: Path) -> dict:
    """All GLM parameters present with the right shapes; q/k/v of layer 3 = source split."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(dst)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    got = {}
    for f in sorted(set(index.values())):
        with safe_open(str(dst / f), framework="pt") as fh:
            for k in fh.keys():
                got[k] = tuple(fh.get_slice(k).get_shape())
    n_params = sum(int(torch.tensor(s).prod()) for s in got.values())

    def read(path, key):
        if path.suffix == ".bin":
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)[key]
        with safe_open(str(path), framework="pt") as fh:
            return fh.get_tensor(key)
    src_index = next(src.glob("*.index.json"))
    smap = json.loads(src_index.read_text())["weight_map"]
    layer = min(3, config.num_hidden_layers - 1)
    key = f"transformer.encoder.layers.{layer}.self_attention.query_key_value.weight"
    qkv = read(src / smap[key], key)
    q, k, v = (read(dst / index[n], n) for n in
               (f"model.layers.{layer}.self_attn.{p}_proj.weight" for p in "qkv"))
    return {"keys_and_shapes_match_GlmForCausalLM": want == got, "params": n_params,
            "qkv_split_exact": bool(torch.equal(torch.cat([q, k, v]), qkv)),
            "out_shards": len(set(index.values())),
            "out_bytes": sum((dst / f).stat().st_size for f in set(index.values()))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tuneserve-bench-chatglm3"))
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--num-layers", type=int, default=28, help="smoke runs only; 28 = ChatGLM3-6B")
    args = ap.parse_args()
    src, dst = args.workdir / f"chatglm3-6b-random-{args.format}", args.workdir / "converted"
    shutil.rmtree(args.workdir, ignore_errors=True)
    try:
        print(f"generating {src} ...", file=sys.stderr, flush=True)
        gen = generate(src, args.format, args.shard_gb * GB, args.num_layers)
        print(f"generated: {gen}", file=sys.stderr, flush=True)
        os.sync()
        print("converting ...", file=sys.stderr, flush=True)
        conv = convert(src, dst)
        print(f"converted: {conv}", file=sys.stderr, flush=True)
        check = verify(src, dst)
        print(f"verified: {check}", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    import psutil
    result = {
        "what": "convert_chatglm3 on a full-size random ChatGLM3-6B-format checkpoint (bf16)",
        "source_format": args.format, "source": gen, "conversion": conv, "check": check,
        "peak_rss_over_largest_shard": round(conv["peak_rss_bytes"]
                                             / gen["largest_shard_bytes"], 2),
        "peak_rss_over_model": round(conv["peak_rss_bytes"] / gen["bytes"], 3),
        "machine": {"cpus": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
                    "python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform()},
        "note": "page cache not dropped: the source was just written, so reads may be cached; "
                "tokenizer.model is a 1000-piece stand-in (the 64,789-piece original is not "
                "available offline), which only affects the seconds-long tokenizer step",
    }
    if args.num_layers != 28:  # smoke run: not a result
        print(json.dumps(result, indent=2))
        return
    out = ROOT / "bench" / "results" / f"convert_chatglm3_{args.format}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
