"""``gemmaforge sft CONFIG.yaml [--key value ...]``: supervised fine-tuning on chat JSONL
(docs/post_training.md): the loss is on the model's replies only, conversations are packed into rows
without seeing each other, optional LoRA merged at save. Same keys, logging and resume as ``train``."""

from __future__ import annotations

from ..train.config import add_config_flags, config_from_args


def add_arguments(parser) -> None:
    add_config_flags(parser)


def run(args) -> int:
    from ..train.loop import train
    from ..train.recipes import SFT
    from .train import _report

    _report(train(config_from_args(args), recipe=SFT()))
    return 0
