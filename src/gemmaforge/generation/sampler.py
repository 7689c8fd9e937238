"""The per-row sampler: the sampling state of a fixed pool of rows (slots), for the scheduler.

The processors, the counter-based draw and ``SamplingParams`` are ``sampling.py``'s; this module keeps
one row of settings, seed key, step and token history per slot and applies them to any subset of the
pool in one batched call (no Python loop over rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import cpu_kernel
from ..errors import GemmaforgeError
from .sampling import (
    SamplingParams,
    _check,
    _draw,
    _log_exponentials,
    _Needs,
    _token_offsets,
    _top_p_cut,
    _warp,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    seed_key,
)


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
            tokens = cpu_kernel.argmax(logits)  # the decode fast path: nothing else over the vocabulary
        else:
            scores = self._process(logits, slots, steps, needs)
            if needs.sampled:
                log_e = _log_exponentials(self._key[slots], steps, self._offsets)  # [R, V]
                tokens = _draw(scores, log_e, self._greedy[slots] if needs.greedy else None)
            else:
                tokens = cpu_kernel.argmax(scores)
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
