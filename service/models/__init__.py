"""Base model loading: ChatGLM3 mapped onto transformers' native GLM (no remote code), other
causal LMs through transformers as usual. See service/models/chatglm3.py for the mapping."""
from service.models.chat_format import (
    IGNORE_INDEX,
    encode_text,
    render_chat,
    stop_token_ids,
    tokenize_chat,
    tokenize_plain,
)
from service.models.chatglm3 import SPECIAL_TOKENS, convert_chatglm3
from service.models.demo import build_demo_model
from service.models.export import export_adapter_chatglm3
from service.models.identity import resolve_identity
from service.models.loader import (
    DEFAULT_LORA_TARGETS,
    base_model_fingerprint,
    checkpoint_weight_names,
    default_lora_targets,
    load_model,
    load_tokenizer,
    model_family,
    position_limit,
    resolve_base_model,
    resolve_device,
    source_hash,
)

__all__ = [
    "DEFAULT_LORA_TARGETS", "IGNORE_INDEX", "base_model_fingerprint", "checkpoint_weight_names", "SPECIAL_TOKENS", "build_demo_model",
    "convert_chatglm3", "default_lora_targets", "encode_text", "export_adapter_chatglm3", "load_model", "load_tokenizer",
    "model_family", "position_limit", "render_chat", "resolve_base_model", "resolve_device", "resolve_identity", "source_hash", "stop_token_ids",
    "tokenize_chat", "tokenize_plain",
]
