"""``gemmaforge reward CONFIG.yaml [--key value ...]``: train a Bradley-Terry reward model on
``{"prompt", "chosen", "rejected"}`` JSONL (docs/post_training.md). The saved model/ is a
sequence-classification checkpoint that transformers' AutoModelForSequenceClassification loads."""

from __future__ import annotations

import os

from ..train.config import add_config_flags, config_from_args


def add_arguments(parser) -> None:
    add_config_flags(parser)


def run(args) -> int:
    from ..train.loop import train
    from ..train.recipes import Reward

    result = train(config_from_args(args), recipe=Reward())
    if int(os.environ.get("RANK", "0")) == 0:
        val = result["val"]
        print(f"gemmaforge: out {result['out']}/model, val loss {val['loss']:.4f}, "
              f"pairwise accuracy {val['accuracy']:.3f} on {int(val['tokens'])} held-out pairs")
    return 0
