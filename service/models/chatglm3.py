"""ChatGLM3 checkpoints read by our own code, onto transformers' native `glm` architecture.

ChatGLM3's arithmetic is GlmForCausalLM's: the fused `query_key_value` is
`[heads*kv | groups*kv | groups*kv]` = q, k, v; `dense_h_to_4h` is `[gate | up]`, which is
exactly GLM's fused `gate_up_proj`; rotary covers the first half of each head with
interleaved pairs (GLM: partial_rotary_factor 0.5). So conversion is renaming plus one
split, and the tokenizer is a `tokenizers` BPE rebuilt from the SentencePiece model.
Nothing in the source directory is ever imported or executed.
"""
from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from service.core.atomic import atomic_dir
from service.core.errors import InvalidInput

# Appended after the SentencePiece vocabulary, in this order, as ChatGLM3's SPTokenizer does.
SPECIAL_TOKENS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
ROLES = ("system", "user", "assistant", "observation")
# Where the original chat stops (ChatGLM3 `chat()`: eos, <|user|>, <|observation|>).
STOP_TOKENS = ("</s>", "<|user|>", "<|observation|>")

# Marker written into the converted config so model_family() recognises ChatGLM3 on GLM.
SOURCE_MARKER_KEY = "tuneserve_converted_from"
CONVERTER_VERSION = 2  # 2: generation_config.json without max_length

# Renders exactly what ChatGLM3's build_chat_input encodes: "[gMASK]sop", then per message
# <|role|> + encode(metadata + "\n") + encode(content), then <|assistant|>. The special tokens
# split the text and each piece gets its own leading "▁" from the normalizer, which is the
# per-part encoding of the original. The " " before content becomes that piece's "▁".
CHAT_TEMPLATE = (
    "[gMASK]sop"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message.get('metadata', '') }}\n"
    "{% if message['content'] %} {{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WEIGHT_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json",
                 "model.safetensors", "pytorch_model.bin")


# --------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------
def read_config(src: Path) -> dict[str, Any]:
    path = Path(src) / "config.json"
    if not path.is_file():
        raise InvalidInput(f"{src}: no config.json", param="base_model", code="model_not_found")
    return json.loads(path.read_text())


def is_chatglm_config(cfg: dict[str, Any]) -> bool:
    return cfg.get("model_type") == "chatglm"


