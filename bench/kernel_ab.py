"""Two builds of the C kernel library side by side: this checkout's sources against a git revision's,
interleaved call by call in one process, so that a noisy machine's drift hits both alike.

    python bench/kernel_ab.py --against HEAD~1        # 2 threads; median ms of interleaved calls

Both builds must share the current C API (the argtypes cpu_kernel.py sets); the Python side is this
checkout's for both. Prints the CPU, then per weight of the embedded model (1 and 4 rows of x) and
for whole native decode steps (1 and 4 rows, positions 20-200 and 200-400). docs/quantization.md,
"Fused multiply-adds", quotes its numbers.
"""

import argparse
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
PKG = "src/gemmaforge"


def build_at(rev: str, out: Path) -> Path:
    """The library as ``rev``'s sources build it (same flags as cpu_kernel.py)."""
    src = out / rev.replace("/", "_")
    src.mkdir(parents=True, exist_ok=True)
    for f in (*cpu_kernel.SOURCES, *cpu_kernel.HEADERS):
        show = subprocess.run(["git", "show", f"{rev}:{PKG}/{f.name}"], cwd=ROOT, capture_output=True, text=True)
        if show.returncode == 0:  # a header the old revision did not have is simply absent
            (src / f.name).write_text(show.stdout)
    lib = src / "lib.so"
    cc = cpu_kernel._compiler()
    subprocess.run([cc, *cpu_kernel.FLAGS, *(str(src / f.name) for f in cpu_kernel.SOURCES), "-o", str(lib), "-lm"],
                   check=True)
    return lib


def load(path: Path):
    """A ctypes handle with cpu_kernel's argtypes, loaded through the same code path."""
    lib = cpu_kernel.library()
    other = type(lib)(str(path))
    for name in ("gf_block_gemv", "gf_dequantize", "gf_decode_layers", "gf_amx_takes", "gf_amx_init"):
        getattr(other, name).argtypes = getattr(lib, name).argtypes
        getattr(other, name).restype = getattr(lib, name).restype
    return other


def interleaved(libs: dict, call, reps: int) -> dict[str, float]:
    times = {n: [] for n in libs}
    for _ in range(reps):
        for n, lib in libs.items():
            cpu_kernel.library = lambda lib=lib: lib  # noqa: E731 (what every caller asks for)
            t = time.perf_counter()
            call(n)
            times[n].append(time.perf_counter() - t)
    return {n: statistics.median(v[1:]) * 1e3 for n, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", default="HEAD", help="git revision to compare with (default HEAD)")
    ap.add_argument("--no-steps", action="store_true",
                    help="weights only: for a revision whose decode-step structs (decode_step.c) differ")
    args = ap.parse_args()
    torch.set_num_threads(2)
    here = cpu_kernel.library()
    with tempfile.TemporaryDirectory() as tmp:
        libs = {args.against: load(build_at(args.against, Path(tmp))), "this checkout": here}
        real_library = cpu_kernel.library  # restored at the end: interleaved() swaps it
        print(f"CPU: {_cpu_name()}, 2 threads; median ms of interleaved calls, {args.against} | this checkout")
        model = gemmaforge.load(None)
        weights = [("head", model.embed.table)] + [
            (n, getattr(parent, n)) for parent, n in ((model.layers[0].attn, "fused_qkv"), (model.layers[0].mlp, "fused_gate_up"),
                                                      (model.layers[0].mlp, "down_proj"), (model.layers[0].attn, "o_proj"))]
        print("| weight | rows | " + " | ".join(libs) + " |\n|---|---|---|---|")
        with torch.inference_mode():
            for name, w in weights:
                for rows in (1, 4):
                    x = torch.randn(rows, w.in_features)
                    ms = interleaved(libs, lambda _: w(x), 30 if name == "head" else 200)
                    print(f"| {name} {w.qtype} {w.in_features} x {w.out_features} | {rows} | "
                          + " | ".join(f"{v:.3f}" for v in ms.values()) + " |")
            print("\n| native decode step | " + " | ".join(libs) + " |\n|---|---|---|")
            for rows in () if args.no_steps else (1, 4):
                forward = FastForward(model, compile=False)
                caches = {n: forward.new_cache(rows, 512) for n in libs}
                tok = torch.full((rows, 1), 5)
                times = {n: [] for n in libs}
                for i in range(400):
                    for n, lib in libs.items():
                        cpu_kernel.library = lambda lib=lib: lib  # noqa: E731
                        t = time.perf_counter()
                        forward(tok, torch.full((rows, 1), i), caches[n])
                        times[n].append(time.perf_counter() - t)
                for lo, hi in ((20, 200), (200, 400)):
                    print(f"| {rows} rows, positions {lo}-{hi} | "
                          + " | ".join(f"{statistics.median(v[lo:hi]) * 1e3:.2f}" for v in times.values()) + " |")
        cpu_kernel.library = real_library


if __name__ == "__main__":
    main()
