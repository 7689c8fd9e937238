"""AdamW with decoupled weight decay, and the learning-rate schedule (linear warmup, then cosine).

The schedule is a pure function of the step, set on the optimizer before every step; there is no
scheduler object whose state could drift from the checkpoint, which is part of what makes resume exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (projections and the tied embedding); never the norm weights: Gemma's norms
    scale by (1 + w), so decaying w pulls the scale towards 1, not towards 0, which is not a
    regulariser anyone wants."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # fused=True runs the whole update as one kernel per dtype on GPU (docs/reference.md §9 anchor
    # uses the eager loop); on CPU the default foreach path is the fast one.
    fused = True if device.type == "cuda" else None
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=fused)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Step 0-based. Warmup reaches ``lr`` at step ``warmup_steps``; cosine to ``min_lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
