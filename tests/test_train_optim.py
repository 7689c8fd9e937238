"""AdamW parameter groups and the warmup + cosine schedule."""

import math

import pytest
import torch

from gemmaforge import Gemma, preset
from gemmaforge.train.config import load_config
from gemmaforge.train.optim import lr_at, make_optimizer, param_groups


def test_schedule_warms_up_then_follows_the_cosine_to_min_lr():
    cfg = load_config(None, dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110))
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(35, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    steps = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))


def test_weight_decay_skips_norms_and_is_decoupled():
    model = Gemma(preset("tiny-gemma2")).init_weights()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, _ in model.named_parameters() if "norm" in n}
    assert "embed.weight" in {names[id(p)] for p in decay["params"]}
    # decoupled: with zero gradients, AdamW still shrinks decayed weights by lr * wd, and only those
    cfg = load_config(None, dict(lr=0.5, weight_decay=0.1))
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    with torch.no_grad():
        model.final_norm.weight.fill_(0.3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(model.embed.weight, before["embed.weight"] * (1 - 0.5 * 0.1))
    torch.testing.assert_close(model.final_norm.weight, before["final_norm.weight"])
