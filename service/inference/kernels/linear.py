"""Serve a bitsandbytes NF4 model's Linear4bit layers through our kernels.

`use_nf4_kernels(model)` swaps every `bnb.nn.Linear4bit` whose weight our kernels cover for an
`NF4Linear` that holds the very same `Params4bit` (no copy, no repacking: the memory stays
bitsandbytes'), so a LoRA wrapper or the model code sees the same `weight`/`bias`.
"""
from __future__ import annotations

import torch
from torch import nn

from service.inference.kernels import MAX_KERNEL_ROWS, NF4Operands, nf4_matmul, operands, warm_up


class NF4Linear(nn.Module):
    def __init__(self, base: nn.Module, ops: NF4Operands, rows: tuple[int, int]):
        super().__init__()
        self.weight = base.weight  # the Params4bit itself (quant_state attached)
        self.bias = base.bias
        self.in_features, self.out_features = ops.k, ops.n
        self.compute_dtype = getattr(base, "compute_dtype", None)
        self._ops = ops
        self.min_rows, self.max_rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As Linear4bit: compute in its compute dtype, answer in the input's.
        in_dtype = x.dtype
        if self.compute_dtype is not None and x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return nf4_matmul(x, self.weight, bias, ops=self._ops, min_rows=self.min_rows,
                          max_rows=self.max_rows).to(in_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 (our kernels)"


def use_nf4_kernels(model: nn.Module, rows: tuple[int, int] = (1, MAX_KERNEL_ROWS)) -> int:
    """Swap covered Linear4bit modules in place (our kernels for batches of `rows` = (min, max)
    rows, bitsandbytes for the others); returns how many were swapped."""
    import bitsandbytes as bnb

    swapped = 0
    layers: list[NF4Linear] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        ops = operands(module.weight)
        if ops is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        swapped_in = NF4Linear(module, ops, rows)
        setattr(parent, child, swapped_in)
        swapped += 1
        layers.append(swapped_in)
    warm_up([(m.weight, m._ops, None if m.bias is None else m.bias.to(m.compute_dtype or torch.bfloat16),
              m.compute_dtype or torch.bfloat16) for m in layers], rows)
    return swapped
