"""Training throughput and memory: the lecture recipe vs tuneserve's training core, side by side
on the same card, same process, same rows.

Model: ChatGLM3-6B-shaped GLM with random weights in NF4 + double quant, bf16 compute (the
shape of bench/reference/seed_recipe_bench.py; speed and memory do not depend on weight values).
Data: AdvertiseGen-like lengths, content 20-80 tokens and summary 50-250 tokens (uniform,
seeded), random token ids.

Configurations (same LoRA in all: r=4, alpha 32, dropout 0.05 on q/k/v_proj, AdamW lr 1e-4):
  recipe      the lecture: plain `[gMASK] sop content summary eos` rows, batch 16 padded to its
              longest row (labels -100 over prompt and padding), gradient checkpointing,
              prepare_model_for_kbit_training (fp32 upcast), loss from the model (HF), exactly
              seed_recipe_bench's setup otherwise.
  ours        workers.training: chat-format rows (`[gMASK] sop <|user|> \\n content
              <|assistant|> \\n summary eos`), effective batch 16 rows, the memory plan from the
              card's free memory (packing, micro-batch, checkpointing), our loop's train_step.
  ours_16gb   the same with torch.cuda.set_per_process_memory_fraction(16e9 / total) and the
              plan's budget set to 16e9 bytes.

Reported per configuration: useful (label) tokens/s, all real tokens/s, computed tokens/s
(padding included), model TFLOP/s and MFU (4 FLOPs per frozen linear weight per computed token
against --peak-tflops, 790 by default: an H200's measured bf16 matmul rate), median step time,
peak allocated / reserved memory, and for ours the plan with its predicted peak beside it. JSON to $OUT/training_bench.json (and one line per record in
$OUT/records.jsonl), summary table on stdout.

  python bench/training.py                 # GPU (run by the lead on an H100)
  python bench/training.py --tiny          # CPU smoke test with a tiny GLM (proves the script runs)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

# Before CUDA initialises: packed micro-batches vary in size, expandable segments avoid fragmentation
# (run_training sets the same default).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 2**30
RESULTS: list[dict] = []
LORA = dict(lora_r=4, lora_alpha=32.0, lora_dropout=0.05)
TARGETS = ["q_proj", "k_proj", "v_proj"]
# ChatGLM3 special ids in a 65024 vocabulary (values only matter for being valid, non-pad ids).
GMASK, SOP, USER, ASSISTANT, NEWLINE, EOS = 64790, 64792, 64795, 64796, 13, 2


def rec(name: str, **kw) -> dict:
    kw = {"name": name, **kw}
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "records.jsonl"), "a") as f:
            f.write(json.dumps(kw) + "\n")
    return kw


# ------------------------------------------------------------------------------------------
# model and data
# ------------------------------------------------------------------------------------------
def glm_config(tiny: bool):
    from transformers import GlmConfig

    if tiny:
        return GlmConfig(vocab_size=65024, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5,
                         attention_bias=True, max_position_embeddings=2048, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=2)
    return GlmConfig(vocab_size=65024, hidden_size=4096, intermediate_size=13696, num_hidden_layers=28,
                     num_attention_heads=32, num_key_value_heads=2, head_dim=128, partial_rotary_factor=0.5,
                     attention_bias=True, max_position_embeddings=8192, rms_norm_eps=1e-5,
                     tie_word_embeddings=False, pad_token_id=0, eos_token_id=2)


def build_random_checkpoint(path: Path, tiny: bool, device: str) -> None:
    from transformers import AutoModelForCausalLM

    if (path / "config.json").exists():
        return
    t = time.time()
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(glm_config(tiny), dtype=torch.bfloat16)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
    m.save_pretrained(path)
    n = sum(p.numel() for p in m.parameters())
    del m
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    rec("checkpoint", params=n, seconds=round(time.time() - t, 1), path=str(path))


def advertisegen_rows(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(content ids, summary ids): content 20-80 tokens, summary 50-250 tokens."""
    rng = random.Random(seed)
    tok = lambda k: [rng.randint(100, 64000) for _ in range(k)]  # noqa: E731
    return [(tok(rng.randint(20, 80)), tok(rng.randint(50, 250))) for _ in range(n)]


