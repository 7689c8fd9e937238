"""The generation engine: token-id prompts in, new token ids out, one decode step at a time.

The engine knows nothing of text. A call takes a batch of prompts (lists of token ids, any lengths)
and runs

    left-pad into one [B, W] batch     positions -1 on the padding (attention.Mask hides it)
    prefill, in chunks of columns      fills the KV cache; bounded memory for long prompts
    repeat: sample, yield, forward     one new column per step, every row in lock step

Left padding keeps every row's newest token in the same (last) column, so one decode step is one
[B, 1] forward for the whole batch; the cache is indexed by column (kv_cache.py), and the rows'
different positions only show up in the mask and RoPE.

Every model call goes through ``Engine._forward``: a faster engine (torch.compile, CUDA graphs)
overrides that one method. The decode loop keeps the host out of the way: stop checks are tensor
ops, and "has every row finished?" (a GPU -> CPU sync) is asked only every ``sync_every`` steps.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence

import torch

from ..errors import GemmaforgeError
from ..kv_cache import KVCache
from ..model import Gemma
from .fast import FastForward
from .sampling import SamplingParams, new_generator, sample

FINISHED = -1  # what a step yields for a row that has already stopped


class Engine:
    def __init__(self, model: Gemma, *, prefill_chunk: int = 512, sync_every: int | None = None,
                 fast: bool = True, compile: bool | None = None):
        self.model = model.eval()
        self.prefill_chunk = prefill_chunk
        # The fast path (fast.py: lean decode step, compiled on CUDA and for quantized CPU models;
        # ``compile`` overrides that) is the default; fast=False keeps the plain model forward, the
        # reference the tests compare to.
        self.fast = FastForward(self.model, compile=compile) if fast else None
        # On CPU asking "all finished?" costs nothing; on a GPU it stalls the queue of launched work.
        self.sync_every = sync_every or (1 if self.device.type == "cpu" else 8)

    @property
    def device(self) -> torch.device:
        return self.model.final_norm.weight.device  # a quantized model has no embed.weight

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens, positions [B, T] -> float32 logits [B, V] of the last column; appends to ``cache``.

        Only the last column goes through the output head: a 512-token prefill chunk would otherwise
        build 512 x 262k logits per row (512 MiB) that nobody reads.
        """
        if self.fast is not None:
            return self.fast(tokens, positions, cache)
        h = self.model.hidden_states(tokens, positions, cache)
        return self.model.logits(h[:, -1]).float()

    # ---- one generation -----------------------------------------------------------------------
    def steps(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        stop_ids: Collection[int] | Sequence[Collection[int]] = (),
        max_new_tokens: int | Sequence[int] | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield one [B] int64 tensor per decode step: each row's new token, or FINISHED (-1) once
        that row has emitted one of its stop ids or used up its ``max_new_tokens``.

        ``stop_ids``: ids shared by all rows, or one collection per row. ``max_new_tokens``: overrides
        ``params.max_new_tokens``, for all rows or per row. The stop token itself is yielded (as in
        HF ``generate``). Bad input raises here; the work starts at the first ``next()``, and closing
        the iterator early (``break``) stops it.
        """
        tokens, positions = self._left_pad(prompts)
        b = tokens.shape[0]
        budgets = self._per_row(max_new_tokens if max_new_tokens is not None else params.max_new_tokens, b)
        return self._decode(tokens, positions, params, budgets, self._stop_table(stop_ids, b))

    @torch.inference_mode()
    def _decode(self, tokens, positions, params: SamplingParams, budgets: list[int], stops: torch.Tensor):
        b, width = tokens.shape
        # Positions must stay inside the trained context; a longer request is cut short, like HF does.
        steps = min(max(budgets), self.context_length - width)
        dev = self.device
        budget = torch.tensor(budgets, device=dev)

        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(b, self.model.config.vocab_size, dtype=torch.bool, device=dev)
            real = positions >= 0
            seen[real.nonzero(as_tuple=True)[0], tokens[real]] = True
        generator = new_generator(params, dev)

        cache = (self.fast or self.model).new_cache(b, width + steps)
        logits = self._prefill(tokens, positions, cache)
        pos = positions[:, -1:]
        finished = torch.zeros(b, dtype=torch.bool, device=dev)
        for step in range(steps):
            new = sample(logits, params, generator, seen)
            yield new.masked_fill(finished, FINISHED)
            finished |= (new[:, None] == stops).any(dim=1) | (budget <= step + 1)
            if step + 1 == steps or ((step + 1) % self.sync_every == 0 and bool(finished.all())):
                return
            if seen is not None:
                seen[torch.arange(b, device=dev), new] = True
            pos = pos + 1
            logits = self._forward(new[:, None], pos, cache)

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
        table = torch.stack(out, dim=1).tolist()  # the only sync for the whole batch
        return [[t for t in row if t != FINISHED] for row in table]

    # ---- helpers ------------------------------------------------------------------------------
    def _left_pad(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
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
        width = max(len(p) for p in prompts)
        tokens = torch.zeros(len(prompts), width, dtype=torch.long)
        positions = torch.full((len(prompts), width), -1, dtype=torch.long)
        for r, p in enumerate(prompts):
            tokens[r, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
            positions[r, width - len(p):] = torch.arange(len(p))
        return tokens.to(self.device), positions.to(self.device)

    def _prefill(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed the prompt columns in chunks: memory grows with the chunk, not the prompt length."""
        logits = None
        for start in range(0, tokens.shape[1], self.prefill_chunk):
            stop = start + self.prefill_chunk
            logits = self._forward(tokens[:, start:stop], positions[:, start:stop], cache)
        return logits

    @staticmethod
    def _per_row(value: int | Sequence[int], b: int) -> list[int]:
        values = [value] * b if isinstance(value, int) else list(value)
        if len(values) != b or any(not isinstance(v, int) or v < 1 for v in values):
            raise GemmaforgeError(f"max_new_tokens={value!r}: give one integer >= 1, or one per prompt ({b})")
        return values

    def _stop_table(self, stop_ids, b: int) -> torch.Tensor:
        """[B, S] stop ids per row, padded with FINISHED (which no sampled token equals)."""
        stop_ids = list(stop_ids)
        per_row = bool(stop_ids) and all(isinstance(s, Collection) for s in stop_ids)
        if per_row and len(stop_ids) != b:
            raise GemmaforgeError(f"got stop ids for {len(stop_ids)} rows but {b} prompts: give one set per prompt")
        rows = [sorted(s) for s in stop_ids] if per_row else [sorted(stop_ids)] * b
        width = max(1, *(len(r) for r in rows))
        table = torch.full((b, width), FINISHED, dtype=torch.long)
        for i, r in enumerate(rows):
            table[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        return table.to(self.device)
