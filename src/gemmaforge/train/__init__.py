"""Training, distillation and data preparation (docs/training.md, docs/distillation.md).

    from gemmaforge.train import load_config, prepare_data, train
    prepare_data(["corpus/"], "data/corpus")                       # tokenize into shards
    train(load_config("examples/pretrain_tiny.yaml", {"max_steps": 10}))

Files, in reading order: config.py (the YAML keys), data.py (shards, packing), batches.py (what a
step reads: Batch, BatchSource), losses.py (chunked output-head losses), objectives.py (what a step
minimises), recipes.py (source + objective per kind of run), models.py (loading and start-up checks),
setup.py (everything before the first step), loop.py (the step and the loop), optim.py (AdamW,
schedule), checkpointing.py, metrics.py, distributed.py (FSDP2), distill.py (cached teacher logits),
experiment.py (distilled vs scratch).

Post-training (docs/post_training.md) plugs into the same loop: chats.py (JSONL records, the chat
template, reply-only targets), packing.py (variable-length sequences as rows, packed with segments),
lora.py (adapters merged at save), rollouts.py (sampling the policy through the engine), gkd.py
(on-policy batches), reward.py (reward model, Bradley-Terry), rl.py (RLOO), averaging.py (linear and
slerp model averaging).
"""

from .config import TrainConfig, load_config
from .data import prepare_data
from .loop import train
from .recipes import Recipe

__all__ = ["Recipe", "TrainConfig", "load_config", "prepare_data", "train"]
