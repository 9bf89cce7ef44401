"""Base model resolution and loading.

`resolve_base_model` turns a hub id or local dir into something plain transformers loads
without remote code: ChatGLM3 checkpoints (model_type "chatglm") are converted once into a
native GLM checkpoint cached under `cache_dir/<content hash>/`; everything else passes through.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from service.core.errors import InvalidInput
from service.core.identity import device_for
from service.models import chatglm3
from service.models.chatglm3 import SOURCE_MARKER_KEY

# LoRA targets per family: the attention input projections (for ChatGLM3 the split
# equivalent of the lecture's fused `query_key_value`).
_QKV = ["q_proj", "k_proj", "v_proj"]
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "chatglm3": _QKV, "glm": _QKV, "glm4": _QKV,
    "llama": _QKV, "mistral": _QKV, "mixtral": _QKV, "qwen2": _QKV, "qwen3": _QKV,
    "gemma": _QKV, "gemma2": _QKV, "gemma3_text": _QKV, "opt": _QKV, "phi": _QKV,
    "phi3": ["qkv_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"], "bloom": ["query_key_value"], "gpt_bigcode": ["c_attn"],
}
# Names tried, in order, on a model of an unknown family.
_ATTENTION_INPUT_NAMES = (("q_proj", "k_proj", "v_proj"), ("qkv_proj",), ("query_key_value",),
                          ("c_attn",), ("Wqkv",), ("query", "key", "value"))

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HASH_MEMO = ".file-hashes.json"


# --------------------------------------------------------------------------------------
# family and LoRA defaults
# --------------------------------------------------------------------------------------
def _config_dict(path_or_config: Any) -> dict[str, Any]:
    obj = getattr(path_or_config, "config", path_or_config)  # a model -> its config
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "to_dict") and hasattr(obj, "model_type"):
        d = obj.to_dict()
        d.setdefault("model_type", obj.model_type)
        return d
    p = Path(str(obj))
    if p.is_dir():
        return chatglm3.read_config(p)
    return _hub_config(str(obj))


# Config keys holding how many positions a model can address, by family: learned position
# tables (GPT-2 `n_positions`) index out of range past it; rotary models were trained up to it.
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length", "n_ctx")


def position_limit(path_or_config: Any) -> int | None:
    """The most tokens (prompt + reply) the base model can address, from its config; None
    when the config names no limit. Serving and training cap their lengths at
    min(TUNESERVE_MAX_SEQ_LEN / max_source_length + max_target_length, this)."""
    cfg = _config_dict(path_or_config)
    limits = [int(cfg[k]) for k in _POSITION_KEYS if isinstance(cfg.get(k), int) and cfg[k] > 0]
    return min(limits) if limits else None


def model_family(path_or_config: Any) -> str:
    """"chatglm3" for ChatGLM3 (raw or converted by us), else the config's model_type."""
    cfg = _config_dict(path_or_config)
    if cfg.get("model_type") == "chatglm" or cfg.get(SOURCE_MARKER_KEY) == "chatglm3":
        return "chatglm3"
    return str(cfg.get("model_type") or "unknown")


def default_lora_targets(family: str, model: torch.nn.Module | None = None, *,
                         weight_names: Iterable[str] | None = None) -> list[str]:
    """Family default; for an unknown family the first attention-input naming the model (or
    its checkpoint's `<module>.weight` names) has (q/k/v_proj, qkv_proj, query_key_value,
    c_attn, ...), else q/k/v_proj."""
    if family in DEFAULT_LORA_TARGETS:
        return list(DEFAULT_LORA_TARGETS[family])
    leaves: set[str] = set()
    if model is not None:
        leaves = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                  if isinstance(mod, torch.nn.Linear) or "Linear" in type(mod).__name__}
    elif weight_names is not None:
        leaves = {n[: -len(".weight")].rsplit(".", 1)[-1] for n in weight_names if n.endswith(".weight")}
    for names in _ATTENTION_INPUT_NAMES:
        if all(n in leaves for n in names):
            return list(names)
    return list(_QKV)


