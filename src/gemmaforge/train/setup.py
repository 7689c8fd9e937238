"""Everything a run does once, before its first step: ``start(cfg, info, recipe) -> Run``.

In order: the output directory and the data's metadata, the recipe's batch sources, the student and
the recipe's objective (the root module, which owns any teacher), FSDP2 sharding (one unit per
transformer block of every network in the objective, then the root), AdamW, and resume from the
newest complete checkpoint. Every process runs all of it; only process 0 writes files.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import atomic
from ..errors import GemmaforgeError
from ..model import Gemma
from .batches import BatchSource, IndexedSource, StepLayout
from .checkpointing import clean_partial, latest_checkpoint, load_checkpoint
from .config import TrainConfig
from .data import prepare_out_dir
from .distributed import DistInfo, broadcast_object, shard
from .metrics import MetricsLog
from .models import check_tokenizer, check_vocab, load_student, source_of
from .objectives import Objective
from .optim import make_optimizer
from .recipes import Recipe

# Changing these between a checkpoint and its resume would silently train on different data. The
# value in parentheses is what a checkpoint that predates the key was trained with.
_RUN_IDENTITY = {"model": None, "data": None, "seq_len": None, "batch_size": None, "seed": None,
                 "packing": "concat", "lora_rank": 0}


@dataclass
class Run:
    """A started run: what ``loop.train_step`` and ``loop.evaluate`` need."""

    cfg: TrainConfig
    info: DistInfo
    recipe: Recipe
    out: Path
    tokenizer_file: Path
    layout: StepLayout
    train: BatchSource
    val: IndexedSource
    student: Gemma
    objective: Objective  # the root module (FSDP2-sharded when there are several processes)
    optimizer: torch.optim.Optimizer
    start_step: int
    log: MetricsLog
    autocast: Callable  # () -> context manager the forwards run in

    @property
    def device(self) -> torch.device:
        return self.info.device


def start(cfg: TrainConfig, info: DistInfo, recipe: Recipe) -> Run:
    if not cfg.out:
        raise GemmaforgeError("no output directory: set out: DIR in the config or pass --out DIR")
    out = Path(cfg.out)
    prepare_out_dir(out)  # on every process: one that failed alone would leave the others waiting
    meta = recipe.meta(cfg)
    layout = StepLayout(cfg.batch_size, info.world, info.rank, cfg.micro_batch_size)
    train = recipe.batches(cfg, meta, "train")
    val = recipe.batches(cfg, meta, "val")

    device = info.device
    check_tokenizer(source_of(cfg.model), meta, "model")
    student = load_student(cfg, device)
    check_vocab(student, meta, "model")
    objective = recipe.objective(cfg, student, meta, train, device)
    student = objective.student  # what trains and is saved (a recipe may add a head, e.g. a reward model's)
    if info.enabled:
        shard(objective, [block for model in objective.models() for block in model.layers], info)
    optimizer = make_optimizer(student, cfg, device)

    start_step = _resume(cfg, out, student, optimizer, info)
    log = MetricsLog(out, start_step or None, info.is_main, cfg.tensorboard)
    if info.is_main:
        atomic.write_bytes(out / "config.yaml", _yaml(cfg).encode())
    bf16 = cfg.autocast == "bfloat16" or (cfg.autocast == "auto" and device.type == "cuda")
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    return Run(cfg, info, recipe, out, recipe.tokenizer_file(cfg, meta), layout, train, val, student, objective,
               optimizer, start_step, log, amp)


def _resume(cfg: TrainConfig, out: Path, student: Gemma, optimizer, info: DistInfo) -> int:
    """Load the newest complete checkpoint in ``out`` (weights and AdamW state); returns its step."""
    if info.is_main:
        clean_partial(out)
    latest = latest_checkpoint(out)
    ckpt = broadcast_object(str(latest) if latest else None, info)
    if ckpt is None:
        return 0

    def same_run(saved: dict) -> None:
        for key, before in _RUN_IDENTITY.items():
            was = saved["config"].get(key, before)
            if was != getattr(cfg, key):
                raise GemmaforgeError(f"{out} holds a run with {key}={was!r}, not {getattr(cfg, key)!r}: "
                                      "use a new out directory, or the same settings to resume")

    saved = load_checkpoint(Path(ckpt), student, optimizer, check=same_run)
    if info.is_main:
        print(f"gemmaforge: resuming from {ckpt}", flush=True)
    return saved["step"]


def _yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
