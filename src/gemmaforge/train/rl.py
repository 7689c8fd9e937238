"""RLHF with RLOO (Ahmadian et al. 2024): ``gemmaforge rl``.

Each optimizer step takes ``batch_size / k`` prompts (k = ``rollouts_per_prompt``) and samples k
completions of each from the current policy through the engine (rollouts.py: one Request(n=k) per
prompt, prefilled once). Every completion gets a reward -- from a reward model (``reward: DIR``, a
``gemmaforge reward`` output) or a Python function (``reward: module:function`` or
``path/to/file.py:function``, called as ``fn(prompts, completions, completion_ids=..., **fields) -> list[float]``
like TRL's reward functions, with each other field of the JSONL records as a list) -- and a KL penalty to
the frozen reference policy:

    r'_i = r_i - kl_coef * KL_i,      KL_i = sum_t log pi(y_t) - log pi_ref(y_t)   (over its tokens)
    A_i  = r'_i - mean_{j != i} r'_j                      (leave-one-out baseline over the k samples)
    loss = -(1 / #sequences) sum_i A_i sum_t log pi(y_t | ...)

The policy's log-probs are the engine's (of the raw logits, at sampling time: on-policy, one update
per batch, so they are the current policy's); the reference's come from a teacher-forced forward of
the frozen model inside the objective (which owns it, as a distillation objective owns its teacher).
The gradient goes through ``losses.policy_gradient_loss``, the same chunked head as every loss, so no
[B, T, vocab] tensor exists. A micro-batch holds whole groups of k (``micro_batch_size`` divisible
by k), so the baseline is computed where the loss is.

Logged per step (metrics.jsonl, TensorBoard): ``reward`` (mean of r), ``kl`` (mean KL_i), ``entropy``
(mean per-token entropy of the policy on its samples), ``length`` (completion tokens). Validation
samples one completion per held-out prompt and reports the same means; its ``loss`` is -mean r'.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import GemmaforgeError
from ..model import Gemma
from .batches import IGNORE, Batch, EpochOrder, IndexedSource, StepLayout
from .chats import Prompt
from .losses import policy_gradient_loss, select_rows
from .objectives import LossSums, Objective
from .packing import Tokens, rows_batch
from .rollouts import sample


# ---- rewards ---------------------------------------------------------------------------------------
def reward_function(spec: str) -> Callable:
    """``module:function`` or ``file.py:function`` -> the function."""
    if ":" not in spec:
        raise GemmaforgeError(f"reward {spec!r} is neither a reward model directory nor module:function")
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise GemmaforgeError(f"reward file {path} does not exist")
            spec_ = importlib.util.spec_from_file_location(f"gemmaforge_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as e:
        raise GemmaforgeError(f"cannot import the reward module {where!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise GemmaforgeError(f"{where} has no function {name!r}: reward must name a callable")
    return fn


class Rewarder:
    """Rewards of completions: a reward model's scores, or a reward function's values."""

    def __init__(self, spec: str, tokenizer, pad_id: int, device, data_digest: str):
        self.tokenizer, self.pad_id, self.spec = tokenizer, pad_id, spec
        if Path(spec).is_dir():
            from .data import tokenizer_digest
            from .reward import load_reward_model

            self.model = load_reward_model(spec, device=device).requires_grad_(False)
            rm_tok = Path(spec) / "tokenizer.json"
            if rm_tok.is_file():
                from ..tokenizer import load_tokenizer

                if tokenizer_digest(load_tokenizer(rm_tok)) != data_digest:
                    raise GemmaforgeError(f"the reward model {spec} uses a different tokenizer than the policy's data")
            self.fn = None
        else:
            self.model, self.fn = None, reward_function(spec)

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[list[int]]) -> list[float]:
        if self.model is not None:
            from .reward import score_sequences

            return score_sequences(self.model, [Tokens.join(p.ids, c) for p, c in zip(prompts, completions)],
                                   self.pad_id)
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        keys = sorted({k for p in prompts for k in p.fields})
        fields = {k: [p.fields.get(k) for p in prompts] for k in keys}
        try:
            values = self.fn([p.text for p in prompts], texts, completion_ids=[list(c) for c in completions], **fields)
        except Exception as e:  # the user's code: one line says whose (--debug shows the traceback)
            raise GemmaforgeError(f"the reward function {self.spec} failed: {type(e).__name__}: {e}") from e
        values = list(values) if values is not None else []
        if len(values) != len(texts) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise GemmaforgeError(f"the reward function returned {str(values)[:80]}: it must return one finite "
                                  f"number per completion ({len(texts)})")
        return [float(v) for v in values]


# ---- rollouts as batches --------------------------------------------------------------------------
class Rollouts:
    """Sampling shared by the training and the validation source: prompts -> completions -> Batch with
    ``extra`` reward / policy_logp / length per row (rows grouped by prompt, k consecutive rows each)."""

    def __init__(self, prompts: Sequence[Prompt], rewarder: Rewarder, *, k: int, seq_len: int, pad_id: int,
                 seed: int, params, stop_ids, max_new_tokens: int):
        self.prompts, self.rewarder, self.k, self.seq_len, self.pad_id = list(prompts), rewarder, k, seq_len, pad_id
        self.seed, self.params, self.stop_ids, self.max_new_tokens = seed, params, stop_ids, max_new_tokens
        self.policy: Gemma | None = None
        for p in self.prompts:
            if len(p.ids) >= seq_len:
                raise GemmaforgeError(f"a prompt has {len(p.ids)} tokens, seq_len is {seq_len}: raise seq_len "
                                      "(prompt + max_new_tokens should fit)")

    def batch_of(self, indices: Sequence[int], samples: Sequence[int], k: int) -> Batch:
        prompts = [self.prompts[i] for i in indices]
        outs = sample(self.policy, [p.ids for p in prompts], self.params, [self.seed * 1_000_003 + s for s in samples],
                      k=k, stop_ids=self.stop_ids, max_new_tokens=self.max_new_tokens)
        seqs, logps, lengths, flat_prompts, completions = [], [], [], [], []
        for p, group in zip(prompts, outs):
            for r in group:
                keep = min(len(r.tokens), self.seq_len - len(p.ids))
                seqs.append(Tokens.join(p.ids, r.tokens[:keep]))
                logps.append(sum(r.logprobs[:keep]))
                lengths.append(keep)
                flat_prompts.append(p)
                completions.append(r.tokens[:keep])
        batch = rows_batch([[s] for s in seqs], self.pad_id)
        batch.extra["reward"] = torch.tensor(self.rewarder(flat_prompts, completions), dtype=torch.float32)
        batch.extra["policy_logp"] = torch.tensor(logps, dtype=torch.float32)
        batch.extra["length"] = torch.tensor(lengths, dtype=torch.float32)
        return batch


class RolloutSource:
    """A ``batches.BatchSource``: step s's prompts are prompt samples s * P ... (P = batch_size / k) in a
    seeded per-epoch order; all its rollouts are sampled at once, then cut into micro-batches."""

    def __init__(self, rollouts: Rollouts, seed: int):
        self.rollouts = rollouts
        self.order = EpochOrder(len(rollouts.prompts), seed, shuffle=True)

    def micro_batches(self, step: int, layout: StepLayout) -> list[Batch]:
        k = self.rollouts.k
        per_step = layout.batch_size // k
        samples = list(range(step * per_step, (step + 1) * per_step))
        full = self.rollouts.batch_of([self.order(s) for s in samples], samples, k)
        rows = layout.micro
        return [_rows(full, slice(m * rows, (m + 1) * rows)) for m in range(layout.accum)]


class RolloutEval(IndexedSource):
    """Held-out prompts, one completion each (seeded by the prompt's number: the same draws at every
    evaluation, so curves compare the policy, not the dice)."""

    def __init__(self, rollouts: Rollouts):
        self.rollouts, self.num_samples = rollouts, len(rollouts.prompts)

    def batch(self, samples: Sequence[int]) -> Batch:
        n = self.num_samples
        return self.rollouts.batch_of([s % n for s in samples], [10**9 + s for s in samples], 1)


def _rows(batch: Batch, rows: slice) -> Batch:
    take = lambda t: None if t is None else t[rows]
    return Batch(batch.tokens[rows], batch.labels[rows], positions=take(batch.positions),
                 segment_ids=take(batch.segment_ids), extra={k: v[rows] for k, v in batch.extra.items()})


# ---- the objective ---------------------------------------------------------------------------------
@torch.no_grad()
def _row_logprobs(model: Gemma, batch: Batch, index: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per row of the batch: sum of log p(label) over its labelled positions (teacher-forced, no grad)."""
    h = model.hidden_states(batch.tokens, batch.positions, segment_ids=batch.segment_ids)
    rows = h.reshape(-1, h.shape[-1]).index_select(0, index)
    picked = torch.empty(rows.shape[0], dtype=torch.float32, device=h.device)
    for start in range(0, rows.shape[0], chunk):
        z = model.logits(rows[start:start + chunk]).float()
        picked[start:start + chunk] = z.gather(1, y[start:start + chunk, None]).squeeze(1) - torch.logsumexp(z, -1)
    return _per_row(picked, index, batch)


