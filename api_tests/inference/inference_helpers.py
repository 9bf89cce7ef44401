"""Shared helpers for the inference engine tests: tiny ChatGLM3 base, random PEFT adapters
published into a real AdapterRegistry, engines on the CPU, and reference answers."""
from __future__ import annotations

import asyncio
import copy
import tempfile
from pathlib import Path

import torch

from service.core.config import Settings
from service.core.domain import ChatMessage, GenerationRequest, SamplingParams

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "chatglm3-tiny"
TARGETS = ["q_proj", "k_proj", "v_proj"]

PROMPTS = ["类型#裙*材质#蕾丝", "Write one line about a red coat.", "再短一点", "Hello world 2023",
           "类型#上衣*版型#宽松*颜色#黑色"]


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def request(prompt: str, adapter: str = "__base__", *, tenant: str = "t1", max_tokens: int = 24,
            timeout_s: float | None = None, **params) -> GenerationRequest:
    params.setdefault("temperature", 0.0)
    return GenerationRequest(tenant=tenant, adapter=adapter,
                             messages=[ChatMessage(role="user", content=prompt)],
                             params=SamplingParams(max_tokens=max_tokens, **params), timeout_s=timeout_s)


async def accepted_together(engine, reqs) -> list:
    """Results (or exceptions) of reqs, decoding held until the engine accepted all of them
    (at most one step ran before the last joined), so they share their first steps."""
    import time

    from harness import DecodeStepper

    with DecodeStepper(engine._runner) as stepper:
        tasks = [asyncio.create_task(engine.generate(r)) for r in reqs]
        deadline = time.monotonic() + 120
        while engine.stats()["running"] + engine.stats()["queue_depth"] < len(reqs):
            assert time.monotonic() < deadline and not any(t.done() for t in tasks)
            await asyncio.sleep(0.002)
        stepper.open()
        return await asyncio.gather(*tasks, return_exceptions=True)


def engine_settings(data_dir: Path, base: Path, **kw) -> Settings:
    defaults = dict(data_dir=data_dir, base_model=str(base), load_in_4bit=False, max_batch_size=4,
                    max_seq_len=96, max_queue=256, adapter_gpu_budget_bytes=1 << 20, device="cpu",
                    cuda_graphs=False)
    defaults.update(kw)
    return Settings(**defaults)


def make_peft_adapter(base_model, out_dir: Path, *, seed: int, r: int = 4, alpha: float = 8.0,
                      targets=TARGETS, std: float = 0.6) -> Path:
    """A PEFT LoRA with random non-zero A and B (init_lora_weights=False would leave B... we
    set both explicitly so the adapter visibly changes greedy outputs)."""
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base_model)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def publish(registry, base_model, *, tenant: str, name: str, seed: int, r: int = 4, alpha: float = 8.0,
            targets=TARGETS, base_model_name: str = "chatglm3-tiny", manifest_targets=None,
            base_model_fingerprint: str | None = None):
    with tempfile.TemporaryDirectory() as tmp:
        src = make_peft_adapter(base_model, Path(tmp) / "a", seed=seed, r=r, alpha=alpha, targets=targets)
        return registry.publish(tenant=tenant, name=name, source_dir=src, manifest={
            "base_model": base_model_name, "target_modules": list(manifest_targets or targets),
            "r": r, "lora_alpha": alpha, "base_model_fingerprint": base_model_fingerprint})


def peft_greedy(base_model, adapter_dir: Path | None, prompt_ids: list[int], stop_ids: list[int],
                max_new_tokens: int) -> list[int]:
    """Reference: plain PEFT `generate` (greedy) with the adapter, as the lecture serves."""
    from peft import PeftModel

    model = copy.deepcopy(base_model)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                             dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=list(stop_ids), pad_token_id=0)
    ids = out[0, len(prompt_ids):].tolist()
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    return ids


async def generate_with_ids(engine, req):
    """(result, generated token ids, deltas) through the streaming API."""
    stream = await engine.stream(req)
    deltas = [d async for d in stream]
    assert "".join(deltas) == stream.result.text
    return stream.result, stream.token_ids, deltas


def teacher_forced_rows(engine, tenant: str, cases: list[tuple[str, str | None]], steps: int = 12,
                        seed: int = 0) -> tuple[list, list, list]:
    """Row isolation without greedy near-ties: every case (prompt, adapter or None) is fed the
    same fixed token sequence alone in slot 0, then with all cases in one batch, then in that
    batch in reverse slot order; returns (alone, mixed, mixed_reversed), each per case (in
    `cases` order) logits [steps + 1, V] (prefill's last token, then each decode step).
    Drives the engine's runner directly: the engine must be idle."""
    n = len(cases)
    runs = teacher_forced_batches(
        engine, tenant, cases, [[i] for i in range(n)] + [list(range(n)), list(reversed(range(n)))],
        steps=steps, seed=seed)
    alone, mixed, mixed_reversed = runs[:n], runs[n], runs[n + 1]
    return [b[0] for b in alone], mixed, mixed_reversed[::-1]


def teacher_forced_batches(engine, tenant: str, cases: list[tuple[str, str | None]], batches: list[list[int]],
                           *, steps: int = 12, seed: int = 0, common_width: bool = False) -> list[list]:
    """The teacher-forced runs behind `teacher_forced_rows`, for any batches: each batch is a
    list of case indices (repeats allowed), placed in slots 0..n-1 in that order; returns per
    batch the logits [steps + 1, V] of each row. Every case that shares a prompt text sees the
    same forced tokens. `common_width`: every batch runs with the LoRA column window of all
    cases together (the widest), so batches of one size run in exactly the same shapes."""
    import torch

    from service.inference.lora import parse_peft_adapter

    runner = engine._runner
    assert engine.stats()["running"] == 0
    names = sorted({a for _, a in cases if a})
    cols, parsed = {}, {}
    for name in names:
        path, _ = engine.registry.resolve(tenant, name)
        parsed[name] = parse_peft_adapter(path, runner.shapes, runner.dtype)
        cols[name] = runner.upload_adapter(parsed[name])
        assert cols[name] is not None
    g = torch.Generator().manual_seed(seed)
    prompts = [engine.tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in cases]
    # One forced sequence per prompt text: cases that share a prompt see the same tokens.
    per_prompt = {p: torch.randint(5, min(runner.vocab, 500), (steps,), generator=g)
                  for p in dict.fromkeys(p for p, _ in cases)}
    forced = torch.stack([per_prompt[p] for p, _ in cases])

    def run_together(idxs: list[int], min_hw: int) -> list:
        n = len(idxs)
        slots = list(range(n))
        for slot, i in enumerate(idxs):
            runner.bind_slot(slot, cols.get(cases[i][1]))
        hw = max([max(cols[cases[i][1]]) + 1 for i in idxs if cases[i][1]] + [min_hw])
        out = [[] for _ in idxs]
        logits = runner.prefill(slots, [prompts[i] for i in idxs], hw)
        for j in range(n):
            out[j].append(logits[j].detach().float().cpu())
        idx = torch.tensor(slots, device=runner.device)
        runner.tok_buf[idx] = forced[idxs, 0].to(runner.device)
        runner.pos_buf[idx] = torch.tensor([len(prompts[i]) for i in idxs], device=runner.device)
        for step in range(steps):
            max_pos = max(len(prompts[i]) + step for i in idxs)
            nb, kv_len, hw_b = runner.decode_buckets(n - 1, max_pos, hw)
            logits = runner.decode(nb, kv_len, hw_b)[:n].detach().float().cpu()
            for j in range(n):
                out[j].append(logits[j])
            if step + 1 < steps:
                runner.advance(idx, forced[idxs, step + 1].to(runner.device))
        for slot in slots:
            runner.clear_slot(slot)
        return [torch.stack(o) for o in out]

    widest = max((max(c) + 1 for c in cols.values()), default=0) if common_width else 0
    try:
        return [run_together(b, widest) for b in batches]
    finally:
        for name in names:
            runner.release_adapter(cols[name], parsed[name].targeted)