def recipe_example(content, summary):
    """The lecture notebook's tokenization: [gMASK] sop + content + summary + eos, labels -100 on the prompt."""
    ids = [GMASK, SOP] + content + summary + [EOS]
    labels = [-100] * (len(content) + 2) + summary + [EOS]
    return ids, labels


def chat_example(content, summary):
    """tuneserve's chat format (service.models.tokenize_chat for ChatGLM3): loss on the reply + eos."""
    from workers.training.data import Example

    prompt = [GMASK, SOP, USER, NEWLINE] + content + [ASSISTANT]
    reply = [NEWLINE] + summary + [EOS]
    return Example(tuple(prompt + reply), tuple([-100] * len(prompt) + reply))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peaks(device: str) -> dict:
    if not device.startswith("cuda"):
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 2)}


def frozen_linear_params(cfg) -> int:
    """Weights of the decoder's linear layers (q/k/v, o, gate_up, down), the frozen base's matmuls."""
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    qkv = h * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * head_dim
    return layers * (qkv + cfg.num_attention_heads * head_dim * h + 3 * h * cfg.intermediate_size)


# Model FLOPs per computed token of a frozen-base LoRA step: forward (2 per weight) and the
# input-gradient backward (2 per weight); no weight gradients, recomputation not counted (MFU,
# not hardware utilisation), attention scores and the output head left out (both small here).
FLOPS_PER_WEIGHT = 4
PEAK_FLOPS = 0.0  # set by main: the card's bf16 matmul rate (--peak-tflops), 0 = not reported


def summarize(name: str, times, label_tokens, real_tokens, computed_tokens, device, **extra) -> dict:
    total = sum(times)
    computed_per_s = sum(computed_tokens) / total
    flops_per_token = FLOPS_PER_WEIGHT * frozen_linear_params(glm_config(args_tiny))
    mfu = dict(model_tflops_per_s=float(f"{computed_per_s * flops_per_token / 1e12:.4g}"),
               mfu=round(computed_per_s * flops_per_token / PEAK_FLOPS, 3) if PEAK_FLOPS else None)
    return rec(name, steps=len(times), median_step_s=round(statistics.median(times), 4),
               label_tokens_per_s=round(sum(label_tokens) / total, 1),
               tokens_per_s=round(sum(real_tokens) / total, 1),
               computed_tokens_per_s=round(computed_per_s, 1),
               padding_share=round(1 - sum(real_tokens) / sum(computed_tokens), 4), **mfu, **peaks(device), **extra)


# ------------------------------------------------------------------------------------------
# the lecture recipe
# ------------------------------------------------------------------------------------------
def bench_recipe(path: Path, rows, device: str, batch: int, warmup: int, steps: int) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    reset_peak(device)
    t = time.time()
    m = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype), dtype=dtype, device_map={"": device})
    load_s = time.time() - t
    m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True)
    m = get_peft_model(m, LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"],
                                     lora_dropout=LORA["lora_dropout"], target_modules=TARGETS,
                                     task_type="CAUSAL_LM"))
    m.train()
    if device == "cpu":
        _no_cpu_repack(m)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    times, lab, real, comp = [], [], [], []
    for s in range(warmup + steps):
        chunk = [recipe_example(c, y) for c, y in rows[s * batch:(s + 1) * batch]]
        L = max(len(i) for i, _ in chunk)
        ids = torch.zeros((len(chunk), L), dtype=torch.long)  # pad id 0, right padding (DataCollatorForSeq2Seq)
        labels = torch.full((len(chunk), L), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), L), dtype=torch.long)
        for r, (i, lb) in enumerate(chunk):
            ids[r, :len(i)] = torch.tensor(i)
            labels[r, :len(lb)] = torch.tensor(lb)
            mask[r, :len(i)] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        sync(device)
        t0 = time.perf_counter()
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if s >= warmup:
            times.append(time.perf_counter() - t0)
            lab.append(int((labels[:, 1:] != -100).sum()))  # shifted: what the loss counts
            real.append(int(mask.sum()))
            comp.append(ids.numel())
    res = summarize("recipe", times, lab, real, comp, device, batch=batch, gradient_checkpointing=True,
                    load_s=round(load_s, 1), last_loss=round(out.loss.item(), 4))
    del m, opt, out
    gc.collect()
    return res


