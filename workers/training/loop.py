"""The training loop (our own, not HF Trainer: cancellation every step, exact resume,
padding-free micro-batches whose gradients add up to the lecture's per-batch mean loss).

Loss of an optimizer step = (sum of token cross-entropies over every label token of the
step's `batch_size` rows) / (number of those label tokens) — the mean the recipe's padded
batch of 16 computes — however the rows are split into micro-batches or ranks. Each
micro-batch backpropagates its own sum divided by the step's global label count, so
accumulation and data parallelism change nothing mathematically.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from service.core.domain import JobProgress, TrainingSpec
from service.core.errors import Cancelled
from workers.training.checkpoint import save_checkpoint
from workers.training.data import DataPosition, Example, StepSampler
from workers.training.model import autocast, micro_batch_loss_and_correct, trainable_parameters
from workers.training.packing import micro_batches
from workers.training.plan import MemoryPlan


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """HF-compatible multipliers: linear warmup, then linear decay to 0 / half-cosine / constant."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return float(step + 1) / float(max(1, warmup_steps + 1)) if warmup_steps else 1.0
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return max(0.0, 1.0 - progress)
    return f


def make_optimizer(model, spec: TrainingSpec, total_steps: int, device: str):
    params = trainable_parameters(model)
    kw: dict[str, Any] = {"lr": spec.learning_rate, "weight_decay": spec.weight_decay}
    if device.startswith("cuda"):
        kw["fused"] = True
    opt = torch.optim.AdamW(params, **kw)
    warmup = math.ceil(spec.warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec.lr_scheduler, warmup, total_steps))
    return opt, sched


@dataclass
class LoopState:
    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    trained_tokens: int = 0        # real tokens seen by the model (padding excluded), all ranks
    label_tokens: int = 0
    loss: float | None = None
    accuracy: float | None = None       # mean token accuracy of the last step
    eval_loss: float | None = None
    eval_accuracy: float | None = None  # mean token accuracy of the last validation pass
    loss_history: list[list[float]] = field(default_factory=list)       # [step, loss]
    eval_history: list[list[float]] = field(default_factory=list)       # [step, eval_loss]

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.position.epoch, "index": self.position.index,
                "trained_tokens": self.trained_tokens, "label_tokens": self.label_tokens,
                "loss": self.loss, "accuracy": self.accuracy, "eval_loss": self.eval_loss,
                "eval_accuracy": self.eval_accuracy, "loss_history": self.loss_history,
                "eval_history": self.eval_history}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoopState":
        return cls(step=int(d["step"]), position=DataPosition(int(d["epoch"]), int(d["index"])),
                   trained_tokens=int(d.get("trained_tokens", 0)), label_tokens=int(d.get("label_tokens", 0)),
                   loss=d.get("loss"), accuracy=d.get("accuracy"), eval_loss=d.get("eval_loss"),
                   eval_accuracy=d.get("eval_accuracy"),
                   loss_history=list(d.get("loss_history", [])), eval_history=list(d.get("eval_history", [])))


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, exs: Sequence[Example]) -> list[Example]:
        """This rank's rows of a step: longest first, dealt round-robin (balances tokens)."""
        if self.world == 1:
            return list(exs)
        order = sorted(range(len(exs)), key=lambda i: (-len(exs[i]), i))
        return [exs[i] for i in order[self.rank::self.world]]

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(t)
        return t

    def any(self, flag: bool, device: str) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        self.all_reduce_(t)
        return bool(t.item() > 0)


def _all_reduce_grads(params: list[torch.nn.Parameter], dist_: Dist) -> None:
    """Sum gradients over ranks in one flat buffer (LoRA grads are a few MB). Each rank's grads
    are already divided by the step's global label count, so the sum is the global mean."""
    if dist_.world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist_.all_reduce_(flat)
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off: off + n].view_as(p).clone()
        off += n


class StepResult(NamedTuple):
    """One optimizer step over all ranks: mean loss and mean token accuracy over the step's
    label tokens, real tokens and label tokens."""
    loss: float
    accuracy: float
    tokens: int
    label_tokens: int


