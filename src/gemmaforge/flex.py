"""FlexAttention path (CUDA): the soft-cap is a ``score_mod`` and the visibility rule
(``attention.visible``) a ``mask_mod``, so Gemma 2's capped scores and sliding windows run in one
fused, block-sparse kernel. The block mask is built once per ``Mask`` (one per layer type per forward) and shared by its layers.
"""

from __future__ import annotations

import functools

import torch

from .attention import visible


@functools.cache
def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention as _  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.cache
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _block_mask(mask, q_len: int, kv_len: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    cached = getattr(mask, "_flex_block", None)
    if cached is not None:
        return cached
    q_pos, k_pos, window, q_seg, k_seg = mask.q_pos, mask.k_pos, mask.window, mask.q_seg, mask.k_seg

    def mask_mod(b, h, qi, ki):
        if q_seg is None:
            return visible(q_pos[b, qi], k_pos[b, ki], window)
        return visible(q_pos[b, qi], k_pos[b, ki], window, q_seg[b, qi], k_seg[b, ki])

    block = create_block_mask(mask_mod, q_pos.shape[0], None, q_len, kv_len, device=device)
    mask._flex_block = block
    return block


def flex_attention(q, k, v, mask, *, scale: float, softcap: float | None):
    score_mod = None
    if softcap is not None:

        def score_mod(score, b, h, qi, ki):
            return torch.tanh(score / softcap) * softcap

    block = _block_mask(mask, q.shape[2], k.shape[2], q.device)
    return _compiled()(
        q, k, v, score_mod=score_mod, block_mask=block, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )
