"""Sampling completions from the model being trained, through the generation engine.

On-policy training (gkd's student samples, rl's rollouts) generates with the same ``Engine`` and step
scheduler as every other consumer: batched over a pool of KV-cache rows, chunked prefill, per-row
sampling settings and seeds. ``k`` samples of one prompt are one ``Request(n=k)``, whose prompt is
prefilled once and forked into k rows. The engine runs under inference_mode and never changes the
model's train/eval mode, and it reads the live weights, so each call samples from the current policy.

Seeds are per prompt and given by the caller (a function of the sample number), so a resumed run
draws the same completions from the same weights. Log-probs are those of the raw logits
(``log_softmax`` at temperature 1, whatever the sampling temperature): the policy's own.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Collection, Sequence

from ..errors import GemmaforgeError


@dataclass(frozen=True)
class Rollout:
    tokens: list[int]  # the completion (its stop token included when one ended it)
    logprobs: list[float]  # log p(token) under the raw logits, per token
    stopped: bool  # ended by a stop token, not by the length budget


def require_one_process(what: str) -> None:
    """Sampling needs whole weights; FSDP shards them over processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise GemmaforgeError(f"{what} samples from the model being trained, which runs on one process: "
                              "run it without torchrun")


def sample(model, prompts: Sequence[Sequence[int]], params, seeds: Sequence[int], *, k: int = 1,
           stop_ids: Collection[int] = (), max_new_tokens: int) -> list[list[Rollout]]:
    """``k`` completions of every prompt, prompt i seeded by ``seeds[i]`` (its samples by the
    scheduler's per-sample seed), all prompts in one pool -> [prompt][sample]."""
    from ..generation import Engine, Request

    engine = Engine.for_model(model)
    width = max(len(p) for p in prompts)
    if width >= engine.context_length:
        raise GemmaforgeError(f"a prompt has {width} tokens, the model's context {engine.context_length}: shorten it")
    sched = engine.scheduler(len(prompts) * k, min(width + max_new_tokens, engine.context_length))
    params = dataclasses.replace(params, logprobs=max(params.logprobs, 1))  # turns on the sampled token's log-prob
    groups = [sched.submit(Request(list(p), dataclasses.replace(params, seed=int(seed) % 2**63), frozenset(stop_ids),
                                   max_new_tokens, n=k))
              for p, seed in zip(prompts, seeds)]
    while sched.has_work():
        sched.step()
    return [[Rollout(list(s.tokens), list(s.logprobs), s.finish_reason == "stop") for s in group] for group in groups]
