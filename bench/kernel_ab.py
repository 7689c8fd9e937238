"""Two builds of the C kernel library side by side: this checkout's sources against a git revision's,
interleaved call by call in one process, so that a noisy machine's drift hits both alike.

    python bench/kernel_ab.py --against HEAD~1        # 2 threads; median ms of interleaved calls

Both builds must share the current C API (cpu_kernel.declare); the Python side is this checkout's for
both. Prints the CPU, then per weight of the embedded model (1 and 4 rows of x) and for whole native
decode steps (1 and 4 rows, positions 20-200 and 200-400, or 100 steps after a prefilled
``--context`` of N tokens; ``--no-steps`` for a revision whose decode-step structs differ). docs/quantization.md, "Fused multiply-adds", quotes its numbers.
"""

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import gemmaforge
from gemmaforge import cpu_kernel
from gemmaforge.benchmark import _cpu_name
from gemmaforge.generation.fast import FastForward

ROOT = Path(__file__).resolve().parents[1]


def library_at(rev: str, out: Path) -> ctypes.CDLL:
    """The library as ``rev``'s sources build it (cpu_kernel.build: the same compiler and flags)."""
    src = out / "src"
    src.mkdir(parents=True)
    for f in (*cpu_kernel.SOURCES, *cpu_kernel.HEADERS):
        show = subprocess.run(["git", "show", f"{rev}:src/gemmaforge/{f.name}"], cwd=ROOT, capture_output=True, text=True)
        if show.returncode == 0:  # a header the revision did not have yet is simply absent
            (src / f.name).write_text(show.stdout)
    cpu_kernel.build(cpu_kernel._compiler(), out / "lib.so", tuple(src / f.name for f in cpu_kernel.SOURCES))
    return cpu_kernel.declare(ctypes.CDLL(str(out / "lib.so")))


def interleaved(libs: dict, call, reps: int) -> dict[str, list[float]]:
    """Seconds of ``call(name, rep)`` per library, the libraries taking turns call by call; every
    caller of cpu_kernel.library() gets the library whose turn it is."""
    times = {n: [] for n in libs}
    real = cpu_kernel.library
    try:
        for rep in range(reps):
            for n, lib in libs.items():
                cpu_kernel.library = lambda lib=lib: lib  # noqa: E731
                t = time.perf_counter()
                call(n, rep)
                times[n].append(time.perf_counter() - t)
    finally:
        cpu_kernel.library = real
    return times


def median_ms(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e3:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", default="HEAD", help="git revision to compare with (default HEAD)")
    ap.add_argument("--no-steps", action="store_true",
                    help="weights only: for a revision whose decode-step structs (decode_step.c) differ")
    ap.add_argument("--context", type=int, default=0,
                    help="time 100 decode steps after a prompt of this many tokens (default: from position 0)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        libs = {args.against: library_at(args.against, Path(tmp)), "this checkout": cpu_kernel.library()}
        print(f"CPU: {_cpu_name()}, 2 threads; median ms of interleaved calls")
        model = gemmaforge.load(None)
        block = model.layers[0]
        weights = [("head", model.embed.table), ("qkv", block.attn.fused_qkv), ("gate/up", block.mlp.fused_gate_up),
                   ("down", block.mlp.down_proj), ("o", block.attn.o_proj)]
        print("| weight | rows | " + " | ".join(libs) + " |\n|---|---|---|---|")
        with torch.inference_mode():
            for name, w in weights:
                for rows in (1, 4):
                    x = torch.randn(rows, w.in_features)
                    times = interleaved(libs, lambda n, rep: w(x), 30 if name == "head" else 200)
                    print(f"| {name} {w.qtype} {w.in_features} x {w.out_features} | {rows} | "
                          + " | ".join(median_ms(v[1:]) for v in times.values()) + " |")
            if args.no_steps:
                return
            print("\n| native decode step | " + " | ".join(libs) + " |\n|---|---|---|")
            start = args.context
            for rows in (1, 4):
                forward = FastForward(model, compile=False)
                caches = {n: forward.new_cache(rows, max(512, start + 128)) for n in libs}
                if start:  # the same prompt in every row of both caches (a prefill: no kernel library call)
                    prompt = torch.randint(0, model.config.vocab_size, (1, start)).expand(rows, -1)
                    for cache in caches.values():
                        forward(prompt, torch.arange(start).expand(rows, -1), cache)
                tok = torch.full((rows, 1), 5)
                times = interleaved(libs, lambda n, i: forward(tok, torch.full((rows, 1), start + i), caches[n]),
                                    100 if start else 400)
                for lo, hi in ((1, 100),) if start else ((20, 200), (200, 400)):
                    print(f"| {rows} rows, positions {start + lo}-{start + hi} | "
                          + " | ".join(median_ms(v[lo:hi]) for v in times.values()) + " |")


if __name__ == "__main__":
    main()
