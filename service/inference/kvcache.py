"""Static per-slot KV cache that transformers' attention layers write into.

Why our own cache object instead of transformers' StaticCache: StaticCache keeps one write
position for the whole batch, while continuous batching needs every row at its own length
(requests join and leave at step boundaries). Here each request owns one *slot* of
fixed tensors `[slots, kv_heads, max_seq_len, head_dim]` per layer, so memory is bounded
up front (max_batch_size x max_seq_len) and never grows.

The model's own attention code is used unchanged: each layer calls
`cache.update(key, value, layer_idx, ...)` (the transformers `Cache` protocol) and
attends to whatever it returns, under the 4-D additive mask we pass (transformers uses a
4-D mask as is). Two modes:

* prefill: rows are new requests (right-padded prompts). Their keys/values are written to
  positions 0..T-1 of their slots and returned unchanged: a prompt attends only to itself.
  Padding positions get garbage that decode overwrites before it is ever unmasked.
* decode: row i is slot i (rows 0..nb-1, one new token each at its own position). The
  token's key/value is written at (slot, pos) and the slot tensors' first `kv_len`
  positions are returned as views (no copy); the mask hides positions > pos.
  `plan_decode(..., slots=)` decodes chosen slots only (row i is slots[i]; the KV is
  gathered, a copy): the engine's retry of a failed step on part of its batch.

All writes are index_put_ with device tensors, so the decode step has static shapes and
no host sync: it can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch


class SlotKVCache:
    # Attributes transformers may probe on a cache object.
    is_compileable = True

    def __init__(self, *, num_layers: int, num_slots: int, max_seq_len: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (num_slots, num_kv_heads, max_seq_len, head_dim)
        # zeros, not empty: masked positions still enter softmax(.) @ V as 0 * value, and
        # 0 * NaN from uninitialised memory would poison the row.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.num_layers = num_layers
        self._rows = torch.arange(num_slots, device=device)
        self.mode = "decode"
        self.prefill_slots: torch.Tensor | None = None  # [n]
        self.prefill_pos: torch.Tensor | None = None    # [n, T]
        self.decode_pos: torch.Tensor | None = None     # [nb]
        self.decode_slots: torch.Tensor | None = None   # [nb]; None = slots 0..nb-1
        self.kv_len = max_seq_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # --- planning (called by the runner before a forward) ------------------------------
    def plan_prefill(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        self.mode = "prefill"
        self.prefill_slots = slots
        self.prefill_pos = positions

    def plan_decode(self, positions: torch.Tensor, kv_len: int, slots: torch.Tensor | None = None) -> None:
        self.mode = "decode"
        self.decode_pos = positions
        self.kv_len = kv_len
        self.decode_slots = slots

    # --- the transformers Cache protocol ------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs):
        k_cache, v_cache = self.keys[layer_idx], self.values[layer_idx]
        if self.mode == "prefill":
            rows = self.prefill_slots[:, None]
            # [n, H, T, D] -> [n, T, H, D] to match advanced indexing's result layout.
            k_cache[rows, :, self.prefill_pos] = key_states.transpose(1, 2).to(k_cache.dtype)
            v_cache[rows, :, self.prefill_pos] = value_states.transpose(1, 2).to(v_cache.dtype)
            return key_states, value_states
        nb = key_states.shape[0]
        rows = self._rows[:nb] if self.decode_slots is None else self.decode_slots
        k_cache[rows, :, self.decode_pos] = key_states[:, :, 0].to(k_cache.dtype)
        v_cache[rows, :, self.decode_pos] = value_states[:, :, 0].to(v_cache.dtype)
        if self.decode_slots is not None:
            return k_cache[rows, :, : self.kv_len], v_cache[rows, :, : self.kv_len]
        return k_cache[:nb, :, : self.kv_len], v_cache[:nb, :, : self.kv_len]

    def write_decode_rotated(self, layer_idx: int, query, key, value, cos, sin, interleaved: bool):
        """In a decode step (one new token per row), the rotary of q and k and the write of k and
        v into this cache as one kernel (`kernels.decoder.rotate_into_cache`); returns (rotated
        q, keys, values) as `update` would after transformers' rotary, or None outside a decode
        step or for shapes the kernel does not take (then the caller rotates and updates)."""
        if self.mode != "decode" or key.shape[2] != 1:
            return None
        from service.inference.kernels.decoder import rotate_into_cache

        nb = key.shape[0]
        rows = self._rows[:nb] if self.decode_slots is None else self.decode_slots
        k_cache, v_cache = self.keys[layer_idx], self.values[layer_idx]
        try:
            query = rotate_into_cache(query, key, value, cos, sin, interleaved, k_cache, v_cache, rows,
                                      self.decode_pos)
        except ValueError:
            return None
        if self.decode_slots is not None:
            return query, k_cache[rows, :, : self.kv_len], v_cache[rows, :, : self.kv_len]
        return query, k_cache[:nb, :, : self.kv_len], v_cache[:nb, :, : self.kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:  # only used when no positions are given
        return 0

    def __len__(self) -> int:
        return self.num_layers
