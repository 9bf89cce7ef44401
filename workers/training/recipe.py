"""The training core as a recipe (torchtune's lora_finetune_single_device.py shape): one object
per run whose phases are methods, setup -> plan_memory -> load_model -> resume -> train ->
save -> evaluate, and one cleanup. Nothing of Celery, HTTP or the database: a caller hands a
TrainingRun and a Progress to run_training and gets a TrainingOutcome (the adapter dir, the
manifest draft and one report, all domain types) or a typed error (TrainingError code
out_of_memory / invalid_data / model_not_found / invalid_plan / internal, or Cancelled)."""
from __future__ import annotations

import gc
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from service.core.atomic import atomic_dir
from service.core.domain import AdapterDraft, JobProgress, TrainingReport, TrainingSpec
from service.core.errors import Cancelled, InvalidInput, TrainingError, TuneserveError
from workers.training import checkpoint as ckpt
from workers.training.data import (Conversations, Example, conversations_list, fingerprint, length_stats,
                                   tokenize_conversations, total_steps)
from workers.training.loop import Dist, LoopState, TrainLoop, make_optimizer
from workers.training.model import check_packing, load_trainable
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
    base_model_ref: str                 # what to load: a hub id or a local directory
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
    # The base's public id, which the manifest records (service.core.identity); None: the ref.
    base_model_id: str | None = None


