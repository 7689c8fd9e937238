"""Choosing the next token: ``SamplingParams`` and ``sample(logits, params, generator, seen)``.

The logits go through the same processors, in the same order, as Hugging Face ``generate``
(``GenerationMixin._get_logits_processor``), so a setting means the same thing in both:

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> softmax -> draw

Temperature 0 means greedy: the argmax after the repetition penalty (HF applies the penalty in
greedy search too). Every step is one batched tensor expression: no Python loop over rows and no
host synchronisation, so a decode loop on a GPU never waits for the CPU here.

Filtered tokens get ``-inf`` (as HF's ``filter_value``), so ``softmax`` gives them probability 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import GemmaforgeError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy: the same output every run
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in the sequence
    seed: int | None = None  # None = a fresh random seed per call
    max_new_tokens: int = 256
    stop: tuple[str, ...] = field(default=())  # strings that end a completion (not included in it)

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        _check(self.temperature, "temperature", "a number >= 0 (0 = greedy)", lambda v: v >= 0)
        _check(self.top_k, "top_k", "an integer >= 0 (0 = off)", lambda v: v >= 0, integer=True)
        _check(self.top_p, "top_p", "a number in (0, 1] (1 = off)", lambda v: 0 < v <= 1)
        _check(self.min_p, "min_p", "a number in [0, 1] (0 = off)", lambda v: 0 <= v <= 1)
        _check(self.repetition_penalty, "repetition_penalty", "a number > 0 (1 = off)", lambda v: v > 0)
        _check(self.max_new_tokens, "max_new_tokens", "an integer >= 1", lambda v: v >= 1, integer=True)
        if self.seed is not None:
            _check(self.seed, "seed", "an integer in [0, 2**63)", lambda v: 0 <= v < 2**63, integer=True)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise GemmaforgeError(f"invalid stop string {s!r}: stop strings must be non-empty text")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check(value, name: str, valid: str, ok, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or not ok(value):
        raise GemmaforgeError(f"invalid {name}={value!r}: it must be {valid}")


# ---- the processors (each [B, V] -> [B, V]; HF's logits_process.py, same math) -----------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Tokens in ``seen`` (bool [B, V]) get their logit divided by ``penalty`` if positive, multiplied
    if negative: both make them less likely for penalty > 1 (CTRL, Keskar et al. 2019)."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (and any tied with the k-th, as HF does)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling: keep the smallest set of most likely tokens whose mass reaches p.

    Sorted ascending, a token is dropped when the mass of it and everything less likely is still
    <= 1 - p; the most likely token always stays.
    """
    sorted_logits, order = torch.sort(logits, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1 - p
    drop_sorted[:, -1] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less likely than ``min_p`` times the most likely one (Nguyen et al. 2024)."""
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    drop = probs < threshold
    drop.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(drop, -math.inf)


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """All enabled processors in HF's order, in float32. For greedy params only the penalty applies."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k:
        logits = apply_top_k(logits, params.top_k)
    if params.top_p < 1.0:
        logits = apply_top_p(logits, params.top_p)
    if params.min_p > 0.0:
        logits = apply_min_p(logits, params.min_p)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B] (int64), on the logits' device."""
    logits = process_logits(logits, params, seen)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def new_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``params.seed`` (or randomly): a seeded call repeats exactly."""
    g = torch.Generator(device=device)
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g