def validation_seconds(val_tokens: int, train_seconds_per_token: float | None,
                       measured_s: float | None) -> float:
    """Seconds one validation-loss pass takes: the last measured pass when there was one (the
    same work every time), else an upper bound from training's own rate: a forward pass over
    the validation tokens costs no more than training's forward + backward over as many."""
    if measured_s is not None:
        return measured_s
    if not val_tokens or train_seconds_per_token is None:
        return 0.0
    return val_tokens * train_seconds_per_token


class TrainLoop:
    def __init__(self, *, model, spec: TrainingSpec, plan: MemoryPlan, examples: Sequence[Example],
                 device: str, pad_id: int, total_steps: int, work_dir, progress, dist_: Dist,
                 validation: Sequence[Example] | None = None, state: LoopState | None = None,
                 optimizer=None, scheduler=None, checkpoint_extra: dict[str, Any] | None = None):
        self.model, self.spec, self.plan, self.examples = model, spec, plan, examples
        self.device, self.pad_id, self.total_steps = device, pad_id, total_steps
        self.work_dir, self.progress, self.dist = work_dir, progress, dist_
        self.validation = validation
        self.state = state or LoopState()
        self.params = trainable_parameters(model)
        if optimizer is None:
            optimizer, scheduler = make_optimizer(model, spec, total_steps, device)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.checkpoint_extra = checkpoint_extra or {}
        # Seconds the job needs after the last step beyond the validation-loss pass (the
        # before/after generation), set by the recipe: part of every ETA reported.
        self.eta_after_s = 0.0
        # The validation-loss pass (run at eval_steps and once after training): its duration
        # when measured, and the tokens it reads, for the ETA (see validation_seconds).
        self.val_tokens = sum(len(e) for e in validation) if validation else 0
        self.val_measured_s: float | None = None
        self.train_seconds_per_token: float | None = None
        self.last_progress: JobProgress | None = None
        self.sampler = StepSampler(len(examples), spec.batch_size, spec.seed, self.state.position)

    # -- one optimizer step ----------------------------------------------------------------
    def train_step(self) -> StepResult:
        """Mean loss and token accuracy of the step, real tokens and label tokens, over all ranks."""
        rows = self.sampler.next_step()
        exs = [self.examples[i] for i in rows]
        global_labels = sum(e.n_label_tokens for e in exs)
        mine = self.dist.shard(exs)
        mbs = micro_batches(mine, packing=self.plan.packing, token_budget=self.plan.micro_batch_tokens,
                            rows=self.plan.micro_batch_rows, pad_id=self.pad_id)
        # [loss sum, correct predictions] of this rank's label tokens (float32 counts are exact
        # up to 2^24 label tokens a step); one host sync per step, at the end.
        acc = torch.zeros(2, dtype=torch.float32, device=self.device)
        for mb in mbs:
            mb = mb.to(self.device)
            with autocast(self.device):
                loss_sum, correct = micro_batch_loss_and_correct(self.model, mb)
            (loss_sum / global_labels).backward()
            acc[0] += loss_sum.detach().float()
            acc[1] += correct
        _all_reduce_grads(self.params, self.dist)
        self.dist.all_reduce_(acc)
        if self.spec.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.spec.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, correct = acc.tolist()
        return StepResult(loss_sum / max(global_labels, 1), correct / max(global_labels, 1),
                          sum(len(e) for e in exs), global_labels)

    def eval_metrics(self) -> tuple[float, float] | None:
        """(validation loss, validation mean token accuracy), timed for the ETA."""
        if not self.validation:
            return None
        from workers.training.evaluate import validation_metrics
        t0 = time.perf_counter()
        # Every rank computes the same numbers (all hold the data); only rank 0 reports them.
        out = validation_metrics(self.model, self.validation, device=self.device,
                                 token_budget=self.plan.micro_batch_tokens, packing=self.plan.packing,
                                 rows=self.plan.micro_batch_rows, pad_id=self.pad_id)
        self.val_measured_s = time.perf_counter() - t0
        return out

    def validation_estimate_s(self) -> float:
        """Seconds of one validation-loss pass (0 without validation data)."""
        return validation_seconds(self.val_tokens, self.train_seconds_per_token, self.val_measured_s)

    def _evals_left(self, step: int) -> int:
        """Validation-loss passes still to run after `step`: the in-loop ones at eval_steps
        (never at the last step) and the final one after training."""
        if not self.validation:
            return 0
        every = self.spec.eval_steps
        in_loop = (self.total_steps - 1) // every - step // every if every and step < self.total_steps else 0
        return max(in_loop, 0) + 1

    def run(self) -> LoopState:
        st, spec, p = self.state, self.spec, self.progress
        window_t, window_tok, window_lab, window_steps = time.perf_counter(), 0, 0, 0
        run_t0, run_steps0, run_tok, eval_s = time.perf_counter(), st.step, 0, 0.0
        while st.step < self.total_steps:
            if self.dist.any(p.should_stop(), self.device):
                raise Cancelled(f"cancelled at step {st.step} of {self.total_steps}")
            loss, accuracy, ntok, nlab = self.train_step()
            st.step += 1
            st.loss, st.accuracy = loss, accuracy
            run_tok += ntok
            st.trained_tokens += ntok
            st.label_tokens += nlab
            st.loss_history.append([st.step, round(loss, 6)])
            window_tok += ntok
            window_lab += nlab
            window_steps += 1
            if spec.eval_steps and self.validation and st.step % spec.eval_steps == 0 \
                    and st.step < self.total_steps:
                st.eval_loss, st.eval_accuracy = self.eval_metrics()
                eval_s += self.val_measured_s
                st.eval_history.append([st.step, round(st.eval_loss, 6)])
                if self.dist.main:
                    p.event(f"step {st.step}: validation loss {st.eval_loss:.4f}, "
                            f"token accuracy {st.eval_accuracy:.4f}",
                            data={"step": st.step, "eval_loss": st.eval_loss,
                                  "eval_mean_token_accuracy": round(st.eval_accuracy, 6)})
            last = st.step == self.total_steps
            if st.step % spec.logging_steps == 0 or last:
                if self.device.startswith("cuda"):
                    torch.cuda.synchronize(self.device)
                now = time.perf_counter()
                dt = max(now - window_t, 1e-9)
                # Training's own pace (the validation passes it ran are counted apart).
                train_s = max(now - run_t0 - eval_s, 0.0)
                step_s = train_s / max(st.step - run_steps0, 1)
                self.train_seconds_per_token = train_s / max(run_tok, 1)
                eta = (step_s * (self.total_steps - st.step)
                       + self.validation_estimate_s() * self._evals_left(st.step) + self.eta_after_s)
                prog = JobProgress(step=st.step, total_steps=self.total_steps,
                                   epoch=round(self.sampler.epoch_float, 4), loss=round(loss, 6),
                                   mean_token_accuracy=round(accuracy, 6),
                                   eval_loss=st.eval_loss,
                                   eval_mean_token_accuracy=(None if st.eval_accuracy is None
                                                             else round(st.eval_accuracy, 6)),
                                   learning_rate=self.scheduler.get_last_lr()[0],
                                   tokens_per_second=round(window_tok / dt, 1),
                                   label_tokens_per_second=round(window_lab / dt, 1),
                                   eta_seconds=round(eta, 1), phase="training")
                self.last_progress = prog
                if self.dist.main:
                    p.progress(prog, st.trained_tokens)
                    p.event(f"step {st.step}/{self.total_steps}: loss {loss:.4f}, "
                            f"{prog.label_tokens_per_second:.0f} label tok/s "
                            f"({prog.tokens_per_second:.0f} tok/s)",
                            data=prog.model_dump(exclude_none=True) | {"trained_tokens": st.trained_tokens})
                window_t, window_tok, window_lab, window_steps = now, 0, 0, 0
            if st.step % spec.checkpoint_steps == 0 and not last:
                self.checkpoint()
        return st

    def checkpoint(self) -> None:
        st = self.state
        if self.dist.main:
            path = save_checkpoint(self.work_dir, st.step, self.model, self.optimizer, self.scheduler,
                                   dict(st.to_dict(), total_steps=self.total_steps,
                                        epoch_float=self.sampler.epoch_float, **self.checkpoint_extra))
            self.progress.event(f"checkpoint saved at step {st.step}",
                                data={"checkpoint_step": st.step, "path": str(path)})
        if self.dist.world > 1:
            import torch.distributed as dist
            dist.barrier()
