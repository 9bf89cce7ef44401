"""Resolving a BaseModelIdentity against the files (the torch side of service.core.identity):
where the model is (ChatGLM3 converted once), its family, fingerprint, default LoRA targets
and position limit, read once from config.json and the safetensors headers, plus the device
it runs on. The trainer and the engine both call this, so what one trains the other serves."""
from __future__ import annotations

from pathlib import Path

from service.core.identity import BaseModelIdentity
from service.models.loader import (
    base_model_fingerprint,
    checkpoint_weight_names,
    default_lora_targets,
    model_family,
    position_limit,
    resolve_base_model,
    resolve_device,
)


def resolve_identity(identity: BaseModelIdentity, cache_dir: Path, *, device: str | None = None) -> BaseModelIdentity:
    """`identity` with path, family, fingerprint, default targets, position limit and device
    filled in. Raises what resolve_base_model raises (InvalidInput model_not_found, OSError)
    and, for the device, InvalidInput param "device"."""
    from transformers import AutoConfig

    dev = resolve_device(device)
    path = resolve_base_model(identity.ref, Path(cache_dir))
    # The config as transformers reads it (class defaults included, e.g. GPT-2's n_positions).
    config = AutoConfig.from_pretrained(str(path))
    family = model_family(config)
    return identity.with_files(
        path=str(path), family=family, fingerprint=base_model_fingerprint(path),
        default_targets=tuple(default_lora_targets(family, weight_names=checkpoint_weight_names(path))),
        position_limit=position_limit(config), device=dev)
