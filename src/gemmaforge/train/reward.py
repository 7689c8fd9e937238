"""Reward models: a Gemma backbone with a scalar head, trained with the Bradley-Terry loss.

``RewardModel`` is a ``Gemma`` plus ``score`` (hidden -> 1, no bias) read at the last token of a
sequence, the final-normed hidden state there: exactly transformers' ``Gemma2ForSequenceClassification``
/ ``Gemma3TextForSequenceClassification`` with ``num_labels=1`` (they pool the rightmost token that is
not ``pad_token_id``; our sequences end with ``<end_of_turn>``, and rows are right-padded). It saves as
that checkpoint: the backbone's tensors under their usual names, ``score.weight``, and a config.json
naming the classification architecture, so ``AutoModelForSequenceClassification.from_pretrained``
gives the same scores (tests/test_train_reward.py).

Training (``gemmaforge reward``): each sample is a pair, prompt + chosen and prompt + rejected, in two
rows of one batch; the loss per pair is ``-log sigmoid(r_chosen - r_rejected)`` (Bradley & Terry 1952,
as in InstructGPT), averaged over pairs; the held-out report adds the pairwise accuracy (the fraction of
pairs ranked the right way; 0.5 is chance) and the mean margin. The head starts at zero, so the
initial loss is ln 2 whatever the backbone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import GemmaforgeError
from ..model import Gemma
from .batches import Batch, EpochOrder, IndexedSource
from .chats import Pair
from .objectives import LossSums, Objective
from .packing import Tokens, rows_batch

SCORE = "score.weight"  # the head's name, in our state dicts and in HF's


def classification_config(config) -> dict:
    """config.json entries that make transformers build the sequence-classification model."""
    arch = "Gemma2ForSequenceClassification" if config.family == "gemma2" else "Gemma3TextForSequenceClassification"
    return {"architectures": [arch], "num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}


class RewardModel(Gemma):
    def __init__(self, config):
        super().__init__(config)
        self.score = nn.Linear(config.hidden_size, 1, bias=False)

    @classmethod
    def from_backbone(cls, backbone: Gemma, score: torch.Tensor | None = None) -> "RewardModel":
        """The backbone's tensors (moved, not copied) and a head: ``score`` [1, hidden], or zeros."""
        p = backbone.final_norm.weight
        with torch.device("meta"):
            model = cls(backbone.config)
        state = dict(backbone.state_dict())
        state[SCORE] = torch.zeros(1, backbone.config.hidden_size, dtype=p.dtype, device=p.device) \
            if score is None else score.to(dtype=p.dtype, device=p.device)
        model.load_state_dict(state, strict=True, assign=True)
        model.reset_buffers(p.device)
        model.activation_checkpointing = backbone.activation_checkpointing
        return model.train(backbone.training)

    def rewards(self, batch: Batch, last: torch.Tensor, attn_impl=None) -> torch.Tensor:
        """[B] scores: the head at each row's token ``last[b]``, in fp32."""
        h = self.hidden_states(batch.tokens, batch.positions, segment_ids=batch.segment_ids, attn_impl=attn_impl)
        pooled = h[torch.arange(h.shape[0], device=h.device), last]
        return self.score(pooled).squeeze(-1).float()


def load_reward_model(path, dtype=None, device=None) -> RewardModel:
    """A directory written by ``gemmaforge reward`` (or any Gemma sequence-classification checkpoint
    with one label)."""
    from ..checkpoint import materialize
    from ..checkpoint.hf import read_config, read_tensors

    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise GemmaforgeError(f"{path} is not a reward model directory (no config.json): train one with gemmaforge reward")
    arch = json.loads(config_path.read_text()).get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in arch):
        raise GemmaforgeError(f"{path} is a {', '.join(arch) or 'plain'} checkpoint, not a reward model (no score head): "
                              "train one with gemmaforge reward")
    tensors = list(read_tensors(path, extra=frozenset({SCORE})))
    score = [t for name, t, _ in tensors if name == SCORE]
    if not score or tuple(score[0].shape) != (1, read_config(path).hidden_size):
        raise GemmaforgeError(f"{path} has no score.weight of shape [1, hidden]: a reward model has one label")
    backbone = materialize(read_config(path), [x for x in tensors if x[0] != SCORE], dtype=dtype, device=device)
    return RewardModel.from_backbone(backbone, score[0]).eval()


def _last(seqs: Sequence[Tokens]) -> torch.Tensor:
    return torch.tensor([len(s) - 1 for s in seqs])


@torch.no_grad()
def score_sequences(model: RewardModel, seqs: Sequence[Tokens], pad_id: int, batch: int = 8) -> list[float]:
    """Rewards of token sequences (prompt + reply), ``batch`` rows at a time."""
    device = model.final_norm.weight.device
    out = []
    for i in range(0, len(seqs), batch):
        part = seqs[i:i + batch]
        b = rows_batch([[s] for s in part], pad_id).to(device)
        out += model.rewards(b, _last(part).to(device)).tolist()
    return out


class PreferencePairs(IndexedSource):
    """Sample i = one pair, rows 2j (chosen) and 2j + 1 (rejected) of its batch; ``extra["last"]`` holds
    each row's last token. Sequences longer than ``seq_len`` keep their first ``seq_len`` tokens."""

    def __init__(self, pairs: Sequence[Pair], seq_len: int, pad_id: int, *, seed: int = 0, shuffle: bool = True):
        self.truncated = sum(max(len(p.chosen), len(p.rejected)) > seq_len for p in pairs)
        self.pairs = [(p.chosen.cut(seq_len), p.rejected.cut(seq_len)) for p in pairs]
        self.seqs = self.pairs  # what recipes.note_truncated counts
        self.pad_id, self.num_samples = pad_id, len(self.pairs)
        self.order = EpochOrder(self.num_samples, seed, shuffle)

    def batch(self, samples: Sequence[int]) -> Batch:
        picked = [self.order(s) for s in samples]
        seqs = [s for i in picked for s in self.pairs[i]]
        b = rows_batch([[s] for s in seqs], self.pad_id, keys=[i for i in picked for _ in range(2)])
        b.extra["last"] = _last(seqs)
        return b


class BradleyTerry(Objective):
    """-log sigmoid(r_chosen - r_rejected) per pair; its targets are pairs, not tokens."""

    def count(self, batch: Batch) -> int:
        return batch.tokens.shape[0] // 2

    def _pairs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.student.rewards(batch, batch.extra["last"], self.attn_impl).view(-1, 2)
        return r[:, 0] - r[:, 1], r

    def loss(self, batch: Batch) -> LossSums:
        margin, r = self._pairs(batch)
        loss = -F.logsigmoid(margin).sum()
        m = margin.detach()
        return LossSums(loss, {"accuracy": (m > 0).float().sum(), "margin": m.sum(),
                               "reward_chosen": r[:, 0].detach().sum()})

    @torch.no_grad()
    def evaluate(self, batch: Batch):
        """(summed loss, pairs, {"accuracy", "margin"} sums) over the pairs with a label (the loop
        masks padding samples by setting all their labels to IGNORE)."""
        margin, _ = self._pairs(batch)
        real = (batch.labels != -100).view(-1, 2, batch.labels.shape[1]).any(-1).any(-1).float()
        return ((-F.logsigmoid(margin) * real).sum().double(), real.sum(),
                {"accuracy": ((margin > 0).float() * real).sum(), "margin": (margin * real).sum()})
