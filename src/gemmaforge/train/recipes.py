"""A ``Recipe`` names the two plug points of the training loop: where a run's batches come from
(a ``batches.BatchSource``) and what it minimises (an ``objectives.Objective``).

    train(cfg)                        # the recipe the config implies: Pretrain, or Distill with a teacher
    train(cfg, recipe=MyRecipe())     # anything else, through the same setup, step, resume and FSDP2

``setup.start`` calls ``batches(cfg, meta, "train")``, ``batches(cfg, meta, "val")`` and then
``objective(cfg, student, meta, train, device)``, in that order, on every process. A recipe may keep
state between the calls: an on-policy source (RLHF rollouts, on-policy distillation) that samples
from the student can take it from ``objective``. The validation source must be an
``IndexedSource``; what the loop reports on it is ``Objective.evaluate``. ``meta`` (what the data
is) and ``tokenizer_file`` default to a prepared corpus's; the post-training recipes (``SFT``,
``GKD``, ``Reward``, ``RL``: docs/post_training.md) read JSONL instead. What trains and is saved is
``objective.student``: a recipe may wrap the model it is given (LoRA adapters, a reward head).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..errors import GemmaforgeError
from ..generation import SamplingParams
from ..model import Gemma
from .batches import BatchSource
from .chats import conversation, jsonl_meta, load_chat_tokenizer, pair, prompt, records
from .config import TrainConfig
from .data import packed_windows, read_meta
from .distill import TeacherCache
from .gkd import OnPolicyMix, completions_source
from .lora import add_lora
from .models import check_teacher, check_tokenizer, load_reference, load_teacher, source_of
from .objectives import CachedTeacher, CrossEntropy, Distillation, GeneralizedJSD, LiveTeacher, Objective
from .packing import SequenceRows
from .reward import BradleyTerry, PreferencePairs, RewardModel
from .rl import RLOO, Rewarder, RolloutEval, RolloutSource, Rollouts
from .rollouts import require_one_process


class Recipe:
    name = "train"  # the progress bar's label

    def meta(self, cfg: TrainConfig) -> dict:
        """What the data is: vocabulary size, special ids, the tokenizer's digest (models.check_tokenizer
        compares it with the model's). A prepared corpus's meta.json, unless the recipe reads other data."""
        return read_meta(cfg.data)

    def tokenizer_file(self, cfg: TrainConfig, meta: dict) -> Path:
        """The tokenizer.json copied into every checkpoint."""
        return Path(cfg.data) / "tokenizer.json"

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
            teacher = live_teacher(cfg, student, meta, device)
        else:
            raise GemmaforgeError("distillation needs teacher: MODEL or teacher_cache: DIR in the config")
        return Distillation(student, teacher, alpha=cfg.alpha, tau=cfg.temperature, kind=cfg.distill_loss,
                            chunk=cfg.loss_chunk, attn_impl=cfg.attn_impl)


def live_teacher(cfg: TrainConfig, student: Gemma, meta: dict, device: torch.device) -> LiveTeacher:
    """The configured teacher, checked to share the data's tokenizer and the student's vocabulary."""
    check_tokenizer(source_of(cfg.teacher), meta, "teacher")
    model = load_teacher(cfg, device)
    check_teacher(model, student, meta)
    return LiveTeacher(model)


class JsonlRecipe(Recipe):
    """Post-training data: a JSONL file tokenized at start-up (chats.py), not a prepared corpus."""

    _tok = None

    def tokenizer(self, cfg: TrainConfig):
        if self._tok is None:
            self._tok = load_chat_tokenizer(cfg)
        return self._tok

    def meta(self, cfg):
        return jsonl_meta(cfg, self.tokenizer(cfg))

    def tokenizer_file(self, cfg, meta):
        path = Path(cfg.out) / "tokenizer.json"  # every process writes the same bytes, atomically
        self.tokenizer(cfg).save(path)
        return path

    def student(self, cfg: TrainConfig, student: Gemma) -> Gemma:
        """LoRA adapters when ``lora_rank`` > 0 (only they train; merged into every saved model)."""
        if cfg.lora_rank:
            add_lora(student, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        return student


class SFT(JsonlRecipe):
    """Chat JSONL, loss on the model's replies only; several conversations per row with
    ``packing: segments`` (none sees another), one per row with ``packing: concat``."""

    name = "sft"

    def batches(self, cfg, meta, split):
        if not cfg.chat_template:
            raise GemmaforgeError("sft trains on chats rendered with the Gemma template: remove chat_template: false")
        tok = self.tokenizer(cfg)
        seqs = [conversation(tok, rec) for rec in records(cfg, split)]
        source = SequenceRows(seqs, cfg.seq_len, meta["pad_id"], seed=cfg.seed, shuffle=split == "train",
                              pack=cfg.packing == "segments")
        note_truncated(source, cfg, split, "conversations")
        return source

    def objective(self, cfg, student, meta, train, device):
        return CrossEntropy(self.student(cfg, student), chunk=cfg.loss_chunk, attn_impl=cfg.attn_impl)


class GKD(JsonlRecipe):
    """On-policy distillation: chat JSONL whose last assistant turn is the dataset's completion; a
    fraction ``lmbda`` of the steps use the student's own completions instead (gkd.py)."""

    name = "gkd"

    def batches(self, cfg, meta, split):
        tok = self.tokenizer(cfg)
        recs = records(cfg, split)
        prompts = [prompt(tok, rec, cfg.chat_template) for rec in recs]
        if split == "val" or cfg.lmbda < 1.0:
            for p, rec in zip(prompts, recs):
                if p.completion is None:
                    raise GemmaforgeError(f"{rec.where}: the conversation does not end with an assistant turn, which "
                                          f"{'validation' if split == 'val' else 'lmbda < 1'} needs as its completion "
                                          "(or give a completion field)")
        if split == "val":
            return completions_source(prompts, cfg.seq_len, meta["pad_id"], seed=cfg.seed, shuffle=False)
        params = SamplingParams(temperature=cfg.sample_temperature, top_p=cfg.sample_top_p)
        return OnPolicyMix(prompts, lmbda=cfg.lmbda, seq_len=cfg.seq_len, pad_id=meta["pad_id"], seed=cfg.seed,
                           params=params, stop_ids=stop_ids(tok, cfg), max_new_tokens=cfg.max_new_tokens)

    def objective(self, cfg, student, meta, train, device):
        if not cfg.teacher:
            raise GemmaforgeError("gkd needs teacher: MODEL (or 'default') in the config")
        if cfg.lmbda > 0:
            require_one_process("gkd with lmbda > 0")
        teacher = live_teacher(cfg, student, meta, device)
        train.policy = self.student(cfg, student)
        return GeneralizedJSD(train.policy, teacher, beta=cfg.beta, tau=cfg.temperature, chunk=cfg.loss_chunk,
                              attn_impl=cfg.attn_impl)


