"""What one training step reads: the ``Batch`` and the ``BatchSource`` protocol the loop calls.

The loop asks a source for the micro-batches of optimizer step ``s`` on this process
(``source.micro_batches(s, layout)``). Exact resume needs that answer to depend on ``s`` only, never
on what was read before; ``IndexedSource`` gives that for free: step ``s`` is global samples
``s * batch_size ... (s + 1) * batch_size - 1``, cut over processes and micro-batches by
``StepLayout``, and ``batch(samples)`` is a pure function of the sample numbers. ``data.PackedWindows``
(packed pre-training windows) is one; an SFT source (prompt labels set to IGNORE), a preference-pair
source or a source of on-policy rollouts is another, with the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol, Sequence

import torch

from ..errors import GemmaforgeError

IGNORE = -100  # label value the losses skip


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] inputs
    labels: torch.Tensor  # [B, T] the token to predict after each input, IGNORE where none is
    windows: torch.Tensor | None = None  # [B] sample keys (they address cached teacher logits)
    positions: torch.Tensor | None = None  # [B, T] rope positions; None = 0 .. T-1 in every row
    segment_ids: torch.Tensor | None = None  # [B, T] a query sees only keys of its own segment
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # objective-specific (advantages, ...)

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return replace(self, tokens=move(self.tokens), labels=move(self.labels), positions=move(self.positions),
                       segment_ids=move(self.segment_ids), extra={k: move(v) for k, v in self.extra.items()})

    def label_count(self) -> int:
        """Labelled positions. Called on the CPU copy, before ``to(device)``: no device sync."""
        return int((self.labels != IGNORE).sum())


@dataclass(frozen=True)
class StepLayout:
    """How one optimizer step's ``batch_size`` sequences are split: ``world`` processes, each running
    ``accum`` micro-batches of ``micro`` sequences (gradient accumulation)."""

    batch_size: int
    world: int = 1
    rank: int = 0
    micro: int = 0  # 0 = batch_size / world (no accumulation)

    def __post_init__(self):
        if self.batch_size % self.world:
            raise GemmaforgeError(f"batch_size {self.batch_size} is not divisible by the {self.world} processes")
        per_rank = self.batch_size // self.world
        if self.micro == 0:
            object.__setattr__(self, "micro", per_rank)
        if per_rank % self.micro:
            raise GemmaforgeError(f"micro_batch_size {self.micro} does not divide the {per_rank} sequences per process")

    @property
    def accum(self) -> int:
        return self.batch_size // self.world // self.micro

    def samples(self, step: int, m: int) -> range:
        """Global sample numbers of this process's micro-batch ``m`` of step ``step``."""
        first = step * self.batch_size + (self.rank * self.accum + m) * self.micro
        return range(first, first + self.micro)


class BatchSource(Protocol):
    def micro_batches(self, step: int, layout: StepLayout) -> list[Batch]:
        """This process's micro-batches of optimizer step ``step``, in order (CPU tensors)."""


class IndexedSource:
    """A source whose sample ``i`` is a pure function of ``i``; subclasses define ``num_samples`` and
    ``batch``. Validation sources must be of this kind: evaluation reads samples 0, 1, ... in order."""

    num_samples: int

    def batch(self, samples: Sequence[int]) -> Batch:
        raise NotImplementedError

    def micro_batches(self, step: int, layout: StepLayout) -> list[Batch]:
        return [self.batch(layout.samples(step, m)) for m in range(layout.accum)]


class EpochOrder:
    """Sample number (counting across epochs) -> item of ``n``: each epoch a fresh permutation seeded by
    (seed, epoch), so the item of a sample never depends on what was read before (exact resume)."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._epoch, self._perm = -1, None

    def __call__(self, sample: int) -> int:
        epoch, i = divmod(sample, self.n)
        if not self.shuffle:
            return i
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return int(self._perm[i])


def evenly_spaced(index: int, fraction: float) -> bool:
    """True for exactly floor(n f) of indices 0 .. n-1, evenly spread: floor((i + 1) f) > floor(i f)."""
    return int((index + 1) * fraction) > int(index * fraction)
