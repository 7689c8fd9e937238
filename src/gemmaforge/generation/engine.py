"""The generation engine: token-id prompts in, new token ids out, over the step scheduler.

The engine knows nothing of text. It owns the model calls (``forward``: the fast decode step, or
the model's own forward), builds KV-cache pools, and turns a batch of prompts into scheduler
requests:

    prompts -> Request per prompt -> Scheduler (pool rows, prefill chunks, decode steps, sampler)
            -> Event per new token -> ``steps`` ([B] per step) / ``generate`` (token lists)

One Engine per model is reused across calls (``Engine.for_model``): it holds the compiled step.
The engine never changes the caller's model (no ``.eval()``): decoding runs under inference_mode
and the Gemma network has no dropout. Every model call goes through ``Engine.forward`` (and its
hook ``_forward``), so a faster engine overrides one method.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Collection, Iterator, Sequence

import torch

from ..errors import GemmaforgeError
from ..kv_cache import KVCache
from ..model import Gemma
from .fast import FastForward
from .sampling import SamplingParams
from .scheduler import Request, Scheduler

FINISHED = -1  # what a step yields for a row that has already stopped

_ENGINES: "weakref.WeakKeyDictionary[Gemma, dict]" = weakref.WeakKeyDictionary()


class Engine:
    def __init__(self, model: Gemma, *, prefill_chunk: int = 512, sync_every: int | None = None,
                 fast: bool = True, compile: bool | None = None):
        self.model = model
        self.prefill_chunk = prefill_chunk
        # The fast path (fast.py: lean decode step, compiled on CUDA and for quantized CPU models;
        # ``compile`` overrides that) is the default; fast=False keeps the plain model forward, the
        # reference the tests compare to.
        self.fast = FastForward(model, compile=compile) if fast else None
        # Kept for callers of the old lock-step engine: the scheduler reads each step's tokens on the
        # host (its stop checks and row retirement need them), so it syncs every step.
        self.sync_every = sync_every or 1

    @classmethod
    def for_model(cls, model: Gemma, **options) -> "Engine":
        """The engine of ``model`` with these options, built once and reused (it holds the compiled
        decode step, whose compilation costs seconds)."""
        per_model = _ENGINES.setdefault(model, {})
        key = tuple(sorted(options.items()))
        if key not in per_model:
            per_model[key] = cls(model, **options)
        return per_model[key]

    @property
    def device(self) -> torch.device:
        return self.model.final_norm.weight.device  # a quantized model has no embed.weight

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    def new_cache(self, num_rows: int, max_len: int, slack: int = 0) -> KVCache:
        return (self.fast or self.model).new_cache(num_rows, max_len, slack)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, rows: slice | None = None,
                columns=None) -> torch.Tensor:
        """tokens, positions [B, T] into pool rows ``rows`` (None = the whole pool) -> float32 logits
        of the last column [B, V], or of ``columns`` [B, C, V] (draft verification, scoring)."""
        if rows is None and columns is None:
            return self._forward(tokens, positions, cache)
        return self._forward(tokens, positions, cache, rows=rows, columns=columns)

    @torch.inference_mode()
    def _forward(self, tokens, positions, cache, rows=None, columns=None) -> torch.Tensor:
        """Only the wanted columns go through the output head: a 512-token prefill chunk would
        otherwise build 512 x 262k logits per row (512 MiB) that nobody reads."""
        if self.fast is not None:
            return self.fast(tokens, positions, cache, rows, columns)
        h = self.model.hidden_states(tokens, positions, cache, rows=rows)
        return self.model.logits(h[:, -1] if columns is None else h[:, columns]).float()

    def scheduler(self, num_rows: int, max_len: int | None = None, **options) -> Scheduler:
        """A scheduler over a pool of ``num_rows`` rows (a server keeps one for its lifetime)."""
        return Scheduler(self, num_rows, max_len or self.context_length, **options)

    # ---- a batch of prompts ---------------------------------------------------------------------
    def steps(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        stop_ids: Collection[int] | Sequence[Collection[int]] = (),
        max_new_tokens: int | Sequence[int] | None = None,
        setup=None,
    ) -> Iterator[torch.Tensor]:
        """Yield one [B] int64 tensor per decode step: each row's new token, or FINISHED (-1) once
        that row has emitted one of its stop ids or used up its ``max_new_tokens``.

        ``stop_ids``: ids shared by all rows, or one collection per row. ``max_new_tokens``: overrides
        ``params.max_new_tokens``, for all rows or per row. Row i is its own request with seed
        ``params.seed + i`` (sampler.Sampler), so its tokens do not depend on the other rows. The
        stop token itself is yielded (as in HF ``generate``). Bad input raises here; the work starts at the first
        ``next()``, and closing the iterator early (``break``) stops it. ``setup(scheduler)`` runs on
        this call's scheduler before its first step (e.g. ``watermark.attach_watermark``).
        """
        prompts = self._check_prompts(prompts)
        b = len(prompts)
        budgets = self._per_row(max_new_tokens if max_new_tokens is not None else params.max_new_tokens, b)
        stops = self._stop_sets(stop_ids, b)
        return self._lockstep(prompts, params, budgets, stops, setup)

    def _lockstep(self, prompts, params, budgets, stops, setup=None):
        """The scheduler's events regrouped into one column per step (rows advance at different
        moments: each row's first token comes after its own prefill)."""
        width = max(len(p) for p in prompts)
        sched = self.scheduler(len(prompts), min(width + max(budgets), self.context_length),
                               decode_during_prefill=False)
        if setup is not None:
            setup(sched)
        seqs = []
        for i, (p, budget, stop) in enumerate(zip(prompts, budgets, stops)):
            seed = None if params.seed is None else (params.seed + i) % 2**63
            row_params = params if seed == params.seed else dataclasses.replace(params, seed=seed)
            seqs += sched.submit(Request(list(p), row_params, stop, budget))
        yielded = 0
        while True:
            while sched.has_work() and any(not s.finished and len(s.tokens) <= yielded for s in seqs):
                sched.step()
            if all(len(s.tokens) <= yielded for s in seqs):
                return
            yield torch.tensor([s.tokens[yielded] if len(s.tokens) > yielded else FINISHED for s in seqs])
            yielded += 1

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        stop_ids: Collection[int] | Sequence[Collection[int]] = (),
        max_new_tokens: int | Sequence[int] | None = None,
    ) -> list[list[int]]:
        """The new token ids of every row (stop id included when one ended the row)."""
        out = list(self.steps(prompts, params, stop_ids, max_new_tokens))
        if not out:
            return [[] for _ in prompts]
        table = torch.stack(out, dim=1).tolist()
        return [[t for t in row if t != FINISHED] for row in table]

    def loglikelihood(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, bool]:
        """log p(continuation | context) and whether it is the greedy continuation, from one forward
        whose logits are taken at the continuation's columns only (the eval harness's request)."""
        ids = list(context) + list(continuation)
        self._check_prompts([ids])
        n = len(continuation)
        cache = self.new_cache(1, len(ids))
        pieces = []
        for start in range(0, len(ids) - 1, self.prefill_chunk):
            chunk = ids[start : min(start + self.prefill_chunk, len(ids) - 1)]
            lo = max(len(context) - 1 - start, 0)  # chunk columns that predict continuation tokens
            cols = list(range(lo, len(chunk)))
            out = self.forward(torch.tensor([chunk], device=self.device),
                               torch.arange(start, start + len(chunk), device=self.device)[None], cache,
                               rows=slice(0, 1), columns=cols)  # none: the chunk only fills the cache
            pieces.append(out[0])
        target = torch.tensor(list(continuation), device=self.device)
        logp = torch.log_softmax(torch.cat(pieces)[-n:].float(), dim=-1)
        return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())

    # ---- helpers ------------------------------------------------------------------------------
    def _check_prompts(self, prompts) -> list[list[int]]:
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        if not prompts:
            raise GemmaforgeError("no prompts given: pass at least one list of token ids")
        vocab = self.model.config.vocab_size
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise GemmaforgeError(f"prompt {i} is empty: give at least one token (e.g. <bos>)")
            if len(p) >= self.context_length:
                raise GemmaforgeError(
                    f"prompt {i} has {len(p)} tokens but the model's context is {self.context_length}"
                    " (room is needed for at least one new token): shorten the prompt"
                )
            if min(p) < 0 or max(p) >= vocab:
                raise GemmaforgeError(f"prompt {i} has token ids outside [0, {vocab}): wrong tokenizer for this model?")
        return [list(p) for p in prompts]

    @staticmethod
    def _per_row(value: int | Sequence[int], b: int) -> list[int]:
        values = [value] * b if isinstance(value, int) else list(value)
        if len(values) != b or any(not isinstance(v, int) or v < 1 for v in values):
            raise GemmaforgeError(f"max_new_tokens={value!r}: give one integer >= 1, or one per prompt ({b})")
        return values

    @staticmethod
    def _stop_sets(stop_ids, b: int) -> list[frozenset[int]]:
        """Stop ids shared by every row, or one collection per row -> one frozenset per row."""
        stop_ids = list(stop_ids)
        per_row = bool(stop_ids) and all(isinstance(s, Collection) for s in stop_ids)
        if per_row and len(stop_ids) != b:
            raise GemmaforgeError(f"got stop ids for {len(stop_ids)} rows but {b} prompts: give one set per prompt")
        return [frozenset(s) for s in stop_ids] if per_row else [frozenset(stop_ids)] * b

