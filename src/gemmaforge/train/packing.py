"""Variable-length token sequences (chats, prompt + completion pairs) as training rows.

A ``Tokens`` is one sequence with a flag per token: is it a *target* (predicted from the tokens before
it, so it gets a loss)? SFT marks the model's replies, GKD and RL the completion. ``SequenceRows``
makes rows of them, an ``IndexedSource`` like ``data.PackedWindows``:

- ``pack=True`` (``packing: segments``): several sequences per row, cut greedily in a seeded order
  fixed at start-up, each its own segment: segment ids keep attention inside a sequence and positions
  restart at 0 at its start, so a sequence is trained exactly as if it were alone in its row
  (tests/test_train_sft.py compares a packed row with its sequences one by one);
- ``pack=False``: one sequence per row.

Rows are padded to the longest in the batch (padding is no target and a segment of its own). Which
row a sample is follows ``batches.EpochOrder``, so resume stays exact. A sequence longer than
``seq_len`` keeps its first ``seq_len`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import GemmaforgeError
from .batches import IGNORE, Batch, EpochOrder, IndexedSource


@dataclass(frozen=True, eq=False)
class Tokens:
    ids: np.ndarray  # [L] int64
    targets: np.ndarray  # [L] bool: this token is predicted (a loss on the position before it)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def join(cls, context: Sequence[int], completion: Sequence[int]) -> "Tokens":
        """``context`` then ``completion``, the completion's tokens the targets."""
        ids = np.asarray(list(context) + list(completion), dtype=np.int64)
        targets = np.zeros(len(ids), dtype=bool)
        targets[len(context):] = True
        return cls(ids, targets)

    def cut(self, n: int) -> "Tokens":
        return self if len(self) <= n else Tokens(self.ids[:n], self.targets[:n])


def rows_batch(rows: Sequence[Sequence[Tokens]], pad_id: int, keys: Sequence[int] | None = None) -> Batch:
    """Rows of sequences -> one Batch padded to its longest row: labels are each next token where
    that token is a target, segment ids number the sequences of a row, positions restart per sequence."""
    width = max(max(sum(len(s) for s in row) for row in rows), 1)
    b = len(rows)
    tokens = np.full((b, width), pad_id, dtype=np.int64)
    labels = np.full((b, width), IGNORE, dtype=np.int64)
    segments = np.zeros((b, width), dtype=np.int64)
    positions = np.zeros((b, width), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for k, seq in enumerate(row):
            n = len(seq)
            tokens[r, at:at + n] = seq.ids
            nxt = np.where(seq.targets[1:], seq.ids[1:], IGNORE)
            labels[r, at:at + n - 1] = nxt  # the last token of a sequence predicts nothing
            segments[r, at:at + n] = k
            positions[r, at:at + n] = np.arange(n)
            at += n
        segments[r, at:] = len(row)  # padding: a segment of its own, never a label
        positions[r, at:] = np.arange(width - at)
    batch = Batch(torch.from_numpy(tokens), torch.from_numpy(labels), positions=torch.from_numpy(positions),
                  segment_ids=torch.from_numpy(segments))
    if keys is not None:
        batch.windows = torch.tensor(list(keys), dtype=torch.long)
    return batch


class SequenceRows(IndexedSource):
    def __init__(self, seqs: Sequence[Tokens], seq_len: int, pad_id: int, *, seed: int = 0, shuffle: bool = True,
                 pack: bool = True):
        if not seqs:
            raise GemmaforgeError("no sequences to train on")
        self.truncated = sum(len(s) > seq_len for s in seqs)
        seqs = [s.cut(seq_len) for s in seqs]
        self.seqs, self.pad_id = seqs, pad_id
        if pack:  # the grouping is fixed once (seeded); only the order of rows changes per epoch
            order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed)).tolist() if shuffle \
                else list(range(len(seqs)))
            self.rows: list[list[int]] = []
            used = seq_len
            for i in order:
                if used + len(seqs[i]) > seq_len:
                    self.rows.append([])
                    used = 0
                self.rows[-1].append(i)
                used += len(seqs[i])
        else:
            self.rows = [[i] for i in range(len(seqs))]
        self.num_samples = len(self.rows)
        self.row_index = EpochOrder(self.num_samples, seed, shuffle)

    def batch(self, samples: Sequence[int]) -> Batch:
        rows = [self.row_index(s) for s in samples]
        return rows_batch([[self.seqs[i] for i in self.rows[r]] for r in rows], self.pad_id, keys=rows)
