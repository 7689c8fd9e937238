"""Choosing the next token: ``SamplingParams`` (one request's settings), the processors and the draw;
``Sampler`` (sampler.py) applies them to a pool of rows.

The logits go through the same processors, in the same order, as Hugging Face ``generate``
(``GenerationMixin._get_logits_processor``), so a setting means the same thing in both:

    penalties -> temperature -> top-k -> top-p -> min-p -> logits processors -> draw

Penalties are HF's repetition penalty first, then OpenAI's frequency and presence penalties (the
order vLLM applies them in). Temperature 0 means greedy: the argmax after the penalties and the
logits processors, with no warper (HF applies the penalty and e.g. its watermark processor in
greedy search too, but temperature/top-k/top-p/min-p only when sampling). Filtered tokens get
``-inf`` (HF's ``filter_value``), so they have probability 0.

Every setting is per-row data: ``Sampler`` keeps one row of tensors per slot of the engine's pool
(``[num_slots]``), and one ``sample`` call handles rows with different settings in a few batched
tensor expressions: no Python loop over rows and no host synchronisation. A row whose setting is
"off" (top_k=0, top_p=1, min_p=0, penalty 1/0, temperature 1) is left bit-for-bit unchanged by that
processor, so a row's result never depends on what the other rows asked for.

Randomness is counter-based (see ``_log_exponentials``): the draw of a row at step ``t`` is a pure
function of (that row's seed, t, its processed logits), so it does not depend on the other rows of
the batch, their order, the slot, or the batch size. The module-level ``process_logits``/``sample`` (one
``SamplingParams`` for a whole batch) are thin wrappers over the same per-row code.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .. import cpu_kernel
from ..errors import GemmaforgeError

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy: the same output every run
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in the sequence (prompt included)
    seed: int | None = None  # None = a fresh random seed per call
    max_new_tokens: int = 256
    stop: tuple[str, ...] = field(default=())  # strings that end a completion (not included in it)
    # OpenAI: logit -= frequency * count + presence * (count > 0), count = times the token was
    # *generated* so far (not counting the prompt, as OpenAI and vLLM). 0 = off; < 0 encourages.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int = 0  # how many most likely tokens' log-probs to report per step (OpenAI top_logprobs)
    stop_token_ids: tuple[int, ...] = field(default=())  # extra ids that end this request (the id is kept)

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        ids = self.stop_token_ids
        ids = (ids,) if isinstance(ids, int) else tuple(ids or ())
        object.__setattr__(self, "stop_token_ids", ids)
        _check(self.temperature, "temperature", "a number >= 0 (0 = greedy)", lambda v: v >= 0)
        _check(self.top_k, "top_k", "an integer >= 0 (0 = off)", lambda v: v >= 0, integer=True)
        _check(self.top_p, "top_p", "a number in (0, 1] (1 = off)", lambda v: 0 < v <= 1)
        _check(self.min_p, "min_p", "a number in [0, 1] (0 = off)", lambda v: 0 <= v <= 1)
        _check(self.repetition_penalty, "repetition_penalty", "a number > 0 (1 = off)", lambda v: v > 0)
        _check(self.presence_penalty, "presence_penalty", "a number in [-2, 2] (0 = off)", lambda v: -2 <= v <= 2)
        _check(self.frequency_penalty, "frequency_penalty", "a number in [-2, 2] (0 = off)", lambda v: -2 <= v <= 2)
        _check(self.logprobs, "logprobs", f"an integer in [0, {MAX_LOGPROBS}]", lambda v: 0 <= v <= MAX_LOGPROBS,
               integer=True)
        _check(self.max_new_tokens, "max_new_tokens", "an integer >= 1", lambda v: v >= 1, integer=True)
        if self.seed is not None:
            _check(self.seed, "seed", "an integer in [0, 2**63)", lambda v: 0 <= v < 2**63, integer=True)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise GemmaforgeError(f"invalid stop string {s!r}: stop strings must be non-empty text")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise GemmaforgeError(f"invalid stop_token_ids entry {t!r}: token ids are integers >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _check(value, name: str, valid: str, ok, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or not ok(value):
        raise GemmaforgeError(f"invalid {name}={value!r}: it must be {valid}")


# ---- the processors: each [B, V] -> [B, V], a setting per row (a tensor [B]) or one for all -------
# HF's logits_process.py, same float32 math, so one setting shared by all rows equals HF exactly
# (on CPU; on CUDA torch divides by a Python scalar as a multiply by its reciprocal, 1 ulp apart).
# A row whose setting is "off" is returned unchanged, bit for bit.
def _per_row(value, logits: torch.Tensor, dtype=torch.float32):
    """A [B] (or [B, 1]) tensor -> [B, 1], to broadcast over the vocabulary; a number stays a number
    (what HF passes, and no host-to-device copy per step)."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(dtype=dtype, device=logits.device).reshape(-1, 1).expand(logits.shape[0], 1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty) -> torch.Tensor:
    """Tokens in ``seen`` (bool [B, V]: prompt and generated) get their logit divided by ``penalty``
    if positive, multiplied if negative: both make them less likely for penalty > 1 (CTRL, Keskar et
    al. 2019; HF ``RepetitionPenaltyLogitsProcessor``). ``penalty``: a number or [B] (1 = off)."""
    penalty = _per_row(penalty, logits)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency_penalty(logits: torch.Tensor, counts: torch.Tensor, presence, frequency) -> torch.Tensor:
    """OpenAI's penalties: logit -= frequency * count + presence * (count > 0), with ``counts``
    (int [B, V]) the times each token was generated so far; a number or [B] each (0 = off).
    Frequency first, then presence, as vLLM's ``apply_penalties``."""
    logits = logits - _per_row(frequency, logits) * counts
    return logits - _per_row(presence, logits) * (counts > 0)