@dataclass(frozen=True)
class TrainingOutcome:
    """What a run hands back: the adapter pair on disk (work_dir/adapter, not yet published),
    what the manifest says of it, and the run's one report."""
    adapter_dir: Path
    adapter: AdapterDraft
    report: TrainingReport

    def to_json(self) -> str:
        return json.dumps({"adapter_dir": str(self.adapter_dir), "adapter": self.adapter.model_dump(mode="json"),
                           "report": self.report.model_dump(mode="json")}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "TrainingOutcome":
        o = json.loads(text)
        return cls(adapter_dir=Path(o["adapter_dir"]), adapter=AdapterDraft.model_validate(o["adapter"]),
                   report=TrainingReport.model_validate(o["report"]))


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


def run_training(run: TrainingRun, progress: Progress | None = None) -> TrainingOutcome | None:
    """Train one LoRA adapter (see module docstring). Resumes from the newest complete
    checkpoint in run.work_dir automatically. The adapter dir is NOT published here. Returns
    None only on a data-parallel rank other than 0 (rank 0 alone saves and reports)."""
    progress = progress or NullProgress()
    # Packed micro-batches vary in size every step; expandable segments keep the caching
    # allocator from fragmenting (only effective if CUDA was not initialised before).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if run.spec.n_gpus > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        from workers.training.distributed import run_training_distributed
        return run_training_distributed(run, progress)
    recipe = LoRAFinetuneRecipe(run, progress)
    try:
        return recipe.run()
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
        recipe.cleanup()


class LoRAFinetuneRecipe:
    """One training run. `run()` calls the phases in order; each sets the attributes the next
    one reads. `cleanup()` is the only exit path, whatever happened (run_training calls it)."""

    def __init__(self, run: TrainingRun, progress: Progress):
        self.cfg, self.spec, self.progress = run, run.spec, progress
        self.work_dir = Path(run.work_dir)
        self.adapter_dir = self.work_dir / ADAPTER_DIR
        self.dist, self.device = Dist(), "cpu"
        self._owns_process_group = False
        self.model = self.optimizer = self.scheduler = None
        self.state, self.resumed_from = LoopState(), None

    def say(self, message: str, *, level: str = "info", data: dict | None = None) -> None:
        if self.dist.main:  # one voice for the whole data-parallel run
            self.progress.event(message, level=level, data=data)

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> TrainingOutcome | None:
        self.t_start = time.time()
        self.setup()
        self.plan_memory()
        self.load_model()
        self.resume()
        self.train()
        if not self.dist.main:
            return None
        self.save()
        metrics = self.evaluate()
        report = self.report(metrics)
        if not self.cfg.keep_checkpoints:
            ckpt.remove_checkpoints(self.work_dir)
        return TrainingOutcome(adapter_dir=self.adapter_dir, adapter=self.draft(), report=report)

    # -- setup: device and ranks, model files, tokenizer, data ------------------------------
    def setup(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._setup_device()
        self._setup_base_model()
        self._setup_data()

    def _setup_device(self) -> None:
        """Rank info and device under torchrun (WORLD_SIZE > 1), else one process."""
        from service.models import resolve_device

        try:
            device = resolve_device(self.cfg.device)  # the engine's rule too (service.core.identity)
        except InvalidInput as exc:
            raise TrainingError(exc.message, code="internal", param="device") from exc
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            import torch.distributed as dist
            if device.startswith("cuda"):
                local = int(os.environ.get("LOCAL_RANK", "0"))
                torch.cuda.set_device(local)
                device = f"cuda:{local}"
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
                self._owns_process_group = True
            self.dist = Dist(rank=dist.get_rank(), world=dist.get_world_size())
        self.device = device

    def _setup_base_model(self) -> None:
        """The base's identity resolved once (service.models.identity, as the engine does):
        files, family, fingerprint, default targets, position limit."""
        from transformers import AutoConfig

        from service.core.identity import BaseModelIdentity
        from service.models import load_tokenizer, resolve_identity

        ref = self.cfg.base_model_ref
        named = BaseModelIdentity(ref=ref, public_id=self.cfg.base_model_id or ref, aliases=frozenset())
        try:
            self.base = resolve_identity(named, Path(self.cfg.models_cache_dir), device=self.device)
        except InvalidInput as exc:
            raise TrainingError(exc.message, code="model_not_found", param="model") from exc
        except (OSError, ValueError) as exc:
            raise TrainingError(f"base model {ref!r}: {exc}", code="model_not_found", param="model") from exc
        self.model_path = self.base.path
        try:
            self.tokenizer = load_tokenizer(self.model_path)
            self.model_config = AutoConfig.from_pretrained(str(self.model_path))
        except (OSError, ValueError) as exc:
            raise TrainingError(f"base model {ref!r} cannot be loaded: {exc}",
                                code="model_not_found", param="model") from exc
        self.family = self.base.family
        self.max_positions = self.base.position_limit
        self.fingerprint = self.base.fingerprint
        self.targets = list(self.spec.lora_target_modules or self.base.default_targets)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _setup_data(self) -> None:
        spec = self.spec
        warn = lambda msg, data: self.say(msg, level="warn", data=data)  # noqa: E731
        self.train_convs = conversations_list(self.cfg.train_conversations) or []
        self.examples = tokenize_conversations(self.tokenizer, self.train_convs, spec, warn=warn, what="training",
                                               max_positions=self.max_positions)
        self.val_convs = conversations_list(self.cfg.validation_conversations)
        self.val_examples = (tokenize_conversations(self.tokenizer, self.val_convs, spec, warn=warn,
                                                    what="validation", max_positions=self.max_positions)
                             if self.val_convs else None)
        self.stats = stats = length_stats(self.examples)
        self.n_steps = total_steps(len(self.examples), spec)
        self.data_fp = fingerprint(self.examples)
        self.say(f"data: {stats['rows']} rows, {stats['tokens']} tokens ({stats['label_tokens']} label tokens), "
                 f"max {stats['max_len']} tokens/row; {self.n_steps} steps of {spec.batch_size} rows",
                 data={"data": stats, "total_steps": self.n_steps, "model_family": self.family,
                       "target_modules": self.targets})

    # -- memory plan, before loading any weights (fail fast) --------------------------------
    def plan_memory(self) -> None:
        spec = self.spec
        self.memory = MemoryModel(compute_bytes=2 if self.device.startswith("cuda") else 4,
                                  quantized=spec.load_in_4bit)
        self.shape = model_shape(self.model_config, self.targets, spec.lora_r, quantize=spec.load_in_4bit)
        self.budget = self.cfg.memory_budget_bytes or device_budget(self.device)
        self.lengths = [len(e) for e in self.examples]
        self.plan = choose_plan(self.shape, self.lengths, spec, self.budget, memory=self.memory,
                                world_size=self.dist.world)
        self.say(self.plan.summary(), data={"memory_plan": self.plan.to_dict()})

    # -- model: 4-bit base + LoRA, optimizer ------------------------------------------------
    def load_model(self) -> None:
        spec, plan = self.spec, self.plan
        _seed_all(spec.seed)  # the same LoRA initialisation on every rank
        self.model = load_trainable(self.model_path, spec, self.targets, self.device, plan.gradient_checkpointing,
                                    dense_layers=plan.dense_layers, attention=plan.attention)
        if self.dist.world > 1:
            _seed_all(spec.seed + 1000 * self.dist.rank)  # but independent dropout masks per rank
        if plan.packing and not check_packing(self.model, self.device, self.shape.vocab):
            self._replan_without_packing()
        self.optimizer, self.scheduler = make_optimizer(self.model, spec, self.n_steps, self.device)

    def _replan_without_packing(self) -> None:
        loaded_dense = self.plan.dense_layers  # already dequantized: plan around them
        self.plan = choose_plan(self.shape, self.lengths, self.spec,
                                self.budget - loaded_dense * dense_layer_bytes(self.shape, self.memory),
                                memory=self.memory, world_size=self.dist.world, packing_supported=False,
                                allow_dense=False)
        self.plan.dense_layers = loaded_dense
        _set_checkpointing(self.model, self.plan.gradient_checkpointing)
        self.say("this model's attention does not honour packed sequences; using length-grouped "
                 "padded micro-batches instead. " + self.plan.summary(), level="warn",
                 data={"memory_plan": self.plan.to_dict()})

    # -- resume from the newest checkpoint that belongs to this run -------------------------
    def resume(self) -> None:
        self.resume_key = {"data": self.data_fp, "spec": _spec_key(self.spec), "base": self.fingerprint,
                           "world_size": self.dist.world}
        if self.dist.main:  # an earlier attempt killed mid-write left a temp dir: it is dead now
            for partial in ckpt.remove_partial_checkpoints(self.work_dir):
                self.say(f"removed the half-written checkpoint {partial.name} of an earlier attempt", level="warn",
                         data={"checkpoint": str(partial)})
        for cand in reversed(ckpt.complete_checkpoints(self.work_dir)):
            try:
                saved = ckpt.read_state(cand)
            except (OSError, ValueError):
                continue
            if saved.get("resume_key") != json.loads(json.dumps(self.resume_key)):
                self.say(f"ignoring checkpoint {cand.name}: it belongs to other data or hyperparameters",
                         level="warn", data={"checkpoint": str(cand)})
                if self.dist.main:
                    ckpt.remove_checkpoints(self.work_dir)
                return
            try:
                state = ckpt.load_checkpoint(cand, self.model, self.optimizer, self.scheduler, self.device)
            except Exception as exc:  # unreadable/corrupt: an older one may still be good
                self.say(f"checkpoint {cand.name} cannot be restored ({type(exc).__name__}: {exc}); "
                         "trying an older one", level="warn", data={"checkpoint": str(cand)})
                continue
            self.state = LoopState.from_dict(state)
            self.resumed_from = self.state.step
            self.say(f"resuming from checkpoint step {self.state.step} (loss {self.state.loss})",
                     data={"resumed_from_step": self.state.step, "loss": self.state.loss})
            return

    # -- train ------------------------------------------------------------------------------
    def train(self) -> None:
        device, plan, state = self.device, self.plan, self.state
        if self.dist.main:
            shutil.rmtree(self.adapter_dir, ignore_errors=True)  # never leave a stale one to be published
        loop = TrainLoop(model=self.model, spec=self.spec, plan=plan, examples=self.examples, device=device,
                         pad_id=self.pad_id, total_steps=self.n_steps, work_dir=self.work_dir,
                         progress=self.progress, dist_=self.dist, validation=self.val_examples, state=state,
                         optimizer=self.optimizer, scheduler=self.scheduler,
                         checkpoint_extra={"resume_key": self.resume_key, "memory_plan": plan.to_dict()})
        # The ETA includes evaluation from the first step on: the before/after generation from a
        # timed probe before training, the validation-loss passes from the loop's own timings.
        self.eval_estimate_s, self.eval_replies = self._eval_estimate()
        loop.eta_after_s = self.eval_estimate_s
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        t_train = time.perf_counter()
        steps_before, tokens_before, labels_before = state.step, state.trained_tokens, state.label_tokens
        try:
            self.state = state = loop.run()
        except torch.OutOfMemoryError as exc:
            raise TrainingError(
                f"out of memory at step {loop.state.step + 1} with plan [{plan.summary()}]: "
                f"{str(exc).splitlines()[0]}", code="out_of_memory") from exc
        train_s = time.perf_counter() - t_train
        self.validation_estimate_s = loop.validation_estimate_s()  # the final pass, in evaluate()
        peak = torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None
        self.last_progress = loop.last_progress or JobProgress(step=state.step, total_steps=self.n_steps,
                                                               loss=state.loss)
        self.optimizer = self.scheduler = None
        del loop
        gc.collect()
        self.throughput = {
            "train_seconds": round(train_s, 2), "steps_this_run": state.step - steps_before,
            "tokens_per_second": round((state.trained_tokens - tokens_before) / max(train_s, 1e-9), 1),
            "label_tokens_per_second": round((state.label_tokens - labels_before) / max(train_s, 1e-9), 1),
            "peak_memory_gib": round(peak / GiB, 3) if peak is not None else None,
            "device": device, "world_size": self.dist.world,
        }
        if self.dist.world > 1:
            import torch.distributed as dist
            dist.barrier()  # every rank done before rank 0 alone saves and evaluates

    # -- save (tmp dir + rename: a half-written adapter is never visible) -------------------
    def save(self) -> None:
        with atomic_dir(self.adapter_dir, replace=True) as tmp:
            self.model.save_pretrained(str(tmp))
        state = self.state
        self.say(f"training done: {state.step} steps, final loss {state.loss:.4f}; "
                 f"{self.throughput['label_tokens_per_second']:.0f} label tok/s",
                 data={"throughput": self.throughput, "loss": state.loss, "step": state.step})

    # -- evaluate: validation loss, BLEU/ROUGE of base and adapter --------------------------
    # Phase "evaluating n/N" in the progress; a cancel is honoured between evaluation batches.
    def evaluate(self) -> dict[str, Any]:
        state = self.state
        evaluating = EvalProgress(self.progress, self.last_progress, state.trained_tokens,
                                  self.eval_estimate_s, self.eval_replies,
                                  validation_s=self.validation_estimate_s if self.val_examples else 0.0)
        try:
            evaluating.check_cancel(f"after step {state.step}, before evaluation")
            return self._evaluate(evaluating)
        except Cancelled:
            shutil.rmtree(self.adapter_dir, ignore_errors=True)  # never published
            raise

    def _evaluate(self, evaluating: EvalProgress) -> dict[str, Any]:
        state, device, args = self.state, self.device, self._eval_args()
        if self.val_examples or args is not None:
            evaluating.start()
        metrics: dict[str, Any] = {"train_loss": state.loss}
        if state.accuracy is not None:
            metrics["train_mean_token_accuracy"] = round(state.accuracy, 6)
        if self.val_examples:
            loss, accuracy = _final_eval_metrics(self.model, self.val_examples, device, self.plan, self.pad_id)
            metrics["eval_loss"], metrics["eval_mean_token_accuracy"] = loss, accuracy
            self.say(f"validation loss {loss:.4f}, token accuracy {accuracy:.4f}",
                     data={"eval_loss": loss, "eval_mean_token_accuracy": accuracy, "step": state.step})
            evaluating.eval_loss(loss, accuracy)
        if args is not None:
            metrics["quality"] = self._quality(args, evaluating)
        return metrics

    def _eval_args(self) -> dict[str, Any] | None:
        """How the before/after evaluation runs (None when eval_max_samples is 0)."""
        spec, device = self.spec, self.device
        if spec.eval_max_samples <= 0:
            return None
        convs, split = (self.val_convs, "validation") if self.val_convs else (self.train_convs, "train")
        new_tokens, prompt_cap = spec.eval_max_new_tokens, spec.max_source_length + spec.max_target_length
        if self.max_positions is not None:  # prompt + reply within the model's positions
            new_tokens = min(new_tokens, self.max_positions - 1)
            prompt_cap = min(prompt_cap, self.max_positions - new_tokens)
        return {"convs": convs, "split": split, "max_new_tokens": new_tokens, "max_prompt_tokens": prompt_cap,
                "batch_size": 8 if device.startswith("cuda") else 4}

    def _eval_estimate(self) -> tuple[float, int]:
        """(seconds, replies) the before/after evaluation will take at most (rank 0 evaluates)."""
        args = self._eval_args() if self.dist.main else None
        if args is None:
            return 0.0, 0
        from workers.training.evaluate import eval_seconds_estimate
        return eval_seconds_estimate(self.model, self.tokenizer, args["convs"], device=self.device,
                                     max_samples=self.spec.eval_max_samples, max_new_tokens=args["max_new_tokens"],
                                     max_prompt_tokens=args["max_prompt_tokens"], batch_size=args["batch_size"])

    def _quality(self, args: dict[str, Any], evaluating: EvalProgress) -> dict[str, Any]:
        from workers.training.evaluate import before_after

        split = args["split"]
        evaluating.begin_replies()
        try:
            quality = before_after(self.model, self.tokenizer, args["convs"], device=self.device,
                                   max_samples=self.spec.eval_max_samples, max_new_tokens=args["max_new_tokens"],
                                   max_prompt_tokens=args["max_prompt_tokens"], split=split,
                                   batch_size=args["batch_size"], log=lambda m: self.say(m),
                                   on_replies=evaluating.replies)
        except torch.OutOfMemoryError as exc:
            return {"error": f"evaluation ran out of memory: {str(exc).splitlines()[0]}"}
        if "adapter" in quality:
            self.say(f"quality on {quality['n_samples']} {split} prompts: adapter {_fmt(quality['adapter'])}; "
                     f"base {_fmt(quality['base'])}", data={"quality": {k: quality[k] for k in ("base", "adapter")}})
        return quality

    # -- the outcome ------------------------------------------------------------------------
    def report(self, metrics: dict[str, Any]) -> TrainingReport:
        s = self.state
        return TrainingReport(
            spec=self.spec, steps=s.step, total_steps=self.n_steps, trained_tokens=s.trained_tokens,
            label_tokens=s.label_tokens, resumed_from_step=self.resumed_from, data=self.stats,
            data_fingerprint=self.data_fp, memory_plan=self.plan.to_dict(), throughput=self.throughput,
            loss_history=_downsample(s.loss_history), eval_history=_downsample(s.eval_history),
            wall_seconds=round(time.time() - self.t_start, 1), metrics=metrics)

    def draft(self) -> AdapterDraft:
        spec = self.spec
        return AdapterDraft(base_model=self.base.public_id,
                            base_model_fingerprint=self.fingerprint, model_family=self.family,
                            target_modules=self.targets, r=spec.lora_r, lora_alpha=spec.lora_alpha,
                            job_id=self.cfg.job_id)

    # -- the one exit path ------------------------------------------------------------------
    def cleanup(self) -> None:
        """Leave the process as it was: the process group this run started destroyed (once),
        the model and optimizer freed, the CUDA cache emptied."""
        if self._owns_process_group:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_process_group = False
        self.model = self.optimizer = self.scheduler = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _final_eval_metrics(model, val: list[Example], device: str, plan: MemoryPlan,
                        pad_id: int) -> tuple[float, float]:
    """(validation loss, validation mean token accuracy), rounded as the events carry them."""
    from workers.training.evaluate import validation_metrics
    loss, accuracy = validation_metrics(model, val, device=device, token_budget=plan.micro_batch_tokens,
                                        packing=plan.packing, rows=plan.micro_batch_rows, pad_id=pad_id)
    return round(loss, 6), round(accuracy, 6)


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
