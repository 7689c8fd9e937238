"""On-policy distillation (GKD, Agarwal et al. 2024): the batches of ``gemmaforge gkd``.

A fraction ``lmbda`` of the optimizer steps trains on completions the *current* student writes for the
step's prompts (sampled through the engine, rollouts.py), the rest on the dataset's own completions;
either way the loss is the generalized JSD between teacher and student on the completion tokens
(objectives.GeneralizedJSD). Which steps are on-policy is fixed: step s is iff floor((s + 1) lmbda) >
floor(s lmbda), so exactly lmbda of the steps are, evenly spread, and a resumed run makes the same
choice (TRL draws a coin per batch; the expectation is the same). A step's prompts are those of its
samples, in the same seeded order as the off-policy steps read them; a sample's seed is a function of
its number, so a resumed run regenerates the same completions from the same weights.
"""

from __future__ import annotations

from typing import Sequence

from ..generation import SamplingParams
from .batches import Batch, StepLayout, evenly_spaced
from .chats import Prompt
from .packing import SequenceRows, Tokens, rows_batch
from .rollouts import sample


def completions_source(prompts: Sequence[Prompt], seq_len: int, pad_id: int, *, seed: int, shuffle: bool) -> SequenceRows:
    """prompt + reference completion per row, the completion the targets (the off-policy batches)."""
    return SequenceRows([Tokens.join(p.ids, p.completion) for p in prompts], seq_len, pad_id, seed=seed,
                        shuffle=shuffle, pack=False)


class OnPolicyMix:
    """A ``batches.BatchSource``; ``policy`` (the student) is set by the recipe once it exists."""

    def __init__(self, prompts: Sequence[Prompt], *, lmbda: float, seq_len: int, pad_id: int, seed: int,
                 params: SamplingParams, stop_ids, max_new_tokens: int):
        self.prompts, self.lmbda, self.seq_len, self.pad_id, self.seed = list(prompts), lmbda, seq_len, pad_id, seed
        self.params, self.stop_ids, self.max_new_tokens = params, stop_ids, max_new_tokens
        # Off-policy steps need the dataset's completions; on-policy ones only its prompts (and the
        # order, which is the same object either way).
        offline = [p if p.completion is not None else Prompt(p.ids, p.fields, [], p.text) for p in self.prompts]
        self.dataset = completions_source(offline, seq_len, pad_id, seed=seed, shuffle=True)
        self.num_samples = self.dataset.num_samples
        self.policy = None

    def on_policy(self, step: int) -> bool:
        return evenly_spaced(step, self.lmbda)

    def micro_batches(self, step: int, layout: StepLayout) -> list[Batch]:
        if not self.on_policy(step):
            return self.dataset.micro_batches(step, layout)
        return [self.generated(layout.samples(step, m)) for m in range(layout.accum)]

    def generated(self, samples: Sequence[int]) -> Batch:
        rows = [self.dataset.row_index(s) for s in samples]
        prompts = [self.prompts[r].ids for r in rows]
        seeds = [self.seed * 1_000_003 + s for s in samples]
        outs = sample(self.policy, prompts, self.params, seeds, stop_ids=self.stop_ids,
                      max_new_tokens=self.max_new_tokens)
        seqs = [Tokens.join(p, group[0].tokens).cut(self.seq_len) for p, group in zip(prompts, outs)]
        return rows_batch([[s] for s in seqs], self.pad_id, keys=rows)
