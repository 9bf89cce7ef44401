"""The trainable model: 4-bit base (service.models.load_model) + kbit preparation + LoRA,
the loss of one micro-batch, and the check that packed rows are really honoured."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from service.core.domain import TrainingSpec
from service.core.errors import TrainingError
from workers.training.data import IGNORE_INDEX
from workers.training.packing import MicroBatch
from workers.training.plan import CE_CHUNK


def resolve_device(device: str) -> str:
    """"auto" -> cuda when present, else cpu. An explicit cuda request without CUDA fails
    loudly: a GPU job silently training on CPU would take days and look like a hang."""
    if device in ("", "auto"):
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError(f"device {device!r} requested but CUDA is not available "
                                f"(torch {torch.__version__})", code="internal", param="device")
        return device if ":" in device else "cuda:0"
    if device != "cpu":
        raise TrainingError(f"unknown device {device!r}", code="internal", param="device")
    return device


def compute_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_trainable(path, spec: TrainingSpec, target_modules: Sequence[str], device: str,
                   gradient_checkpointing: bool):
    """NF4 (double quant) base, prepared for k-bit training, with a fresh LoRA adapter.

    `prepare_model_for_kbit_training` freezes the base and upcasts every non-4-bit parameter
    to fp32 (a guard meant for fp16). With bf16 compute we cast the frozen ones (embeddings,
    lm_head, norms, biases) back: bf16 has fp32's range, frozen weights accumulate nothing,
    and it saves ~2 GiB on a 6B model and keeps every matmul on bf16 tensor cores. The
    LoRA weights stay fp32 (the optimizer's master copy).
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


def _ce_chunk(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def micro_batch_loss_sum(model, mb: MicroBatch, *, chunk: int = CE_CHUNK) -> torch.Tensor:
    """Sum of token cross-entropies over the micro-batch's label positions.

    Logits are computed only at label positions and in chunks of `chunk` tokens, each chunk
    recomputed in backward (torch.utils.checkpoint), so the 65k-vocabulary logits of a whole
    micro-batch never exist at once. `use_cache=False`: with a cache transformers would not
    read restarting position_ids as packed sequences.
    """
    keep = mb.targets != IGNORE_INDEX
    parts = _parts(model)
    if parts is None:  # generic path: full logits
        out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                    position_ids=mb.position_ids, use_cache=False)
        return torch.nn.functional.cross_entropy(out.logits[keep].float(), mb.targets[keep], reduction="sum")
    decoder, head = parts
    hidden = decoder(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                     position_ids=mb.position_ids, use_cache=False).last_hidden_state
    h = hidden[keep]
    t = mb.targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        total = total + torch.utils.checkpoint.checkpoint(
            _ce_chunk, head, h[s: s + chunk], t[s: s + chunk], use_reentrant=False)
    return total


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
            packed = fwd(torch.cat([a, b], 1), torch.cat([torch.arange(7), torch.arange(5)])[None])
        ref = torch.cat([la, lb], 1)
        tol = 1e-3 if device == "cpu" else 5e-2
        return bool(torch.allclose(packed, ref, atol=tol * max(1.0, float(ref.abs().max())), rtol=0))
    finally:
        model.train(was_training)
