"""The models a run loads (student, teacher) and the start-up checks that they fit the data and
each other: vocabulary sizes, and the tokenizer itself when a checkpoint ships one."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import GemmaforgeError
from ..model import Gemma
from .config import TrainConfig
from .data import tokenizer_digest


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    from ..checkpoint import resolve_dtype

    return resolve_dtype(None if name == "auto" else name, device)


def source_of(name: str | None) -> str | None:
    """Config value -> gemmaforge.load's argument ("default" = the embedded Gemma 3 270M)."""
    return None if name == "default" else name


def shipped_tokenizer(source: str | None):
    """The tokenizer a model source carries (a GGUF's, an HF directory's tokenizer.json or
    tokenizer.model, the embedded default's), or None (a preset, a directory without one)."""
    from ..config import PRESETS

    if source in PRESETS:
        return None
    if source is None:
        from ..default_model import default_model_path

        path = default_model_path()
    else:
        path = Path(source)
    if not (path.suffix == ".gguf" or any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))):
        return None
    from ..tokenizer import load_tokenizer

    return load_tokenizer(path)


def check_tokenizer(source: str | None, meta: dict, role: str) -> None:
    """A model that ships a tokenizer (GGUF, HF dir with tokenizer.json) must match the data's.
    ``source`` None is the embedded default model."""
    if meta.get("tokenizer") is None:
        return  # synthetic data: only the vocabulary size can be checked
    tok = shipped_tokenizer(source)
    if tok is None:
        return  # a random preset, or a checkpoint without a tokenizer: the vocabulary size is checked later
    if tokenizer_digest(tok) != meta["tokenizer_sha256"]:
        raise GemmaforgeError(
            f"the {role} {source or 'default'} uses a different tokenizer than the data (prepared with "
            f"{meta['tokenizer']}): prepare the data with the {role}'s tokenizer"
        )


def check_vocab(model: Gemma, meta: dict, role: str) -> None:
    if meta["vocab_size"] > model.config.vocab_size:
        raise GemmaforgeError(
            f"the data was tokenized with a {meta['vocab_size']}-token vocabulary but the {role} has "
            f"{model.config.vocab_size} tokens: use a model with the data's tokenizer, or prepare the data again"
        )


def check_teacher(teacher, student, meta: dict) -> None:
    """Teacher and student must index the same vocabulary (docs/reference.md §6: check at start-up)."""
    t, s = teacher.config.vocab_size, student.config.vocab_size
    if t != s:
        raise GemmaforgeError(
            f"the teacher has a {t}-token vocabulary and the student {s}: distillation needs teacher and student "
            f"to share one tokenizer; pick a student preset with vocab_size {t}"
        )
    if meta["vocab_size"] > t:
        raise GemmaforgeError(f"the data was tokenized with a {meta['vocab_size']}-token vocabulary, larger than "
                              f"the teacher's {t}: prepare the data with the teacher's tokenizer")


def load_student(cfg: TrainConfig, device: torch.device) -> Gemma:
    from ..checkpoint import load

    model = load(source_of(cfg.model), dtype=resolve_dtype(cfg.dtype, device), device=device, seed=cfg.seed)
    model.activation_checkpointing = cfg.activation_checkpointing
    return model.train()


def load_frozen(source: str, dtype: str, device: torch.device, seed: int, quant: str | None = None) -> Gemma:
    """A model in eval mode with frozen weights; weight-only quantized when ``quant`` says so (it then
    has no ``embed.weight``: everything reads its head through ``Gemma.logits``)."""
    from ..checkpoint import load

    model = load(source_of(source), dtype=resolve_dtype(dtype, device), device=device, seed=seed)
    model = model.eval().requires_grad_(False)
    if quant is not None:
        from ..quant import quantize

        quantize(model, quant)
    return model


def load_teacher(cfg: TrainConfig, device: torch.device) -> Gemma:
    return load_frozen(cfg.teacher, cfg.teacher_dtype, device, cfg.seed + 1, cfg.teacher_quant)


def load_reference(cfg: TrainConfig, device: torch.device) -> Gemma:
    """RL's frozen reference policy: ``reference``, or the run's initial ``model`` (same seed for a preset)."""
    return load_frozen(cfg.reference or cfg.model, cfg.dtype, device, cfg.seed)