def apply_temperature(logits: torch.Tensor, temperature) -> torch.Tensor:
    """HF ``TemperatureLogitsWarper``: a division (not a multiply by 1/T), as HF; 1 = off."""
    return logits / _per_row(temperature, logits)


def apply_top_k(logits: torch.Tensor, k) -> torch.Tensor:
    """Keep the k largest logits (and any tied with the k-th, as HF does). ``k``: int or [B] (0 = off)."""
    return apply_top_k_top_p(logits, k, None)


def apply_top_p(logits: torch.Tensor, p) -> torch.Tensor:
    """Nucleus sampling: keep the smallest set of most likely tokens whose mass reaches p (1 = off)."""
    return apply_top_k_top_p(logits, None, p)


def _top_p_cut(p) -> torch.Tensor | float:
    """The drop threshold ``1 - p`` of HF's top-p, computed in float64 as HF does (``1 - self.top_p``
    in Python) before the comparison casts it to float32; -1 (drops nothing) where p = 1 is off."""
    if isinstance(p, torch.Tensor):
        p = p.double()
        return torch.where(p < 1, 1 - p, -1.0).float()
    return 1 - p if p < 1 else -1.0


def apply_top_k_top_p(logits: torch.Tensor, k, p) -> torch.Tensor:
    """Top-k then top-p. ``k``/``p``: None (off for all rows), or a number or [B] (0 / 1 = off for
    that row). A [B] ``k`` costs one host sync here (its max); ``Sampler`` knows it without one."""
    k_max = None
    if isinstance(k, torch.Tensor):
        k_max = int(k.max())
    return _top_k_top_p(logits, None if k is None else _per_row(k, logits, torch.long),
                        None if p is None else _per_row(_top_p_cut(p), logits), k_max)


