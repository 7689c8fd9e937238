"""``gemmaforge rl CONFIG.yaml [--key value ...]``: RLOO with a KL penalty to the frozen reference
(train/rl.py, docs/post_training.md). Rollouts go through the engine; the reward comes from a reward
model directory or a Python function (``reward: module:function``). Reward, KL, entropy and length
are logged per step (metrics.jsonl, TensorBoard) and plotted into OUT/rl_curves.png."""

from __future__ import annotations

import os
from pathlib import Path

from ..train.config import add_config_flags, config_from_args


def add_arguments(parser) -> None:
    add_config_flags(parser)


def run(args) -> int:
    from ..train.loop import train
    from ..train.metrics import plot_metrics
    from ..train.recipes import RL

    result = train(config_from_args(args), recipe=RL())
    if int(os.environ.get("RANK", "0")) == 0:
        plot = plot_metrics(Path(result["out"]), ["reward", "kl", "entropy", "length"], Path(result["out"]) / "rl_curves.png")
        val = result["val"]
        print(f"gemmaforge: out {result['out']}/model, held-out reward {val['reward']:.4f}, kl {val['kl']:.4f}"
              + (f", curves {plot}" if plot else ""))
    return 0
