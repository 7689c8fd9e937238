"""A/B of one decode step on a server-sized pool: the whole pool (the scheduler before issue 10's
rows-0..last-busy change) against the live rows only (KVCache.prefix), interleaved in one process.

    python bench/pool_rows.py            # embedded model, --quant int4, 2 threads, 16-row pool

One row holds a 160-token context; the other 15 rows are idle (position -1). Prints steps/s of
each side per round and the best-of-rounds ratio (docs/benchmarks.md, "Serving").
"""

import time

import torch

import gemmaforge
from gemmaforge.generation import Engine
from gemmaforge.quant import quantize

ROWS, CONTEXT, STEPS, ROUNDS = 16, 160, 20, 3


def main() -> None:
    torch.set_num_threads(2)
    model = quantize(gemmaforge.load(None, dtype=torch.float32), "int4")
    engine = Engine(model)
    cache = engine.new_cache(ROWS, 1024, 16)
    engine.forward(torch.arange(2, 2 + CONTEXT)[None], torch.arange(CONTEXT)[None], cache, rows=slice(0, 1))
    pos = CONTEXT

    def step(width: int) -> None:
        nonlocal pos
        tokens = torch.zeros(width, 1, dtype=torch.long)
        positions = torch.full((width, 1), -1)
        tokens[0, 0], positions[0, 0] = 5, pos
        engine.forward(tokens, positions, cache, rows=None if width == ROWS else slice(0, width))
        pos += 1

    for width in (ROWS, 1):  # compile both batch sizes first
        for _ in range(3):
            step(width)
    rates = {ROWS: [], 1: []}
    for _ in range(ROUNDS):  # interleaved: both sides see the same load
        for width in (ROWS, 1):
            t = time.perf_counter()
            for _ in range(STEPS):
                step(width)
            rates[width].append(STEPS / (time.perf_counter() - t))
    print(f"whole pool ({ROWS} rows) steps/s:", [round(r, 1) for r in rates[ROWS]])
    print("live row only steps/s:", [round(r, 1) for r in rates[1]])
    print(f"best-of-{ROUNDS} ratio: {max(rates[1]) / max(rates[ROWS]):.2f}x")


if __name__ == "__main__":
    main()
