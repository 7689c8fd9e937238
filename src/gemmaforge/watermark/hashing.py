"""The SynthID-Text hash and sampling table, bit for bit as transformers computes them.

docs/reference.md section 8: a running hash ``h = (h + x) * 6364136223846793005 + 1`` with int64
wrap-around (a linear congruential generator with newlib/musl's multiplier), starting at 1, over the
context tokens, then the candidate token, then one key per tournament layer; the g-value is
``table[h mod size]`` for a table of fair coin flips drawn once from a seeded torch generator.
"""

from __future__ import annotations

import torch

MULTIPLIER = 6364136223846793005
INCREMENT = 1


def accumulate_hash(current: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """current [...] int64, data [..., T] -> the hash after feeding data's T values in order.

    ``f(h, data[:T]) == f(f(h, data[:T-1]), data[T-1:])``, so a hash can be extended token by token.
    int64 arithmetic in torch wraps modulo 2**64, which is the LCG's arithmetic."""
    for i in range(data.shape[-1]):
        current = (current + data[..., i]) * MULTIPLIER + INCREMENT
    return current


def context_hash(context: torch.Tensor) -> torch.Tensor:
    """[R, ngram_len - 1] context tokens -> [R] their hash (what the repetition check compares)."""
    start = torch.ones(context.shape[:-1], dtype=torch.long, device=context.device)
    return accumulate_hash(start, context)


def sampling_table(size: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[size] int64 of 0/1: ``torch.randint(0, 2, (size,))`` from a generator on ``device`` seeded
    with ``seed``, as transformers draws it. The draw depends on the generator's device (CPU
    mt19937 vs CUDA Philox), so the table is a property of (seed, device): see docs/watermark.md."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(0, 2, (size,), generator=generator, device=device)
