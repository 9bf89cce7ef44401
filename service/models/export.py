"""Export a LoRA adapter trained on the converted (GLM) ChatGLM3 to ChatGLM3's own layout.

Users of the original model + PEFT have one fused `query_key_value` per layer where we
have q_proj/k_proj/v_proj. A LoRA on the three is exactly a LoRA on the fused module:

    delta_qkv = [s_q B_q A_q ; s_k B_k A_k ; s_v B_v A_v]
              = s * blockdiag(B_q, B_k, B_v) @ [A_q ; A_k ; A_v]

with rank r_q + r_k + r_v (3r) and the same scaling s = alpha/r when alpha becomes 3*alpha
(with rsLoRA, s = alpha/sqrt(r), alpha becomes alpha*sqrt(3)). A is stacked, B block-
diagonal; no arithmetic touches the weights when the three share r and alpha, so the
export is bit-exact. Other LoRA modules are renamed (o_proj -> self_attention.dense,
gate_up_proj -> mlp.dense_h_to_4h, down_proj -> mlp.dense_4h_to_h; same shapes).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from service.core.atomic import atomic_dir
from service.core.errors import AdapterMismatch, InvalidInput

_KEY = re.compile(r"^(?P<prefix>.*?)(?:model\.)?layers\.(?P<layer>\d+)\."
                  r"(?P<module>self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate_up|down)_proj)\."
                  r"lora_(?P<ab>A|B)\.weight$")
_RENAMED = {"self_attn.o_proj": "self_attention.dense",
            "mlp.gate_up_proj": "mlp.dense_h_to_4h",
            "mlp.down_proj": "mlp.dense_4h_to_h"}
_FUSED = "self_attention.query_key_value"
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
CHATGLM3_PREFIX = "base_model.model.transformer.encoder.layers."


def _scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _module_r_alpha(cfg: dict[str, Any], module_path: str) -> tuple[int, float]:
    """r and alpha of one module, honouring PEFT's rank_pattern / alpha_pattern."""
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    for pat, val in (cfg.get("rank_pattern") or {}).items():
        if re.search(rf"(^|\.){pat}$", module_path):
            r = int(val)
    for pat, val in (cfg.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pat}$", module_path):
            alpha = float(val)
    return r, alpha


def _load_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file
    cfg_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise InvalidInput(f"{adapter_dir}: needs adapter_config.json and adapter_model.safetensors",
                           param="adapter")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterMismatch(f"only LoRA adapters can be exported, not {cfg.get('peft_type')}")
    for flag in ("use_dora", "lora_bias"):
        if cfg.get(flag):
            raise AdapterMismatch(f"adapters with {flag}=true cannot be exported to ChatGLM3 layout")
    if cfg.get("modules_to_save"):
        raise AdapterMismatch("adapters with modules_to_save cannot be exported to ChatGLM3 layout")
    return cfg, load_file(str(weights))


