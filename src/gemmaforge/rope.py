"""Rotary position embeddings, "rotate_half" (NeoX, half-split) layout as in HF and gemma_pytorch.

cos/sin are computed in float32 from integer positions and cast to the activation dtype, as the
reference implementations do (docs/reference.md §1). Positions are per row ([B, T]) so that left-
padded batches and cached decode use the same code.
"""

from __future__ import annotations

import torch


def inv_frequencies(head_dim: int, theta: float, scaling_factor: float = 1.0) -> torch.Tensor:
    """[head_dim / 2] float32 on the CPU; linear scaling divides frequencies (Gemma 3 4B+, global layers).

    Always computed on the CPU, also inside ``with torch.device("meta")`` (a model built to be loaded
    into): meta-device arithmetic goes through torch._refs, whose first use imports torch._dynamo,
    ~2 s of every load."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (theta**exponent) / scaling_factor


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions [B, T] (int) -> cos, sin [B, 1, T, head_dim] ready to broadcast over heads."""
    freqs = positions.clamp(min=0).float()[..., None] * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]."""
    return x * cos + rotate_half(x) * sin
