"""The trainable model: 4-bit base (service.models.load_model) + kbit preparation + LoRA,
the loss of one micro-batch, and the check that packed rows are really honoured."""
from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

import torch

from service.core.domain import TrainingSpec
from service.core.errors import TrainingError
from workers.training.data import IGNORE_INDEX
from workers.training.packing import MicroBatch
from workers.training.plan import CE_CHUNK


def compute_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_trainable(path, spec: TrainingSpec, target_modules: Sequence[str], device: str,
                   gradient_checkpointing: bool, *, dense_layers: int = 0, attention: str = "sdpa"):
    """NF4 (double quant) base, prepared for k-bit training, with a fresh LoRA adapter.

    `prepare_model_for_kbit_training` freezes the base and upcasts every non-4-bit parameter
    to fp32 (a guard meant for fp16). With bf16 compute we cast the frozen ones (embeddings,
    lm_head, norms, biases) back: bf16 has fp32's range, frozen weights accumulate nothing,
    and it saves ~2 GiB on a 6B model and keeps every matmul on bf16 tensor cores. The
    LoRA weights stay fp32 (the optimizer's master copy).

    `dense_layers` (the memory plan's choice): the first N decoder layers get their NF4
    weights dequantized ONCE into frozen compute-dtype nn.Linear modules. bitsandbytes
    dequantizes the same weights to the same dtype before every matmul, forward and backward,
    so the numbers are identical; what goes away is the per-micro-step dequantization and the
    Python/dispatch cost of the 4-bit path, at 1.5 extra bytes per parameter. `attention`:
    "varlen" uses torch's flash varlen kernel on packed rows (CUDA, when available).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from service.models import load_model

    dtype = compute_dtype(device)
    model = load_model(path, quantize_4bit=spec.load_in_4bit, device=device, compute_dtype=dtype)
    model.config.use_cache = False
    if device == "cpu":
        _no_cpu_inference_repack(model)
    if spec.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if dtype != torch.float32:
        for p in model.parameters():
            if p.dtype == torch.float32 and not p.requires_grad:
                p.data = p.data.to(dtype)
    if spec.load_in_4bit and dense_layers:
        dequantize_layers(model, dense_layers, dtype)
    if attention == "varlen":
        enable_varlen_attention(model, device)
    lora = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                      target_modules=list(target_modules), task_type="CAUSAL_LM", bias="none")
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:  # no module matched the targets
        raise TrainingError(f"LoRA target modules {list(target_modules)} not found in the model: {exc}",
                            code="invalid_data", param="hyperparameters.lora_target_modules") from exc
    for p in model.parameters():  # LoRA master weights in fp32 whatever the compute dtype
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    model.train()  # gradient checkpointing and dropout only act in train mode
    return model


def _no_cpu_inference_repack(model) -> None:
    """bitsandbytes repacks a CPU Linear4bit's weight in place for its AVX512-BF16 inference
    kernel the first time it runs in eval mode without grad (validation, generation, the packing
    check). That kernel is not differentiable, so training after it would silently stop
    propagating gradients through the frozen layers: keep the training model on the generic
    4-bit kernel."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def dequantize_layers(model, n_layers: int, dtype: torch.dtype) -> int:
    """Replace the bitsandbytes 4-bit Linear modules of decoder layers 0..n_layers-1 by frozen
    dense Linear modules holding the dequantized weights (exactly what bnb computes with).
    Returns how many modules were replaced."""
    import bitsandbytes as bnb

    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        m = _LAYER_RE.search(name)
        if m is None or int(m.group(1)) >= n_layers:
            continue
        w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
        dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                device=w.device, dtype=dtype)
        dense.weight = torch.nn.Parameter(w.reshape(module.out_features, module.in_features),
                                          requires_grad=False)
        if module.bias is not None:
            dense.bias = torch.nn.Parameter(module.bias.data.to(dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, dense)
        del module, w
        replaced += 1
    if replaced and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return replaced


VARLEN_IMPL = "tuneserve_varlen"


def _varlen_fn():
    """torch's flash varlen attention, adapted to the signature of the installed torch (2.10+
    takes is_causal, newer ones window_size/enable_gqa), or None when it is not there."""
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    gqa = "enable_gqa" in params

    def run(q, k, v, cu, max_len, scale):
        if q.shape[1] != k.shape[1]:
            if gqa:
                return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, enable_gqa=True, **causal)
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, **causal)
    return run


def _varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                              **kwargs):
    """transformers attention interface: packed single row with `cu_seq_lens_q` in kwargs ->
    flash varlen (no T^2 mask); anything else (generation, padding masks) -> sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    run = _varlen_fn() if cu is not None and query.shape[0] == 1 and query.is_cuda else None
    if run is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    q = query[0].transpose(0, 1).contiguous()   # [T, H, D]
    k = key[0].transpose(0, 1).contiguous()
    v = value[0].transpose(0, 1).contiguous()
    out = run(q, k, v, cu, int(kwargs["max_length_q"]), scaling)
    return out.unsqueeze(0), None               # [1, T, H, D], like sdpa's


def enable_varlen_attention(model, device: str) -> bool:
    """Switch the model to the varlen attention interface (CUDA with torch varlen only)."""
    if not device.startswith("cuda") or _varlen_fn() is None:
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(VARLEN_IMPL, _varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_IMPL, sdpa_mask)  # the fallback path needs masks
    try:
        model.set_attn_implementation(VARLEN_IMPL)
    except Exception:  # noqa: BLE001 - an older transformers: keep sdpa
        return False
    return True


def uses_varlen(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, "_attn_implementation", None) == VARLEN_IMPL


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def autocast(device: str):
    """bf16 autocast on CUDA (LoRA's fp32 weights meet bf16 activations); nothing on CPU."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _parts(model):
    """(decoder, lm_head) of the causal LM under the PEFT wrapper, or None if not exposed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        decoder = base.get_decoder()
        head = base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None:
        return None
    return decoder, head


def _ce_chunk(head, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropies, number of positions whose argmax logit is the target) of a chunk:
    the accuracy comes from the logits the loss computes anyway (no grad flows through it)."""
    logits = head(hidden).float()
    correct = (logits.detach().argmax(dim=-1) == targets).sum()
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum"), correct


def micro_batch_loss_sum(model, mb: MicroBatch, *, chunk: int = CE_CHUNK) -> torch.Tensor:
    """Sum of token cross-entropies over the micro-batch's label positions (see
    micro_batch_loss_and_correct)."""
    return micro_batch_loss_and_correct(model, mb, chunk=chunk)[0]


def micro_batch_loss_and_correct(model, mb: MicroBatch, *,
                                 chunk: int = CE_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies over the micro-batch's label positions, how many of those
    positions the model predicts right: argmax of the logits == the target), both on the device.

    Targets are already shifted (position i holds token i+1, -100 where there is no loss), so
    dividing the count by the label tokens is the mean token accuracy as HF/TRL report it.
    Logits are computed only at label positions and in chunks of `chunk` tokens, each chunk
    recomputed in backward (torch.utils.checkpoint), so the 65k-vocabulary logits of a whole
    micro-batch never exist at once; the argmax is taken inside the chunk, from those logits.
    `use_cache=False`: with a cache transformers would not read restarting position_ids as
    packed sequences.
    """
    idx = mb.label_index
    if idx is None:
        idx = (mb.targets.reshape(-1) != IGNORE_INDEX).nonzero().reshape(-1)
    t = mb.targets.reshape(-1).index_select(0, idx)
    n = mb.n_label_tokens if mb.label_index is not None else int(idx.numel())
    extra = {}
    if mb.cu_seqlens is not None and uses_varlen(model):
        extra = {"cu_seq_lens_q": mb.cu_seqlens, "cu_seq_lens_k": mb.cu_seqlens,
                 "max_length_q": mb.max_seqlen, "max_length_k": mb.max_seqlen}
    parts = _parts(model)
    if parts is None:  # generic path: full logits
        out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                    position_ids=mb.position_ids, use_cache=False, **extra)
        logits = out.logits.reshape(-1, out.logits.shape[-1]).index_select(0, idx).float()
        correct = (logits.detach().argmax(dim=-1) == t).sum()
        return torch.nn.functional.cross_entropy(logits, t, reduction="sum"), correct
    decoder, head = parts
    hidden = decoder(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                     position_ids=mb.position_ids, use_cache=False, **extra).last_hidden_state
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)
    total = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
    for s in range(0, n, chunk):
        loss_c, correct_c = torch.utils.checkpoint.checkpoint(
            _ce_chunk, head, h[s: s + chunk], t[s: s + chunk], use_reentrant=False)
        total = total + loss_c
        correct = correct + correct_c
    return total, correct


@torch.no_grad()
def check_packing(model, device: str, vocab_size: int) -> bool:
    """True if two sequences packed in one row with restarting position_ids give the same
    logits as each alone (i.e. the attention implementation honours packed sequences)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(5, max(6, min(vocab_size, 200)), (1, 7), generator=g)
    b = torch.randint(5, max(6, min(vocab_size, 200)), (1, 5), generator=g)
    was_training = model.training
    model.eval()
    try:
        with autocast(device):
            fwd = lambda ids, pos: model(input_ids=ids.to(device), position_ids=pos.to(device),  # noqa: E731
                                         use_cache=False).logits.float()
            la = fwd(a, torch.arange(7)[None])
            lb = fwd(b, torch.arange(5)[None])
            extra = {}
            if uses_varlen(model):  # check the kernel training will use
                cu = torch.tensor([0, 7, 12], dtype=torch.int32, device=device)
                extra = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 7, "max_length_k": 7}
            packed = model(input_ids=torch.cat([a, b], 1).to(device), use_cache=False,
                           position_ids=torch.cat([torch.arange(7), torch.arange(5)])[None].to(device),
                           **extra).logits.float()
        ref = torch.cat([la, lb], 1)
        tol = 1e-3 if device == "cpu" else 5e-2
        return bool(torch.allclose(packed, ref, atol=tol * max(1.0, float(ref.abs().max())), rtol=0))
    finally:
        model.train(was_training)
