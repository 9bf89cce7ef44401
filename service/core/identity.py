"""The base model's identity: what to load (`ref`), the name clients use (`public_id`), and
the other spellings that mean it. One rule, torch-free, read by the launcher, the API, the
engine, the worker and the trainer's manifest (which records the public id, so an adapter
names its base the way clients do, never a host's path).

DESIGN.md's choice: TUNESERVE_BASE_MODEL when set; else ChatGLM3-6B from the hub on a CUDA
host, else the demo model built under models_dir/demo.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.core.config import CHATGLM3_HUB_ID, DEMO_MODEL_NAME, Settings
from service.core.domain import BASE_ADAPTER


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
