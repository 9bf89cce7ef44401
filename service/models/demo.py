"""A tiny ChatGLM3-format checkpoint built by our own code (no download).

Used by `make run` without a GPU and by end-to-end tests; it goes through the same
resolve_base_model conversion as the real ChatGLM3-6B. Also holds the random ChatGLM3
tensor generator the full-size conversion benchmark streams from.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from service.core.atomic import atomic_dir
from service.models.chatglm3 import SPECIAL_TOKENS

_SAMPLE = Path(__file__).resolve().parents[1] / "data" / "advertisegen_sample.jsonl"
_FALLBACK_CORPUS = [
    "类型#裙*材质#蕾丝*风格#宫廷", "宫廷风的甜美蕾丝设计，优雅又浪漫。",
    "类型#上衣*版型#宽松*颜色#黑色", "这款卫衣采用宽松的版型，穿着舒适，百搭又显瘦。",
    "类型#裤*材质#牛仔布*风格#休闲", "经典的牛仔布料，休闲百搭，轻松穿出个人态度。",
    "你是一名广告文案。", "再短一点", "Write one line about a red coat.", "Hello world 2023",
]

# ChatGLM3-6B's exact config.json (what THUDM/chatglm3-6b ships, minus auto_map targets).
CHATGLM3_6B_CONFIG: dict[str, Any] = {
    "model_type": "chatglm", "architectures": ["ChatGLMModel"],
    "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "ffn_hidden_size": 13696,
    "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": 4096,
    "kv_channels": 128, "layernorm_epsilon": 1e-05, "multi_query_attention": True,
    "multi_query_group_num": 2, "num_attention_heads": 32, "num_layers": 28,
    "original_rope": True, "padded_vocab_size": 65024, "post_layer_norm": True,
    "rmsnorm": True, "seq_length": 8192, "use_cache": True, "torch_dtype": "float16",
    "transformers_version": "4.30.2", "tie_word_embeddings": False,
    "eos_token_id": 2, "pad_token_id": 0,
    "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                 "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                 "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
}


def chatglm3_tensor_shapes(cfg: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of a ChatGLM3 checkpoint, in the original's order."""
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["kv_channels"]
    groups = cfg["multi_query_group_num"] if cfg.get("multi_query_attention") else heads
    ffn, vocab = cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    yield "transformer.embedding.word_embeddings.weight", (vocab, h)
    yield "transformer.rotary_pos_emb.inv_freq", (kv // 4,)
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attention.query_key_value.weight", (heads * kv + 2 * groups * kv, h)
        if cfg.get("add_qkv_bias", True):
            yield p + "self_attention.query_key_value.bias", (heads * kv + 2 * groups * kv,)
        yield p + "self_attention.dense.weight", (h, heads * kv)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.dense_h_to_4h.weight", (2 * ffn, h)
        yield p + "mlp.dense_4h_to_h.weight", (h, ffn)
    yield "transformer.encoder.final_layernorm.weight", (h,)
    yield "transformer.output_layer.weight", (vocab, h)


def iter_random_chatglm3_tensors(cfg: dict[str, Any], dtype: torch.dtype = torch.float32,
                                 seed: int = 0, std: float = 0.02
                                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Random ChatGLM3 weights, one tensor at a time (norms 1, rotary buffer as the original)."""
    g = torch.Generator().manual_seed(seed)
    for name, shape in chatglm3_tensor_shapes(cfg):
        if name.endswith("layernorm.weight"):
            t = torch.ones(shape, dtype=dtype)
        elif name.endswith("inv_freq"):
            dim = cfg["kv_channels"] // 2
            t = (1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))).to(dtype)
        else:
            t = (torch.randn(shape, generator=g, dtype=torch.float32) * std).to(dtype)
        yield name, t


def _default_corpus() -> list[str]:
    lines: list[str] = []
    if _SAMPLE.is_file():
        for row in _SAMPLE.read_text(encoding="utf-8").splitlines():
            if row.strip():
                obj = json.loads(row)
                lines += [obj.get("content", ""), obj.get("summary", "")]
    return [x for x in lines + _FALLBACK_CORPUS if x]


def _train_sentencepiece(corpus: list[str], out_dir: Path, vocab_size: int) -> Path:
    import sentencepiece as spm
    text = out_dir / "corpus.txt"
    text.write_text("\n".join(corpus) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(out_dir / "tokenizer"), model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True, split_digits=True,
        character_coverage=1.0, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2)
    text.unlink()
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    return out_dir / "tokenizer.model"


def build_demo_model(dst: Path, corpus: list[str] | None = None, *, vocab_size: int = 1000,
                     hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny random ChatGLM3-format checkpoint (config.json model_type "chatglm",
    tokenizer.model, model.safetensors with ChatGLM3 names) to dst; returns dst.
    Idempotent: an existing complete dst is returned as is. Written to a temp dir + rename."""
    from safetensors.torch import save_file

    dst = Path(dst)
    if (dst / "config.json").is_file() and (dst / "model.safetensors").is_file():
        return dst
    with atomic_dir(dst, replace=True) as tmp:
        sp_path = _train_sentencepiece(corpus or _default_corpus(), tmp, vocab_size)
        import sentencepiece as spm
        n_sp = spm.SentencePieceProcessor(model_file=str(sp_path)).get_piece_size()
        n_vocab = n_sp + len(SPECIAL_TOKENS)
        heads, kv = 4, hidden_size // 4
        cfg = dict(CHATGLM3_6B_CONFIG)
        cfg.update({
            "_name_or_path": dst.name, "hidden_size": hidden_size, "num_layers": num_layers,
            "num_attention_heads": heads, "kv_channels": kv, "multi_query_group_num": 2,
            "ffn_hidden_size": hidden_size * 2, "padded_vocab_size": (n_vocab + 63) // 64 * 64,
            "seq_length": 2048, "torch_dtype": "float32",
        })
        state = dict(iter_random_chatglm3_tensors(cfg, torch.float32, seed=seed))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "name_or_path": dst.name, "remove_space": False, "do_lower_case": False,
            "tokenizer_class": "ChatGLMTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
        }, indent=2))
    return dst
