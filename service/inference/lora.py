"""Many LoRA adapters in one batch on one shared base.

Layout ("column pool"): every LoRA target Linear of the base is wrapped by
`MultiLoRALinear`, which owns two pool tensors, A `[R, in]` and B `[out, R]`. Each
GPU-resident adapter owns a set of pool *columns* (as many as its rank; not necessarily
contiguous), the same columns in every wrapped module: its `lora_A` (as PEFT stores it,
`[r, in]`) sits in A's rows, its `lora_B * scaling` (`[out, r]`) in B's columns. A per-row
0/1 mask `M [rows, 1, hw]` selects the columns of the row's adapter, so for every row at once

    y = base(x) + ((x @ A[:hw].T) * M) @ B[:, :hw].T

which equals PEFT's `base(x) + lora_B(lora_A(x)) * scaling` for that row's adapter (and
just `base(x)` for a base row: an all-zero mask row, the "no adapter" slot). Two dense
GEMMs per module, no gather of per-row weight copies, no Python loop over adapters, static
shapes (graph-capturable). Cost is proportional to `hw`, the highest column any running
adapter uses (columns are allocated lowest-first), so it stays small next to the base
matmul; ranks are packed without padding to a common r_max, which is what makes the GPU
byte budget rank-aware. Modules that no resident adapter targets skip the LoRA term.

Pools of modules with the same (in, out) shape are views of one stacked tensor per shape
(`LoRAGroup`), and a parsed adapter is laid out the same way on the host (PEFT's own
orientation, no transposes), so uploading an adapter is one host-to-device copy plus a
few kernels per shape group, not a few per module.
"""
from __future__ import annotations

import heapq
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from service.core.errors import AdapterMismatch

PEFT_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


class LoRAContext:
    """Per-forward state shared by all wrapped modules (set by the runner, read in forward)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # [rows, 1, hw] 0/1, activation dtype; None = no LoRA rows
        self.hw: int = 0
        self.kernels = False  # our Triton shrink/expand instead of PyTorch's GEMMs (set by the runner)


class LoRAGroup:
    """Stacked pools of the wrapped modules that share one (in, out) shape."""

    def __init__(self, key: tuple[int, int], names: list[str], capacity: int, dtype: torch.dtype,
                 device: torch.device):
        self.key, self.names = key, names
        fan_in, fan_out = key
        self.A = torch.zeros(len(names), capacity, fan_in, dtype=dtype, device=device)
        self.B = torch.zeros(len(names), fan_out, capacity, dtype=dtype, device=device)


def group_layout(shapes: dict[str, tuple[int, int]]) -> list[tuple[tuple[int, int], list[str]]]:
    """[(shape, sorted module names)] in a fixed order: the one layout runner and parser share."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name in sorted(shapes):
        groups.setdefault(tuple(shapes[name]), []).append(name)
    return sorted(groups.items())


class MultiLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, name: str, ctx: LoRAContext):
        super().__init__()
        self.base = base
        self.name = name
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.ctx = ctx
        self.enabled = False  # True while some resident adapter targets this module
        # Views into a LoRAGroup's stacked pools (set by install), [R, in] and [out, R].
        self.lora_A: torch.Tensor | None = None
        self.lora_B: torch.Tensor | None = None

    @property
    def weight(self):  # some model code inspects proj.weight (dtype/device)
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        mask = self.ctx.mask
        if mask is None or not self.enabled:
            return out
        hw = self.ctx.hw
        if self.ctx.kernels:
            return self._add_lora_kernels(x, out, mask, hw)
        xa = torch.matmul(x.to(self.lora_A.dtype), self.lora_A[:hw].t())
        return out + torch.matmul(xa * mask, self.lora_B[:, :hw].t()).to(out.dtype)

    def _add_lora_kernels(self, x: torch.Tensor, out: torch.Tensor, mask: torch.Tensor, hw: int) -> torch.Tensor:
        """The same sum in two launches (service/inference/kernels/lora_kernels.py), into `out`."""
        from service.inference.kernels.lora_kernels import lora_group

        x2 = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out = out.contiguous()
        lora_group(x2, [self.lora_A[:hw]], [self.lora_B[:, :hw]], [out.view(-1, out.shape[-1])], mask[:, 0, :],
                   x2.shape[0] // mask.shape[0])
        return out

    @property
    def pool_bytes_per_column(self) -> int:
        return (self.in_features + self.out_features) * self.lora_A.element_size()


def project_shared_input(modules: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """`[m(x) for m in modules]` for modules reading the same input (an attention's q, k, v).
    With the LoRA kernels on, the LoRA terms of the wrapped modules among them run as one
    shrink and one expand for all of them (`lora_group`) instead of two launches each."""
    lora = [m for m in modules if isinstance(m, MultiLoRALinear) and m.enabled]
    ctx = lora[0].ctx if lora else None
    if len(lora) < 2 or ctx.mask is None or not ctx.kernels or any(m.ctx is not ctx for m in lora):
        return [m(x) for m in modules]
    from service.inference.kernels.lora_kernels import MAX_GROUP, lora_group

    if len(lora) > MAX_GROUP:
        return [m(x) for m in modules]
    outs = [(m.base(x) if isinstance(m, MultiLoRALinear) else m(x)).contiguous() for m in modules]
    hw, mask = ctx.hw, ctx.mask
    x2 = x.reshape(-1, x.shape[-1]).to(lora[0].lora_A.dtype)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    ys = [out.view(-1, out.shape[-1]) for m, out in zip(modules, outs) if m in lora]
    lora_group(x2, [m.lora_A[:hw] for m in lora], [m.lora_B[:, :hw] for m in lora], ys, mask[:, 0, :],
               x2.shape[0] // mask.shape[0])
    return outs


def _matches(name: str, targets: list[str]) -> bool:
    # PEFT semantics for a list: exact name or ".<target>" suffix.
    return any(name == t or name.endswith("." + t) for t in targets)


def find_target_modules(model: nn.Module, targets: list[str] | str) -> dict[str, nn.Linear]:
    """Linear modules the engine can serve LoRA on. `targets` as in PEFT: list of suffixes or
    "all-linear" (every Linear except the output head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        if targets == "all-linear" or _matches(name, list(targets)):
            found[name] = module
    return found


def install(model: nn.Module, targets: list[str] | str, capacity: int, dtype: torch.dtype,
            device: torch.device, ctx: LoRAContext) -> tuple[dict[str, MultiLoRALinear], list[LoRAGroup]]:
    """Replace each target Linear by a MultiLoRALinear (in place). Returns (name -> wrapper,
    the shape groups holding their pools)."""
    wrapped: dict[str, MultiLoRALinear] = {}
    for name, module in find_target_modules(model, targets).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = MultiLoRALinear(module, name, ctx)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    if not wrapped:
        raise ValueError(f"no Linear modules match LoRA targets {targets!r}")
    shapes = {n: (w.in_features, w.out_features) for n, w in wrapped.items()}
    groups = [LoRAGroup(key, names, capacity, dtype, device) for key, names in group_layout(shapes)]
    for g in groups:
        for i, name in enumerate(g.names):
            wrapped[name].lora_A, wrapped[name].lora_B = g.A[i], g.B[i]
    return wrapped, groups


class ColumnAllocator:
    """Free list of pool columns; lowest-first so the high-water mark (and the LoRA cost) stays low."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._free = list(range(capacity))
        heapq.heapify(self._free)

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        return sorted(heapq.heappop(self._free) for _ in range(n))

    def release(self, cols: list[int]) -> None:
        for c in cols:
            heapq.heappush(self._free, c)


# --------------------------------------------------------------------------------------
# Reading a PEFT adapter (on the CPU, in a loader thread)
# --------------------------------------------------------------------------------------
@dataclass
class ParsedAdapter:
    rank: int  # pool columns needed (max rank over modules)
    # module name -> (A [r_m, in], B [out, r_m]) as PEFT stores them (unscaled): views into `flat`
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)  # module -> LoRA scaling
    # One buffer (pinned on CUDA hosts, the file's dtype) holding, per shape group of
    # group_layout(), A stacked [n, rank, in] then B stacked [n, out, rank], zero-padded for
    # modules (or ranks) the adapter lacks: a whole adapter moves with one host-to-device copy
    # and lands in the pools with one index_copy_ per group and tensor.
    flat: torch.Tensor | None = None
    # group shape -> (A offset, B offset, n modules, per-module scales [n] float32)
    groups: dict[tuple[int, int], tuple[int, int, int, torch.Tensor]] = field(default_factory=dict)

    @property
    def targeted(self) -> set[str]:
        return set(self.modules)

    @property
    def nbytes(self) -> int:
        return 0 if self.flat is None else self.flat.numel() * self.flat.element_size()

    def group_sources(self, device: torch.device):
        """{shape: (A [n, rank, in], B [n, out, rank], scales [n])} on `device` (one copy of
        the flat buffer, non-blocking from pinned memory)."""
        flat = self.flat
        if flat.device != torch.device(device):
            flat = flat.to(device, non_blocking=flat.is_pinned())
        out = {}
        for (fan_in, fan_out), (a_off, b_off, n, scales) in self.groups.items():
            a = flat[a_off:a_off + n * self.rank * fan_in].view(n, self.rank, fan_in)
            b = flat[b_off:b_off + n * fan_out * self.rank].view(n, fan_out, self.rank)
            out[(fan_in, fan_out)] = (a, b, scales.to(device, non_blocking=scales.is_pinned()))
        return out


def _pattern_value(patterns: dict, module_name: str, default):
    # peft.utils.other.get_pattern_key semantics: key matches "(.*\.)?key$".
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def parse_peft_adapter(adapter_dir: Path, shapes: dict[str, tuple[int, int]], dtype: torch.dtype,
                       *, pin: bool = False) -> ParsedAdapter:
    """PEFT pair (adapter_config.json + adapter_model.safetensors) -> per-module pool tensors.

    `shapes` maps each servable module name (relative to the CausalLM) to (in, out).
    Anything we cannot serve exactly is refused with AdapterMismatch, never approximated.
    """
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterMismatch(f"adapter is {cfg.get('peft_type')}, only LoRA is served", param="model")
    unsupported = {k: cfg.get(k) for k in ("use_dora", "fan_in_fan_out") if cfg.get(k)}
    if cfg.get("bias", "none") != "none":
        unsupported["bias"] = cfg.get("bias")
    if cfg.get("modules_to_save"):
        unsupported["modules_to_save"] = cfg.get("modules_to_save")
    if unsupported:
        raise AdapterMismatch(f"adapter uses LoRA options the engine does not serve: {unsupported}",
                              param="model")
    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", r_default))
    rslora = bool(cfg.get("use_rslora", False))

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"), device="cpu")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if not m:
            raise AdapterMismatch(f"adapter tensor {key!r} is not a LoRA A/B weight", param="model")
        module = m.group("module")
        if module.startswith(PEFT_PREFIX):
            module = module[len(PEFT_PREFIX):]
        pairs.setdefault(module, {})[m.group("ab")] = t
    if not pairs:
        raise AdapterMismatch("adapter has no LoRA weights", param="model")

    parsed = ParsedAdapter(rank=0)
    raw: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, ab in sorted(pairs.items()):
        if module not in shapes:
            raise AdapterMismatch(
                f"adapter targets {module!r}, which this engine does not serve LoRA on "
                f"(served: {sorted({n.rsplit('.', 1)[-1] for n in shapes})})", param="model")
        if set(ab) != {"A", "B"}:
            raise AdapterMismatch(f"adapter module {module!r} lacks lora_A or lora_B", param="model")
        a, b = ab["A"], ab["B"]  # [r, in], [out, r]
        fan_in, fan_out = shapes[module]
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fan_in or b.shape != (fan_out, r):
            raise AdapterMismatch(
                f"adapter module {module!r} has shapes A{tuple(a.shape)} B{tuple(b.shape)}, "
                f"the base needs A[r, {fan_in}] B[{fan_out}, r]", param="model")
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, alpha_default))
        r_cfg = int(_pattern_value(cfg.get("rank_pattern"), module, r_default))
        if r_cfg != r:
            raise AdapterMismatch(f"adapter module {module!r}: rank {r} on disk, {r_cfg} in config",
                                  param="model")
        parsed.scales[module] = alpha / math.sqrt(r) if rslora else alpha / r
        raw[module] = (a, b)
        parsed.rank = max(parsed.rank, r)
    # The file's dtype travels to the GPU; the cast to the pool dtype happens there.
    kinds = {t.dtype for ab in raw.values() for t in ab}
    src_dtype = kinds.pop() if len(kinds) == 1 and next(iter(kinds)).is_floating_point else torch.float32
    rank = parsed.rank
    layout = group_layout(shapes)
    total = sum(len(names) * rank * (fi + fo) for (fi, fo), names in layout)
    flat = torch.empty(total, dtype=src_dtype, pin_memory=pin)
    offset = 0
    for (fan_in, fan_out), names in layout:
        n = len(names)
        a_off, b_off = offset, offset + n * rank * fan_in
        offset = b_off + n * fan_out * rank
        a_all = flat[a_off:b_off].view(n, rank, fan_in)
        b_all = flat[b_off:offset].view(n, fan_out, rank)
        scales = torch.zeros(n, dtype=torch.float32, pin_memory=pin)
        for i, name in enumerate(names):
            if name not in raw:
                a_all[i].zero_()
                b_all[i].zero_()
                continue
            a, b = raw[name]
            r = a.shape[0]
            if r < rank:  # columns past this module's rank must contribute nothing
                a_all[i, r:].zero_()
                b_all[i, :, r:].zero_()
            a_all[i, :r].copy_(a)
            b_all[i, :, :r].copy_(b)
            scales[i] = parsed.scales[name]
            parsed.modules[name] = (a_all[i, :r], b_all[i, :, :r])
        parsed.groups[(fan_in, fan_out)] = (a_off, b_off, n, scales)
    parsed.flat = flat
    return parsed