def _top_k_top_p(logits: torch.Tensor, k, cut, k_max: int | None = None) -> torch.Tensor:
    """k: None, an int or [B, 1] int64 (0 = off) with ``k_max`` its largest value; cut: None, a float
    or [B, 1] float32 (the top-p drop threshold 1 - p, from ``_top_p_cut``; < 0 = off).

    Top-k as HF: drop what is below the k-th largest logit (ties with it stay), found with
    ``topk(k_max)``, a partial selection, not a sort. Top-p then sorts the top-k-filtered row, as
    HF does: its one sort per step, only when some row uses top-p (and mostly -inf when top-k ran,
    which CPU sorts fast). Stable sort: equal logits keep one order whatever the batch is, so a
    tie at the top-p boundary resolves the same way in any batch.
    """
    v = logits.shape[-1]
    kth = None
    if isinstance(k, torch.Tensor):
        k_max = min(v, k_max)
        if k_max > 0:
            top = logits.topk(k_max, dim=-1).values  # [B, k_max], largest first
            k = k.clamp(max=v)  # HF: min(top_k, vocab)
            kth = top.gather(1, (k - 1).clamp(min=0)).masked_fill(k == 0, -math.inf)  # off: nothing below -inf
    elif k:
        kth = logits.topk(min(k, v), dim=-1).values[:, -1:]
    if kth is not None:
        logits = logits.masked_fill(logits < kth, -math.inf)
    if cut is not None:
        # Sorted ascending, a token is dropped when the mass of it and everything less likely is
        # still <= 1 - p; the most likely token always stays (HF's min_tokens_to_keep=1).
        sorted_logits, order = torch.sort(logits, dim=-1, stable=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= cut
        drop_sorted[:, -1] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def apply_min_p(logits: torch.Tensor, min_p) -> torch.Tensor:
    """Drop tokens less likely than ``min_p`` times the most likely one (Nguyen et al. 2024; HF
    ``MinPLogitsWarper``). ``min_p``: a number or [B] (0 = off)."""
    probs = logits.softmax(dim=-1)
    threshold = _per_row(min_p, logits) * probs.amax(dim=-1, keepdim=True)
    drop = probs < threshold
    drop.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(drop, -math.inf)


@dataclass
class _Needs:
    """Which processors some row of a batch uses: the others are skipped (they would be no-ops)."""
    sampled: bool = False
    greedy: bool = False
    temperature: bool = False
    top_k: int = 0  # the largest top_k of the sampled rows (0: no row uses top-k)
    top_p: bool = False
    min_p: bool = False
    repetition: bool = False
    frequency: bool = False
    presence: bool = False
    top_logprobs: int = 0

    @classmethod
    def of(cls, rows: Iterable[SamplingParams | None]) -> _Needs:
        n = cls()
        for p in rows:
            if p is None:
                continue
            n.repetition |= p.repetition_penalty != 1.0
            n.frequency |= p.frequency_penalty != 0.0
            n.presence |= p.presence_penalty != 0.0
            n.top_logprobs = max(n.top_logprobs, p.logprobs)
            n.greedy |= p.greedy
            if not p.greedy:
                n.sampled = True
                n.temperature |= p.temperature != 1.0
                n.top_k = max(n.top_k, p.top_k)
                n.top_p |= p.top_p < 1.0
                n.min_p |= p.min_p > 0.0
        return n

    @property
    def penalties(self) -> bool:
        return self.repetition or self.frequency or self.presence


def _warp(logits, needs: _Needs, temperature, top_k, top_p_cut, min_p) -> torch.Tensor:
    """The warpers of sampled rows, in HF's order; each setting a number or [B, 1]. Greedy rows carry
    the "off" values (1, 0, -1, 0), so the same expression leaves them as they were."""
    if needs.temperature:
        logits = logits / temperature
    if needs.top_k or needs.top_p:
        logits = _top_k_top_p(logits, top_k if needs.top_k else None, top_p_cut if needs.top_p else None, needs.top_k)
    if needs.min_p:
        logits = apply_min_p(logits, min_p)
    return logits


# ---- counter-based randomness ----------------------------------------------------------------
# Why a hash and not torch.Generator: a generator is one stream for a whole batch, so a row's draws
# would depend on which rows come before it and how many. Here every random number is a pure
# function of (row seed, step, token id): splitmix64 (Steele, Lea & Flood 2014, the seeder of
# java.util.SplittableRandom), in int64 tensor ops.
#
# Why Gumbel-max and not inverse-CDF with one uniform per row: argmax(logits + Gumbel noise) is an
# exact draw from softmax(logits) (Gumbel 1954; vLLM's sampler does the same race, probs / Exp(1)),
# needs no softmax, no cumulative sum (a float32 cumsum over 262k tokens drifts by ~1e-5, which
# misplaces the boundaries of rare tokens) and no sort, and is independent of the vocab order.
# Its cost is ~20 in-place elementwise passes over [R, V] (CPU, 1 thread, V=262k: ~5 ms per row, less
# than the softmax + multinomial it replaces); a pure chain that torch.compile can fuse into one kernel.
_M64 = 1 << 64
_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: splitmix64's increment
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 value torch stores (torch int64 arithmetic wraps mod 2**64)."""
    x %= _M64
    return x - _M64 if x >= 1 << 63 else x


def _mix64_int(z: int) -> int:
    """splitmix64's output function on a Python int (the reference the tensor version must equal)."""
    z %= _M64
    z = ((z ^ (z >> 30)) * _MIX1) % _M64
    z = ((z ^ (z >> 27)) * _MIX2) % _M64
    return z ^ (z >> 31)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64: torch's ``>>`` is arithmetic (copies the sign bit), so mask."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64_(z: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function on int64 ``z``, in place (``tmp``: scratch of z's shape): on the
    [R, V] noise every pass counts, so no temporaries."""
    for shift, multiplier in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=tmp).bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(tmp)
        if multiplier is not None:
            z.mul_(_signed(multiplier))
    return z


def _mix64(z: torch.Tensor) -> torch.Tensor:
    return _mix64_(z.clone(), torch.empty_like(z))


def _token_offsets(vocab_size: int, device) -> torch.Tensor:
    """[V] int64: (token + 1) * golden, the splitmix64 stream positions of the vocabulary."""
    return torch.arange(1, vocab_size + 1, dtype=torch.long, device=device) * _signed(_GOLDEN)


def _log_exponentials(keys: torch.Tensor, steps: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """keys, steps [R] int64, offsets [V] -> log E [R, V] float32, E ~ Exp(1) i.i.d. per (row key,
    step, token); -log E is Gumbel(0, 1) noise, so argmax(scores - log E) ~ softmax(scores).

    The row's key at a step is the splitmix64 stream of its seed key at position step + 1; per token,
    the stream of that at position token + 1. Of the 64 bits, 53 become v in [0, 1) (float32 keeps
    their relative precision near 0) and E = -log1p(-v): exact for small E, the tail that lets a
    rare token win. v is clamped to [2**-60, 1 - 2**-24] so E is never 0 or inf.
    """
    row = _mix64(keys + (steps + 1) * _signed(_GOLDEN))  # [R]
    z = row[:, None] + offsets[None, :]  # [R, V] int64
    tmp = torch.empty_like(z)
    _mix64_(z, tmp)
    torch.bitwise_right_shift(z, 11, out=tmp).bitwise_and_((1 << 53) - 1)
    del z
    neg_v = tmp.to(torch.float32).mul_(-(2.0**-53)).clamp_(-(1 - 2.0**-24), -(2.0**-60))  # -v
    return neg_v.log1p_().neg_().log_()  # log(-log(1 - v)) = log E


def _draw(scores: torch.Tensor, log_e: torch.Tensor, greedy: torch.Tensor | None = None) -> torch.Tensor:
    """argmax(scores - log E) per row: one token from softmax(scores) (-inf never wins); rows where
    ``greedy`` ([R, 1] bool) is set get no noise, i.e. the argmax. Writes over ``log_e``."""
    if greedy is not None:
        log_e.masked_fill_(greedy, 0.0)
    return cpu_kernel.argmax(torch.sub(scores, log_e, out=log_e))


def seed_key(seed: int) -> int:
    """A seed -> the row key (int64) the hash starts from; splitmix64 so nearby seeds differ fully."""
    return _signed(_mix64_int(seed + _GOLDEN))


def row_seed(seed: int | None, index: int = 0) -> int:
    """The effective seed of sample ``index`` of a request (the engine passes it to ``set_row``).

    index 0 is ``seed`` itself, so n=1 with a seed repeats n=1; sample i > 0 gets a hash of
    (seed, i), not seed + i, so request (seed=5, n=2) does not repeat request (seed=6). ``seed``
    None: a fresh random seed (from os.urandom), so unseeded requests differ.
    """
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    if index == 0:
        return seed
    return _mix64_int(_mix64_int(seed) ^ _mix64_int(index + _GOLDEN)) >> 1


# ---- one SamplingParams for a whole batch (today's engine) -----------------------------------------
def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                   counts: torch.Tensor | None = None) -> torch.Tensor:
    """All enabled processors in HF's order, in float32, one setting for every row: the per-row code
    with a shared setting. ``seen`` bool [B, V] (prompt + generated) for the repetition penalty,
    ``counts`` int [B, V] (generated) for presence/frequency. Greedy params: only the penalties."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and counts is not None:
        logits = apply_presence_frequency_penalty(logits, counts, params.presence_penalty, params.frequency_penalty)
    if params.greedy:
        return logits
    return _warp(logits, _Needs.of([params]), params.temperature, params.top_k, _top_p_cut(params.top_p), params.min_p)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B] (int64), on the logits' device. The draw is ``Sampler``'s
    (Gumbel-max over a hash), with each row's key taken from ``generator``: a seeded generator
    repeats exactly."""
    logits = process_logits(logits, params, seen)
    if params.greedy:
        return logits.argmax(dim=-1)
    b, v = logits.shape
    keys = torch.randint(-(2**63), 2**63 - 1, (b,), generator=generator, dtype=torch.long, device=logits.device)
    return _draw(logits, _log_exponentials(keys, torch.zeros_like(keys), _token_offsets(v, logits.device)))


def new_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``params.seed`` (or randomly): a seeded call repeats exactly."""
    g = torch.Generator(device=device)
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g


__all__ = ["MAX_LOGPROBS", "SamplingParams", "apply_min_p",
           "apply_presence_frequency_penalty", "apply_repetition_penalty", "apply_temperature", "apply_top_k",
           "apply_top_k_top_p", "apply_top_p", "new_generator", "process_logits", "row_seed", "sample", "seed_key"]
