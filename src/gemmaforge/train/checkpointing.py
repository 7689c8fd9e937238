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
            adapters = _trained_apart(model_state)
            if adapters:  # model/ holds the merged weights; resume needs the adapters themselves
                blob["adapters"] = adapters
            torch.save(blob, tmp / "trainer.pt")
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def _trained_apart(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a LoRA run's resume cannot take from ``model/`` (whose weights are merged): the adapters,
    and a reward model's score head, which trains with them (docs/post_training.md section 2). Empty
    without LoRA."""
    from .reward import SCORE

    adapters = adapter_state(state)
    if adapters and SCORE in state:
        adapters[SCORE] = state[SCORE]
    return adapters


def _load_adapters(path: Path, student: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's adapters on top of the frozen base the run loaded, with strict key checks:
    the saved entries must be exactly the model's adapter entries, of the same shapes (another
    ``lora_targets`` would otherwise load in part and train on silently). Each is then copied into its
    parameter or buffer: under FSDP2 ``state_dict()`` has the same names and global shapes, its
    parameters being DTensors, which get their shard of the full tensor (every process runs the same
    copies in the same order)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    own = _trained_apart(dict(student.state_dict()))  # detached views: copying into them sets the model
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        detail = "; ".join(part for part in (f"missing {', '.join(missing[:3])}" if missing else "",
                                             f"unexpected {', '.join(unexpected[:3])}" if unexpected else "") if part)
        raise GemmaforgeError(f"{path / 'trainer.pt'} holds adapters that do not match this run's ({detail}): "
                              "resume with the lora_targets it was trained with, or use a new out directory")
    for key in sorted(saved):
        if tuple(saved[key].shape) != tuple(own[key].shape):
            raise GemmaforgeError(f"{path / 'trainer.pt'}: adapter {key} has shape {tuple(saved[key].shape)}, this "
                                  f"run's {tuple(own[key].shape)}: resume with the same lora settings, or use a new "
                                  "out directory")
    with torch.no_grad():
        for key in sorted(saved):
            dest = own[key]
            if isinstance(dest, DTensor):
                full = saved[key].to(device=dest.device, dtype=dest.dtype)
                dest.copy_(distribute_tensor(full, dest.device_mesh, dest.placements))
            else:
                dest.copy_(saved[key])


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
        _load_adapters(path, student, blob["adapters"])
    else:
        state = {name: t for name, t, _ in read_tensors(path / "model", extra=frozenset({"score.weight"}))}
        set_model_state_dict(student, state, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(student, optimizer, blob["optimizer"], options=StateDictOptions(full_state_dict=True))
    return blob["trainer"]