def _no_cpu_repack(model) -> None:
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# ------------------------------------------------------------------------------------------
# ours
# ------------------------------------------------------------------------------------------
def bench_ours(name: str, path: Path, rows, device: str, batch: int, warmup: int, steps: int,
               budget_bytes: int | None) -> dict:
    from service.core.domain import TrainingSpec
    from workers.training.loop import Dist, TrainLoop
    from workers.training.model import load_trainable
    from workers.training.plan import MemoryModel, choose_plan, device_budget, model_shape
    from workers.training.recipe import NullProgress

    spec = TrainingSpec(batch_size=batch, learning_rate=1e-4, max_steps=warmup + steps, **LORA,
                        lora_target_modules=TARGETS, eval_max_samples=0, checkpoint_steps=10**6,
                        max_source_length=96, max_target_length=260)
    examples = [chat_example(c, y) for c, y in rows]
    reset_peak(device)
    memory = MemoryModel(compute_bytes=2 if device.startswith("cuda") else 4)
    shape = model_shape(glm_config(args_tiny), TARGETS, spec.lora_r)
    budget = budget_bytes or device_budget(device)
    plan = choose_plan(shape, [len(e) for e in examples], spec, budget, memory=memory)
    rec(f"{name}_plan", **plan.to_dict())
    t = time.time()
    model = load_trainable(path, spec, TARGETS, device, plan.gradient_checkpointing,
                           dense_layers=plan.dense_layers, attention=plan.attention)
    load_s = time.time() - t
    loop = TrainLoop(model=model, spec=spec, plan=plan, examples=examples, device=device, pad_id=0,
                     total_steps=warmup + steps, work_dir=Path(os.environ.get("OUT", "/tmp")) / "bench-job",
                     progress=NullProgress(), dist_=Dist())
    # Sequential order, so ours and the recipe see the same 16 rows in each step.
    loop.sampler.next_step = _sequential(len(examples), batch)
    times, lab, real, comp = [], [], [], []
    for s in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        loss, _accuracy, ntok, nlab = loop.train_step()
        sync(device)
        if s >= warmup:
            times.append(time.perf_counter() - t0)
            lab.append(nlab)
            real.append(ntok)
            comp.append(ntok)  # packed rows carry no padding
    res = summarize(name, times, lab, real, comp, device, batch=batch,
                    gradient_checkpointing=plan.gradient_checkpointing, packing=plan.packing,
                    micro_batch_tokens=plan.micro_batch_tokens, dense_layers=plan.dense_layers,
                    attention=plan.attention,
                    predicted_peak_gib=round(plan.predicted_peak_bytes / GiB, 2),
                    predicted_tokens_per_s=plan.predicted_tokens_per_s, budget_gib=round(budget / GiB, 2),
                    load_s=round(load_s, 1), last_loss=round(loss, 4))
    del model, loop
    gc.collect()
    return res


def _sequential(n: int, batch: int):
    state = {"i": 0}

    def next_step():
        i = state["i"]
        state["i"] = i + batch
        return list(range(i, min(i + batch, n)))
    return next_step


# ------------------------------------------------------------------------------------------
# --profile: where a micro-step's time goes (used to calibrate plan.py's cost model)
# ------------------------------------------------------------------------------------------
def _time_micro_steps(model, examples, device, batch, steps, warmup, *, packing, budget, rows):
    from workers.training.model import autocast, micro_batch_loss_sum
    from workers.training.packing import micro_batches

    reset_peak(device)
    wall, cpu, n_micro, toks, comp, first = [], [], [], [], [], 0.0
    for s in range(warmup + steps):
        exs = examples[s * batch:(s + 1) * batch]
        mbs = micro_batches(exs, packing=packing, token_budget=budget, rows=rows, pad_id=0)
        sync(device)
        t0 = time.perf_counter()
        for mb in mbs:
            mb = mb.to(device)
            with autocast(device):
                loss = micro_batch_loss_sum(model, mb)
            (loss / 1000.0).backward()
            if s == 0:
                first += float(loss)  # same weights in every config (LoRA B = 0): must agree
        t1 = time.perf_counter()
        sync(device)
        t2 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        if s >= warmup:
            wall.append(t2 - t0)
            cpu.append(t1 - t0)
            n_micro.append(len(mbs))
            toks.append(sum(len(e) for e in exs))
            comp.append(sum(mb.shape_tokens for mb in mbs))
    return {"step_s": round(statistics.median(wall), 4), "mean_step_s": round(sum(wall) / len(wall), 4),
            "cpu_enqueue_s": round(statistics.median(cpu), 4), "micro_steps": statistics.median(n_micro),
            "tokens_per_s": round(sum(toks) / sum(wall), 1), "loss_sum_step0": round(first, 3),
            "computed_tokens": round(sum(comp) / len(comp)),
            **peaks(device)}


