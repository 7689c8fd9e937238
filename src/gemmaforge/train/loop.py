"""The training loop behind ``gemmaforge train`` and ``gemmaforge distill``.

    run = setup.start(cfg, info, recipe)     # models, sharding, optimizer, resume (setup.py)
    for step in range(run.start_step, cfg.max_steps):
        record = train_step(run, step)       # one optimizer step over the recipe's micro-batches

What is trained is not written here. A ``recipes.Recipe`` supplies a batch source (``batches.py``:
the micro-batches of step ``s``) and an objective (``objectives.py``: a root module whose forward
returns the summed loss); the loop only runs them. Pre-training is packed windows + cross-entropy,
distillation the same windows + a live or cached teacher; SFT with masked prompts, a reward model or
on-policy distillation plug in a source and an objective of their own (see recipes.py) and reuse
this file, setup.py and checkpointing.py unchanged: ``train(cfg, recipe=MyRecipe())``.

One optimizer step = ``batch_size`` sequences, split over processes and then into micro-batches
(gradient accumulation). The loss is the objective's sum over its targets divided by the number of
targets in the *global* batch, so the step does not depend on how the batch was split. Which
samples make up step ``s`` is a pure function of ``s`` (batches.StepLayout), the learning rate too
(optim.lr_at), and the checkpoint holds the full weights and AdamW state: restarting from a
checkpoint continues the loss curve identically (tests/test_train_resume.py kills a run with -9).

Losses and statistics are accumulated on the device; the host reads them once per optimizer step
(and once per evaluation), never per micro-batch, so the GPU is not stalled between micro-batches.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn as nn

from ..errors import GemmaforgeError
from ..eval.perplexity import Perplexity
from .batches import IGNORE
from .checkpointing import export_model, full_model_state, latest_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import all_reduce_sum, cleanup, full_tensor, setup
from .optim import lr_at, set_lr
from .recipes import Recipe, recipe_for
from .setup import Run, start


def train(cfg: TrainConfig, *, recipe: Recipe | None = None) -> dict:
    """Run (or resume) training as configured; returns the final train and val records."""
    info = setup(cfg.device)
    try:
        return fit(start(cfg, info, recipe or recipe_for(cfg)))
    finally:
        cleanup(info)


def fit(run: Run) -> dict:
    from tqdm import tqdm

    cfg, info = run.cfg, run.info
    last_val, last_train = None, None
    bar = tqdm(total=cfg.max_steps, initial=run.start_step, desc=run.recipe.name,
               disable=not (info.is_main and cfg.progress), dynamic_ncols=True)
    for step in range(run.start_step, cfg.max_steps):
        last_train = train_step(run, step)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            run.log.write(last_train)
        bar.update(1)
        bar.set_postfix(loss=f"{last_train['loss']:.4f}", tok_s=f"{last_train['tok_per_s']:,.0f}")
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            last_val = evaluate(run, done)
            if info.is_main:
                extra = [f"ppl {last_val['ppl']:.2f}"] if run.objective.reports_perplexity else \
                    [f"{k} {v:.4g}" for k, v in last_val.items() if k not in ("step", "split", "loss", "ppl", "tokens")]
                bar.write(", ".join([f"step {done}: val loss {last_val['loss']:.4f}", *extra]))
        if done % cfg.save_every == 0 or done == cfg.max_steps:
            save_checkpoint(run.out, done, run.student, run.optimizer, {"step": done, "config": cfg.to_dict()}, info,
                            keep=cfg.keep_checkpoints, tokenizer_file=run.tokenizer_file)
    bar.close()
    state = full_model_state(run.student)
    if info.is_main:
        export_model(state, run.student.config, run.out / "model", run.tokenizer_file)
    if last_val is None:  # resumed a finished run: nothing trained, report where it stands
        last_val = evaluate(run, cfg.max_steps)
    run.log.close()
    return {"train": last_train, "val": last_val, "out": str(run.out)}


def train_step(run: Run, step: int) -> dict:
    """One optimizer step; returns its train record (read from the device once, at the end)."""
    t0 = time.perf_counter()
    cfg, info, objective, device = run.cfg, run.info, run.objective, run.device
    lr = lr_at(step, cfg)
    set_lr(run.optimizer, lr)
    batches = run.train.micro_batches(step, run.layout)
    local_n = sum(objective.count(b) for b in batches)
    n_global = all_reduce_sum(torch.tensor(float(local_n), dtype=torch.float64, device=device), info).clamp(min=1.0)
    scale = (info.world / n_global).float()  # times world: FSDP averages gradients over processes
    sync = getattr(objective, "set_requires_gradient_sync", None)
    sums, names = None, None
    for m, b in enumerate(batches):
        if sync is not None:
            sync(m == len(batches) - 1)  # reduce-scatter gradients once, after the last micro-batch
        with run.autocast():
            loss, stats = objective(b.to(device))
        (loss * scale).backward()
        names = names or list(stats)
        part = torch.stack([loss.detach(), *(stats[k] for k in names)]).double()
        sums = part if sums is None else sums + part
    grad_norm = _clip(run.student, cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    means = all_reduce_sum(sums, info) / n_global
    loss_value, *values = torch.cat([means, grad_norm.double().reshape(1), n_global.reshape(1)]).tolist()  # one sync
    targets = int(values.pop())
    grad_norm_value = values.pop()
    if not math.isfinite(loss_value):
        # the weights in memory took a non-finite step: stop before anything is saved from them
        latest = latest_checkpoint(run.out)
        kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
        raise GemmaforgeError(f"the loss is {loss_value} at step {step + 1}: training stopped and {kept}; "
                              "lower lr, or check the data")
    tokens_per_step = cfg.batch_size * cfg.seq_len
    done = step + 1
    return {"step": done, "split": "train", "loss": loss_value, **dict(zip(names, values)), "lr": lr,
            "grad_norm": grad_norm_value, "targets": targets, "tokens": done * tokens_per_step,
            "tok_per_s": tokens_per_step / max(time.perf_counter() - t0, 1e-9)}


def evaluate(run: Run, step: int) -> dict:
    """The objective's held-out loss (cross-entropy for today's objectives) and its exp, over the first
    ``eval_batches * batch_size`` validation samples, however many processes share them."""
    cfg, info, objective, micro, device = run.cfg, run.info, run.objective, run.layout.micro, run.device
    objective.eval()
    n_samples = min(run.val.num_samples, cfg.eval_batches * cfg.batch_size)
    sums, names = None, []
    with torch.no_grad(), run.autocast():
        # every process runs the same number of forwards (FSDP gathers weights collectively);
        # samples past n_samples only pad the last round and count for nothing
        rounds = max(1, -(-n_samples // (info.world * micro)))
        for r in range(rounds):
            first = (r * info.world + info.rank) * micro
            b = run.val.batch(range(first, first + micro))
            padding = torch.arange(first, first + micro) >= n_samples
            b.labels[padding.repeat_interleave(b.tokens.shape[0] // micro)] = IGNORE  # a sample may be 2 rows (pairs)
            nats, n, *more = objective(b.to(device), evaluate=True)  # more: {name: sum} to report per target
            stats = more[0] if more else {}
            names = names or list(stats)
            part = torch.stack([nats.double(), n.double(), *(stats[k].double() for k in names)])
            sums = part if sums is None else sums + part
    objective.train()
    nats, n, *values = all_reduce_sum(sums, info).tolist()
    result = Perplexity.of(nats, n)
    record = {"step": step, "split": "val", "loss": result.loss, "ppl": result.ppl, "tokens": result.tokens,
              **{k: v / max(n, 1.0) for k, v in zip(names, values)}}
    run.log.write(record)
    return record


def _clip(model: nn.Module, max_norm: float) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return full_tensor(norm)