class Reward(JsonlRecipe):
    """A reward model: the backbone plus a zero-initialised scalar head, Bradley-Terry on preference
    pairs; held-out loss, pairwise accuracy and margin (reward.py)."""

    name = "reward"

    def batches(self, cfg, meta, split):
        tok = self.tokenizer(cfg)
        pairs = [pair(tok, rec, cfg.chat_template) for rec in records(cfg, split)]
        source = PreferencePairs(pairs, cfg.seq_len, meta["pad_id"], seed=cfg.seed, shuffle=split == "train")
        note_truncated(source, cfg, split, "pairs")
        return source

    def objective(self, cfg, student, meta, train, device):
        model = self.student(cfg, RewardModel.from_backbone(student))
        model.score.requires_grad_(True)  # trains with or without LoRA adapters
        return BradleyTerry(model, chunk=cfg.loss_chunk, attn_impl=cfg.attn_impl)


class RL(JsonlRecipe):
    """RLOO: k rollouts per prompt through the engine, rewards from a reward model or a function,
    a KL penalty to the frozen reference (rl.py)."""

    name = "rl"

    def __init__(self):
        self._rollouts = []  # the train and val samplers, which get the policy and the rewarder later

    def batches(self, cfg, meta, split):
        k = cfg.rollouts_per_prompt
        if k < 2:  # the baseline of one sample is itself: every advantage would be 0 and nothing would train
            raise GemmaforgeError(f"rollouts_per_prompt {k}: RLOO's leave-one-out baseline needs at least 2 samples "
                                  "per prompt")
        micro = cfg.micro_batch_size or cfg.batch_size
        if split == "train" and (cfg.batch_size % k or micro % k):
            raise GemmaforgeError(f"batch_size {cfg.batch_size} and micro_batch_size {micro} must be multiples of "
                                  f"rollouts_per_prompt {k}: a micro-batch holds whole groups of samples")
        if not cfg.reward:
            raise GemmaforgeError("rl needs reward: a reward model directory or module:function in the config")
        tok = self.tokenizer(cfg)
        params = SamplingParams(temperature=cfg.sample_temperature, top_p=cfg.sample_top_p)
        prompts = [prompt(tok, rec, cfg.chat_template) for rec in records(cfg, split)]
        rollouts = Rollouts(prompts, None, k=k, seq_len=cfg.seq_len, pad_id=meta["pad_id"], seed=cfg.seed, params=params,
                            stop_ids=stop_ids(tok, cfg), max_new_tokens=cfg.max_new_tokens)
        self._rollouts.append(rollouts)
        return RolloutSource(rollouts, cfg.seed) if split == "train" else RolloutEval(rollouts)

    def objective(self, cfg, student, meta, train, device):
        require_one_process("rl")
        if cfg.reference:
            check_tokenizer(source_of(cfg.reference), meta, "reference")
        reference = load_reference(cfg, device)
        if reference.config != student.config:
            raise GemmaforgeError(f"the reference {cfg.reference} has another config than the policy {cfg.model}: "
                                  "the reference is the policy's starting point")
        rewarder = Rewarder(cfg.reward, self.tokenizer(cfg), meta["pad_id"], device, meta["tokenizer_sha256"])
        policy = self.student(cfg, student)
        for r in self._rollouts:
            r.policy, r.rewarder = policy, rewarder
        return RLOO(policy, reference, k=cfg.rollouts_per_prompt, kl_coef=cfg.kl_coef, chunk=cfg.loss_chunk,
                    attn_impl=cfg.attn_impl)


def stop_ids(tok, cfg: TrainConfig) -> frozenset[int]:
    """Where a sampled reply ends: <end_of_turn> (or <eos>) in a chat; <eos> for plain text."""
    return tok.stop_ids if cfg.chat_template else frozenset({tok.eos_id})


def note_truncated(source: SequenceRows, cfg: TrainConfig, split: str, what: str) -> None:
    if source.truncated and int(os.environ.get("RANK", "0")) == 0:
        print(f"gemmaforge: {source.truncated} of the {len(source.seqs)} {split} {what} are longer than "
              f"seq_len={cfg.seq_len}: trained on their first {cfg.seq_len} tokens", file=sys.stderr)


def recipe_for(cfg: TrainConfig) -> Recipe:
    """A config that names a teacher (or a teacher cache) distils; any other pre-trains."""
    return Distill() if (cfg.teacher or cfg.teacher_cache) else Pretrain()
