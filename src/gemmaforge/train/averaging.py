"""Model averaging (Gemma 2 report; WARP, Ramé et al. 2024): one model from several of one shape.

- ``linear`` without a base: ``sum_i w_i theta_i`` with the weights normalised to sum to 1 (a "model
  soup"). With ``base``: task arithmetic, ``theta_0 + sum_i w_i (theta_i - theta_0)``, weights as given
  (a single source with w < 1 is WARP's interpolation towards the initialisation).
- ``slerp`` (needs ``base``): spherical interpolation of the task vectors ``delta_i = theta_i - theta_0``,
  tensor by tensor, so the merged update keeps the norm of its parts instead of shrinking as a linear
  mean of dissimilar vectors does (WARP section 3.2). For two sources with weights (1 - t, t) and
  ``Omega`` the angle between ``delta_1`` and ``delta_2``:

      theta = theta_0 + sin((1 - t) Omega) / sin(Omega) delta_1 + sin(t Omega) / sin(Omega) delta_2

  More sources are folded in one at a time, each with its share of the weight so far
  (t = w_i / (w_1 + ... + w_i)). Nearly parallel or zero task vectors fall back to the linear formula,
  its limit.

Sources are anything ``gemmaforge.load`` reads; they are read one at a time (the base and a running
result stay in memory), in float32. All must have the same config, and those that carry a tokenizer
the same one; the result carries it too.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Sequence

import torch

from ..errors import GemmaforgeError
from .data import tokenizer_digest
from .models import shipped_tokenizer, source_of

METHODS = ("linear", "slerp")


def slerp(d1: torch.Tensor, d2: torch.Tensor, t: float, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation between two task vectors (fp32 tensors of one shape)."""
    a, b = d1.flatten().double(), d2.flatten().double()
    na, nb = a.norm(), b.norm()
    if na < eps or nb < eps:
        return (1 - t) * d1 + t * d2
    cos = torch.clamp(torch.dot(a, b) / (na * nb), -1.0, 1.0)
    omega = math.acos(float(cos))
    if math.sin(omega) < eps:  # parallel (or opposite): the linear limit
        return (1 - t) * d1 + t * d2
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s) * d1 + (math.sin(t * omega) / s) * d2


def _config_difference(a, b) -> str:
    for f in fields(a):
        if getattr(a, f.name) != getattr(b, f.name):
            return f"{f.name}={getattr(b, f.name)!r} instead of {getattr(a, f.name)!r}"
    return ""


def _parse_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise GemmaforgeError(f"--weights has {len(weights)} values for {n} sources: give one per source")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise GemmaforgeError(f"--weights {weights}: they must be >= 0 and not all 0")
    return weights


def average(sources: Sequence[str], *, weights: Sequence[float] | None = None, method: str = "linear",
            base: str | None = None):
    """-> (the averaged model, the shared tokenizer or None). Raises GemmaforgeError on bad input
    before computing anything it would have to throw away."""
    from ..checkpoint import load

    if method not in METHODS:
        raise GemmaforgeError(f"--method {method!r}: use linear or slerp")
    if method == "slerp" and base is None:
        raise GemmaforgeError("--method slerp interpolates task vectors: give --base SRC (the model they start from)")
    if len(sources) < (1 if base is not None and method == "linear" else 2):
        raise GemmaforgeError("give at least two sources to average (or one with --base for linear)")
    w = _parse_weights(weights, len(sources))
    if base is None or method == "slerp":
        total = sum(w)
        w = [x / total for x in w]

    tokenizer, digest = None, None
    for src in ([base] if base is not None else []) + list(sources):
        tok = shipped_tokenizer(source_of(src))
        if tok is None:
            continue
        d = tokenizer_digest(tok)
        if digest is not None and d != digest:
            raise GemmaforgeError(f"{src} has a different tokenizer than {tokenizer.source}: "
                                  "averaged models must share one vocabulary")
        tokenizer, digest = tokenizer or tok, d

    f32 = torch.float32
    load_one = lambda src: load(source_of(src), dtype=f32, device="cpu")
    first = load_one(base if base is not None else sources[0])
    config = first.config

    def checked(src):
        model = load_one(src)
        diff = _config_difference(config, model.config)
        if diff:
            raise GemmaforgeError(f"{src} has {diff} (of {base if base is not None else sources[0]}): "
                                  "averaging needs models with the same config")
        return model

    with torch.no_grad():
        if base is None:  # plain weighted mean, accumulated into the first model's tensors
            state = first.state_dict()
            for t in state.values():
                t.mul_(w[0])
            for src, wi in zip(sources[1:], w[1:]):
                for k, t in checked(src).state_dict().items():
                    state[k].add_(t, alpha=wi)
            return first, tokenizer
        theta0 = first.state_dict()
        acc, seen = None, 0.0  # the running merged task vector and the weight folded in so far
        for src, wi in zip(sources, w):
            delta = {k: t - theta0[k] for k, t in checked(src).state_dict().items()}
            if acc is None:
                acc = {k: d * (wi if method == "linear" else 1.0) for k, d in delta.items()}
            elif method == "linear":
                for k, d in delta.items():
                    acc[k].add_(d, alpha=wi)
            else:
                t = wi / (seen + wi) if seen + wi > 0 else 0.0
                acc = {k: slerp(acc[k], d, t) for k, d in delta.items()}
            seen += wi
        for k, t in theta0.items():
            t.add_(acc[k])
        return first, tokenizer
