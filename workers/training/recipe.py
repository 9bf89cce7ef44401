"""run_training: setup -> train -> save -> evaluate -> cleanup, with nothing of Celery, HTTP or
the database: a caller hands a TrainingRun and a Progress and gets a TrainingOutcome or a
typed error (TrainingError code out_of_memory / invalid_data / model_not_found /
invalid_plan / internal, or Cancelled)."""
from __future__ import annotations

import gc
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from service.core.atomic import atomic_dir
from service.core.domain import JobProgress, TrainingSpec
from service.core.errors import Cancelled, InvalidInput, TrainingError, TuneserveError
from workers.training import checkpoint as ckpt
from workers.training.data import (Conversations, Example, conversations_list, fingerprint, length_stats,
                                   tokenize_conversations, total_steps)
from workers.training.loop import Dist, LoopState, TrainLoop, make_optimizer
from workers.training.model import check_packing, load_trainable, resolve_device
from workers.training.phases import EvalProgress
from workers.training.plan import (GiB, MemoryModel, MemoryPlan, choose_plan, dense_layer_bytes, device_budget,
                                   model_shape)

ADAPTER_DIR = "adapter"


@runtime_checkable
class Progress(Protocol):
    """The one callback surface a caller (the Celery task, a test, a notebook) implements."""

    def event(self, message: str, *, level: str = "info", data: dict | None = None) -> None: ...

    def progress(self, p: JobProgress, trained_tokens: int) -> None: ...  # at each logging step

    def should_stop(self) -> bool: ...  # asked before EVERY optimizer step


class NullProgress:
    def event(self, message: str, *, level: str = "info", data: dict | None = None) -> None:
        pass

    def progress(self, p: JobProgress, trained_tokens: int) -> None:
        pass

    def should_stop(self) -> bool:
        return False


@dataclass
class TrainingRun:
    """Everything one run needs. Conversations are lists of {"role", "content"} dicts (or a
    zero-argument callable returning an iterable of them, read once)."""
    job_id: str
    tenant: str
    base_model_ref: str
    spec: TrainingSpec
    train_conversations: Conversations
    validation_conversations: Conversations | None = None
    work_dir: Path = Path(".tuneserve/jobs/local")
    device: str = "auto"
    models_cache_dir: Path = Path(".tuneserve/models")
    # Overrides for tests/benchmarks: the memory the plan may use (bytes; default: free memory).
    memory_budget_bytes: int | None = None
    # Keep the work_dir's checkpoints after success (listed at /checkpoints).
    keep_checkpoints: bool = True


@dataclass
class TrainingOutcome:
    adapter_dir: Path                   # work_dir/adapter: adapter_config.json + adapter_model.safetensors
    trained_tokens: int
    steps: int
    metrics: dict[str, Any]             # eval loss, BLEU/ROUGE of base and adapter, before/after table
    manifest: dict[str, Any]            # the registry manifest's fields (publish(manifest=...))
    result: dict[str, Any] = field(default_factory=dict)  # plan, throughput, loss curve (job.result)
    resumed_from_step: int | None = None


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _spec_key(spec: TrainingSpec) -> dict[str, Any]:
    """Spec fields a checkpoint must agree on to be resumed (the run's trajectory)."""
    keys = ("batch_size", "learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm",
            "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "load_in_4bit", "seed",
            "max_source_length", "max_target_length", "train_format", "n_epochs", "max_steps")
    return {k: getattr(spec, k) for k in keys}


