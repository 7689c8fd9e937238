"""The training loop behind ``gemmaforge train`` and ``gemmaforge distill``.

One optimizer step = ``batch_size`` windows of ``seq_len`` tokens, split over processes and then
into micro-batches (gradient accumulation). The loss is the sum over label tokens divided by the
number of label tokens in the *global* batch, so the step does not depend on how the batch was split.
Which windows make up step ``s`` is a pure function of ``s`` (data.PackedWindows), the learning rate
too (optim.lr_at), and the checkpoint holds the full weights and AdamW state: restarting from a
checkpoint continues the loss curve identically (tests/test_train_resume.py kills a run with -9).

The network and its loss live in one ``Objective`` module whose ``forward`` returns the loss: under
FSDP2 a sharded module's weights are gathered only inside its ``forward``, so the output head (the
student's tied embedding, and the teacher's) must be used inside the root's forward, not outside.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn

from .. import atomic
from ..errors import GemmaforgeError
from ..model import Gemma
from .checkpointing import clean_partial, export_model, full_model_state, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import IGNORE, PackedWindows, TokenStream, prepare_out_dir, read_meta
from .distributed import DistInfo, all_reduce_sum, broadcast_object, cleanup, full_tensor, setup, shard
from .losses import _Buffers, head_loss, select_rows
from .optim import lr_at, make_optimizer, set_lr

# Changing these between a checkpoint and its resume would silently train on different data.
_RUN_IDENTITY = ("model", "data", "seq_len", "batch_size", "seed")


class Objective(nn.Module):
    """student (+ teacher) -> summed loss over label tokens. ``cached`` = (ids, logits) [B, T, k]."""

    def __init__(self, student: Gemma, teacher: Gemma | None = None, cfg: TrainConfig | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.cfg = cfg or TrainConfig()
        self.compute_dtype = compute_dtype

    def forward(self, tokens, labels, cached=None, hard_only: bool = False):
        cfg, student = self.cfg, self.student
        h = student.hidden_states(tokens, attn_impl=cfg.attn_impl)
        rows, y, index = select_rows(h, labels, IGNORE)
        teacher_fn, alpha = None, 0.0
        if not hard_only and (self.teacher is not None or cached is not None):
            teacher_fn, alpha = self._teacher_fn(tokens, index, cached), cfg.alpha
        loss, hard, kd = head_loss(
            rows, student.embed.weight, y, softcap=student.config.final_logit_softcap, teacher=teacher_fn,
            alpha=alpha, tau=cfg.temperature, kd_kind=cfg.distill_loss, chunk=cfg.loss_chunk,
            compute_dtype=self.compute_dtype,
        )
        return loss, hard, kd, y.numel()

    def _teacher_fn(self, tokens, index, cached):
        if cached is not None:
            ids, z = (c.reshape(-1, c.shape[-1]).index_select(0, index) for c in cached)
            return lambda rows: (ids[rows], z[rows])
        teacher = self.teacher
        with torch.no_grad():
            ht = teacher.hidden_states(tokens, attn_impl=self.cfg.attn_impl)
            ht = ht.reshape(-1, ht.shape[-1]).index_select(0, index)
        weight, cap = teacher.embed.weight, teacher.config.final_logit_softcap
        buf = _Buffers(min(self.cfg.loss_chunk, max(len(index), 1)), ht.device)

        def logits(rows):  # one chunk of the teacher's head, in its own dtype, soft-capped in fp32
            m, vocab = rows.stop - rows.start, weight.shape[0]
            z = torch.matmul(ht[rows], weight.T, out=buf.get("z", m, vocab, ht.dtype))
            z = z if z.dtype == torch.float32 else buf.get("q", m, vocab, torch.float32).copy_(z)
            return None, (z if cap is None else z.div_(cap).tanh_().mul_(cap))

        return logits


# ---- setup helpers -------------------------------------------------------------------------------
def _dtype(name: str, device: torch.device) -> torch.dtype:
    from ..checkpoint import resolve_dtype

    return resolve_dtype(None if name == "auto" else name, device)


def check_tokenizer(source: str | None, meta: dict, role: str) -> None:
    """A model that ships a tokenizer (GGUF, HF dir with tokenizer.json) must match the data's.
    ``source`` None is the embedded default model."""
    from ..config import PRESETS

    if meta.get("tokenizer") is None or source in PRESETS:
        return  # synthetic data or a random preset: only the vocabulary size can be checked
    if source is None:
        from ..default_model import default_model_path

        path = default_model_path()
    else:
        path = Path(source)
    if not (path.suffix == ".gguf" or any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))):
        return
    from ..tokenizer import load_tokenizer
    from .data import tokenizer_digest

    if tokenizer_digest(load_tokenizer(path)) != meta["tokenizer_sha256"]:
        raise GemmaforgeError(
            f"the {role} {source or 'default'} uses a different tokenizer than the data (prepared with "
            f"{meta['tokenizer']}): prepare the data with the {role}'s tokenizer"
        )


def check_vocab(model: Gemma, meta: dict, role: str) -> None:
    if meta["vocab_size"] > model.config.vocab_size:
        raise GemmaforgeError(
            f"the data was tokenized with a {meta['vocab_size']}-token vocabulary but the {role} has "
            f"{model.config.vocab_size} tokens: use a model with the data's tokenizer, or prepare the data again"
        )


def load_student(cfg: TrainConfig, device: torch.device) -> Gemma:
    from ..checkpoint import load

    source = None if cfg.model == "default" else cfg.model  # "default" = the embedded Gemma 3 270M
    model = load(source, dtype=_dtype(cfg.dtype, device), device=device, seed=cfg.seed)
    model.activation_checkpointing = cfg.activation_checkpointing
    return model.train()


def load_teacher(cfg: TrainConfig, device: torch.device) -> Gemma:
    from ..checkpoint import load

    source = None if cfg.teacher == "default" else cfg.teacher
    teacher = load(source, dtype=_dtype(cfg.teacher_dtype, device), device=device, seed=cfg.seed + 1)
    return teacher.eval().requires_grad_(False)


def batch_split(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(micro-batch size, accumulation steps) per process."""
    if cfg.batch_size % world:
        raise GemmaforgeError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    per_rank = cfg.batch_size // world
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise GemmaforgeError(f"micro_batch_size {micro} does not divide the {per_rank} sequences per process")
    return micro, per_rank // micro


