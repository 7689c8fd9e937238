"""Atomic training checkpoints that load regardless of how many processes wrote them.

    RUN/checkpoints/step-000200/model/        HF format (config.json, model.safetensors, tokenizer.json):
                                             gemmaforge.load and transformers read it as is
    RUN/checkpoints/step-000200/trainer.pt    step, run config, full (unsharded) AdamW state

Both halves are *full* state dicts keyed by parameter name (``torch.distributed.checkpoint.state_dict``
gathers FSDP shards), so a checkpoint written by 2 processes resumes on 1 and vice versa. A checkpoint
is assembled in a hidden temporary directory and renamed into place in one step: a run killed at any
moment (kill -9 included) leaves either the previous checkpoint or the new one, never half of one.
Resume picks the highest complete ``step-*`` directory.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..atomic import publish_dir
from ..checkpoint.hf import read_tensors
from ..config import GemmaConfig
from ..errors import GemmaforgeError
from .distributed import DistInfo, barrier
from .lora import adapter_state, merge_state

_STEP_RE = re.compile(r"^step-(\d+)$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _checkpoints(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, dir), oldest first."""
    root = _checkpoints(Path(run_dir))
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_RE.match(d.name)
            if m and (d / "trainer.pt").is_file() and (d / "model" / "config.json").is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def export_model(state: dict[str, torch.Tensor], config: GemmaConfig, dest: Path, tokenizer_file: Path | None) -> None:
    """Full state dict -> HF directory (written atomically by save_pretrained)."""
    from ..model import Gemma

    from ..checkpoint.hf import save_pretrained
    from .reward import SCORE, classification_config

    state = dict(merge_state(state))  # LoRA adapters folded in
    head = {SCORE: state.pop(SCORE)} if SCORE in state else {}  # a reward model's scalar head
    with torch.device("meta"):
        model = Gemma(config)
    model.load_state_dict(state, strict=True, assign=True)
    save_pretrained(model, dest, extra_tensors=head, config_overrides=classification_config(config) if head else None)
    if tokenizer_file is not None and tokenizer_file.is_file():
        shutil.copyfile(tokenizer_file, dest / "tokenizer.json")


def full_model_state(student: nn.Module) -> dict[str, torch.Tensor]:
    """Collective under FSDP: every process must call it."""
    return get_model_state_dict(student, options=_FULL)


def save_checkpoint(run_dir: str | Path, step: int, student: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, info: DistInfo, *, keep: int, tokenizer_file: Path | None) -> Path:
    """Write RUN/checkpoints/step-N atomically (all processes call this; process 0 writes)."""
    model_state = full_model_state(student)
    optim_state = get_optimizer_state_dict(student, optimizer, options=_FULL)
    root = _checkpoints(Path(run_dir))
    final = root / f"step-{step:06d}"
    if info.is_main:
        with publish_dir(final) as tmp:  # replaces a same-step checkpoint of an earlier attempt
            export_model(model_state, student.config, tmp / "model", tokenizer_file)
            blob = {"trainer": trainer_state, "optimizer": optim_state}
            adapters = adapter_state(model_state)
            if adapters:  # model/ holds the merged weights; resume needs the adapters themselves
                blob["adapters"] = adapters
            torch.save(blob, tmp / "trainer.pt")
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def clean_partial(run_dir: str | Path) -> None:
    """Remove temporary directories a killed run left behind (they are never complete)."""
    root = _checkpoints(Path(run_dir))
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(".step-"):
                shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(path: Path, student: nn.Module, optimizer: torch.optim.Optimizer, check=None) -> dict:
    """Restore weights and optimizer state (into sharded or plain modules); returns the trainer state.
    ``check(trainer_state)`` runs first, so a run that may not resume here fails before anything loads."""
    try:
        blob = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file can only come from outside: we never write in place
        raise GemmaforgeError(f"cannot read {path / 'trainer.pt'} ({e}): delete {path} to resume from an older one") from None
    if check is not None:
        check(blob["trainer"])
    if "adapters" in blob:  # LoRA: the frozen base is the run's ``model``, loaded already
        set_model_state_dict(student, blob["adapters"], options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        state = {name: t for name, t, _ in read_tensors(path / "model", extra=frozenset({"score.weight"}))}
        set_model_state_dict(student, state, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(student, optimizer, blob["optimizer"], options=StateDictOptions(full_state_dict=True))
    return blob["trainer"]
