"""Tiny random bases of other families, built by the tests (no hub access): a byte-level BPE
tokenizer trained on a few sentences with the family's special tokens and its own chat
template, and a random model of that family (Llama, Qwen3, GPT-2 with its fused `c_attn` and
learned, limited positions)."""
from __future__ import annotations

from pathlib import Path

CORPUS = ["hello world, the quick brown fox jumps over the lazy dog.",
          "Write one line about a red coat. A red coat is warm.",
          "user assistant system: answer briefly, please. 1 2 3 4 5 6 7 8 9 0"]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GPT2_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + '\n' + message['content'] + '<|endoftext|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant\n' }}{% endif %}")

FAMILIES = {
    # family: (special tokens, bos, eos, template)
    "llama": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
              "<|begin_of_text|>", "<|eot_id|>", LLAMA3_TEMPLATE),
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", CHATML_TEMPLATE),
    "gpt2": (["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", GPT2_TEMPLATE),
}


def build_tokenizer(family: str, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, template = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=specials[0],
                                  additional_special_tokens=[t for t in specials if t not in (bos, eos)])
    out.chat_template = template
    return out


def build_base(family: str, dst: Path, *, n_positions: int = 64, seed: int = 0) -> Path:
    """Tokenizer + random model of `family` saved to dst (safetensors); returns dst."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(family)
    vocab = len(tokenizer)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if family == "llama":
        from transformers import LlamaConfig
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=n_positions, **ids)
    elif family == "qwen3":
        from transformers import Qwen3Config
        config = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                             max_position_embeddings=n_positions, **ids)
    else:
        from transformers import GPT2Config
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=n_positions, **ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst
