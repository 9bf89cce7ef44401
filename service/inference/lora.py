"""Many LoRA adapters in one batch on one shared base.

Layout ("column pool"): every LoRA target Linear of the base is wrapped by
`MultiLoRALinear`, which owns two pool tensors, A `[in, R]` and B `[R, out]`. Each
GPU-resident adapter owns a set of pool *columns* (as many as its rank; not necessarily
contiguous), the same columns in every wrapped module: its `lora_A.T` sits in A's
columns, its `lora_B.T * scaling` in B's rows. A per-row 0/1 mask `M [rows, 1, hw]`
selects the columns of the row's adapter, so for every row at once

    y = base(x) + ((x @ A[:, :hw]) * M) @ B[:hw]

which equals PEFT's `base(x) + lora_B(lora_A(x)) * scaling` for that row's adapter (and
just `base(x)` for a base row: an all-zero mask row, the "no adapter" slot). Two dense
GEMMs per module, no gather of per-row weight copies, no Python loop over adapters, static
shapes (graph-capturable). Cost is proportional to `hw`, the highest column any running
adapter uses (columns are allocated lowest-first), so it stays small next to the base
matmul; ranks are packed without padding to a common r_max, which is what makes the GPU
byte budget rank-aware. Modules that no resident adapter targets skip the LoRA term.
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


class MultiLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, name: str, capacity: int, dtype: torch.dtype,
                 device: torch.device, ctx: LoRAContext):
        super().__init__()
        self.base = base
        self.name = name
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.ctx = ctx
        self.enabled = False  # True while some resident adapter targets this module
        self.register_buffer("lora_A", torch.zeros(self.in_features, capacity, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("lora_B", torch.zeros(capacity, self.out_features, dtype=dtype, device=device),
                             persistent=False)

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
        xa = torch.matmul(x.to(self.lora_A.dtype), self.lora_A[:, :hw])
        return out + torch.matmul(xa * mask, self.lora_B[:hw]).to(out.dtype)

    @property
    def pool_bytes_per_column(self) -> int:
        return (self.in_features + self.out_features) * self.lora_A.element_size()


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
            device: torch.device, ctx: LoRAContext) -> dict[str, MultiLoRALinear]:
    """Replace each target Linear by a MultiLoRALinear (in place). Returns name -> wrapper."""
    wrapped: dict[str, MultiLoRALinear] = {}
    for name, module in find_target_modules(model, targets).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = MultiLoRALinear(module, name, capacity, dtype, device, ctx)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    if not wrapped:
        raise ValueError(f"no Linear modules match LoRA targets {targets!r}")
    return wrapped


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
    # module name -> (A^T [in, r_m], B^T * scaling [r_m, out]): views into `flat` (CPU, pool dtype)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # One buffer holding every module's tensors (pinned on CUDA hosts), so the GPU owner
    # moves a whole adapter with one host-to-device copy.
    flat: torch.Tensor | None = None

    @property
    def targeted(self) -> set[str]:
        return set(self.modules)

    @property
    def nbytes(self) -> int:
        return 0 if self.flat is None else self.flat.numel() * self.flat.element_size()

    def to(self, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-module tensors on `device` (one copy of the flat buffer)."""
        if self.flat is None or self.flat.device == torch.device(device):
            return self.modules
        flat = self.flat.to(device, non_blocking=self.flat.is_pinned())
        out, base = {}, self.flat.data_ptr()
        for name, (a, b) in self.modules.items():
            ea = (a.data_ptr() - base) // a.element_size()
            eb = (b.data_ptr() - base) // b.element_size()
            out[name] = (flat[ea:ea + a.numel()].view(a.shape), flat[eb:eb + b.numel()].view(b.shape))
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
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        parsed.modules[module] = (a.t().to(dtype), (b.float() * scaling).t().to(dtype))
        parsed.rank = max(parsed.rank, r)
    total = sum(a.numel() + b.numel() for a, b in parsed.modules.values())
    flat = torch.empty(total, dtype=dtype, pin_memory=pin)
    offset = 0
    for module, (a, b) in list(parsed.modules.items()):
        views = []
        for t in (a, b):
            view = flat[offset:offset + t.numel()].view(t.shape)
            view.copy_(t)
            views.append(view)
            offset += t.numel()
        parsed.modules[module] = (views[0], views[1])
    parsed.flat = flat
    return parsed
