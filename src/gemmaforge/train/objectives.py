"""What training minimises: ``Objective`` modules, Batch -> summed loss over the batch's targets.

An objective is the *root module* of a run: it owns the student (and a live teacher), the loop
shards it with FSDP2, and every use of the networks goes through its ``forward``. That is not a
style choice: under FSDP2 a sharded module's weights are all-gathered only inside its ``forward``,
so the student's tied embedding (and the teacher's) may only be touched there.

    forward(batch)                 -> LossSums(loss, stats)   loss summed over targets; stats detached sums
    forward(batch, evaluate=True)  -> (nats, count)           held-out NLL sums (eval.perplexity)
    count(batch)                   -> int                     what the sums are over (labelled tokens)

The loop divides by the number of targets in the *global* batch, so an objective only sums. Today's
objectives: ``CrossEntropy`` (pre-training, fine-tuning; with an SFT source whose prompt labels are
IGNORE it is SFT) and ``Distillation`` with a ``LiveTeacher`` or a ``CachedTeacher``. A new one
(a reward model on preference pairs, a policy-gradient loss on rollouts carrying advantages in
``batch.extra``) subclasses ``Objective``, implements ``loss`` (and ``count`` / ``evaluate`` if
labelled tokens are not what it counts), and lists any extra networks in ``models()`` so that they
are sharded too. Every output head goes through ``Gemma.logits``, so quantized teachers work.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from ..eval.perplexity import nll_sums
from ..model import Gemma
from .batches import IGNORE, Batch
from .losses import TeacherFn, head_jsd, head_loss, select_rows


class LossSums(NamedTuple):
    loss: torch.Tensor  # 0-d, summed over the batch's targets; the loop backpropagates loss * scale
    stats: dict[str, torch.Tensor]  # detached 0-d sums to log (each divided by the global target count)


class Objective(nn.Module):
    """Base class: the student, how its hidden states are computed, and held-out evaluation."""

    def __init__(self, student: Gemma, *, chunk: int = 1024, attn_impl: str | None = None):
        super().__init__()
        self.student, self.chunk, self.attn_impl = student, chunk, attn_impl

    def models(self) -> list[Gemma]:
        """Every network in this root; their blocks become FSDP2 units of their own."""
        return [self.student]

    def count(self, batch: Batch) -> int:
        """How many targets ``loss`` sums over (on the CPU batch: no device sync)."""
        return batch.label_count()

    def hidden(self, model: Gemma, batch: Batch) -> torch.Tensor:
        return model.hidden_states(batch.tokens, batch.positions, segment_ids=batch.segment_ids,
                                   attn_impl=self.attn_impl)

    def loss(self, batch: Batch) -> LossSums:
        raise NotImplementedError

    def evaluate(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed NLL of the labels, their count): the validation loss is their ratio."""
        return nll_sums(self.student, batch.tokens, batch.labels, positions=batch.positions,
                        segment_ids=batch.segment_ids, chunk=self.chunk, attn_impl=self.attn_impl)

    @property
    def reports_perplexity(self) -> bool:
        """The held-out loss is this base class's token NLL, so exp(loss) is a perplexity; an
        objective that evaluates a divergence, a pairwise or a policy loss overrides ``evaluate``."""
        return type(self).evaluate is Objective.evaluate

    def forward(self, batch: Batch, evaluate: bool = False):
        return self.evaluate(batch) if evaluate else self.loss(batch)


class CrossEntropy(Objective):
    """Next-token cross-entropy on the labels."""

    def loss(self, batch: Batch) -> LossSums:
        rows, y, _ = select_rows(self.hidden(self.student, batch), batch.labels, IGNORE)
        loss, hard, _ = head_loss(rows, self.student, y, chunk=self.chunk)
        return LossSums(loss, {"ce": hard})


class LiveTeacher(nn.Module):
    """A teacher network run on the same batch (inside the root, so FSDP2 shards it with the student)."""

    def __init__(self, model: Gemma):
        super().__init__()
        self.model = model

    def models(self) -> list[Gemma]:
        return [self.model]

    @torch.no_grad()
    def distribution(self, objective: Objective, batch: Batch, index: torch.Tensor) -> TeacherFn:
        ht = objective.hidden(self.model, batch)
        ht = ht.reshape(-1, ht.shape[-1]).index_select(0, index)
        logits = self.model.logits

        def fn(rows: slice):  # one chunk of the teacher's head: [rows, vocab], never all rows at once
            with torch.no_grad():
                return None, logits(ht[rows])

        return fn


class CachedTeacher:
    """Teacher logits stored per training window (distill.TeacherCache), looked up by ``batch.windows``."""

    def __init__(self, cache):
        self.cache = cache

    def models(self) -> list[Gemma]:
        return []

    def distribution(self, objective: Objective, batch: Batch, index: torch.Tensor) -> TeacherFn:
        ids, z = (c.reshape(-1, c.shape[-1]).index_select(0, index)
                  for c in self.cache.lookup(batch.windows, index.device))
        return lambda rows: (ids[rows], z[rows])


class Distillation(Objective):
    """(1 - alpha) CE(labels) + alpha tau^2 KD(teacher || student), docs/distillation.md."""

    def __init__(self, student: Gemma, teacher: LiveTeacher | CachedTeacher, *, alpha: float, tau: float,
                 kind: str = "kl", chunk: int = 1024, attn_impl: str | None = None):
        super().__init__(student, chunk=chunk, attn_impl=attn_impl)
        self.teacher, self.alpha, self.tau, self.kind = teacher, alpha, tau, kind

    def models(self) -> list[Gemma]:
        return [self.student, *self.teacher.models()]

    def loss(self, batch: Batch) -> LossSums:
        rows, y, index = select_rows(self.hidden(self.student, batch), batch.labels, IGNORE)
        teacher = self.teacher.distribution(self, batch, index)
        loss, hard, kd = head_loss(rows, self.student, y, teacher=teacher, alpha=self.alpha, tau=self.tau,
                                   kd_kind=self.kind, chunk=self.chunk)
        return LossSums(loss, {"ce": hard, self.kind: kd})


class GeneralizedJSD(Objective):
    """GKD's loss: the generalized JSD (losses.head_jsd) between a live teacher and the student on
    the labelled (completion) tokens, over the soft-capped logits both emit. Its held-out value is the
    same divergence on the validation completions (reported as the val ``loss``; ``ppl`` is its exp)."""

    def __init__(self, student: Gemma, teacher: LiveTeacher, *, beta: float, tau: float, chunk: int = 1024,
                 attn_impl: str | None = None):
        super().__init__(student, chunk=chunk, attn_impl=attn_impl)
        self.teacher, self.beta, self.tau = teacher, beta, tau

    def models(self) -> list[Gemma]:
        return [self.student, *self.teacher.models()]

    def loss(self, batch: Batch) -> LossSums:
        rows, _, index = select_rows(self.hidden(self.student, batch), batch.labels, IGNORE)
        loss, jsd = head_jsd(rows, self.student, self.teacher.distribution(self, batch, index), beta=self.beta,
                             tau=self.tau, chunk=self.chunk)
        return LossSums(loss, {"jsd": jsd})

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        loss, _ = self.loss(batch)
        return loss.double(), torch.tensor(batch.label_count(), device=loss.device)
