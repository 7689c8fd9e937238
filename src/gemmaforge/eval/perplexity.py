"""Teacher-forced perplexity, the one implementation: training's validation loss, the distillation
experiment's held-out numbers and ``gemmaforge bench`` all call this.

    nats, n = nll_sums(model, tokens, labels)       # sums over the labelled positions, on device
    Perplexity.of(nats, n).ppl                      # exp(nats / n), after one host sync

``labels[b, t]`` is the token that should follow ``tokens[b, t]``, or IGNORE (-100) where nothing is
scored (padding, document boundaries, prompts). The output head (``Gemma.logits``: tied matmul and final
soft-cap) runs ``chunk`` positions at a time and only on labelled positions, so the [T, vocab] logits of
a long text never exist at once; log-softmax is taken in fp32 whatever the model's dtype. The sums are
returned as device tensors so that a caller scoring many batches adds them up and syncs once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

IGNORE = -100


@dataclass(frozen=True)
class Perplexity:
    nats: float  # summed negative log-likelihood
    tokens: int  # scored tokens

    @property
    def loss(self) -> float:
        """Mean nats per token (the cross-entropy)."""
        return self.nats / max(self.tokens, 1)

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0))  # exp overflows a float past ~709 nats

    @classmethod
    def of(cls, nats: torch.Tensor | float, tokens: torch.Tensor | int) -> "Perplexity":
        return cls(float(nats), int(tokens))


@torch.no_grad()
def nll_sums(model, tokens: torch.Tensor, labels: torch.Tensor | None = None, *, positions=None, segment_ids=None,
             chunk: int = 1024, attn_impl=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p(label | prefix) in float64, number of labels) over the labelled positions of
    ``tokens`` [B, T]; 0-d tensors on the model's device. ``labels`` None scores every next token."""
    if labels is None:
        labels = torch.full_like(tokens, IGNORE)
        labels[:, :-1] = tokens[:, 1:]
    h = model.hidden_states(tokens, positions, segment_ids=segment_ids, attn_impl=attn_impl)
    flat = labels.reshape(-1)
    index = (flat != IGNORE).nonzero().squeeze(1)
    rows, y = h.reshape(-1, h.shape[-1]).index_select(0, index), flat.index_select(0, index)
    nats = torch.zeros((), dtype=torch.float64, device=h.device)
    for start in range(0, rows.shape[0], chunk):
        z = model.logits(rows[start:start + chunk]).float()
        picked = z.gather(1, y[start:start + chunk, None]).squeeze(1)
        nats += (torch.logsumexp(z, dim=-1) - picked).double().sum()
    return nats, torch.tensor(rows.shape[0], device=h.device)


def perplexity(model, batches: Iterable, *, chunk: int = 1024, attn_impl=None) -> Perplexity:
    """Over batches with ``tokens``, ``labels`` and optional ``positions`` / ``segment_ids``
    (``train.batches.Batch``); moved to the model's device here, one host sync at the end."""
    device = model.final_norm.weight.device  # not embed.weight: a quantized table has none
    nats = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    for b in batches:
        move = lambda t: None if t is None else t.to(device)
        s, n = nll_sums(model, move(b.tokens), move(b.labels), positions=move(getattr(b, "positions", None)),
                        segment_ids=move(getattr(b, "segment_ids", None)), chunk=chunk, attn_impl=attn_impl)
        nats, count = nats + s, count + n
    return Perplexity.of(nats, count)


def sequence_perplexity(model, ids: Sequence[int], *, chunk: int = 128) -> float:
    """exp(-mean log p(ids[i+1] | ids[:i+1])) of one token sequence (it should start with <bos>)."""
    device = model.final_norm.weight.device
    tokens = torch.tensor([list(ids)], device=device)
    return Perplexity.of(*nll_sums(model, tokens, chunk=chunk)).ppl
