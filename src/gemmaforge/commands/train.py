"""``gemmaforge train CONFIG.yaml [--key value ...]``: pre-train or fine-tune (docs/training.md).

Multi-process: ``torchrun --nproc_per_node N -m gemmaforge train CONFIG.yaml`` (FSDP2).
"""

from __future__ import annotations

from ..errors import GemmaforgeError
from ..train.config import add_config_flags, config_from_args


def add_arguments(parser) -> None:
    add_config_flags(parser)


def run(args) -> int:
    from ..train.loop import train

    cfg = config_from_args(args)
    if cfg.teacher or cfg.teacher_cache:
        raise GemmaforgeError("the config names a teacher: run `gemmaforge distill` for distillation")
    _report(train(cfg))
    return 0


def _report(result: dict) -> None:
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    train, val = result["train"] or {}, result["val"] or {}
    parts = [f"out {result['out']}/model"]
    if train:
        parts.append(f"train loss {train['loss']:.4f}")
    if val:
        parts.append(f"val loss {val['loss']:.4f} (ppl {val['ppl']:.2f})")
    print("gemmaforge: " + ", ".join(parts))
