"""``gemmaforge bench``: prefill / decode speed of gemmaforge, HF transformers and llama.cpp.

    gemmaforge bench                                   # the embedded Gemma 3 270M, all variants
    gemmaforge bench --variants gemmaforge:int4,hf:fp32 --new-tokens 16 --out bench.json
    gemmaforge bench serve --help                      # the serving benchmark (commands/bench_serve.py)
    gemmaforge bench eval --help                       # gemmaforge eval against lm-eval's HF backend (eval/bench.py)

Prints a markdown table (ratios against HF transformers float32) and writes the full report as JSON.
What each column means is in ``gemmaforge.benchmark``; recorded results are in docs/benchmarks.md.
The GPU benchmark is a separate script: bench/gpu_inference.py.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from ..benchmark import DEFAULT_VARIANTS, BenchSettings, run_benchmark, write_json
from ..benchmark_report import format_table
from ..errors import GemmaforgeError


def add_arguments(p: argparse.ArgumentParser) -> None:
    # `bench serve` is a sub-mode with its own flags; without the word, `bench` is the inference benchmark
    modes = p.add_subparsers(dest="bench_mode", metavar="{serve,eval}")
    serve_help = "streaming load against gemmaforge serve, llama-server and llama_cpp.server"
    from . import bench_serve

    bench_serve.add_arguments(modes.add_parser("serve", help=serve_help, description=serve_help))
    eval_help = "gemmaforge eval against lm-eval's HF backend: samples/s and identical scores"
    from ..eval import bench as bench_eval

    bench_eval.add_arguments(modes.add_parser("eval", help=eval_help, description=eval_help))
    d = BenchSettings()
    p.add_argument("--model", default=None,
                   help="HF directory, .gguf file or preset name (default: the embedded Gemma 3 270M)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated backend:precision list (default: %(default)s)")
    p.add_argument("--prompt-len", type=int, default=d.prompt_len, help="prompt tokens (default %(default)s)")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens, help="tokens generated (default %(default)s)")
    p.add_argument("--batch", type=int, default=d.batch, help="rows of the batched decode (default %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads, every backend (default %(default)s)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed runs, best kept (default %(default)s)")
    p.add_argument("--rounds", type=int, default=d.rounds,
                   help="run the variant list this many times, round-robin, and report the best and every "
                        "round (for a machine whose speed drifts; default %(default)s)")
    p.add_argument("--ppl-chars", type=int, default=d.ppl_chars,
                   help="characters of the fixed text scored for perplexity (0 = skip)")
    p.add_argument("--e2e-tokens", type=int, default=d.e2e_tokens,
                   help="end-to-end wall time of `gemmaforge generate` vs llama.cpp making this many tokens "
                        "from a fresh process, on the source GGUF (0 = skip; default %(default)s)")
    p.add_argument("--no-isolate", action="store_true",
                   help="run every variant in this process (faster; no per-variant peak memory)")
    p.add_argument("--workdir", default=None,
                   help="where the converted HF/GGUF copies are kept between runs (default: the cache dir)")
    p.add_argument("--out", default="bench-inference.json", help="JSON report path (default %(default)s)")


def _default_workdir(model) -> Path:
    from ..default_model import cache_dir

    key = hashlib.sha256(str(Path(model).resolve() if model and Path(model).exists() else model).encode())
    return cache_dir() / "bench" / key.hexdigest()[:12]


def run(args: argparse.Namespace) -> int:
    if args.bench_mode == "serve":
        from . import bench_serve

        return bench_serve.run(args)
    if args.bench_mode == "eval":
        from ..eval import bench as bench_eval

        return bench_eval.run(args)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if not variants:
        raise GemmaforgeError("--variants is empty: give at least one backend:precision, e.g. gemmaforge:fp32")
    settings = BenchSettings(prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch=args.batch,
                             threads=args.threads, repeats=args.repeats, ppl_chars=args.ppl_chars,
                             variants=variants, e2e_tokens=args.e2e_tokens, isolate=not args.no_isolate,
                             rounds=args.rounds)
    workdir = Path(args.workdir) if args.workdir else _default_workdir(args.model)
    report = run_benchmark(args.model, settings, workdir)
    print(format_table(report))
    write_json(report, args.out)
    print(f"wrote {args.out}")
    return 0