def checkpoint_weight_names(path: Path | str) -> list[str]:
    """Tensor names of a local safetensors checkpoint, from the file headers only (no weights
    read); [] for a hub id or another format."""
    p = Path(str(path))
    names: list[str] = []
    if not p.is_dir():
        return names
    for f in sorted(p.glob("*.safetensors")):
        with open(f, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size < 1 << 27:  # not a safetensors header
                continue
            header = json.loads(fh.read(size))
        names.extend(k for k in header if k != "__metadata__")
    return names


# --------------------------------------------------------------------------------------
# resolution + conversion cache
# --------------------------------------------------------------------------------------
def _hub_config(ref: str) -> dict[str, Any]:
    try:
        from huggingface_hub import hf_hub_download
        return json.loads(Path(hf_hub_download(ref, "config.json")).read_text())
    except Exception as e:  # offline, unknown repo, gated ...
        raise InvalidInput(f"base model {ref!r} is neither a local directory nor a reachable "
                           f"hub repository ({type(e).__name__}: {e})", param="base_model",
                           code="model_not_found") from e


def _download_chatglm(ref: str) -> Path:
    """Snapshot the files conversion needs; never the repository's .py files."""
    from huggingface_hub import list_repo_files, snapshot_download
    files = list_repo_files(ref)
    has_st = any(f.endswith(".safetensors") for f in files)
    allow = ["config.json", "tokenizer.model", "tokenizer_config.json", "*.json"]
    allow += ["*.safetensors"] if has_st else ["*.bin"]
    return Path(snapshot_download(ref, allow_patterns=allow, ignore_patterns=["*.py"]))


def _source_files(src: Path) -> list[Path]:
    files = [src / "config.json", src / "tokenizer.model"]
    if (src / "tokenizer_config.json").is_file():
        files.append(src / "tokenizer_config.json")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index).is_file():
            files.append(src / index)
            break
    return files + chatglm3.weight_shards(src)


