"""The closed-form detector scores and their p-values under "not watermarked".

Inputs are g-values [B, N, depth] in {0, 1} and a mask [B, N] of the n-grams that count (context
not repeated, before any EOS: ``detector.features``). Formulas as in the SynthID paper and the
synthid-text reference code (docs/reference.md section 8):

- mean score: the mean g over unmasked positions and layers;
- weighted mean: layer l weighted by ``linspace(10, 1, depth)`` normalised to sum to depth (the
  first layers carry more of the signal);
- p-values: without the watermark each g is an independent coin with P(1) = the table's share of
  ones (~0.5), so the sum of the n x depth unmasked g's is Binomial(n * depth, p0): the mean score's
  p-value is its exact upper tail. The weighted sum has no such closed form; its p-value uses the
  normal approximation (mean p0, variance p0 (1 - p0) sum w^2 / (depth^2 n)).
"""

from __future__ import annotations

import math

import torch


def _unmasked(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.float64).sum(dim=1)


def mean_score(g_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] float64: the mean g over unmasked n-grams and all layers (NaN where nothing is unmasked)."""
    g = g_values.to(torch.float64) * mask.to(torch.float64)[..., None]
    return g.sum(dim=(1, 2)) / (g_values.shape[-1] * _unmasked(mask))


def default_weights(depth: int) -> torch.Tensor:
    w = torch.linspace(10, 1, depth, dtype=torch.float64)
    return w * depth / w.sum()


def _weights(depth: int, weights) -> torch.Tensor:
    if weights is None:
        return default_weights(depth)
    w = torch.as_tensor(weights, dtype=torch.float64)
    return w * depth / w.sum()


def weighted_mean_score(g_values: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """[B] float64: the mean of layer-weighted g's (weights default to ``default_weights``)."""
    depth = g_values.shape[-1]
    w = _weights(depth, weights)
    g = g_values.to(torch.float64) * w.to(g_values.device) * mask.to(torch.float64)[..., None]
    return g.sum(dim=(1, 2)) / (depth * _unmasked(mask))


def binomial_tail(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p), summed in log space (exact to float64)."""
    if successes <= 0:
        return 1.0
    if successes > trials:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    k = torch.arange(successes, trials + 1, dtype=torch.float64)
    log_pmf = (math.lgamma(trials + 1) - torch.lgamma(k + 1) - torch.lgamma(trials - k + 1) + k * lp + (trials - k) * lq)
    return float(torch.logsumexp(log_pmf, dim=0).exp().clamp(max=1.0))


def mean_p_value(g_values: torch.Tensor, mask: torch.Tensor, p0: float = 0.5) -> torch.Tensor:
    """[B] float64: P(mean score >= the observed one) for text without the watermark (1 where
    nothing is unmasked: no evidence)."""
    sums = (g_values.to(torch.float64) * mask.to(torch.float64)[..., None]).sum(dim=(1, 2)).round().long().tolist()
    trials = (_unmasked(mask) * g_values.shape[-1]).long().tolist()
    return torch.tensor([binomial_tail(s, n, p0) if n else 1.0 for s, n in zip(sums, trials)], dtype=torch.float64)


def weighted_p_value(g_values: torch.Tensor, mask: torch.Tensor, p0: float = 0.5,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """[B] float64: the normal-approximation upper tail of the weighted mean score."""
    depth = g_values.shape[-1]
    w = _weights(depth, weights)
    n = _unmasked(mask)
    score = weighted_mean_score(g_values, mask, w)
    sd = torch.sqrt(p0 * (1 - p0) * (w**2).sum() / (depth**2 * n))
    z = (score - p0) / sd
    return torch.where(n > 0, 0.5 * torch.erfc(z / math.sqrt(2)), torch.ones_like(z))