def export_adapter_chatglm3(adapter_dir: Path, out_dir: Path, *,
                            base_model_name_or_path: str = "THUDM/chatglm3-6b") -> Path:
    """Write a PEFT LoRA adapter for the original ChatGLM3 (fused query_key_value, original
    module names) to out_dir (temp dir + rename; refuses an existing out_dir). Returns out_dir."""
    from safetensors.torch import save_file

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if out_dir.exists():
        raise InvalidInput(f"{out_dir} already exists", param="out_dir", code="conflict")
    cfg, sd = _load_adapter(adapter_dir)
    rslora = bool(cfg.get("use_rslora"))

    # layer -> module -> {"A": tensor, "B": tensor}
    layers: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, t in sd.items():
        m = _KEY.match(key)
        if not m:
            raise AdapterMismatch(f"adapter tensor {key!r} has no ChatGLM3 counterpart")
        layers.setdefault(int(m["layer"]), {}).setdefault(m["module"], {})[m["ab"]] = t
    if not layers:
        raise AdapterMismatch("adapter has no LoRA tensors")

    out: dict[str, torch.Tensor] = {}
    fused_r = fused_alpha = None
    target_modules: set[str] = set()
    renamed_ra: dict[str, tuple[int, float]] = {}
    for layer, mods in sorted(layers.items()):
        qkv = [m for m in _QKV if m in mods]
        if qkv:
            if len(qkv) != 3:
                raise AdapterMismatch(
                    f"layer {layer}: LoRA on {', '.join(qkv)} only; the fused export needs "
                    "q_proj, k_proj and v_proj all adapted")
            ra = [_module_r_alpha(cfg, f"model.layers.{layer}.{m}") for m in qkv]
            scales = [_scale(a, r, rslora) for r, a in ra]
            r_new = sum(r for r, _ in ra)
            # Keep the per-module scaling: s_new = s when all three agree (the usual case).
            s_new = scales[0]
            a_new = s_new * math.sqrt(r_new) if rslora else s_new * r_new
            if fused_r is None:
                fused_r, fused_alpha = r_new, a_new
            elif (fused_r, fused_alpha) != (r_new, a_new):
                raise AdapterMismatch("q/k/v ranks or alphas differ between layers; not exportable "
                                      "to one fused LoRA config")
            A = torch.cat([mods[m]["A"] for m in qkv], dim=0)
            outs = [mods[m]["B"].shape[0] for m in qkv]
            B = torch.zeros(sum(outs), r_new, dtype=mods[qkv[0]]["B"].dtype)
            row = col = 0
            for m, (r, _), s in zip(qkv, ra, scales):
                b = mods[m]["B"]
                # Only when q/k/v scalings differ does a block need rescaling (then not bit-exact).
                B[row:row + b.shape[0], col:col + r] = b if s == s_new else (b.float() * (s / s_new)).to(b.dtype)
                row, col = row + b.shape[0], col + r
            base = f"{CHATGLM3_PREFIX}{layer}.{_FUSED}"
            out[f"{base}.lora_A.weight"] = A.contiguous()
            out[f"{base}.lora_B.weight"] = B
            target_modules.add("query_key_value")
        for m, new in _RENAMED.items():
            if m in mods:
                short = new.rsplit(".", 1)[1]
                ra = _module_r_alpha(cfg, f"model.layers.{layer}.{m}")
                if renamed_ra.setdefault(short, ra) != ra:
                    raise AdapterMismatch(f"{m}: rank/alpha differ between layers; not exportable")
                base = f"{CHATGLM3_PREFIX}{layer}.{new}"
                out[f"{base}.lora_A.weight"] = mods[m]["A"].contiguous()
                out[f"{base}.lora_B.weight"] = mods[m]["B"].contiguous()
                target_modules.add(short)

    # One config: the fused rank/alpha globally (when there is a fused module); every renamed
    # module keeps its own r/alpha through rank_pattern/alpha_pattern (exact-name patterns).
    new_cfg = {k: v for k, v in cfg.items() if k not in ("rank_pattern", "alpha_pattern")}
    if fused_r is not None:
        new_cfg["r"], new_cfg["lora_alpha"] = fused_r, fused_alpha
    rank_pattern = {n: r for n, (r, a) in renamed_ra.items() if r != new_cfg["r"]}
    alpha_pattern = {n: a for n, (r, a) in renamed_ra.items() if a != new_cfg["lora_alpha"]}
    new_cfg.update({
        "peft_type": "LORA", "task_type": cfg.get("task_type") or "CAUSAL_LM",
        "target_modules": sorted(target_modules), "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "base_model_name_or_path": base_model_name_or_path,
        "layers_to_transform": None, "layers_pattern": None, "fan_in_fan_out": False,
    })

    with atomic_dir(out_dir) as tmp:
        save_file(out, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(new_cfg, indent=2))
    return out_dir