def _dist_from_env(device: str) -> tuple[Dist, str]:
    """(rank info, device) under torchrun (WORLD_SIZE > 1), else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size()), device


def run_training(run: TrainingRun, progress: Progress | None = None) -> TrainingOutcome:
    """Train one LoRA adapter (see module docstring). Resumes from the newest complete
    checkpoint in run.work_dir automatically. The adapter dir is NOT published here."""
    progress = progress or NullProgress()
    spec = run.spec
    # Packed micro-batches vary in size every step; expandable segments keep the caching
    # allocator from fragmenting (only effective if CUDA was not initialised before).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if spec.n_gpus > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        from workers.training.distributed import run_training_distributed
        return run_training_distributed(run, progress)
    try:
        return _run(run, progress)
    except (TrainingError, Cancelled):
        raise
    except torch.OutOfMemoryError as exc:
        raise TrainingError(f"out of memory: {str(exc).splitlines()[0]}", code="out_of_memory") from exc
    except InvalidInput as exc:
        code = exc.code if exc.code in ("model_not_found", "invalid_data") else "invalid_data"
        raise TrainingError(exc.message, code=code, param=exc.param) from exc
    except TuneserveError as exc:
        raise TrainingError(exc.message, code="internal", param=exc.param) from exc
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _run(run: TrainingRun, progress: Progress) -> TrainingOutcome:
    from transformers import AutoConfig

    from service.models import base_model_fingerprint, load_tokenizer, model_family, resolve_base_model
    from service.models import default_lora_targets, position_limit

    spec = run.spec
    t_start = time.time()
    work_dir = Path(run.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(run.device)
    dist_, device = _dist_from_env(device)
    say = progress.event if dist_.main else (lambda *a, **k: None)

    # --- setup: model files, tokenizer, data ------------------------------------------------
    try:
        path = resolve_base_model(run.base_model_ref, Path(run.models_cache_dir))
    except InvalidInput as exc:
        raise TrainingError(exc.message, code="model_not_found", param="model") from exc
    except OSError as exc:
        raise TrainingError(f"base model {run.base_model_ref!r}: {exc}", code="model_not_found",
                            param="model") from exc
    try:
        tokenizer = load_tokenizer(path)
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise TrainingError(f"base model {run.base_model_ref!r} cannot be loaded: {exc}",
                            code="model_not_found", param="model") from exc
    family = model_family(config)
    max_positions = position_limit(config)
    targets = list(spec.lora_target_modules or default_lora_targets(family))

    warn = lambda msg, data: say(msg, level="warn", data=data)  # noqa: E731
    train_convs = conversations_list(run.train_conversations) or []
    examples = tokenize_conversations(tokenizer, train_convs, spec, warn=warn, what="training",
                                      max_positions=max_positions)
    val_convs = conversations_list(run.validation_conversations)
    val_examples = (tokenize_conversations(tokenizer, val_convs, spec, warn=warn, what="validation",
                                           max_positions=max_positions)
                    if val_convs else None)
    stats = length_stats(examples)
    n_steps = total_steps(len(examples), spec)
    data_fp = fingerprint(examples)
    say(f"data: {stats['rows']} rows, {stats['tokens']} tokens ({stats['label_tokens']} label tokens), "
        f"max {stats['max_len']} tokens/row; {n_steps} steps of {spec.batch_size} rows",
        data={"data": stats, "total_steps": n_steps, "model_family": family, "target_modules": targets})

    # --- memory plan, before loading any weights (fail fast) -------------------------------
    memory = MemoryModel(compute_bytes=2 if device.startswith("cuda") else 4, quantized=spec.load_in_4bit)
    shape = model_shape(config, targets, spec.lora_r, quantize=spec.load_in_4bit)
    budget = run.memory_budget_bytes or device_budget(device)
    lengths = [len(e) for e in examples]
    plan = choose_plan(shape, lengths, spec, budget, memory=memory, world_size=dist_.world)
    say(plan.summary(), data={"memory_plan": plan.to_dict()})

    # --- model ------------------------------------------------------------------------------
    _seed_all(spec.seed)  # the same LoRA initialisation on every rank
    model = load_trainable(path, spec, targets, device, plan.gradient_checkpointing,
                           dense_layers=plan.dense_layers, attention=plan.attention)
    if dist_.world > 1:
        _seed_all(spec.seed + 1000 * dist_.rank)  # but independent dropout masks per rank
    if plan.packing and not check_packing(model, device, shape.vocab):
        loaded_dense = plan.dense_layers  # already dequantized: plan around them
        plan = choose_plan(shape, lengths, spec, budget - loaded_dense * dense_layer_bytes(shape, memory),
                           memory=memory, world_size=dist_.world, packing_supported=False, allow_dense=False)
        plan.dense_layers = loaded_dense
        _set_checkpointing(model, plan.gradient_checkpointing)
        say("this model's attention does not honour packed sequences; using length-grouped "
            "padded micro-batches instead. " + plan.summary(), level="warn",
            data={"memory_plan": plan.to_dict()})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    optimizer, scheduler = make_optimizer(model, spec, n_steps, device)

    # --- resume ----------------------------------------------------------------------------
    resume_key = {"data": data_fp, "spec": _spec_key(spec), "base": base_model_fingerprint(path),
                  "world_size": dist_.world}
    state, resumed_from = LoopState(), None
    for cand in reversed(ckpt.complete_checkpoints(work_dir)):
        try:
            saved = ckpt.read_state(cand)
        except (OSError, ValueError):
            continue
        if saved.get("resume_key") != json.loads(json.dumps(resume_key)):
            say(f"ignoring checkpoint {cand.name}: it belongs to other data or hyperparameters",
                level="warn", data={"checkpoint": str(cand)})
            if dist_.main:
                ckpt.remove_checkpoints(work_dir)
            break
        try:
            state = LoopState.from_dict(ckpt.load_checkpoint(cand, model, optimizer, scheduler, device))
        except Exception as exc:  # unreadable/corrupt: an older one may still be good
            say(f"checkpoint {cand.name} cannot be restored ({type(exc).__name__}: {exc}); trying an older one",
                level="warn", data={"checkpoint": str(cand)})
            continue
        resumed_from = state.step
        say(f"resuming from checkpoint step {state.step} (loss {state.loss})",
            data={"resumed_from_step": state.step, "loss": state.loss})
        break

    # --- train ------------------------------------------------------------------------------
    adapter_dir = work_dir / ADAPTER_DIR
    if dist_.main:
        shutil.rmtree(adapter_dir, ignore_errors=True)  # never leave a stale one to be published
    loop = TrainLoop(model=model, spec=spec, plan=plan, examples=examples, device=device, pad_id=pad_id,
                     total_steps=n_steps, work_dir=work_dir, progress=progress, dist_=dist_,
                     validation=val_examples, state=state, optimizer=optimizer, scheduler=scheduler,
                     checkpoint_extra={"resume_key": resume_key, "memory_plan": plan.to_dict()})
    eval_args = _eval_args(spec, val_convs, train_convs, max_positions, device)
    eval_estimate_s, eval_replies = 0.0, 0
    if eval_args is not None and dist_.main:  # the ETA includes evaluation from the first step on
        from workers.training.evaluate import eval_seconds_estimate
        eval_estimate_s, eval_replies = eval_seconds_estimate(
            model, tokenizer, eval_args["convs"], device=device, max_samples=spec.eval_max_samples,
            max_new_tokens=eval_args["max_new_tokens"], max_prompt_tokens=eval_args["max_prompt_tokens"],
            batch_size=eval_args["batch_size"])
        loop.eta_after_s = eval_estimate_s
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    t_train = time.perf_counter()
    steps_before = state.step
    tokens_before, labels_before = state.trained_tokens, state.label_tokens
    try:
        state = loop.run()
    except torch.OutOfMemoryError as exc:
        raise TrainingError(
            f"out of memory at step {loop.state.step + 1} with plan [{plan.summary()}]: "
            f"{str(exc).splitlines()[0]}", code="out_of_memory") from exc
    train_s = time.perf_counter() - t_train
    peak = torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None
    last_progress = loop.last_progress or JobProgress(step=state.step, total_steps=n_steps, loss=state.loss)
    del optimizer, scheduler, loop
    gc.collect()

    if dist_.world > 1:
        import torch.distributed as dist
        dist.barrier()
        if not dist_.main:  # rank 0 alone saves and evaluates
            dist.destroy_process_group()
            return TrainingOutcome(adapter_dir=adapter_dir, trained_tokens=state.trained_tokens,
                                   steps=state.step, metrics={}, manifest={})

    # --- save (tmp dir + rename: a half-written adapter is never visible) -------------------
    with atomic_dir(adapter_dir, replace=True) as tmp:
        model.save_pretrained(str(tmp))
    throughput = {
        "train_seconds": round(train_s, 2), "steps_this_run": state.step - steps_before,
        "tokens_per_second": round((state.trained_tokens - tokens_before) / max(train_s, 1e-9), 1),
        "label_tokens_per_second": round((state.label_tokens - labels_before) / max(train_s, 1e-9), 1),
        "peak_memory_gib": round(peak / GiB, 3) if peak is not None else None,
        "device": device, "world_size": dist_.world,
    }
    say(f"training done: {state.step} steps, final loss {state.loss:.4f}; "
        f"{throughput['label_tokens_per_second']:.0f} label tok/s", data={"throughput": throughput,
                                                                         "loss": state.loss,
                                                                         "step": state.step})

    # --- evaluate (phase "evaluating n/N"; a cancel is honoured between evaluation batches) ---
    evaluating = EvalProgress(progress, last_progress, state.trained_tokens, eval_estimate_s, eval_replies)
    try:
        evaluating.check_cancel(f"after step {state.step}, before evaluation")
        metrics = _evaluate(model, tokenizer, spec, state, val_examples, eval_args, evaluating, device, plan,
                            pad_id, say)
    except Cancelled:
        shutil.rmtree(adapter_dir, ignore_errors=True)  # never published
        raise

    training = {"steps": state.step, "total_steps": n_steps, "trained_tokens": state.trained_tokens,
                "label_tokens": state.label_tokens, "data": stats, "data_fingerprint": data_fp,
                "memory_plan": plan.to_dict(), "throughput": throughput,
                "loss_history": _downsample(state.loss_history), "eval_history": _downsample(state.eval_history), "resumed_from_step": resumed_from,
                "wall_seconds": round(time.time() - t_start, 1)}
    manifest = {"base_model": run.base_model_ref, "base_model_fingerprint": base_model_fingerprint(path),
                "model_family": family, "target_modules": targets, "r": spec.lora_r,
                "lora_alpha": spec.lora_alpha, "job_id": run.job_id, "training": training, "metrics": metrics}
    if not run.keep_checkpoints:
        ckpt.remove_checkpoints(work_dir)
    if dist_.world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return TrainingOutcome(adapter_dir=adapter_dir, trained_tokens=state.trained_tokens, steps=state.step,
                           metrics=metrics, manifest=manifest, result={"training": training, "metrics": metrics},
                           resumed_from_step=resumed_from)


def _evaluate(model, tokenizer, spec: TrainingSpec, state: LoopState, val_examples, eval_args, evaluating,
              device: str, plan: MemoryPlan, pad_id: int, say) -> dict[str, Any]:
    """Validation loss, then the before/after replies; raises Cancelled between batches."""
    if val_examples or eval_args is not None:
        evaluating.start()
    metrics: dict[str, Any] = {"train_loss": state.loss}
    if val_examples:
        metrics["eval_loss"] = loop_eval = _final_eval_loss(model, val_examples, device, plan, pad_id)
        say(f"validation loss {loop_eval:.4f}", data={"eval_loss": loop_eval, "step": state.step})
        evaluating.eval_loss(loop_eval)
    if eval_args is not None:
        from workers.training.evaluate import before_after
        split = eval_args["split"]
        evaluating.begin_replies()
        try:
            quality = before_after(model, tokenizer, eval_args["convs"], device=device,
                                   max_samples=spec.eval_max_samples, max_new_tokens=eval_args["max_new_tokens"],
                                   max_prompt_tokens=eval_args["max_prompt_tokens"], split=split,
                                   batch_size=eval_args["batch_size"], log=lambda m: say(m),
                                   on_replies=evaluating.replies)
        except torch.OutOfMemoryError as exc:
            quality = {"error": f"evaluation ran out of memory: {str(exc).splitlines()[0]}"}
        metrics["quality"] = quality
        if "adapter" in quality:
            say(f"quality on {quality['n_samples']} {split} prompts: adapter {_fmt(quality['adapter'])}; "
                f"base {_fmt(quality['base'])}", data={"quality": {k: quality[k] for k in ("base", "adapter")}})
    return metrics


def _eval_args(spec: TrainingSpec, val_convs, train_convs, max_positions: int | None,
               device: str) -> dict[str, Any] | None:
    """How the before/after evaluation runs (None when eval_max_samples is 0)."""
    if spec.eval_max_samples <= 0:
        return None
    convs, split = (val_convs, "validation") if val_convs else (train_convs, "train")
    new_tokens, prompt_cap = spec.eval_max_new_tokens, spec.max_source_length + spec.max_target_length
    if max_positions is not None:  # prompt + reply within the model's positions
        new_tokens = min(new_tokens, max_positions - 1)
        prompt_cap = min(prompt_cap, max_positions - new_tokens)
    return {"convs": convs, "split": split, "max_new_tokens": new_tokens, "max_prompt_tokens": prompt_cap,
            "batch_size": 8 if device.startswith("cuda") else 4}


def _final_eval_loss(model, val: list[Example], device: str, plan: MemoryPlan, pad_id: int) -> float:
    from workers.training.evaluate import validation_loss
    return round(validation_loss(model, val, device=device, token_budget=plan.micro_batch_tokens,
                                 packing=plan.packing, rows=plan.micro_batch_rows, pad_id=pad_id), 6)


def _downsample(points: list, keep: int = 500) -> list:
    """At most ~`keep` points of a curve (first and last kept), so manifests stay small."""
    if len(points) <= keep:
        return points
    stride = math.ceil(len(points) / keep)
    out = points[::stride]
    return out if out[-1] == points[-1] else out + [points[-1]]


def _fmt(scores: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if isinstance(v, float))


def _set_checkpointing(model, on: bool) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    active = bool(getattr(base, "is_activation_checkpointing", None)
                  if hasattr(base, "is_activation_checkpointing") else base.is_gradient_checkpointing)
    if on and not active:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif not on and active:
        base.gradient_checkpointing_disable()
