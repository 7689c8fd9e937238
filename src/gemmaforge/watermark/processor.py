"""The watermark in the engine: a ``Sampler`` processor with per-row state.

    attach_watermark(scheduler, wm)                      # every request the scheduler runs
    attach_watermark(scheduler, lambda req: table.get(req.id))   # per request (a server option)
    gemmaforge.generate(model, tok, prompts, watermark=wm)       # the text API does the first

transformers' processor keeps one state per batch and assumes every row starts together; in the
step scheduler rows join and leave the pool at token boundaries, so the state is per pool row (slot)
and restarts when the row's request is at step 0 (generation/sampler.py). Per row, as transformers:

- the context of step k is the last ``ngram_len - 1`` *generated* tokens, zeros before the first
  (the prompt is not part of it: docs/reference.md section 8), read from ``Sampler.recent``;
- the step is left as it is when its context hash is among the row's last
  ``context_history_size`` context hashes (those of steps k-H .. k-1, zeros before the start).

The history is a ring of H + 1 hashes indexed by step, so running the processor twice at one step
(``Sampler.process`` then ``sample``) changes nothing: step k's own slot is never compared.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import GemmaforgeError
from .hashing import context_hash
from .synthid import SynthIDTextWatermark

Choice = SynthIDTextWatermark | Callable[[int], "SynthIDTextWatermark | None"]


class WatermarkProcessor:
    """``proc(logits [R, V], slots [R], steps [R]) -> logits`` for ``sampler.processors``.

    ``watermark``: one watermark for every row, or ``choose(slot) -> watermark | None`` deciding
    per row (rows with None are left alone; a row's choice must not change during a request)."""

    def __init__(self, sampler, watermark: Choice):
        self.sampler = sampler
        self._single = watermark if isinstance(watermark, SynthIDTextWatermark) else None
        if self._single is None and not callable(watermark):
            raise GemmaforgeError(f"watermark must be a SynthIDTextWatermark or a function of the row, "
                                  f"got {type(watermark).__name__}")
        self._choose = watermark
        # Keyed by the settings, not the object: a server may build a watermark per request.
        self._on_device: dict = {}  # WatermarkConfig -> the watermark on the logits' device
        self._history: dict = {}  # WatermarkConfig -> [slots, H + 1] context hashes
        if self._single is not None:
            self._check(self._single)

    def __call__(self, logits: torch.Tensor, slots: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        if self._single is not None:
            return self._apply(self._single, logits, slots, steps, None)
        groups: dict = {}  # WatermarkConfig -> (watermark, batch rows)
        for i, slot in enumerate(slots.tolist()):  # the scheduler syncs every step anyway
            wm = self._choose(slot)
            if wm is not None:
                self._check(wm)
                groups.setdefault(wm.config, (wm, []))[1].append(i)
        for wm, where in groups.values():
            logits = self._apply(wm, logits, slots, steps, torch.tensor(where, device=logits.device))
        return logits

    def detach(self) -> None:
        """Stop watermarking: remove this processor from its sampler."""
        if self in self.sampler.processors:
            self.sampler.processors.remove(self)

    # ---- internals ------------------------------------------------------------------------------
    def _check(self, wm) -> None:
        if not isinstance(wm, SynthIDTextWatermark):
            raise GemmaforgeError(f"the watermark chooser returned {type(wm).__name__}, not a SynthIDTextWatermark")
        if wm.ngram_len - 1 > self.sampler.history:
            raise GemmaforgeError(f"ngram_len={wm.ngram_len} needs the last {wm.ngram_len - 1} tokens but the sampler "
                                  f"keeps {self.sampler.history}: build it with Sampler(history={wm.ngram_len - 1})")

    def _apply(self, wm, logits, slots, steps, where):
        dev = logits.device
        if wm.config not in self._on_device or self._on_device[wm.config].device != dev:
            self._on_device[wm.config] = wm.to(dev)
        wm = self._on_device[wm.config]
        rows = slots if where is None else slots[where]
        step = steps if where is None else steps[where]
        scores = logits if where is None else logits[where]
        n1 = wm.ngram_len - 1
        generated = step[:, None] - n1 + torch.arange(n1, device=dev)  # index of each context token among the new ones
        context = self.sampler.recent(rows, n1).masked_fill(generated < 0, 0)
        h = context_hash(context)  # [r]
        updated = wm.tournament(scores, h)

        ring = wm.context_history_size + 1
        history = self._history.get(wm.config)
        if history is None:
            history = self._history[wm.config] = torch.zeros(self.sampler.num_slots, ring, dtype=torch.long, device=dev)
        past = history[rows].masked_fill(step[:, None] == 0, 0)  # a new request in the slot: no history
        own = (step % ring)[:, None]
        others = torch.arange(ring, device=dev)[None, :] != own
        repeated = ((past == h[:, None]) & others).any(dim=1, keepdim=True)
        keep = repeated
        if wm.skip_first_ngram_calls:
            # transformers returns before recording the context at these steps, so they leave no history.
            skipped = (step < n1)[:, None]
            keep = keep | skipped
            past.scatter_(1, own, torch.where(skipped, past.gather(1, own), h[:, None]))
        else:
            past.scatter_(1, own, h[:, None])
        history[rows] = past
        result = torch.where(keep, scores, updated)
        if where is None:
            return result
        out = logits.clone()
        out[where] = result
        return out


def attach_watermark(scheduler, watermark: SynthIDTextWatermark | Callable) -> WatermarkProcessor:
    """Watermark what ``scheduler`` (a generation.Scheduler) samples from now on; returns the
    processor (``.detach()`` stops it).

    ``watermark``: a ``SynthIDTextWatermark`` for every request, or ``choose(request) ->
    SynthIDTextWatermark | None`` called with each running row's ``Request`` (a server's per-request
    option: keys per tenant, or None for requests that did not ask). Runs after the other logit
    processors and warpers, for greedy rows too, as transformers does."""
    if isinstance(watermark, SynthIDTextWatermark):
        choice: Choice = watermark
    elif callable(watermark):
        def choice(slot: int):
            seq = scheduler.rows[slot]
            return None if seq is None else watermark(seq.request)
    else:
        raise GemmaforgeError(f"watermark must be a SynthIDTextWatermark or a function of the request, "
                              f"got {type(watermark).__name__}")
    proc = WatermarkProcessor(scheduler.sampler, choice)
    scheduler.sampler.processors.append(proc)
    return proc
