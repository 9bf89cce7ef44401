"""Progress after the last optimizer step: the `evaluating` phase (validation loss, then the
before/after replies) reported through the recipe's Progress, with an ETA measured as it goes
and a cancel check between evaluation batches."""
from __future__ import annotations

import time

from service.core.domain import JobProgress
from service.core.errors import Cancelled


class EvalProgress:
    """Reports `evaluating n/N` with the training's last numbers kept (step, loss, ...)."""

    def __init__(self, progress, last: JobProgress, trained_tokens: int, estimate_s: float, total: int,
                 validation_s: float = 0.0):
        """`estimate_s`: the before/after generation's estimate; `validation_s`: the
        validation-loss pass's, which comes first (0 when there is none)."""
        self.progress, self.trained_tokens = progress, trained_tokens
        self.estimate_s = estimate_s
        self.current = last.model_copy(update={"phase": "evaluating", "eval_done": 0, "eval_total": total or None,
                                               "eta_seconds": round(validation_s + estimate_s, 1)})
        self.t0: float | None = None

    def start(self) -> None:
        self._report()

    def eval_loss(self, value: float, accuracy: float | None = None) -> None:
        """The validation pass is done: its numbers in, the generation's estimate left."""
        self.current = self.current.model_copy(update={"eval_loss": value, "eval_mean_token_accuracy": accuracy,
                                                       "eta_seconds": round(self.estimate_s, 1)})
        self._report()
        self.check_cancel("after the validation loss")

    def begin_replies(self) -> None:
        self.t0 = time.perf_counter()

    def replies(self, done: int, total: int) -> None:
        """After each batch of generated replies (before_after's on_replies): the ETA is the
        measured time per reply so far times the replies left."""
        t0 = self.t0 if self.t0 is not None else time.perf_counter()
        eta = (time.perf_counter() - t0) / done * (total - done) if done else self.current.eta_seconds
        self.current = self.current.model_copy(update={"eval_done": done, "eval_total": total,
                                                       "eta_seconds": round(max(eta or 0.0, 0.0), 1)})
        self._report()
        self.check_cancel(f"during evaluation ({done}/{total} replies)")

    def check_cancel(self, where: str) -> None:
        if self.progress.should_stop():
            raise Cancelled(f"cancelled {where}")

    def _report(self) -> None:
        self.progress.progress(self.current, self.trained_tokens)
