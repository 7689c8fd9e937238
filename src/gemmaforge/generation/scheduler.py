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
    # Log-probs of the prompt's own tokens (OpenAI ``echo`` with ``logprobs``, lm-eval's scoring):
    # None = off; k >= 0 = each prompt token's log-prob and the k most likely alternatives.
    prompt_logprobs: int | None = None
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
    # request.prompt_logprobs: (log-prob, top ids, top log-probs) of prompt tokens 1.. (token 0 has none)
    prompt_logprobs: list[tuple[float, list[int], list[float]]] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens whose keys a finished request left in the row (prefix reuse)
    finish_reason: str | None = None  # "stop" | "length" | "abort"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Event:
    seq: Sequence
    token: int | None  # None: a request of max_new_tokens=0 (prompt scoring) ended after its prefill
    logprob: float | None
    finished: bool


class Scheduler:
    def __init__(self, engine, num_rows: int, max_len: int, *, slack: int = 0, decode_during_prefill: bool = True,
                 prefix_reuse: bool = False):
        """``decode_during_prefill`` False: while a prompt is being fed, steps run only its chunks
        (all prompts of a batch first, then lock-step decoding: what ``Engine.steps`` wants). True:
        running rows keep decoding meanwhile (a server's running requests never stall).

        ``prefix_reuse``: a finished request leaves its keys in its row; a new prompt that starts
        with what a free row holds (a system prompt, the earlier turns of a chat, a few-shot block)
        takes that row and feeds only the rest. ``slack`` extra ring slots let a row be cut back by
        up to ``slack`` tokens once its ring has wrapped (kv_cache.KVCache.can_rewind)."""
        self.engine = engine
        self.decode_during_prefill = decode_during_prefill
        self.prefix_reuse = prefix_reuse
        self.cache = engine.new_cache(num_rows, max_len, slack)
        self.sampler = Sampler(num_rows, engine.model.config.vocab_size, engine.device)
        self.num_rows, self.max_len = num_rows, self.cache.max_len
        self.waiting: deque[list[Sequence]] = deque()  # one entry per request: its n sequences
        self.rows: list[Sequence | None] = [None] * num_rows
        # With prefix_reuse: the token ids whose keys each row holds, kept after its request leaves.
        self.resident: list[list[int]] = [[] for _ in range(num_rows)]
        self._freed_at = [0] * num_rows  # when each row was last released: reuse the oldest first
        self._clock = 0
        self._prefill: tuple[list[Sequence], int] | None = None  # sequences of the prompt being fed, fed so far
        self._want_logprob = False

    # ---- requests in ---------------------------------------------------------------------------
    def submit(self, request: Request) -> list[Sequence]:
        """Queue a request; returns its ``n`` sequences (filled in as they generate).
        ``max_new_tokens=0`` scores the prompt only (with ``prompt_logprobs``) and samples nothing."""
        if request.n < 1 or request.n > self.num_rows:
            raise GemmaforgeError(f"n={request.n} samples: it must be between 1 and the pool size {self.num_rows}")
        budget = request.max_new_tokens if request.max_new_tokens is not None else request.params.max_new_tokens
        if budget == 0:
            if len(request.prompt) > self.max_len:
                raise GemmaforgeError(f"the prompt has {len(request.prompt)} tokens, more than the cache holds "
                                      f"({self.max_len}): shorten it")
        else:
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
        """Stop ``seq`` now (e.g. its text hit a stop string, its client left); frees its row at once."""
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

    @property
    def running(self) -> int:
        return sum(s is not None for s in self.rows)

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
            request = seqs[0].request
            reuse, first = 0, None
            if self.prefix_reuse and request.prompt_logprobs is None:
                # The longest reusable prefix; among equal ones the lowest row, since a decode step
                # covers rows 0..last busy one (_decode): a single stream that reused row 1 of two
                # rows left by a warm-up decoded as a batch of two (0.68x the speed of one row).
                reuse, first = max(((self._reusable(r, request.prompt), -r) for r in free), default=(0, None))
                first = None if first is None else -first
            # The other rows: first those below the last busy row, the least recently released
            # first (recent prefixes stay longest); then upwards from there, since a decode step
            # covers rows 0..last busy one (_decode), and a higher row widens every step.
            top = max((r for r, s in enumerate(self.rows) if s is not None), default=-1)
            others = sorted((r for r in free if r != first or reuse == 0),
                            key=lambda r: (0, self._freed_at[r]) if r < top else (1, r))
            rows = ([first] if reuse else []) + others[: len(seqs) - (1 if reuse else 0)]
            for seq, row in zip(seqs, rows):
                seq.row = row
                self.rows[row] = seq
                seq.cached_tokens = reuse if row == rows[0] else 0
            head = rows[0]
            if reuse:
                self.cache.rewind(head, self.cache.lengths[head] - reuse)
            else:
                self.cache.free(head)
            self.resident[head] = list(request.prompt[:reuse])
            self._prefill = (seqs, reuse)

    def _reusable(self, row: int, prompt: list[int]) -> int:
        """How many leading prompt tokens row ``row``'s resident keys can stand for (0 = none): the
        common prefix, less the prompt's last token (its logits are needed), if the row can be cut
        back to it."""
        held = self.resident[row]
        n = 0
        for a, b in zip(held, prompt[:-1]):
            if a != b:
                break
            n += 1
        return n if n and self.cache.can_rewind(row, self.cache.lengths[row] - n) else 0

    def _decode(self) -> list[Event]:
        live = [s for s in self.rows if s is not None and s.tokens and not s.finished]
        if not live:
            return []
        dev = self.engine.device
        # Rows 0..width-1 only: rows above the last live one would cost as much as live ones.
        width = max(s.row for s in live) + 1
        tokens, positions = [0] * width, [-1] * width
        for s in live:
            tokens[s.row] = s.tokens[-1]
            positions[s.row] = self.cache.lengths[s.row]
        logits = self.engine.forward(torch.tensor(tokens, device=dev)[:, None],
                                     torch.tensor(positions, device=dev)[:, None], self.cache,
                                     rows=None if width == self.num_rows else slice(0, width))
        rows = [s.row for s in live]
        return self._sample(live, logits[rows] if len(rows) < width else logits, rows)

    def _prefill_chunk(self) -> list[Event]:
        if self._prefill is None:
            return []
        seqs, done = self._prefill
        request = seqs[0].request
        prompt = request.prompt
        # Prompt log-probs need every column's logits ([T, V] float32): smaller chunks bound that.
        size = self.engine.prefill_chunk if request.prompt_logprobs is None else min(self.engine.prefill_chunk, 64)
        chunk = prompt[done : done + size]
        row = seqs[0].row
        tokens = torch.tensor([chunk], device=self.engine.device)
        positions = torch.arange(done, done + len(chunk), device=self.engine.device)[None]
        if request.prompt_logprobs is None:
            logits = self.engine.forward(tokens, positions, self.cache, rows=slice(row, row + 1))
        else:
            all_logits = self.engine.forward(tokens, positions, self.cache, rows=slice(row, row + 1),
                                             columns=list(range(len(chunk))))[0]  # [T, V]
            self._score_prompt(seqs, all_logits, prompt[done + 1 : done + len(chunk) + 1])
            logits = all_logits[-1:]
        if self.prefix_reuse:
            self.resident[row] += chunk
        done += len(chunk)
        if done < len(prompt):
            self._prefill = (seqs, done)
            return []
        self._prefill = None
        self.cache.fork(row, [s.row for s in seqs[1:]])
        for s in seqs[1:] if self.prefix_reuse else ():
            self.resident[s.row] = list(self.resident[row])
        for s in seqs:
            if s.finished:  # aborted while the prompt was being fed
                self._release(s)
        seqs = [s for s in seqs if not s.finished]
        if seqs and seqs[0].budget == 0:  # prompt scoring only
            events = []
            for s in seqs:
                s.finish_reason = "length"
                events.append(Event(s, None, None, True))
                self._release(s)
            return events
        for s in seqs:
            self.sampler.set_row(s.row, s.request.params, prompt, s.seed)
        return self._sample(seqs, logits.expand(len(seqs), -1), [s.row for s in seqs]) if seqs else []

    def _score_prompt(self, seqs: list[Sequence], logits: torch.Tensor, targets: list[int]) -> None:
        """Log-probs of the prompt tokens that the chunk's columns predict (the last column of the
        last chunk predicts the first new token: not a prompt token)."""
        k = seqs[0].request.prompt_logprobs
        logp = torch.log_softmax(logits[: len(targets)].float(), dim=-1)
        picked = logp.gather(1, torch.tensor(targets, device=logp.device)[:, None])[:, 0].tolist()
        top_lp, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
        rows = list(zip(picked, top_ids.tolist(), top_lp.tolist()))
        for s in seqs:
            s.prompt_logprobs += rows

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, rows: list[int]) -> list[Event]:
        out = self.sampler.sample(logits, rows, logprob=self._want_logprob)
        tokens = out.tokens.tolist()  # the one host sync per step: stop checks need the tokens
        lps = out.logprob.tolist() if out.logprob is not None else [None] * len(seqs)
        tops = None
        if out.top_ids is not None:
            tops = list(zip(out.top_ids.tolist(), out.top_logprobs.tolist()))
        events = []
        for i, (seq, t) in enumerate(zip(seqs, tokens)):
            if self.prefix_reuse and seq.tokens:  # the token sampled before this one is now in the row
                self.resident[seq.row].append(seq.tokens[-1])
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
        """The row of ``seq`` is free. With prefix reuse its keys stay (``resident``) for a later
        prompt that starts the same way; without, it is emptied."""
        row = seq.row
        self.sampler.clear_row(row)
        if not self.prefix_reuse:
            self.cache.free(row)
            self.resident[row] = []
        self._clock += 1
        self._freed_at[row] = self._clock
        self.rows[row] = None
        seq.row = None
