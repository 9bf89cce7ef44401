"""The base model's identity: what to load (`ref`), the name clients use (`public_id`), the
other spellings that mean it, and, once resolved against the files (service.models.identity,
which needs torch), its fingerprint, family, default LoRA targets, position limit and device.
One rule, torch-free here, read by the launcher, the API, the engine, the worker, the
trainer's manifest (which records the public id, so an adapter names its base the way
clients do, never a host's path) and export.

DESIGN.md's choice: TUNESERVE_BASE_MODEL when set; else ChatGLM3-6B from the hub on a CUDA
host, else the demo model built under models_dir/demo.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from service.core.config import CHATGLM3_HUB_ID, DEMO_MODEL_NAME, Settings
from service.core.domain import BASE_ADAPTER
from service.core.errors import InvalidInput

_CUDA = re.compile(r"^cuda(:[0-9]{1,3})?$")


def device_for(requested: str | None, *, has_cuda: bool) -> str:
    """The one device rule (engine and trainer): "auto"/"" -> cuda:0 when CUDA is present,
    else cpu; "cuda" -> cuda:0; "cuda:N" and "cpu" as given. A CUDA request on a host
    without CUDA fails loudly (a GPU job silently on CPU would take days and look like a
    hang), as does any other name."""
    device = (requested or "auto").strip()
    if device == "auto":
        return "cuda:0" if has_cuda else "cpu"
    if _CUDA.fullmatch(device):
        if not has_cuda:
            raise InvalidInput(f"device {device!r} requested but CUDA is not available", param="device",
                               code="device_unavailable")
        return device if ":" in device else "cuda:0"
    if device != "cpu":
        raise InvalidInput(f"unknown device {device!r} (auto, cpu, cuda or cuda:N)", param="device")
    return device


def demo_dir(settings: Settings) -> Path:
    return (settings.models_dir / "demo").absolute()


def public_id(ref: str, settings: Settings) -> str:
    """The hub id as is, DEMO_MODEL_NAME for the demo model, else a local directory's last
    component (a host path is no name to give clients). An empty ref is the demo (CPU) choice."""
    if not ref:
        return DEMO_MODEL_NAME
    if ref == DEMO_MODEL_NAME:
        return ref
    path = Path(ref).expanduser()
    if path.absolute() == demo_dir(settings):
        return DEMO_MODEL_NAME
    return path.name if path.is_dir() and path.name else ref


def chosen_ref(settings: Settings, *, has_cuda: bool) -> str:
    """The ref DESIGN.md's rule picks (the demo dir may not be built yet)."""
    if settings.base_model:
        return settings.base_model
    return CHATGLM3_HUB_ID if has_cuda else str(demo_dir(settings))


def load_ref(name: str, settings: Settings) -> str:
    """What a worker loads for a job's base `name`: this host's TUNESERVE_BASE_MODEL when set
    (the one shared base), the locally built demo for its public id, else `name` itself."""
    if settings.base_model:
        return settings.base_model
    if name == DEMO_MODEL_NAME:
        return str(demo_dir(settings))
    return name


@dataclass(frozen=True)
class BaseModelIdentity:
    ref: str
    public_id: str
    aliases: frozenset[str]  # other spellings clients or manifests may use (raw ref, paths)
    # Filled by service.models.identity.resolve_identity (None/empty until then):
    path: str | None = None            # what load_model/load_tokenizer take (converted dir, or hub id)
    family: str | None = None          # "chatglm3", "llama", "gpt2", ...
    fingerprint: str | None = None     # sha256 of config.json: adapters record it, the engine checks it
    default_targets: tuple[str, ...] = ()  # LoRA targets when a job names none (trainer = server)
    position_limit: int | None = None  # most tokens (prompt + reply) the model can address
    device: str | None = None          # device_for(settings.device)

    @property
    def resolved(self) -> bool:
        return self.path is not None

    def with_files(self, **fields) -> "BaseModelIdentity":
        """This identity with what the files say (service.models.identity)."""
        return dataclasses.replace(self, **fields)

    @classmethod
    def of(cls, ref: str, settings: Settings) -> "BaseModelIdentity":
        pid = public_id(ref, settings)
        aliases = {ref, settings.base_model}
        if pid == DEMO_MODEL_NAME:
            aliases.add(str(demo_dir(settings)))
        return cls(ref=ref, public_id=pid, aliases=frozenset(a for a in aliases if a and a != pid))

    @property
    def names(self) -> frozenset[str]:
        return self.aliases | {self.public_id}

    def is_base(self, name: str | None) -> bool:
        """Does a request's `model` (or an adapter name) mean the base itself?"""
        return not name or name == BASE_ADAPTER or name in self.names
