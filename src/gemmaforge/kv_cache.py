"""Preallocated KV cache: global layers keep every position, local layers a ring of ``sliding_window`` slots.

Why a ring is enough (REFERENCE.md section 5): a local layer's query at position p sees keys
p-W+1..p, so only the last W keys ever matter. Each slot stores the position of the token in it;
``attention.Mask`` turns stored positions into visibility, so a stale or empty slot (position -1)
is masked by the same rule as everything else.

The cache is indexed by *step* (a column shared by the whole batch: the n-th token fed), not by
position: with left-padded prompts of different lengths the rows' positions differ, but they all
advance one column per decode step. ``length`` counts the columns written so far.

One forward with a cache is three calls: ``step = cache.prepare(positions)`` (indices and key
positions for both layer types, computed once), ``k, v = cache.update(layer, k, v, step)`` per layer
(writes, returns what to attend over), then ``cache.commit(step)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import GemmaConfig


@dataclass
class CacheStep:
    length: int  # columns already written before this forward
    new: int  # columns written by this forward (T)
    global_cols: torch.Tensor  # [T] columns of the new tokens in the global buffers
    ring_cols: torch.Tensor  # [min(T, W)] ring slots that receive the last min(T, W) new tokens
    global_k_pos: torch.Tensor  # [B, length + T] positions of the keys global layers attend to
    local_k_pos: torch.Tensor  # [B, S_local] positions of the keys local layers attend to


class KVCache:
    def __init__(self, config: GemmaConfig, batch_size: int, max_len: int, *, device=None, dtype=torch.float32,
                 spare: int = 0):
        """``spare`` slots per buffer are allocated but never written (position -1: masked wherever
        attended). The compiled CPU decode step (generate/fast.py) asks for one, so that a slice of
        the written slots is never the whole buffer, which would be a recompilation."""
        self.config, self.batch_size, self.max_len = config, batch_size, max_len
        self.window = min(config.sliding_window, max_len)
        kv, hd = config.num_kv_heads, config.head_dim
        self.k, self.v = [], []
        for i in range(config.num_layers):
            slots = (self.window if config.is_local(i) else max_len) + spare
            self.k.append(torch.zeros(batch_size, kv, slots, hd, device=device, dtype=dtype))
            self.v.append(torch.zeros(batch_size, kv, slots, hd, device=device, dtype=dtype))
        # Slot positions are the same for every layer of one type: stored once per type.
        self.global_pos = torch.full((batch_size, max_len + spare), -1, dtype=torch.long, device=device)
        self.ring_pos = torch.full((batch_size, self.window + spare), -1, dtype=torch.long, device=device)
        self.length = 0

    def reset(self) -> None:
        self.global_pos.fill_(-1)
        self.ring_pos.fill_(-1)
        self.length = 0

    def prepare(self, positions: torch.Tensor) -> CacheStep:
        """positions [B, T] of the tokens about to be fed (-1 for padding)."""
        t = positions.shape[1]
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {t} tokens > max_len {self.max_len}")
        dev = self.global_pos.device
        cols = torch.arange(self.length, self.length + t, device=dev)
        m = min(t, self.window)
        ring_cols = cols[t - m :] % self.window
        self.global_pos[:, cols] = positions
        if t == 1:
            # Decode: write first, then attend over the ring. The overwritten slot held position
            # p - W, which is outside the window of p anyway.
            local_k_pos = self.ring_pos.clone()
            local_k_pos[:, ring_cols] = positions
        else:
            # Chunked prefill: earlier queries of this chunk may need keys that later tokens of the
            # chunk would overwrite, so attend over [ring before this chunk | the chunk], then write.
            # The first chunk has an empty ring: attend over the chunk alone (W fewer keys to score).
            local_k_pos = positions if self.length == 0 else torch.cat([self.ring_pos, positions], dim=1)
        return CacheStep(
            self.length, t, cols, ring_cols, self.global_pos[:, : self.length + t], local_k_pos
        )

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: CacheStep):
        """k, v [B, Hkv, T, D] of this layer's new tokens -> (keys, values) to attend over."""
        ck, cv = self.k[layer], self.v[layer]
        if not self.config.is_local(layer):
            ck.index_copy_(2, step.global_cols, k)
            cv.index_copy_(2, step.global_cols, v)
            end = step.length + step.new
            return ck[:, :, :end], cv[:, :, :end]
        m = step.ring_cols.numel()
        if step.new == 1:
            ck.index_copy_(2, step.ring_cols, k)
            cv.index_copy_(2, step.ring_cols, v)
            return ck, cv
        keys, values = (k, v) if step.length == 0 else (torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2))
        ck.index_copy_(2, step.ring_cols, k[:, :, -m:])
        cv.index_copy_(2, step.ring_cols, v[:, :, -m:])
        return keys, values

    def commit(self, step: CacheStep) -> None:
        m = step.ring_cols.numel()
        self.ring_pos[:, step.ring_cols] = self.global_pos[:, step.length + step.new - m : step.length + step.new]
        self.length += step.new

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def cache_bytes_per_token(config: GemmaConfig, max_len: int, dtype_bytes: int = 2) -> float:
    """Average KV bytes per token of context when the cache holds ``max_len`` tokens (bf16 default)."""
    per_slot = 2 * config.num_kv_heads * config.head_dim * dtype_bytes  # K and V
    window = min(config.sliding_window, max_len)
    slots = sum(window if config.is_local(i) else max_len for i in range(config.num_layers))
    return per_slot * slots / max_len


def full_cache_bytes_per_token(config: GemmaConfig, dtype_bytes: int = 2) -> float:
    """What a cache that keeps every position in every layer would need (the baseline to compare to)."""
    return 2 * config.num_kv_heads * config.head_dim * dtype_bytes * config.num_layers
