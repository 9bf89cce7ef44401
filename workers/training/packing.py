"""Micro-batches of one optimizer step: padding-free packed rows, or length-grouped padded rows.

Packed: the step's examples are placed first-fit-decreasing into bins of `token_budget`
tokens; each bin is ONE row, the examples concatenated, `position_ids` restarting at 0 for
each example and no attention mask. transformers >= 4.54 / 5.x (`masking_utils.
find_packed_sequence_indices`) turns position ids that restart into a block-diagonal causal
mask for eager/sdpa/flex attention (and flash-attention uses them as varlen boundaries) — but
only when `attention_mask is None` and there is no KV cache, hence `use_cache=False` in the
loop. Targets are shifted per example before concatenation, so no token learns to predict
the first token of its neighbour. `model.check_packing` verifies the model honours it.

Packed rows also carry `cu_seqlens` (example boundaries) so a varlen attention kernel
(model.py's "tuneserve_varlen") can skip the dense block-diagonal mask, whose T^2 cost sdpa
pays in full on the mem-efficient/math kernels.

Padded (fallback when packing cannot apply): the step's examples sorted by length and cut
into groups of `rows` examples, each padded only to its own longest row. Rows are RIGHT-padded
and get no attention mask: with causal attention a real token only sees earlier positions,
which are all real, so the result is exact, and sdpa keeps its is_causal flash kernel (a
padding mask would force the slower masked kernels). Padding positions carry no targets.

Every micro-batch carries `label_index`, the flat positions of its targets, computed here on
the host so the loss can gather hidden states at label positions without a device sync.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workers.training.data import IGNORE_INDEX, Example


@dataclass
class MicroBatch:
    input_ids: torch.Tensor              # [R, L]
    position_ids: torch.Tensor           # [R, L]
    targets: torch.Tensor                # [R, L] next-token targets, -100 = no loss
    attention_mask: torch.Tensor | None  # None: packed rows, or right-padded rows (see above)
    n_tokens: int                        # real tokens (no padding)
    n_label_tokens: int
    n_examples: int
    label_index: torch.Tensor | None = None  # [n_label_tokens] flat positions of the targets
    cu_seqlens: torch.Tensor | None = None   # [n_examples + 1] int32, packed single row only
    max_seqlen: int = 0

    @property
    def shape_tokens(self) -> int:
        """Tokens the model computes, padding included."""
        return int(self.input_ids.numel())

    def to(self, device) -> "MicroBatch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return MicroBatch(mv(self.input_ids), mv(self.position_ids), mv(self.targets),
                          mv(self.attention_mask), self.n_tokens, self.n_label_tokens, self.n_examples,
                          mv(self.label_index), mv(self.cu_seqlens), self.max_seqlen)


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices whose lengths sum to <= capacity (an item longer than capacity gets its own bin)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def packed_row(examples: Sequence[Example]) -> MicroBatch:
    ids: list[int] = []
    pos: list[int] = []
    tgt: list[int] = []
    for ex in examples:
        ids.extend(ex.input_ids)
        pos.extend(range(len(ex)))
        tgt.extend(ex.targets)
    idx = [i for i, t in enumerate(tgt) if t != IGNORE_INDEX]
    t = lambda x: torch.tensor([x], dtype=torch.long)  # noqa: E731
    cu = [0]
    for ex in examples:
        cu.append(cu[-1] + len(ex))
    return MicroBatch(t(ids), t(pos), t(tgt), None, len(ids), len(idx), len(examples),
                      torch.tensor(idx, dtype=torch.long), torch.tensor(cu, dtype=torch.int32),
                      max(len(e) for e in examples))


def padded_batch(examples: Sequence[Example], pad_id: int) -> MicroBatch:
    """Right-padded rows, no attention mask (exact under causal attention, see module doc)."""
    L = max(len(e) for e in examples)
    R = len(examples)
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    tgt = torch.full((R, L), IGNORE_INDEX, dtype=torch.long)
    for r, ex in enumerate(examples):
        n = len(ex)
        ids[r, :n] = torch.tensor(ex.input_ids)
        tgt[r, :n] = torch.tensor(ex.targets)
    pos = torch.arange(L).unsqueeze(0).expand(R, L).contiguous()
    idx = (tgt.reshape(-1) != IGNORE_INDEX).nonzero().reshape(-1)
    return MicroBatch(ids, pos, tgt, None, sum(len(e) for e in examples), int(idx.numel()), R, idx)


def micro_batches(examples: Sequence[Example], *, packing: bool, token_budget: int,
                  rows: int, pad_id: int) -> list[MicroBatch]:
    """Split one step's examples into micro-batches (packed bins, or padded groups of `rows`)."""
    if not examples:
        return []
    if packing:
        bins = first_fit_decreasing([len(e) for e in examples], token_budget)
        return [packed_row([examples[i] for i in b]) for b in bins]
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    groups = [order[i: i + rows] for i in range(0, len(order), rows)]
    return [padded_batch([examples[i] for i in g], pad_id) for g in groups]
