"""The step scheduler: requests join and leave a fixed pool of KV-cache rows at token boundaries.

    sched = Scheduler(engine, num_rows=8, max_len=4096)
    seqs = sched.submit(Request(prompt_ids, params, stop_ids={1}))   # n sequences for n samples
    while sched.has_work():
        for event in sched.step():                                  # one token for some sequences
            ...  event.seq, event.token, event.logprob, event.finished

One ``step()`` runs

    admit       waiting requests take free rows (a request of n samples waits for n free rows)
    decode      (unless ``decode_during_prefill`` is off and a prompt is being fed)
                one [S, 1] forward over the whole pool for every row with a token to feed
                (idle rows ride along with position -1: the pool's shape never changes)
    prefill     at most one chunk of one prompt; when the prompt is complete its row samples the
                first token, and a request of n samples forks the prefilled row into n rows
    sample      per-row settings and randomness (sampler.Sampler), so a row's tokens depend only
                on its own request and seed, never on what else is in the batch
    retire      rows that hit a stop id or their budget leave the pool (cache.free, clear_row)

It knows nothing of text: stop strings are the text layer's (api.py), which can ``abort`` a
sequence. Every model call goes through ``engine.forward``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from ..errors import GemmaforgeError
from .sampler import Sampler
from .sampling import SamplingParams, row_seed

_ids = itertools.count()


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int] = frozenset()  # token ids that end a sequence (yielded, as HF does)
    max_new_tokens: int | None = None  # None = params.max_new_tokens
    n: int = 1  # samples sharing one prefill
    id: int = field(default_factory=lambda: next(_ids))


@dataclass
class Sequence:
    """One sample of a request: the row it runs in and what it generated so far."""

    request: Request
    index: int  # sample index within the request
    seed: int
    budget: int
    row: int | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[tuple[list[int], list[float]]] = field(default_factory=list)  # when params.logprobs > 0
    finish_reason: str | None = None  # "stop" | "length" | "abort"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Event:
    seq: Sequence
    token: int
    logprob: float | None
    finished: bool


class Scheduler:
    def __init__(self, engine, num_rows: int, max_len: int, *, slack: int = 0, decode_during_prefill: bool = True):
        """``decode_during_prefill`` False: while a prompt is being fed, steps run only its chunks
        (all prompts of a batch first, then lock-step decoding: what ``Engine.steps`` wants). True:
        running rows keep decoding meanwhile (a server's running requests never stall)."""
        self.engine = engine
        self.decode_during_prefill = decode_during_prefill
        self.cache = engine.new_cache(num_rows, max_len, slack)
        self.sampler = Sampler(num_rows, engine.model.config.vocab_size, engine.device)
        self.num_rows, self.max_len = num_rows, self.cache.max_len
        self.waiting: deque[list[Sequence]] = deque()  # one entry per request: its n sequences
        self.rows: list[Sequence | None] = [None] * num_rows
        self._prefill: tuple[list[Sequence], int] | None = None  # sequences of the prompt being fed, fed so far
        self._want_logprob = False

    # ---- requests in ---------------------------------------------------------------------------
    def submit(self, request: Request) -> list[Sequence]:
        """Queue a request; returns its ``n`` sequences (filled in as they generate)."""
        if request.n < 1 or request.n > self.num_rows:
            raise GemmaforgeError(f"n={request.n} samples: it must be between 1 and the pool size {self.num_rows}")
        budget = request.max_new_tokens if request.max_new_tokens is not None else request.params.max_new_tokens
        # Positions must stay inside the trained context (and the pool): a longer request is cut short, like HF.
        budget = min(budget, self.max_len - len(request.prompt))
        if budget < 1:
            raise GemmaforgeError(f"the prompt has {len(request.prompt)} tokens, which fills the cache "
                                  f"({self.max_len}): shorten it")
        stop = request.stop_ids | frozenset(request.params.stop_token_ids)
        request = request if stop == request.stop_ids else dataclasses.replace(request, stop_ids=stop)
        seqs = [Sequence(request, i, row_seed(request.params.seed, i), budget) for i in range(request.n)]
        self.waiting.append(seqs)
        self._want_logprob |= request.params.logprobs > 0
        return seqs

    def abort(self, seq: Sequence) -> None:
        """Stop ``seq`` now (e.g. its text hit a stop string); frees its row at once."""
        if seq.finished:
            return
        seq.finish_reason = "abort"
        if self._prefill is not None and seq in self._prefill[0]:
            return  # its prompt is still being fed into the row: released when that ends
        if seq.row is not None:
            self._release(seq)
        else:
            for group in self.waiting:
                if seq in group:
                    group.remove(seq)
            self.waiting = deque(g for g in self.waiting if g)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.rows)

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        self._admit()
        if self._prefill is not None and not self.decode_during_prefill:
            return self._prefill_chunk()
        events = self._decode()
        events += self._prefill_chunk()
        return events

    def _admit(self) -> None:
        while self.waiting and self._prefill is None:
            seqs = self.waiting[0]
            free = [r for r, s in enumerate(self.rows) if s is None]
            if len(free) < len(seqs):
                return
            self.waiting.popleft()
            for seq, row in zip(seqs, free):
                seq.row = row
                self.rows[row] = seq
            self._prefill = (seqs, 0)

    def _decode(self) -> list[Event]:
        live = [s for s in self.rows if s is not None and s.tokens and not s.finished]
        if not live:
            return []
        dev = self.engine.device
        tokens, positions = [0] * self.num_rows, [-1] * self.num_rows
        for s in live:
            tokens[s.row] = s.tokens[-1]
            positions[s.row] = self.cache.lengths[s.row]
        logits = self.engine.forward(torch.tensor(tokens, device=dev)[:, None],
                                     torch.tensor(positions, device=dev)[:, None], self.cache)
        rows = [s.row for s in live]
        return self._sample(live, logits[rows] if len(rows) < self.num_rows else logits, rows)

    def _prefill_chunk(self) -> list[Event]:
        if self._prefill is None:
            return []
        seqs, done = self._prefill
        prompt = seqs[0].request.prompt
        chunk = prompt[done : done + self.engine.prefill_chunk]
        row = seqs[0].row
        tokens = torch.tensor([chunk], device=self.engine.device)
        positions = torch.arange(done, done + len(chunk), device=self.engine.device)[None]
        logits = self.engine.forward(tokens, positions, self.cache, rows=slice(row, row + 1))
        done += len(chunk)
        if done < len(prompt):
            self._prefill = (seqs, done)
            return []
        self._prefill = None
        self.cache.fork(row, [s.row for s in seqs[1:]])
        for s in seqs:
            if s.finished:  # aborted while the prompt was being fed
                self.cache.free(s.row)
                self.rows[s.row], s.row = None, None
        seqs = [s for s in seqs if not s.finished]
        for s in seqs:
            self.sampler.set_row(s.row, s.request.params, prompt, s.seed)
        return self._sample(seqs, logits.expand(len(seqs), -1), [s.row for s in seqs]) if seqs else []

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, rows: list[int]) -> list[Event]:
        out = self.sampler.sample(logits, rows, logprob=self._want_logprob)
        tokens = out.tokens.tolist()  # the one host sync per step: stop checks need the tokens
        lps = out.logprob.tolist() if out.logprob is not None else [None] * len(seqs)
        tops = None
        if out.top_ids is not None:
            tops = list(zip(out.top_ids.tolist(), out.top_logprobs.tolist()))
        events = []
        for i, (seq, t) in enumerate(zip(seqs, tokens)):
            seq.tokens.append(t)
            if lps[i] is not None:
                seq.logprobs.append(lps[i])
            k = seq.request.params.logprobs
            if tops is not None and k:
                seq.top.append((tops[i][0][:k], tops[i][1][:k]))
            if t in seq.request.stop_ids:
                seq.finish_reason = "stop"
            elif len(seq.tokens) >= seq.budget:
                seq.finish_reason = "length"
            events.append(Event(seq, t, lps[i], seq.finished))
            if seq.finished:
                self._release(seq)
        return events

    def _release(self, seq: Sequence) -> None:
        self.cache.free(seq.row)
        self.sampler.clear_row(seq.row)
        self.rows[seq.row] = None
        seq.row = None