def _file_sha256(path: Path, memo: dict[str, Any]) -> str:
    real = Path(os.path.realpath(path))
    # Hub cache: LFS blobs are stored under their sha256, so no need to read 12 GB again.
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name
    st = real.stat()
    hit = memo.get(str(real))
    if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
        return hit["sha256"]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for chunk in iter(lambda: f.read(16 << 20), b""):
            h.update(chunk)
    memo[str(real)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
    return h.hexdigest()


def source_hash(src: Path, cache_dir: Path | None = None) -> str:
    """Content hash of a ChatGLM3 checkpoint (config, tokenizer, weights) + converter version.
    File hashes are memoised by (path, size, mtime) in cache_dir so restarts do not reread."""
    memo_path = Path(cache_dir) / _HASH_MEMO if cache_dir else None
    memo: dict[str, Any] = {}
    if memo_path and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except ValueError:
            memo = {}
    h = hashlib.sha256(f"tuneserve-chatglm3-v{chatglm3.CONVERTER_VERSION}\n".encode())
    for f in _source_files(Path(src)):
        h.update(f"{f.name}\t{_file_sha256(f, memo)}\n".encode())
    if memo_path:
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    return h.hexdigest()[:32]


def base_model_fingerprint(path: Path | str) -> str | None:
    """sha256 of a resolved base model's config.json: the trainer writes it into every adapter
    manifest and the engine compares it, so an adapter is never served on another base.
    None for a hub id that has no local directory."""
    config = Path(str(path)) / "config.json"
    return hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None


def _complete(d: Path) -> bool:
    return (d / "tuneserve_conversion.json").is_file() and (d / "config.json").is_file()


def resolve_base_model(ref: str | Path, cache_dir: Path) -> Path | str:
    """Hub id or local dir -> what load_model/load_tokenizer take.

    ChatGLM3 (config model_type "chatglm"): converted once into `cache_dir/<content hash>/`
    (under a file lock, written to a temp dir and renamed) and that dir returned. Other
    model types: the local dir as a Path, or the hub id unchanged (a str).
    """
    cache_dir = Path(cache_dir)
    p = Path(ref).expanduser()
    if p.is_dir():
        cfg = chatglm3.read_config(p)
        src: Path | None = p.resolve()
    elif _HUB_ID.match(str(ref)) and not str(ref).startswith((".", "/", "~")):
        cfg = _hub_config(str(ref))
        src = None
    else:
        raise InvalidInput(f"base model {str(ref)!r} not found", param="base_model",
                           code="model_not_found")
    if not chatglm3.is_chatglm_config(cfg):
        return p.resolve() if src else str(ref)
    if src is None:
        src = _download_chatglm(str(ref))

    cache_dir.mkdir(parents=True, exist_ok=True)
    key = source_hash(src, cache_dir)
    dst = cache_dir / key
    if _complete(dst):
        return dst
    with open(cache_dir / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting the same source
        try:
            if _complete(dst):
                return dst
            if dst.exists():  # unmarked leftover (should not happen: rename is atomic)
                shutil.rmtree(dst)
            for stale in cache_dir.glob(f".{key}.tmp-*"):  # a crashed conversion's temp dir
                shutil.rmtree(stale, ignore_errors=True)
            chatglm3.convert_chatglm3(src, dst)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return dst


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------
def _refuse_raw_chatglm(path: Any) -> None:
    p = Path(str(path))
    if p.is_dir() and (p / "config.json").is_file() and \
            chatglm3.is_chatglm_config(chatglm3.read_config(p)):
        raise InvalidInput(f"{p} is a ChatGLM3 checkpoint in its original format; pass it "
                           "through resolve_base_model() first (it would need remote code)",
                           param="base_model")


def resolve_device(device: str | None) -> str:
    """service.core.identity.device_for on this host (InvalidInput param "device")."""
    return device_for(device, has_cuda=torch.cuda.is_available())


def load_tokenizer(path: Path | str):
    """AutoTokenizer on a resolved model; remote code is never allowed here."""
    from transformers import AutoTokenizer
    _refuse_raw_chatglm(path)
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


@contextlib.contextmanager
def quiet_weight_loading() -> Iterator[None]:
    """No "Loading weights" tqdm bar: transformers 5 draws one on stderr for every
    from_pretrained, which is `make run`'s terminal (the engine and each training job load
    the base). transformers' progress bars are off inside the block and restored after; a
    local path downloads nothing, so no hub download bar is hidden with it."""
    from transformers.utils import logging as hf_logging

    if not hf_logging.is_progress_bar_enabled():  # already off (HF_HUB_DISABLE_PROGRESS_BARS, a caller)
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def load_model(path: Path | str, *, quantize_4bit: bool, device: str = "cpu",
               compute_dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """A resolved base model, in 4-bit NF4 (double quant) or at compute_dtype.

    compute_dtype defaults to bf16 on CUDA and float32 on CPU; non-quantized parameters
    (norms, embeddings, lm_head) use it too. trust_remote_code is only ever passed for
    operator allow-listed models and never applies to ChatGLM3 (converted instead).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    _refuse_raw_chatglm(path)
    device = resolve_device(device)
    dtype = compute_dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": device},
                              "trust_remote_code": bool(trust_remote_code)}
    if quantize_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    with quiet_weight_loading():
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if quantize_4bit and device == "cpu":
        _avoid_bnb_cpu_packing_bug(model)
    model.eval()
    return model


def _avoid_bnb_cpu_packing_bug(model) -> None:
    """bitsandbytes 0.50's CPU inference fast path (AVX512-BF16 repacking, taken in eval mode
    without grad) crashes on layers whose in_features is not a multiple of the quant block
    size (e.g. ffn 96 with blocksize 64). Those layers keep the generic 4-bit kernel."""
    for module in model.modules():
        if type(module).__name__ not in ("Linear4bit", "LinearNF4"):
            continue
        state = getattr(module.weight, "quant_state", None)
        block = getattr(state, "blocksize", 64) or 64
        if module.in_features % block:
            module.support_avx512bf16_for_cpu = False