def _per_row(values: torch.Tensor, index: torch.Tensor, batch: Batch) -> torch.Tensor:
    b, t = batch.labels.shape
    return torch.zeros(b, dtype=values.dtype, device=values.device).index_add_(0, index // t, values)


def leave_one_out(values: torch.Tensor, k: int) -> torch.Tensor:
    """[G * k] grouped values -> each minus the mean of the other k - 1 of its group."""
    g = values.view(-1, k)
    return ((g - (g.sum(1, keepdim=True) - g) / (k - 1)) if k > 1 else g - g).reshape(-1)


class RLOO(Objective):
    def __init__(self, student: Gemma, reference: Gemma, *, k: int, kl_coef: float, chunk: int = 1024,
                 attn_impl: str | None = None):
        super().__init__(student, chunk=chunk, attn_impl=attn_impl)
        self.reference, self.k, self.kl_coef = reference, k, kl_coef

    def models(self) -> list[Gemma]:
        return [self.student, self.reference]

    def count(self, batch: Batch) -> int:
        return batch.tokens.shape[0]  # targets are sequences

    def _shaped(self, batch: Batch, index, y):
        kl = batch.extra["policy_logp"] - _row_logprobs(self.reference, batch, index, y, self.chunk)
        return batch.extra["reward"] - self.kl_coef * kl, kl

    def loss(self, batch: Batch) -> LossSums:
        rows, y, index = select_rows(self.hidden(self.student, batch), batch.labels, IGNORE)
        shaped, kl = self._shaped(batch, index, y)
        advantage = leave_one_out(shaped, self.k)
        weights = advantage.index_select(0, index // batch.labels.shape[1])
        loss, _, entropy = policy_gradient_loss(rows, self.student, y, weights, chunk=self.chunk)
        length = batch.extra["length"]
        per_token_entropy = _per_row(entropy, index, batch) / length.clamp(min=1)
        return LossSums(loss, {"reward": batch.extra["reward"].sum(), "kl": kl.sum(),
                               "entropy": per_token_entropy.sum(), "length": length.sum()})

    @torch.no_grad()
    def evaluate(self, batch: Batch):
        real = (batch.labels != IGNORE).any(1).float()  # the loop blanks the labels of padding samples
        flat = batch.labels.reshape(-1)
        index = (flat != IGNORE).nonzero().squeeze(1)
        shaped, kl = self._shaped(batch, index, flat.index_select(0, index))
        return ((-shaped * real).sum().double(), real.sum(),
                {"reward": (batch.extra["reward"] * real).sum(), "kl": (kl * real).sum(),
                 "length": (batch.extra["length"] * real).sum()})
