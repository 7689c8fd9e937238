"""``gemmaforge gkd CONFIG.yaml [--key value ...]``: on-policy distillation (GKD) from ``teacher``:
on a fraction ``lmbda`` of the steps the student's own completions, else the dataset's, scored by the
generalized JSD (``beta``, ``temperature``) between teacher and student. See docs/post_training.md."""

from __future__ import annotations

from ..train.config import add_config_flags, config_from_args


def add_arguments(parser) -> None:
    add_config_flags(parser)


def run(args) -> int:
    from ..train.loop import train
    from ..train.recipes import GKD
    from .train import _report

    _report(train(config_from_args(args), recipe=GKD()))
    return 0
