"""Attention kernels behind one dispatch point: ``attention(q, k, v, mask, scale=, softcap=, impl=)``.

``eager`` is the reference every other path is tested against (docs/reference.md §1):
    scores = (q . k) * scale;  scores = softcap * tanh(scores / softcap);  mask;  softmax in fp32.
Fast paths:
- ``sdpa``: torch's fused scaled_dot_product_attention. It has no soft-cap hook, so it is only
  chosen when ``softcap is None`` (Gemma 3); it is never used to silently drop a Gemma 2 cap.
- ``chunked``: the eager math over blocks of queries, so long prefill needs O(block * S) memory
  instead of O(T * S); the mask is built per block from positions, never as a T x S matrix.
- ``flex``: FlexAttention (CUDA) with the soft-cap as a score_mod; see ``flex.py``.

Masks are not tensors handed around but a rule over positions (``visible``, wrapped by ``Mask``):
key j is visible to query i iff  k_pos[j] >= 0 (a real token),  0 <= q_pos[i] - k_pos[j]  (causal),
for local layers  q_pos[i] - k_pos[j] < window  (W keys including itself), and, when segment ids are
given (documents packed into one training window), the two tokens belong to the same segment. The
same rule serves full forwards, padded batches (pad positions are -1), ring-buffer caches (slots
store positions), the fast decode step's additive bias and FlexAttention's ``mask_mod``: it is
written once, here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

IMPLS = ("auto", "eager", "chunked", "sdpa", "flex")
# Large finite negative rather than -inf: a fully masked row (a pad query) must stay finite, or its
# NaN output would reach other rows through 0 * NaN when it is later read as a (masked) value.
_NEG = torch.finfo(torch.float32).min
_CHUNK_ELEMENTS = 1 << 24  # score elements per chunk (64 MiB of fp32) before ``auto`` chunks


def visible(q_pos, k_pos, window: int | None = None, q_seg=None, k_seg=None) -> torch.Tensor:
    """The visibility rule, element-wise on broadcastable position (and segment id) tensors.

    Written with plain tensor ops only, so that it serves broadcast masks ([B, T, 1] vs [B, 1, S]),
    the decode step's bias and FlexAttention's per-element ``mask_mod`` alike."""
    d = q_pos - k_pos
    ok = (k_pos >= 0) & (d >= 0)
    if window is not None:
        ok = ok & (d < window)
    if q_seg is not None:
        ok = ok & (q_seg == k_seg)
    return ok


@dataclass
class Mask:
    """Visibility of keys to queries. q_pos [B, T], k_pos [B, S]; q_seg [B, T] and k_seg [B, S] are
    optional segment ids (packed documents never see each other)."""

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    window: int | None = None
    q_seg: torch.Tensor | None = None
    k_seg: torch.Tensor | None = None
    _dense: torch.Tensor | None = field(default=None, repr=False)

    def block(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Boolean [B, 1, t, S] for queries start:stop."""
        seg = (None, None)
        if self.q_seg is not None:
            seg = (self.q_seg[:, start:stop, None], self.k_seg[:, None, :])
        return visible(self.q_pos[:, start:stop, None], self.k_pos[:, None, :], self.window, *seg)[:, None]

    def dense(self) -> torch.Tensor:
        if self._dense is None:  # built once per forward, shared by all layers of one type
            self._dense = self.block()
        return self._dense

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        m = self.dense()
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, torch.finfo(dtype).min)


def _grouped(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    """[B, H, T, D] -> [B, Hkv, G*T, D]: query head h reads kv head h // G (GQA) without copying k/v."""
    b, h, t, d = q.shape
    return q.reshape(b, n_kv, (h // n_kv) * t, d)


def eager_attention(q, k, v, mask: Mask, *, scale: float, softcap: float | None, rows=None) -> torch.Tensor:
    """The reference. q [B, H, T, D], k/v [B, Hkv, S, D] -> [B, H, T, D]."""
    b, h, t, d = q.shape
    n_kv = k.shape[1]
    g = h // n_kv
    scores = torch.matmul(_grouped(q, n_kv), k.transpose(-1, -2)).float() * scale  # [B, Hkv, G*T, S]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    visible = mask.block(*rows) if rows is not None else mask.dense()
    scores = scores.masked_fill(~visible.repeat(1, 1, g, 1), _NEG)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(b, h, t, d)


def chunked_attention(q, k, v, mask: Mask, *, scale: float, softcap: float | None, block: int | None = None):
    """Eager math over query blocks: peak memory O(block * S), results identical to eager."""
    t, s = q.shape[2], k.shape[2]
    if block is None:
        block = max(16, _CHUNK_ELEMENTS // max(1, s * q.shape[1]))
    if t <= block:
        return eager_attention(q, k, v, mask, scale=scale, softcap=softcap)
    out = torch.empty_like(q)
    for i in range(0, t, block):
        j = min(t, i + block)
        out[:, :, i:j] = eager_attention(
            q[:, :, i:j], k, v, mask, scale=scale, softcap=softcap, rows=(i, j)
        )
    return out


def sdpa_attention(q, k, v, mask: Mask, *, scale: float, softcap: float | None):
    if softcap is not None:
        raise ValueError("sdpa cannot apply an attention soft-cap; use eager, chunked or flex")
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask.additive(q.dtype), scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


def choose_impl(q: torch.Tensor, k: torch.Tensor, softcap: float | None) -> str:
    if q.is_cuda:
        from .flex import flex_available

        if flex_available():
            return "flex"
    if softcap is None:
        return "sdpa"
    if q.shape[1] * q.shape[2] * k.shape[2] > _CHUNK_ELEMENTS:
        return "chunked"
    return "eager"


def attention(q, k, v, mask: Mask, *, scale: float, softcap: float | None, impl: str | None = None):
    """The single dispatch point. q [B, H, T, D], k/v [B, Hkv, S, D] -> [B, H, T, D]."""
    impl = impl or "auto"
    if impl == "auto":
        impl = choose_impl(q, k, softcap)
    if impl == "eager":
        return eager_attention(q, k, v, mask, scale=scale, softcap=softcap)
    if impl == "chunked":
        return chunked_attention(q, k, v, mask, scale=scale, softcap=softcap)
    if impl == "sdpa":
        return sdpa_attention(q, k, v, mask, scale=scale, softcap=softcap)
    if impl == "flex":
        from .flex import flex_attention

        return flex_attention(q, k, v, mask, scale=scale, softcap=softcap)
    raise ValueError(f"unknown attention impl {impl!r}: choose one of {IMPLS}")
