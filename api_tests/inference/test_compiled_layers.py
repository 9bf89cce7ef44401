"""`CompiledDecodeLayers`: the decode step's decoder layers through one torch.compile'd callable.

On the CPU with the `aot_eager` backend (Dynamo + AOTAutograd, no code generation: seconds,
not minutes): what is checked here is the part that is ours, that one compiled artifact
serves every layer (no recompile per layer, whatever the depth), that prefill stays eager,
and that teacher-forced decode logits, mixed LoRA rows included, equal the eager runner's.
Inductor's fused kernels are checked on the GPU (test_inference_gpu.py)."""
from __future__ import annotations

import pytest
import torch

from service.inference.lora import parse_peft_adapter
from service.inference.runner import ModelRunner

from inference_helpers import make_peft_adapter

TARGETS = ["q_proj", "k_proj", "v_proj"]


def _glm(layers: int):
    from transformers import GlmConfig, GlmForCausalLM

    cfg = GlmConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                    partial_rotary_factor=0.5, attention_bias=True, pad_token_id=0, eos_token_id=1,
                    bos_token_id=2)
    return GlmForCausalLM(cfg)


def _llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(cfg)


def _runner(model, compiled: bool) -> ModelRunner:
    runner = ModelRunner(model, num_slots=4, max_seq_len=64, lora_targets=TARGETS, lora_budget_bytes=1 << 20,
                         device=torch.device("cpu"), torch_compile=compiled, compile_backend="aot_eager")
    runner.pad_shapes = True  # the bucketed shapes CUDA graphs use
    return runner


def _teacher_forced(runner: ModelRunner, adapters, prompts, forced) -> torch.Tensor:
    """Logits [steps, rows, V] of decode steps fed `forced` [rows, steps], row i in slot i
    with adapter i (None = base)."""
    hw = 0
    for slot, parsed in enumerate(adapters):
        cols = runner.upload_adapter(parsed) if parsed is not None else None
        runner.bind_slot(slot, cols)
        hw = max([hw] + [c + 1 for c in cols or []])
    n = len(prompts)
    with torch.no_grad():
        runner.prefill(list(range(n)), prompts, hw)
        runner.pos_buf[:n] = torch.tensor([len(p) for p in prompts])
        out = []
        for step in range(forced.shape[1]):
            runner.tok_buf[:n] = forced[:, step]
            nb, kv_len, width = runner.decode_buckets(n - 1, int(runner.pos_buf[:n].max()), hw)
            out.append(runner.decode(nb, kv_len, width)[:n].clone())
            runner.pos_buf[:n] += 1
    return torch.stack(out)


@pytest.mark.parametrize("build", [_glm, _llama], ids=["glm", "llama"])
def test_compiled_decode_equals_eager_with_one_artifact_for_all_layers(build, tmp_path):
    import torch._dynamo
    from torch._dynamo.utils import counters

    def fresh():
        torch.manual_seed(0)  # every copy of the base has the same weights
        return build(6).eval()

    base = fresh()
    adapters_dir = [make_peft_adapter(base, tmp_path / f"a{i}", seed=10 + i, r=2 + 2 * i, targets=TARGETS)
                    for i in range(2)]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 3, 7)]
    forced = torch.randint(3, 97, (3, 6), generator=g)

    def logits(compiled: bool):
        runner = _runner(fresh(), compiled)
        parsed = [parse_peft_adapter(d, runner.shapes, runner.dtype) for d in adapters_dir]
        return runner, _teacher_forced(runner, [parsed[0], None, parsed[1]], prompts, forced)

    _, eager = logits(False)
    torch._dynamo.reset()
    counters.clear()
    runner, compiled = logits(True)
    frames = counters["stats"]["unique_graphs"]
    # Fed the same tokens, the compiled layers run the same float32 ATen ops as eager ones;
    # only the order of a few reductions may differ (bound: float32 epsilon times the
    # logits' scale, times a few for the depth).
    scale = eager.abs().max()
    assert (compiled - eager).abs().max() <= 64 * torch.finfo(torch.float32).eps * scale
    # Six layers, two KV lengths, LoRA on and off: still a few artifacts (layer 0 specialised,
    # then layer_idx symbolic), not one per layer.
    assert 1 <= frames <= 4, frames
    # Prefill never went through the compiled callable (its lengths would recompile it).
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        runner.prefill([3], [[5, 6, 7, 8, 9, 10, 11, 12, 13]], 0)
    assert counters["stats"]["unique_graphs"] == before