def _profile_table(model, examples, device, batch, tag, packing=True):
    from torch.profiler import ProfilerActivity, profile

    from workers.training.model import autocast, micro_batch_loss_sum
    from workers.training.packing import micro_batches

    exs = examples[:batch]
    mb = micro_batches(exs, packing=packing, token_budget=10**6, rows=batch, pad_id=0)[0].to(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        with autocast(device):
            loss = micro_batch_loss_sum(model, mb)
        loss.backward()
        sync(device)
    model.zero_grad(set_to_none=True)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    text = (prof.key_averages().table(sort_by=key, row_limit=25) + "\n\nBY CPU\n"
            + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    out = os.environ.get("OUT", "/tmp")
    with open(os.path.join(out, f"profile_{tag}.txt"), "w") as f:
        f.write(text)


def run_profile(path: Path, rows, device: str, batch: int, steps: int) -> None:
    from service.core.domain import TrainingSpec
    from workers.training.model import dequantize_layers, enable_varlen_attention, load_trainable
    from workers.training.recipe import _set_checkpointing

    spec = TrainingSpec(batch_size=batch, learning_rate=1e-4, **LORA, lora_target_modules=TARGETS,
                        max_source_length=96, max_target_length=260)
    examples = [chat_example(c, y) for c, y in rows]
    model = load_trainable(path, spec, TARGETS, device, False)
    warm = 2
    n_layers = glm_config(args_tiny).num_hidden_layers

    def grid(tag, cfgs):
        for name, gc_on, packing, budget, nrows in cfgs:
            _set_checkpointing(model, gc_on)
            try:
                r = _time_micro_steps(model, examples, device, batch, steps, warm, packing=packing,
                                      budget=budget, rows=nrows)
            except Exception as exc:  # noqa: BLE001 - record and go on
                r = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                gc.collect()
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
            rec("profile", weights=tag, config=name, gradient_checkpointing=gc_on, **r)
        _set_checkpointing(model, False)

    full = [("packed_1row", False, True, 10**6, 16), ("packed_1650", False, True, 1650, 16),
            ("padded_16", False, False, 10**6, 16), ("padded_8", False, False, 10**6, 8),
            ("packed_1row_gc", True, True, 10**6, 16), ("padded_16_gc", True, False, 10**6, 16)]
    grid("nf4_sdpa", full)
    _profile_table(model, examples, device, batch, "nf4_sdpa")
    varlen = enable_varlen_attention(model, device)
    rec("profile_varlen", enabled=varlen)
    if varlen:
        grid("nf4_varlen", [full[0], full[1], full[4]])
    half = n_layers // 2
    rec("profile_dequant", replaced=dequantize_layers(model, half, torch.bfloat16 if device.startswith("cuda")
                                                      else torch.float32), layers=half)
    grid(f"dense{half}_{'varlen' if varlen else 'sdpa'}", [full[0], full[4]])
    rec("profile_dequant", replaced=dequantize_layers(model, n_layers, torch.bfloat16 if device.startswith("cuda")
                                                      else torch.float32), layers=n_layers)
    tag = f"dense{n_layers}_{'varlen' if varlen else 'sdpa'}"
    grid(tag, full)
    _profile_table(model, examples, device, batch, tag)
    if varlen:
        model.get_base_model().set_attn_implementation("sdpa")
        grid(f"dense{n_layers}_sdpa", [full[0], full[4]])


args_tiny = False


def main() -> None:
    global args_tiny, PEAK_FLOPS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny GLM")
    ap.add_argument("--model-dir", default=None, help="random checkpoint dir (built if missing)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--configs", default="recipe,ours,ours_16gb")
    ap.add_argument("--profile", action="store_true", help="micro-step timing grid + torch.profiler tables")
    ap.add_argument("--budget-16gb", type=float, default=16e9, help="bytes for ours_16gb")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the card's bf16 matmul rate for MFU (default: 790, an H200's measured rate; none on CPU)")
    args = ap.parse_args()
    args_tiny = args.tiny
    PEAK_FLOPS = 1e12 * (args.peak_tflops if args.peak_tflops is not None else 0.0 if args.tiny else 790.0)
    device = "cpu" if args.tiny else "cuda:0"
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --tiny for the CPU smoke test")
    steps = args.steps or (3 if args.tiny else 10)
    import bitsandbytes
    import peft
    import transformers
    rec("env", torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
        bnb=bitsandbytes.__version__, device=torch.cuda.get_device_name(0) if not args.tiny else "cpu",
        tiny=args.tiny)
    if args.tiny:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    path = Path(args.model_dir or ("/tmp/glm-tiny-bench" if args.tiny else "/tmp/glm6b"))
    build_random_checkpoint(path, args.tiny, device)
    rows = advertisegen_rows(args.batch * (args.warmup + steps), seed=0)
    rec("data", rows=len(rows), content_tokens="20-80", summary_tokens="50-250",
        mean_summary=round(sum(len(s) for _, s in rows) / len(rows), 1),
        mean_content=round(sum(len(c) for c, _ in rows) / len(rows), 1))
    if args.profile:
        run_profile(path, rows, device, args.batch, steps)
        return
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    results = {}
    for cfg in configs:
        try:
            if cfg == "recipe":
                results[cfg] = bench_recipe(path, rows, device, args.batch, args.warmup, steps)
            elif cfg == "ours":
                results[cfg] = bench_ours(cfg, path, rows, device, args.batch, args.warmup, steps, None)
            elif cfg == "ours_16gb":
                budget = int(args.budget_16gb)
                if device.startswith("cuda"):
                    total = torch.cuda.get_device_properties(0).total_memory
                    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), 0)
                try:
                    results[cfg] = bench_ours(cfg, path, rows, device, args.batch, args.warmup, steps, budget)
                    results[cfg]["within_budget"] = (results[cfg]["peak_reserved_gib"] is None or
                                                     results[cfg]["peak_reserved_gib"] * GiB <= budget)
                finally:
                    if device.startswith("cuda"):
                        torch.cuda.set_per_process_memory_fraction(1.0, 0)
            else:
                raise ValueError(f"unknown config {cfg}")
        except Exception as exc:  # record and go on: one config's failure must not hide the others
            results[cfg] = rec(cfg, error=f"{type(exc).__name__}: {str(exc)[:500]}")
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    base = results.get("recipe", {}).get("label_tokens_per_s")
    if base:
        for cfg, r in results.items():
            if r.get("label_tokens_per_s"):
                r["speedup_vs_recipe_label_tokens"] = round(r["label_tokens_per_s"] / base, 2)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "training_bench.json"), "w") as f:
            json.dump({"results": results, "records": RESULTS}, f, indent=1)
    print("\nSUMMARY (label = useful tokens)")
    print(f"{'config':<11} {'label tok/s':>12} {'tok/s':>9} {'computed/s':>11} {'pad':>6} {'step s':>7} "
          f"{'peak alloc':>10} {'predicted':>9} {'peak resv':>9} {'MFU':>6} {'x recipe':>8}")
    for cfg, r in results.items():
        if "error" in r:
            print(f"{cfg:<11} ERROR {r['error']}")
            continue
        fmt = lambda v: "-" if v is None else f"{v}"  # noqa: E731
        print(f"{cfg:<11} {r['label_tokens_per_s']:>12} {r['tokens_per_s']:>9} {r['computed_tokens_per_s']:>11} "
              f"{r['padding_share']:>6} {r['median_step_s']:>7} {fmt(r['peak_allocated_gib']):>10} "
              f"{fmt(r.get('predicted_peak_gib')):>9} {fmt(r['peak_reserved_gib']):>9} {fmt(r.get('mfu')):>6} "
              f"{fmt(r.get('speedup_vs_recipe_label_tokens')):>8}")


if __name__ == "__main__":
    main()