def glm_config_dict(cfg: dict[str, Any]) -> dict[str, Any]:
    """ChatGLM3 config.json -> GlmConfig kwargs. Refuses variants whose arithmetic differs."""
    problems = []
    if "position_encoding_2d" in cfg or "kv_channels" not in cfg:
        problems.append("this is a ChatGLM-6B (v1) config; only ChatGLM2/3 layouts are supported")
    for key, want in (("rmsnorm", True), ("apply_residual_connection_post_layernorm", False),
                      ("add_bias_linear", False), ("post_layer_norm", True)):
        if cfg.get(key, want) != want:
            problems.append(f"{key}={cfg.get(key)!r} is not supported (ChatGLM3 uses {want})")
    if cfg.get("original_rope", True) is not True:
        problems.append("original_rope=false is not supported")
    if problems:
        raise InvalidInput("unsupported chatglm config: " + "; ".join(problems), param="base_model")

    heads = cfg["num_attention_heads"]
    groups = cfg.get("multi_query_group_num", heads) if cfg.get("multi_query_attention") else heads
    kv = cfg["kv_channels"]
    rope_theta = 10000.0 * float(cfg.get("rope_ratio", 1.0))
    eos = cfg.get("eos_token_id", 2)
    return {
        "model_type": "glm",
        "architectures": ["GlmForCausalLM"],
        "vocab_size": cfg["padded_vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["ffn_hidden_size"],
        "num_hidden_layers": cfg["num_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": groups,
        "head_dim": kv,
        "hidden_act": "silu",
        "attention_dropout": float(cfg.get("attention_dropout", 0.0)),
        "attention_bias": bool(cfg.get("add_qkv_bias", False)),
        "max_position_embeddings": cfg.get("seq_length", 8192),
        "rms_norm_eps": cfg.get("layernorm_epsilon", 1e-5),
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta,
                            "partial_rotary_factor": 0.5},
        "tie_word_embeddings": False,
        "use_cache": True,
        "initializer_range": 0.02,
        "pad_token_id": cfg.get("pad_token_id", 0),
        "eos_token_id": eos,
        "bos_token_id": None,
        "dtype": cfg.get("torch_dtype", "float32"),
    }


# --------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------
def convert_tensor(name: str, t: torch.Tensor, gcfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One ChatGLM3 tensor -> the GLM tensors it becomes ({} for the unused rotary buffer)."""
    if name.endswith("rotary_pos_emb.inv_freq"):
        return {}
    if name == "transformer.embedding.word_embeddings.weight":
        return {"model.embed_tokens.weight": t}
    if name == "transformer.output_layer.weight":
        return {"lm_head.weight": t}
    if name == "transformer.encoder.final_layernorm.weight":
        return {"model.norm.weight": t}
    prefix = "transformer.encoder.layers."
    if not name.startswith(prefix):
        raise InvalidInput(f"unexpected ChatGLM3 tensor {name!r}", param="base_model")
    idx, rest = name[len(prefix):].split(".", 1)
    out = f"model.layers.{idx}."
    if rest.startswith("self_attention.query_key_value."):
        kind = rest.rsplit(".", 1)[1]  # weight | bias
        q = gcfg["num_attention_heads"] * gcfg["head_dim"]
        kv = gcfg["num_key_value_heads"] * gcfg["head_dim"]
        if t.shape[0] != q + 2 * kv:
            raise InvalidInput(f"{name}: {tuple(t.shape)} does not split into {q}+{kv}+{kv}",
                               param="base_model")
        # clone() so each part owns its storage (safetensors refuses shared views).
        return {out + f"self_attn.q_proj.{kind}": t[:q].clone(),
                out + f"self_attn.k_proj.{kind}": t[q:q + kv].clone(),
                out + f"self_attn.v_proj.{kind}": t[q + kv:].clone()}
    simple = {
        "self_attention.dense.weight": "self_attn.o_proj.weight",
        "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",  # [gate | up] in both
        "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
        "input_layernorm.weight": "input_layernorm.weight",
        "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    }
    if rest not in simple:
        raise InvalidInput(f"unexpected ChatGLM3 tensor {name!r}", param="base_model")
    return {out + simple[rest]: t}


def weight_shards(src: Path) -> list[Path]:
    """The source's weight files in index order: safetensors preferred, else .bin."""
    src = Path(src)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [src / f for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (src / single).is_file():
            return [src / single]
    raise InvalidInput(f"{src}: no weights (model.safetensors[.index.json] or pytorch_model*.bin)",
                       param="base_model", code="model_not_found")


def iter_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one shard, one at a time where the format allows (never unpickles code)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    else:
        # weights_only: no arbitrary unpickling; mmap: pages in on demand, not the whole file.
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        try:
            for key in list(state.keys()):
                yield key, state.pop(key)
        finally:
            del state


# --------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------
def build_fast_tokenizer(sp_model_path: Path, model_max_length: int = 8192):
    """A PreTrainedTokenizerFast equal to ChatGLM3's SentencePiece tokenizer + its specials."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(sp_model_path).read_bytes())
    if proto.trainer_spec.model_type != 2:  # 2 = BPE
        raise InvalidInput("tokenizer.model is not a SentencePiece BPE model (ChatGLM3 uses BPE)",
                           param="base_model")
    from tokenizers.models import BPE as _BPE
    kw = SentencePieceExtractor(str(sp_model_path)).extract(_BPE)
    vocab, merges = kw["vocab"], kw["merges"]
    n_sp = len(proto.pieces)
    unk = proto.pieces[proto.trainer_spec.unk_id].piece

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                               byte_fallback=True, dropout=None))
    # SentencePiece's own order: charsmap normalization, whitespace collapsing, dummy prefix,
    # spaces -> "▁". ChatGLM3-style models use the identity normalizer and keep all spaces,
    # so only the last two apply there; the others are honoured if a model sets them.
    spec = proto.normalizer_spec
    norm = []
    if spec.precompiled_charsmap:
        norm.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        norm += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip(left=True, right=True)]
    if spec.add_dummy_prefix:
        norm.append(normalizers.Prepend("▁"))
    norm.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(norm)
    tok.pre_tokenizer = None
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    # sentencepiece control tokens (<s>, </s>) must not be produced from plain text.
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in proto.pieces if p.type == 3])
    # "sop"/"eop" are ordinary letters too: single_word keeps plain text like "isopropyl" from
    # being cut at them (the original never looks for specials inside text at all).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False,
                                       single_word=t in ("sop", "eop")) for t in SPECIAL_TOKENS])
    for i, t in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(t)
        if got != n_sp + i:
            raise InvalidInput(f"special token {t} would get id {got}, expected {n_sp + i}",
                               param="base_model")
    gmask, sop, eos = n_sp + 1, n_sp + 3, proto.trainer_spec.eos_id
    eos_piece = proto.pieces[eos].piece
    # ChatGLM3's build_inputs_with_special_tokens: [gMASK] sop A (+ B eos for pairs).
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] sop $A", pair=f"[gMASK] sop $A $B {eos_piece}",
        special_tokens=[("[gMASK]", gmask), ("sop", sop), (eos_piece, eos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=unk, eos_token=eos_piece, pad_token=unk,
        padding_side="left",  # as ChatGLMTokenizer
        model_max_length=model_max_length, clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={}, additional_special_tokens=SPECIAL_TOKENS,
    )


def is_chatglm3_tokenizer(tokenizer) -> bool:
    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in ("[gMASK]", "sop", "<|user|>", "<|assistant|>", "<|observation|>"))


# --------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------
def _write_config(dst: Path, cfg: dict[str, Any], gcfg: dict[str, Any], tokenizer) -> None:
    from transformers import GenerationConfig, GlmConfig

    stop = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    gcfg = dict(gcfg, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
    config = GlmConfig(**{k: v for k, v in gcfg.items() if k not in ("model_type",)})
    config.architectures = ["GlmForCausalLM"]
    setattr(config, SOURCE_MARKER_KEY, "chatglm3")
    config.save_pretrained(dst)
    # No max_length: every caller passes max_new_tokens, and a saved max_length makes transformers
    # warn "Both max_new_tokens and max_length seem to have been set" on every generate call (the
    # position limit is max_position_embeddings above).
    GenerationConfig(eos_token_id=stop, pad_token_id=tokenizer.pad_token_id).save_pretrained(dst)


def convert_chatglm3(src: Path, dst: Path,
                     progress: Callable[[int, int], None] | None = None,
                     max_shard_bytes: int | None = None) -> Path:
    """Convert a ChatGLM3 checkpoint dir into a native GLM checkpoint + fast tokenizer at dst.

    Streams source shard by shard: each source shard becomes one (or, with max_shard_bytes,
    several) safetensors shards and is freed before the next is read, so peak memory is about
    one shard. Writes into a temp dir beside dst and renames it at the end, so a crash leaves
    no half-written dst. `progress(done_shards, total_shards)` is called after each shard.
    Returns dst. Refuses to overwrite an existing dst.
    """
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise InvalidInput(f"{dst} already exists", param="dst", code="conflict")
    cfg = read_config(src)
    if not is_chatglm_config(cfg):
        raise InvalidInput(f"{src}: model_type is {cfg.get('model_type')!r}, not 'chatglm'",
                           param="src")
    gcfg = glm_config_dict(cfg)
    sp = src / "tokenizer.model"
    if not sp.is_file():
        raise InvalidInput(f"{src}: no tokenizer.model", param="src", code="model_not_found")
    shards = weight_shards(src)
    tokenizer = build_fast_tokenizer(sp, model_max_length=cfg.get("seq_length", 8192))

    with atomic_dir(dst) as tmp:
        weight_map: dict[str, str] = {}
        total_size = 0
        out_files: list[tuple[str, list[str]]] = []
        n_out = 0
        for i, shard in enumerate(shards):
            buf: dict[str, torch.Tensor] = {}
            buf_bytes = 0

            def flush():
                nonlocal buf, buf_bytes, n_out
                if not buf:
                    return
                n_out += 1
                name = f"model-part-{n_out:05d}.safetensors"
                save_file(buf, str(tmp / name), metadata={"format": "pt"})
                out_files.append((name, list(buf)))
                buf, buf_bytes = {}, 0

            for key, t in iter_shard(shard):
                for new_key, new_t in convert_tensor(key, t, gcfg).items():
                    new_t = new_t.contiguous()
                    nbytes = new_t.numel() * new_t.element_size()
                    if max_shard_bytes and buf and buf_bytes + nbytes > max_shard_bytes:
                        flush()
                    buf[new_key] = new_t
                    buf_bytes += nbytes
                    total_size += nbytes
                del t
            flush()
            gc.collect()
            if progress:
                progress(i + 1, len(shards))
        # Standard HF names: model-0000k-of-0000n.safetensors.
        for k, (name, keys) in enumerate(out_files, 1):
            final = f"model-{k:05d}-of-{len(out_files):05d}.safetensors"
            os.replace(tmp / name, tmp / final)
            weight_map.update({key: final for key in keys})
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total_size},
             "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        _write_config(tmp, cfg, gcfg, tokenizer)
        tokenizer.save_pretrained(tmp)
        (tmp / "tuneserve_conversion.json").write_text(json.dumps(
            {"source_model_type": "chatglm", "family": "chatglm3",
             "converter_version": CONVERTER_VERSION, "source": str(src)}, indent=2))
    return dst
