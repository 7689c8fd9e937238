# not "kernels.py": a script run from bench/ would shadow the `kernels` package transformers imports
"""The block-quantized matmul kernels side by side on the embedded model's weight shapes, one process:
the AMX tiles (amx_gemm.c), the AVX-512 kernel (block_gemv.c, AMX off) and dequantize + sgemm
(``BlockQuantLinear._chunked``, 16 rows or more), by number of rows of x.

    python bench/quant_kernels.py              # 2 threads; best of 20 calls per cell, ms

Random codes in the weights' ranges; prints the CPU and whether AMX is on (docs/quantization.md,
"On AMX tiles, still exact", quotes its table). Without AMX the AMX column repeats the AVX one.
Then the whole embedded model, AMX on against off in the same process: a 128-token prefill and one
native decode step over 4, 8 and 16 rows (ms, best of 5).
"""

import time

import torch

from gemmaforge import cpu_kernel
from gemmaforge.benchmark import _cpu_name
from gemmaforge.gguf_quant import BlockQuantLinear

SHAPES = [  # name, K, N, group, offsets (the embedded Q4_K_M file's types)
    ("gate/up Q5_0", 640, 4096, 32, False),
    ("qkv Q5_0", 640, 1536, 32, False),
    ("o Q4_K", 1024, 640, 32, True),
    ("down Q6_K", 2048, 640, 16, False),
    ("down Q4_K", 2048, 640, 32, True),
    ("head Q8_0", 640, 262144, 32, False),
]
ROWS = (1, 2, 4, 8, 16, 128)


def best_ms(f, n=20) -> float:
    f()
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    torch.set_num_threads(2)
    amx = cpu_kernel.use_amx(True)
    print(f"CPU: {_cpu_name()}, 2 threads, AMX {'on' if amx else 'not available'}")
    print("| weight (K x N) | rows | AMX ms | AVX-512 ms | dequantize + sgemm ms |")
    print("|---|---|---|---|---|")
    for name, k, n, gs, offset in SHAPES:
        codes = torch.randint(-32, 32, (n, k), dtype=torch.int8)
        scale = torch.rand(n, k // gs) * 0.01
        off = torch.randn(n, k // gs) * 0.01 if offset else None
        lin = BlockQuantLinear(codes, scale, off, gs)
        for m in ROWS if n < 100_000 else (1, 2, 4, 8, 16):  # the head sees one row at prefill
            x = torch.randn(m, k)
            gemv = lambda: cpu_kernel.run_block_gemv(x, codes, scale, off)  # noqa: E731
            cpu_kernel.use_amx(amx)
            a = best_ms(gemv, 5 if n > 100_000 else 20)
            cpu_kernel.use_amx(False)
            b = best_ms(gemv, 5 if n > 100_000 else 20)
            c = f"{best_ms(lambda: lin._chunked(x)):.3f}" if m >= 16 and n < 100_000 else "-"
            print(f"| {name} {k} x {n} | {m} | {a:.3f} | {b:.3f} | {c} |")
    cpu_kernel.use_amx(amx)
    model_steps(amx)


def model_steps(amx: bool) -> None:
    import gemmaforge
    from gemmaforge.generation.fast import FastForward

    model = gemmaforge.load(None)  # the embedded Q4_K_M file, as stored
    forward = FastForward(model, compile=False)
    forward.native.max_rows = 16
    tokens = torch.randint(2, 10000, (1, 128), generator=torch.Generator().manual_seed(0))

    def prefill():
        forward(tokens, torch.arange(128)[None], model.new_cache(1, 129))

    def step(rows):
        cache = forward.new_cache(rows, 256)
        tok = torch.full((rows, 1), 5)
        for i in range(3):  # a short context in every row
            forward(tok, torch.full((rows, 1), i), cache)
        return lambda: forward(tok, torch.full((rows, 1), 3), cache)

    print("\n| embedded model, ms | AMX on | AMX off |\n|---|---|---|")
    with torch.inference_mode():
        cases = [("prefill 128 tokens", prefill)] + [(f"decode step, {r} rows", step(r)) for r in (4, 8, 16)]
        for name, f in cases:
            cpu_kernel.use_amx(amx)
            on = best_ms(f, 5)
            cpu_kernel.use_amx(False)
            off = best_ms(f, 5)
            print(f"| {name} | {on:.1f} | {off:.1f} |")
    cpu_kernel.use_amx(amx)


if __name__ == "__main__":
    main()
