"""Where the compiled rotate-half kernel differs from transformers (bf16, Llama)."""
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from service.inference.kernels.decoder import rotate

cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
g = torch.Generator().manual_seed(7)
q = torch.randn(2, 3, 4, 16, generator=g).to(torch.bfloat16).cuda().transpose(1, 2)
k = torch.randn(2, 3, 2, 16, generator=g).to(torch.bfloat16).cuda().transpose(1, 2)
pos = torch.tensor([[0, 1, 2], [5, 9, 40]], device="cuda")
cos, sin = LlamaRotaryEmbedding(cfg).cuda()(q, pos)
print("cos", cos.dtype, cos.shape, "halves equal:", torch.equal(cos[..., :8], cos[..., 8:]))
ref_q, _ = apply_rotary_pos_emb(q, k, cos, sin)
ours = rotate(q, cos, sin, False)
d = (ours.float() - ref_q.float()).abs()
print("max err", d.max().item(), "n differ", int((d > 0).sum()), "of", d.numel())
idx = torch.nonzero(d > 0)[:8]
for b, h, t, i in idx.tolist():
    print(dict(b=b, h=h, t=t, i=i, x=q[b, h, t, i].item(), ref=ref_q[b, h, t, i].item(), ours=ours[b, h, t, i].item(),
               cos=cos[b, t, i].item(), sin=sin[b, t, i].item()))
