"""Choosing the next token: ``SamplingParams`` (one request's settings) and ``Sampler`` (a pool of rows).

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

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
    return torch.sub(scores, log_e, out=log_e).argmax(dim=-1)


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


# ---- the per-row sampler -------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleOutput:
    tokens: torch.Tensor  # [R] int64
    logprob: torch.Tensor | None  # [R] float32: log_softmax(raw logits) at the token (OpenAI/vLLM); see sample()
    top_ids: torch.Tensor | None = None  # [R, k] int64, k = max logprobs of the rows; most likely first
    top_logprobs: torch.Tensor | None = None  # [R, k] float32: their log_softmax(raw logits)


Processor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Sampler:
    """The sampling state of a fixed pool of rows (slots), one row of each tensor per slot.

        sampler = Sampler(num_slots=8, vocab_size=V, device="cuda")
        sampler.set_row(3, params, prompt_ids, seed=row_seed(params.seed))
        out = sampler.sample(logits, slots)  # logits [R, V] of the rows in ``slots`` [R]
        sampler.clear_row(3)

    Per slot: the settings (temperature, top_k, top_p, min_p, the three penalties), the seed's key,
    the step (tokens sampled so far for this request), the sequence length and a ring of its last
    ``history`` tokens (prompt included) for processors, and, only once some row uses a penalty,
    the prompt's tokens [S, V] bool and the generated-token counts [S, V] int32.

    ``processors``: callables ``proc(logits [R, V], slots [R], steps [R]) -> logits [R, V]``, run in
    order after the warpers and before the draw, for greedy rows too (HF runs logits processors such
    as its SynthID watermark in greedy search as well; for a greedy row ``logits`` are the penalised
    raw logits, for a sampled row the warped ones, -inf where filtered). ``steps`` is the index of
    the token being chosen (0 = the request's first new token, so a processor with its own per-slot
    state resets it there). A processor reads each row's context with ``sampler.recent(slots, n)``;
    it must not modify ``logits`` in place (return a new tensor).
    """

    def __init__(self, num_slots: int, vocab_size: int, device: torch.device | str = "cpu", *, history: int = 16):
        for name, value in (("num_slots", num_slots), ("vocab_size", vocab_size), ("history", history)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GemmaforgeError(f"invalid {name}={value!r}: it must be an integer >= 1")
        self.num_slots, self.vocab_size, self.history = num_slots, vocab_size, history
        self.device = torch.device(device)
        s, dev = num_slots, self.device
        f32 = dict(dtype=torch.float32, device=dev)
        # The "off" values: an empty slot samples greedily with nothing applied.
        self._temperature = torch.ones(s, 1, **f32)  # [S, 1]: broadcasts over the vocabulary
        self._top_k = torch.zeros(s, 1, dtype=torch.long, device=dev)
        self._top_p_cut = torch.full((s, 1), -1.0, **f32)  # 1 - top_p; < 0 = off
        self._min_p = torch.zeros(s, 1, **f32)
        self._repetition = torch.ones(s, 1, **f32)
        self._presence = torch.zeros(s, 1, **f32)
        self._frequency = torch.zeros(s, 1, **f32)
        self._greedy = torch.ones(s, 1, dtype=torch.bool, device=dev)
        self._key = torch.zeros(s, dtype=torch.long, device=dev)
        self._step = torch.zeros(s, dtype=torch.long, device=dev)  # tokens sampled so far
        self._length = torch.zeros(s, dtype=torch.long, device=dev)  # prompt + generated
        self._recent = torch.full((s, history), -1, dtype=torch.long, device=dev)  # token at position t: [t % H]
        self._prompt_seen: torch.Tensor | None = None  # [S, V] bool, allocated with the first penalty
        self._counts: torch.Tensor | None = None  # [S, V] int32 generated tokens
        self._offsets = _token_offsets(vocab_size, dev)
        self._params: list[SamplingParams | None] = [None] * num_slots  # host mirror: decides what runs
        self._pool_needs: _Needs | None = _Needs()
        self.processors: list[Processor] = []

    # ---- rows join and leave ------------------------------------------------------------------
    def set_row(self, slot: int, params: SamplingParams, prompt_ids: Sequence[int], seed: int) -> None:
        """Request ``params`` enters ``slot`` (empty) with its prompt; ``seed`` is the effective seed
        (``row_seed(params.seed, i)`` for sample i of the request). Step 0 comes next."""
        self._check_slot(slot)
        if self._params[slot] is not None:
            raise GemmaforgeError(f"slot {slot} is in use: clear_row({slot}) before giving it another request")
        if not isinstance(params, SamplingParams):
            raise GemmaforgeError(f"params must be SamplingParams, got {type(params).__name__}")
        _check(seed, "seed", "an integer in [0, 2**63)", lambda v: 0 <= v < 2**63, integer=True)
        if isinstance(prompt_ids, torch.Tensor):
            ids = prompt_ids.detach().to("cpu", torch.long).reshape(-1)
        else:
            ids = torch.as_tensor(list(prompt_ids), dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise GemmaforgeError(f"prompt for slot {slot} has token ids outside [0, {self.vocab_size})")
        if any(t >= self.vocab_size for t in params.stop_token_ids):
            raise GemmaforgeError(
                f"stop_token_ids {params.stop_token_ids} reach past the vocabulary ({self.vocab_size} tokens)")
        sampled = not params.greedy
        self._temperature[slot] = params.temperature if sampled else 1.0
        self._top_k[slot] = params.top_k if sampled else 0
        self._top_p_cut[slot] = _top_p_cut(params.top_p) if sampled else -1.0
        self._min_p[slot] = params.min_p if sampled else 0.0
        self._repetition[slot] = params.repetition_penalty
        self._presence[slot] = params.presence_penalty
        self._frequency[slot] = params.frequency_penalty
        self._greedy[slot] = not sampled
        self._key[slot] = seed_key(seed)
        self._step[slot] = 0
        self._length[slot] = len(ids)
        tail = ids[-self.history:]
        self._recent[slot] = -1
        where = torch.arange(len(ids) - len(tail), len(ids), device=self.device) % self.history
        self._recent[slot, where] = tail.to(self.device)
        if params.penalised:
            if self._counts is None:
                # Rows already running never used their counts (no penalty), so starting now is exact.
                self._prompt_seen = torch.zeros(self.num_slots, self.vocab_size, dtype=torch.bool, device=self.device)
                self._counts = torch.zeros(self.num_slots, self.vocab_size, dtype=torch.int32, device=self.device)
            self._prompt_seen[slot] = False
            self._prompt_seen[slot, ids.to(self.device)] = True
            self._counts[slot] = 0
        self._params[slot] = params
        self._pool_needs = None

    def clear_row(self, slot: int) -> None:
        """The request in ``slot`` left; the slot is empty (greedy, nothing applied) until set again."""
        self._check_slot(slot)
        self._params[slot] = None
        self._temperature[slot] = 1.0
        self._top_k[slot] = 0
        self._top_p_cut[slot] = -1.0
        self._min_p[slot] = 0.0
        self._repetition[slot] = 1.0
        self._presence[slot] = 0.0
        self._frequency[slot] = 0.0
        self._greedy[slot] = True
        self._pool_needs = None

    def params(self, slot: int) -> SamplingParams | None:
        self._check_slot(slot)
        return self._params[slot]

    # ---- one step --------------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, slots, *, logprob: bool = False) -> SampleOutput:
        """logits [R, V] (float32, raw model output) of the rows in ``slots`` [R] (distinct, any
        subset of the pool, any order) -> the next token of each row.

        Advances each row's step and records its token (counts, ring). ``logprob`` of the output is
        computed when ``logprob=True`` or some row has ``params.logprobs > 0`` (else None: the
        all-greedy fast path is one argmax, no pass over the vocabulary with exp); ``top_ids`` and
        ``top_logprobs`` when some row has logprobs > 0, with k = the largest of them (a row reads
        its first ``params.logprobs`` columns). All log-probs are of the raw logits (no penalty,
        temperature or filter), as OpenAI and vLLM report them. ``logits`` is never written to.
        """
        slots, needs = self._batch(logits, slots)
        steps = self._step[slots]  # [R]
        if not needs.sampled and not needs.penalties and not self.processors:
            tokens = logits.argmax(dim=-1)  # the decode fast path: nothing else over the vocabulary
        else:
            scores = self._process(logits, slots, steps, needs)
            if needs.sampled:
                log_e = _log_exponentials(self._key[slots], steps, self._offsets)  # [R, V]
                tokens = _draw(scores, log_e, self._greedy[slots] if needs.greedy else None)
            else:
                tokens = scores.argmax(dim=-1)
        self._record(slots, steps, tokens)

        lp = top_ids = top_lp = None
        if logprob or needs.top_logprobs:
            raw = logits.float()
            norm = torch.logsumexp(raw, dim=-1)  # [R]
            lp = raw.gather(1, tokens[:, None])[:, 0] - norm
            if needs.top_logprobs:
                values, top_ids = raw.topk(needs.top_logprobs, dim=-1)  # sorted, most likely first
                top_lp = values - norm[:, None]
        return SampleOutput(tokens, lp, top_ids, top_lp)

    def process(self, logits: torch.Tensor, slots) -> torch.Tensor:
        """The processed logits [R, V] that ``sample`` would draw from (penalties, warpers for the
        sampled rows, processors); changes no state. For inspection and tests."""
        slots, needs = self._batch(logits, slots)
        return self._process(logits, slots, self._step[slots], needs)

    def recent(self, slots, n: int | None = None) -> torch.Tensor:
        """[R, n] the last n tokens of each row's sequence (prompt and generated), oldest first, -1
        before its start; n <= ``history`` (default all of it). What an n-gram watermark keys on."""
        n = self.history if n is None else n
        if not 1 <= n <= self.history:
            raise GemmaforgeError(f"recent(n={n}): n must be in [1, {self.history}] (the Sampler's history)")
        slots = self._slot_tensor(slots)
        pos = self._length[slots][:, None] - n + torch.arange(n, device=self.device)  # [R, n]
        return self._recent[slots[:, None], pos % self.history].masked_fill(pos < 0, -1)

    def steps(self, slots) -> torch.Tensor:
        """[R] tokens sampled so far for each row's request."""
        return self._step[self._slot_tensor(slots)]

    # ---- internals -------------------------------------------------------------------------------
    def _process(self, logits, slots, steps, needs: _Needs) -> torch.Tensor:
        x = logits.float()
        if needs.penalties:
            counts = self._counts[slots]  # [R, V] int32
            if needs.repetition:
                seen = self._prompt_seen[slots] | (counts > 0)
                x = apply_repetition_penalty(x, seen, self._repetition[slots])
            if needs.frequency or needs.presence:
                x = apply_presence_frequency_penalty(x, counts, self._presence[slots], self._frequency[slots])
        if needs.sampled:
            x = _warp(x, needs, self._temperature[slots], self._top_k[slots], self._top_p_cut[slots],
                      self._min_p[slots])
        if self.processors and x is logits:
            x = x.clone()  # a processor must not reach the caller's logits (logprobs read them)
        for proc in self.processors:
            x = proc(x, slots, steps)
            if not isinstance(x, torch.Tensor) or x.shape != logits.shape:
                raise GemmaforgeError(
                    f"logits processor {proc!r} must return a tensor of shape {tuple(logits.shape)}")
        return x

    def _record(self, slots, steps, tokens) -> None:
        self._step[slots] = steps + 1
        length = self._length[slots]
        self._recent[slots, length % self.history] = tokens
        self._length[slots] = length + 1
        if self._counts is not None:
            self._counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)

    def _batch(self, logits: torch.Tensor, slots) -> tuple[torch.Tensor, _Needs]:
        """Check shapes; slots -> a device tensor, and what the batch needs. With slots the host can
        see (a list, or a CPU tensor on a CPU sampler) that is exactly the batch's rows, checked;
        slots on a GPU would need a sync to read, so the needs of all occupied slots stand in (the
        result is the same: a processor run for rows that have it off changes nothing)."""
        if logits.dim() != 2 or logits.shape[1] != self.vocab_size:
            raise GemmaforgeError(f"logits must be [rows, {self.vocab_size}], got {tuple(logits.shape)}")
        host = self._host_view(slots)
        if host is not None:
            for s in host:
                self._check_slot(s)
                if self._params[s] is None:
                    raise GemmaforgeError(f"slot {s} is empty: set_row({s}, ...) before sampling it")
            if len(set(host)) != len(host):
                raise GemmaforgeError(f"slots {host} repeat a slot: sample each row once per step")
            needs = _Needs.of(self._params[s] for s in host)
        else:
            if self._pool_needs is None:
                self._pool_needs = _Needs.of(self._params)
            needs = self._pool_needs
        slots = self._slot_tensor(slots)
        if slots.shape != (logits.shape[0],):
            raise GemmaforgeError(f"got {logits.shape[0]} rows of logits but slots of shape {tuple(slots.shape)}")
        return slots, needs

    def _host_view(self, slots) -> list[int] | None:
        """The slots as host ints when reading them costs no device sync, else None."""
        if not isinstance(slots, torch.Tensor):
            return [int(s) for s in slots]
        if slots.device.type == "cpu" and self.device.type == "cpu":
            return slots.tolist()
        return None

    def _slot_tensor(self, slots) -> torch.Tensor:
        return torch.as_tensor(slots, dtype=torch.long).to(self.device, non_blocking=True).reshape(-1)

    def _check_slot(self, slot) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise GemmaforgeError(f"invalid slot {slot!r}: slots are integers in [0, {self.num_slots})")


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


__all__ = ["MAX_LOGPROBS", "Processor", "SampleOutput", "Sampler", "SamplingParams", "apply_min_p",
           "apply_presence_frequency_penalty", "apply_repetition_penalty", "apply_temperature", "apply_top_k",
           "apply_top_k_top_p", "apply_top_p", "new_generator", "process_logits", "row_seed", "sample", "seed_key"]