class MetricsLog:
    """metrics.jsonl (+ TensorBoard when installed), written by process 0 only."""

    def __init__(self, out: Path, resume_step: int | None, enabled: bool, tensorboard: bool):
        self.path, self.enabled, self.tb = out / "metrics.jsonl", enabled, None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():  # drop what the killed run logged after its checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            atomic.write_bytes(self.path, "".join(line + "\n" for line in kept).encode())
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step)
            except ImportError:
                print("gemmaforge: tensorboard is not installed; metrics go to metrics.jsonl only")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record['split']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---- the loop -------------------------------------------------------------------------------------
def train(cfg: TrainConfig, *, distill: bool = False) -> dict:
    """Run (or resume) training as configured; returns the final metrics."""
    info = setup(cfg.device)
    try:
        return _train(cfg, info, distill)
    finally:
        cleanup(info)


def _train(cfg: TrainConfig, info: DistInfo, distill: bool) -> dict:
    from tqdm import tqdm

    if not cfg.out:
        raise GemmaforgeError("no output directory: set out: DIR in the config or pass --out DIR")
    out = Path(cfg.out)
    prepare_out_dir(out)  # on every process: one that failed alone would leave the others waiting
    meta = read_meta(cfg.data)
    data_dir = Path(cfg.data)
    tokenizer_file = data_dir / "tokenizer.json"
    train_windows = PackedWindows(TokenStream(data_dir, "train", meta), cfg.seq_len, meta["bos_id"], cfg.seed)
    val_windows = PackedWindows(TokenStream(data_dir, "val", meta), cfg.seq_len, meta["bos_id"], shuffle=False)
    micro, accum = batch_split(cfg, info.world)

    device = info.device
    check_tokenizer(None if cfg.model == "default" else cfg.model, meta, "model")
    student = load_student(cfg, device)
    check_vocab(student, meta, "model")
    teacher, cache = None, None
    if distill:
        from .distill import TeacherCache, check_teacher

        if cfg.teacher_cache:
            cache = TeacherCache(cfg.teacher_cache, meta, cfg.seq_len, train_windows.num_windows)
            if cache.vocab_size != student.config.vocab_size:
                raise GemmaforgeError(f"the teacher cache has vocabulary {cache.vocab_size}, the student "
                                      f"{student.config.vocab_size}: distillation needs a shared tokenizer")
        elif cfg.teacher:
            check_tokenizer(None if cfg.teacher == "default" else cfg.teacher, meta, "teacher")
            teacher = load_teacher(cfg, device)
            check_teacher(teacher, student, meta)
        else:
            raise GemmaforgeError("distillation needs teacher: MODEL or teacher_cache: DIR in the config")

    autocast = cfg.autocast == "bfloat16" or (cfg.autocast == "auto" and device.type == "cuda")
    compute_dtype = torch.bfloat16 if autocast else student.embed.weight.dtype
    objective = Objective(student, teacher, cfg, compute_dtype)
    if info.enabled:
        blocks = list(student.layers) + (list(teacher.layers) if teacher is not None else [])
        shard(objective, blocks, info)
    optimizer = make_optimizer(student, cfg, device)

    start_step, resumed = 0, None
    if info.is_main:
        clean_partial(out)
    ckpt = broadcast_object(str(latest_checkpoint(out)) if latest_checkpoint(out) else None, info)
    if ckpt is not None:
        saved = load_checkpoint(Path(ckpt), student, optimizer)
        changed = [k for k in _RUN_IDENTITY if saved["config"].get(k) != getattr(cfg, k)]
        if changed:
            k = changed[0]
            raise GemmaforgeError(f"{out} holds a run with {k}={saved['config'][k]!r}, not {getattr(cfg, k)!r}: "
                                  "use a new out directory, or the same settings to resume")
        start_step = resumed = saved["step"]
        if info.is_main:
            print(f"gemmaforge: resuming from {ckpt}", flush=True)
    log = MetricsLog(out, resumed, info.is_main, cfg.tensorboard)
    if info.is_main:
        atomic.write_bytes(out / "config.yaml", _yaml(cfg).encode())

    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else nullcontext
    sync = getattr(objective, "set_requires_gradient_sync", None)

    def evaluate(step: int) -> dict:
        """Mean CE over the first eval_batches * batch_size validation windows, however many processes."""
        objective.eval()
        n_windows = min(val_windows.num_windows, cfg.eval_batches * cfg.batch_size)
        sums = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad(), amp():
            # every process runs the same number of forwards (FSDP gathers weights collectively);
            # windows past n_windows only pad the last round and count for nothing
            rounds = -(-n_windows // (info.world * micro))
            for r in range(rounds):
                first = (r * info.world + info.rank) * micro
                b = val_windows.batch(range(first, first + micro))
                b.labels[torch.arange(first, first + micro) >= n_windows] = IGNORE
                _, hard, _, n = objective(b.tokens.to(device), b.labels.to(device), hard_only=True)
                sums += torch.tensor([hard.item(), n], dtype=torch.float64)
        objective.train()
        loss_sum, n = all_reduce_sum(sums.to(device), info).tolist()
        record = {"step": step, "split": "val", "loss": loss_sum / n, "ppl": math.exp(min(50.0, loss_sum / n)),
                  "tokens": int(n)}
        log.write(record)
        return record

    tokens_per_step = cfg.batch_size * cfg.seq_len
    last_val, last_train = None, None
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="distill" if distill else "train",
               disable=not (info.is_main and cfg.progress), dynamic_ncols=True)
    t_last = time.perf_counter()
    for step in range(start_step, cfg.max_steps):
        lr = lr_at(step, cfg)
        set_lr(optimizer, lr)
        base = step * cfg.batch_size + info.rank * micro * accum
        batches = [train_windows.batch(range(base + m * micro, base + (m + 1) * micro)) for m in range(accum)]
        local_n = sum(int((b.labels != IGNORE).sum()) for b in batches)
        n_global = all_reduce_sum(torch.tensor([float(local_n)], device=device), info).item()
        scale = info.world / max(n_global, 1.0)  # FSDP averages gradients over processes
        sums = torch.zeros(2, dtype=torch.float64)
        for m, b in enumerate(batches):
            if sync is not None:
                sync(m == accum - 1)  # reduce-scatter gradients once, after the last micro-batch
            cached = cache.lookup(b.windows, device) if cache is not None else None
            with amp():
                loss, hard, kd, _ = objective(b.tokens.to(device), b.labels.to(device), cached)
            (loss * scale).backward()
            sums += torch.tensor([hard.item(), kd.item()], dtype=torch.float64)
        grad_norm = _clip(student, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hard_sum, kd_sum = (all_reduce_sum(sums.to(device), info) / max(n_global, 1.0)).tolist()
        alpha = cfg.alpha if (teacher is not None or cache is not None) else 0.0
        loss_value = (1 - alpha) * hard_sum + alpha * cfg.temperature**2 * kd_sum
        tok_s = tokens_per_step / max(time.perf_counter() - t_last, 1e-9)
        done = step + 1
        last_train = {"step": done, "split": "train", "loss": loss_value, "ce": hard_sum, "lr": lr,
                      "grad_norm": grad_norm, "tokens": done * tokens_per_step, "tok_per_s": tok_s}
        if distill:
            last_train[cfg.distill_loss] = kd_sum
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            log.write(last_train)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}")
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            last_val = evaluate(done)
            if info.is_main:
                bar.write(f"step {done}: val loss {last_val['loss']:.4f}, ppl {last_val['ppl']:.2f}")
        if done % cfg.save_every == 0 or done == cfg.max_steps:
            save_checkpoint(out, done, student, optimizer, {"step": done, "config": cfg.to_dict()}, info,
                            keep=cfg.keep_checkpoints, tokenizer_file=tokenizer_file)
        t_last = time.perf_counter()  # evaluation and checkpoint time is not training throughput
    bar.close()
    state = full_model_state(student)
    if info.is_main:
        export_model(state, student.config, out / "model", tokenizer_file)
    if last_val is None:  # resumed a finished run: nothing trained, report where it stands
        last_val = evaluate(cfg.max_steps)
    log.close()
    return {"train": last_train, "val": last_val, "out": str(out)}


def _clip(model: nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return float(full_tensor(norm))


def _yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
