"""Training, distillation and data preparation (docs/training.md, docs/distillation.md).

    from gemmaforge.train import load_config, prepare_data, train
    prepare_data(["corpus/"], "data/corpus")                       # tokenize into shards
    train(load_config("examples/pretrain_tiny.yaml", {"max_steps": 10}))

Files, in reading order: config.py (the YAML keys), data.py (shards, packing), losses.py (chunked
output-head losses), optim.py (AdamW, schedule), loop.py (the loop), checkpointing.py, distributed.py
(FSDP2), distill.py (teacher checks, cached logits), experiment.py (distilled vs scratch).
"""

from .config import TrainConfig, load_config
from .data import prepare_data
from .loop import train

__all__ = ["TrainConfig", "load_config", "prepare_data", "train"]
