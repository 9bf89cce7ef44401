"""Conversations -> tokenized training examples, and the seeded order in which steps see them.

Tokenization is service.models' (the exact format the engine serves), so training and
inference cannot drift apart. The data position of a run is (epoch, index into that
epoch's permutation); the permutation is a pure function of (seed, epoch, n), which is what
makes a resumed run see exactly the examples the uninterrupted one would have seen.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from service.core.domain import TrainingSpec
from service.core.errors import InvalidInput, TrainingError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One tokenized row. `labels` is aligned with `input_ids` (HF convention: -100 = no loss);
    the loss at position t predicts input_ids[t] from the tokens before it."""
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def targets(self) -> list[int]:
        """Next-token targets per position (labels shifted left by one, -100 at the end), so
        examples can be concatenated without a boundary token predicting the next example."""
        return list(self.labels[1:]) + [IGNORE_INDEX]

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


Warn = Callable[[str, dict], None]


def _split_single_turn(conv: Sequence[dict]) -> tuple[str, str] | None:
    """(user content, assistant content) of a single-turn row (an optional system message first)."""
    msgs = [m for m in conv if m.get("role") != "system"]
    if len(msgs) == 2 and msgs[0].get("role") == "user" and msgs[1].get("role") == "assistant":
        return msgs[0]["content"], msgs[1]["content"]
    return None


# A run's conversations: given, or produced on demand (a dataset read only by the rank that needs it).
Conversations = Sequence[Sequence[dict]] | Callable[[], Iterable[Sequence[dict]]]


def conversations_list(src: Conversations | None) -> list[Sequence[dict]] | None:
    if src is None:
        return None
    return list(src() if callable(src) else src)


def tokenize_conversations(tokenizer, conversations: Iterable[Sequence[dict]], spec: TrainingSpec,
                           *, warn: Warn | None = None, what: str = "training",
                           max_positions: int | None = None) -> list[Example]:
    """Tokenize every conversation for training; drop (with one warning) rows left with no
    label token after truncation; raise TrainingError(invalid_data) if nothing usable remains.

    chat:  service.models.tokenize_chat, cut at max_source_length + max_target_length tokens.
    plain: service.models.tokenize_plain (the lecture's `[gMASK] sop content summary eos`),
           only for single-turn user/assistant rows (AdvertiseGen-like).
    Either way a row holds at most `max_positions` tokens (the base model's position limit,
    service.models.position_limit) when that is below max_source_length + max_target_length.
    """
    from service.models import tokenize_chat, tokenize_plain

    out: list[Example] = []
    dropped: list[int] = []
    n = 0
    max_len = spec.max_source_length + spec.max_target_length
    if max_positions is not None:
        max_len = min(max_len, max_positions)
    for i, conv in enumerate(conversations):
        n += 1
        try:
            if spec.train_format == "plain":
                pair = _split_single_turn(conv)
                if pair is None:
                    raise TrainingError(
                        f"{what} row {i}: train_format 'plain' needs single-turn user/assistant rows "
                        "(AdvertiseGen-like content/summary)", code="invalid_data", param="train_format")
                ids, labels = tokenize_plain(tokenizer, pair[0], pair[1],
                                             spec.max_source_length, spec.max_target_length)
                ids, labels = ids[:max_len], labels[:max_len]
            else:
                ids, labels = tokenize_chat(tokenizer, conv, max_len)
        except InvalidInput as exc:
            raise TrainingError(f"{what} row {i}: {exc.message}", code="invalid_data",
                                param=exc.param) from exc
        ex = Example(tuple(int(t) for t in ids), tuple(int(t) for t in labels))
        if len(ex) < 2 or ex.n_label_tokens == 0:
            dropped.append(i)
            continue
        out.append(ex)
    if dropped and warn is not None:
        warn(f"dropped {len(dropped)} of {n} {what} rows with no assistant token left after "
             f"truncation to {spec.max_source_length}+{spec.max_target_length} tokens",
             {"dropped": len(dropped), "rows": n, "first_dropped_rows": dropped[:10]})
    if not out:
        raise TrainingError(f"no usable {what} rows: {n} rows read, {len(dropped)} without any "
                            "assistant token after truncation", code="invalid_data",
                            param="training_file" if what == "training" else "validation_file")
    return out


def fingerprint(examples: Sequence[Example]) -> str:
    """Identifies the tokenized data set, so a resume refuses checkpoints of other data."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.asarray(ex.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(ex.labels, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def length_stats(examples: Sequence[Example]) -> dict[str, float]:
    lens = np.asarray([len(e) for e in examples])
    labs = np.asarray([e.n_label_tokens for e in examples])
    return {"rows": int(lens.size), "tokens": int(lens.sum()), "label_tokens": int(labs.sum()),
            "mean_len": float(lens.mean()), "p50_len": float(np.percentile(lens, 50)),
            "p95_len": float(np.percentile(lens, 95)), "max_len": int(lens.max())}


# ---------------------------------------------------------------------------------------
# Order of the data: seeded per-epoch permutations, steps of `batch_size` rows
# ---------------------------------------------------------------------------------------
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The permutation of epoch `epoch`: a pure function of (n, seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)  # a last, smaller batch is kept (no row is skipped)


def total_steps(n: int, spec: TrainingSpec) -> int:
    if spec.max_steps:
        return spec.max_steps
    return max(1, math.ceil(spec.n_epochs * steps_per_epoch(n, spec.batch_size)))


@dataclass
class DataPosition:
    epoch: int = 0
    index: int = 0  # next row of this epoch's permutation


class StepSampler:
    """Yields the row indices of each optimizer step from a DataPosition, advancing it."""

    def __init__(self, n: int, batch_size: int, seed: int, position: DataPosition | None = None):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.position = position or DataPosition()
        self._order: list[int] | None = None
        self._order_epoch = -1

    def _order_for(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            self._order, self._order_epoch = epoch_order(self.n, self.seed, epoch), epoch
        assert self._order is not None
        return self._order

    def next_step(self) -> list[int]:
        pos = self.position
        if pos.index >= self.n:
            pos.epoch, pos.index = pos.epoch + 1, 0
        order = self._order_for(pos.epoch)
        rows = order[pos.index: pos.index + self.batch_size]
        pos.index += len(rows)
        return rows

    @property
    def epoch_float(self) -> float:
        return self.position.epoch + self.position.index / self.n
