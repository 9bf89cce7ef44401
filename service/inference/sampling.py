"""Batched token selection with per-row parameters, on the model's device.

Order as in transformers' logits processors: repetition penalty -> temperature -> top-k
-> top-p -> sample (temperature 0 = greedy argmax of the penalised logits).

Randomness: each row's noise is a counter-based hash of (seed, token index, vocab id)
turned into Gumbel noise, and the token is argmax(logits/T + gumbel) (the Gumbel-max
trick = a categorical draw). Unlike one torch.Generator per request, this needs no Python
loop over rows, no host sync, and a seeded request draws the same noise whether it runs
alone or inside any batch: seeds are reproducible under continuous batching.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
# Odd multipliers < 2**31 so every product of a 32-bit value fits in int64 (no overflow).
_C_IDX, _C_CTR, _C_MIX = 0x27D4EB2D, 0x165667B1, 0x045D9F3B


def _fmix(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * _C_MIX) & _M32
    h = h ^ (h >> 16)
    h = (h * _C_MIX) & _M32
    return h ^ (h >> 16)


def uniform_noise(seed: torch.Tensor, counter: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] float32 in (0, 1), a pure function of (seed[row], counter[row], column)."""
    idx = torch.arange(vocab, device=seed.device, dtype=torch.int64)[None, :]
    lo = (seed & _M32)[:, None]
    hi = ((seed >> 32) & _M32)[:, None]
    h = ((idx * _C_IDX) + ((counter & 0xFFFFF) * _C_CTR)[:, None] + lo) & _M32
    h = _fmix(h)
    h = _fmix(h ^ hi)
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


class SamplingState:
    """Per-slot sampling parameters as device tensors, written when a request takes a slot."""

    def __init__(self, num_slots: int, vocab: int, device: torch.device):
        self.vocab = vocab
        self.temperature = torch.zeros(num_slots, device=device)
        self.top_p = torch.ones(num_slots, device=device)
        self.top_k = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self.penalty = torch.ones(num_slots, device=device)
        self.seed = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self.counter = torch.zeros(num_slots, dtype=torch.int64, device=device)
        # Tokens seen (prompt + generated), for the repetition penalty.
        self.seen = torch.zeros(num_slots, vocab, dtype=torch.bool, device=device)
        # Host-side copies so the hot path can skip unused work without a device sync.
        self._host = [dict(temperature=0.0, top_p=1.0, top_k=0, penalty=1.0)] * num_slots

    def set_slot(self, slot: int, *, temperature: float, top_p: float, top_k: int, penalty: float,
                 seed: int, prompt_ids: list[int]) -> None:
        self.temperature[slot] = temperature
        self.top_p[slot] = top_p
        self.top_k[slot] = top_k
        self.penalty[slot] = penalty
        self.seed[slot] = seed
        self.counter[slot] = 0
        self._host[slot] = dict(temperature=temperature, top_p=top_p, top_k=top_k, penalty=penalty)
        if penalty != 1.0:
            self.seen[slot].zero_()
            ids = torch.tensor([i for i in prompt_ids if 0 <= i < self.vocab], dtype=torch.int64,
                               device=self.seen.device)
            self.seen[slot, ids] = True

    def clear_slot(self, slot: int) -> None:
        self.temperature[slot] = 0.0
        self.penalty[slot] = 1.0
        self._host[slot] = dict(temperature=0.0, top_p=1.0, top_k=0, penalty=1.0)

    def sample(self, logits: torch.Tensor, slots: torch.Tensor, host_slots: list[int]) -> torch.Tensor:
        """logits [n, V] for the given slots -> token ids [n] (int64, on device)."""
        hosts = [self._host[s] for s in host_slots]
        logits = logits.float()
        if logits.shape[-1] > self.vocab:
            logits = logits[:, : self.vocab]
        if any(h["penalty"] != 1.0 for h in hosts):
            pen = self.penalty[slots][:, None]
            penalised = torch.where(logits > 0, logits / pen, logits * pen)
            logits = torch.where(self.seen[slots], penalised, logits)
        greedy = logits.argmax(-1)
        if not any(h["temperature"] > 0 for h in hosts):
            return greedy
        x = logits / self.temperature[slots].clamp_min(1e-6)[:, None]
        if any(h["top_k"] > 0 or h["top_p"] < 1.0 for h in hosts):
            vocab = x.shape[-1]
            sorted_x, order = x.sort(-1, descending=True)
            ranks = torch.arange(vocab, device=x.device)[None, :]
            k = self.top_k[slots]
            k = torch.where(k > 0, k, torch.full_like(k, vocab))[:, None]
            remove = ranks >= k
            probs = torch.softmax(sorted_x.masked_fill(remove, float("-inf")), -1)
            top_p = self.top_p[slots][:, None]
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            remove = remove | (((probs.cumsum(-1) - probs) >= top_p) & (top_p < 1.0))
            x = torch.empty_like(x).scatter_(-1, order, sorted_x.masked_fill(remove, float("-inf")))
        u = uniform_noise(self.seed[slots], self.counter[slots], x.shape[-1])
        gumbel = -torch.log(-torch.log(u))
        sampled = (x + gumbel).argmax(-1)
        return torch.where(self.temperature[slots] > 0, sampled, greedy)

    def after_step(self, slots: torch.Tensor, tokens: torch.Tensor, host_slots: list[int]) -> None:
        self.counter[slots] += 1
        if any(self._host[s]["penalty"] != 1.0 for s in host_slots):
            self.seen[slots, tokens] = True
