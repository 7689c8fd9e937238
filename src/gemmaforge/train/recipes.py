"""A ``Recipe`` names the two plug points of the training loop: where a run's batches come from
(a ``batches.BatchSource``) and what it minimises (an ``objectives.Objective``).

    train(cfg)                        # the recipe the config implies: Pretrain, or Distill with a teacher
    train(cfg, recipe=MyRecipe())     # anything else, through the same setup, step, resume and FSDP2

``setup.start`` calls ``batches(cfg, meta, "train")``, ``batches(cfg, meta, "val")`` and then
``objective(cfg, student, meta, train, device)``, in that order, on every process. A recipe may keep
state between the calls: an on-policy source (RLHF rollouts, on-policy distillation) that samples
from the student can take it from ``objective``. The validation source must be an
``IndexedSource``; what the loop reports on it is ``Objective.evaluate``.
"""

from __future__ import annotations

import torch

from ..errors import GemmaforgeError
from ..model import Gemma
from .batches import BatchSource
from .config import TrainConfig
from .data import packed_windows
from .distill import TeacherCache
from .models import check_teacher, check_tokenizer, load_teacher, source_of
from .objectives import CachedTeacher, CrossEntropy, Distillation, LiveTeacher, Objective


class Recipe:
    name = "train"  # the progress bar's label

    def batches(self, cfg: TrainConfig, meta: dict, split: str) -> BatchSource:
        raise NotImplementedError

    def objective(self, cfg: TrainConfig, student: Gemma, meta: dict, train: BatchSource,
                  device: torch.device) -> Objective:
        raise NotImplementedError


class Pretrain(Recipe):
    """Packed windows of a prepared corpus, next-token cross-entropy (pre-training, continued training)."""

    def batches(self, cfg, meta, split):
        return packed_windows(cfg, split, meta)

    def objective(self, cfg, student, meta, train, device):
        return CrossEntropy(student, chunk=cfg.loss_chunk, attn_impl=cfg.attn_impl)


class Distill(Pretrain):
    """The same windows; the loss mixes the labels with a teacher's distribution, live or cached."""

    name = "distill"

    def objective(self, cfg, student, meta, train, device):
        if cfg.teacher_cache:
            cache = TeacherCache(cfg.teacher_cache, meta, cfg.seq_len, train.num_samples, cfg.packing)
            if cache.vocab_size != student.config.vocab_size:
                raise GemmaforgeError(f"the teacher cache has vocabulary {cache.vocab_size}, the student "
                                      f"{student.config.vocab_size}: distillation needs a shared tokenizer")
            teacher = CachedTeacher(cache)
        elif cfg.teacher:
            check_tokenizer(source_of(cfg.teacher), meta, "teacher")
            model = load_teacher(cfg, device)
            check_teacher(model, student, meta)
            teacher = LiveTeacher(model)
        else:
            raise GemmaforgeError("distillation needs teacher: MODEL or teacher_cache: DIR in the config")
        return Distillation(student, teacher, alpha=cfg.alpha, tau=cfg.temperature, kind=cfg.distill_loss,
                            chunk=cfg.loss_chunk, attn_impl=cfg.attn_impl)


def recipe_for(cfg: TrainConfig) -> Recipe:
    """A config that names a teacher (or a teacher cache) distils; any other pre-trains."""
    return Distill() if (cfg.teacher or cfg.teacher_cache) else Pretrain()
