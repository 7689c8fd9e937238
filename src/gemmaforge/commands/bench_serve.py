"""``gemmaforge bench serve``: streaming load against ``gemmaforge serve``, ``llama-server`` and
``python -m llama_cpp.server`` on the same GGUF file and thread count.

    gemmaforge bench serve                                     # all three, C = 1,4,8,16
    gemmaforge bench serve --targets gemmaforge --concurrency 1,8 --requests 8
    gemmaforge bench serve --targets http://127.0.0.1:8000     # a server that is already running

Prints a markdown table (ratios against llama-server at the same concurrency) and writes the full
report as JSON. What each column means is in ``gemmaforge.serve_bench``; recorded results are in
docs/benchmarks.md ("Serving").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import GemmaforgeError
from ..serve_bench import QUANTS, TARGETS, ServeBenchSettings


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ServeBenchSettings()
    p.add_argument("--model", default=None, help="the GGUF file every target serves (default: the embedded Gemma 3 270M)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help="comma-separated: gemmaforge, llama-server, llama-cpp-python, or URLs of running servers "
                        "(default: %(default)s)")
    p.add_argument("--concurrency", default=",".join(map(str, d.concurrency)),
                   help="concurrent streaming clients, one level each (default: %(default)s)")
    p.add_argument("--requests", type=int, default=d.requests, help="requests per level (default %(default)s)")
    p.add_argument("--prompt-tokens", default="{}-{}".format(*d.prompt_tokens),
                   help="prompt length range MIN-MAX or N, drawn with --seed (default %(default)s)")
    p.add_argument("--output-tokens", default="{}-{}".format(*d.output_tokens),
                   help="max_tokens range MIN-MAX or N; EOS is ignored so each request makes exactly that many "
                        "(default %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads of every server (default %(default)s)")
    p.add_argument("--quant", choices=QUANTS, default=d.quant,
                   help="gemmaforge serve --quant (default %(default)s: the GGUF file as stored, like llama.cpp)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default=d.compile,
                   help="gemmaforge serve --compile (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="prompt/output length draws (default %(default)s)")
    p.add_argument("--llama-server", default=None,
                   help="the llama-server binary (default: $LLAMA_SERVER, else llama-server on PATH)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the Engine's own batch-1 decode speed (the C=1 comparison)")
    p.add_argument("--no-warmup", action="store_true", help="time each level from a cold start")
    p.add_argument("--startup-timeout", type=float, default=d.startup_timeout_s,
                   help="seconds a server may take to answer its health route (default %(default)s)")
    p.add_argument("--logdir", default=None, help="keep the servers' logs here (default: a temporary folder)")
    p.add_argument("--out", default="bench-serve.json", help="JSON report path (default %(default)s)")


def _int_list(flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise GemmaforgeError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise GemmaforgeError(f"{flag} is empty: give at least one value, e.g. 1,4,8")
    return values


def _range(flag: str, text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        pair = (int(lo), int(hi if sep else lo))
    except ValueError:
        raise GemmaforgeError(f"{flag} must be MIN-MAX or N (tokens), got {text!r}") from None
    return pair


def run(args: argparse.Namespace) -> int:
    from ..serve_bench import run_serve_benchmark
    from ..serve_bench_report import format_summary, format_table
    from ..benchmark import write_json

    settings = ServeBenchSettings(
        concurrency=_int_list("--concurrency", args.concurrency), requests=args.requests,
        prompt_tokens=_range("--prompt-tokens", args.prompt_tokens),
        output_tokens=_range("--output-tokens", args.output_tokens), threads=args.threads, quant=args.quant,
        compile=args.compile, seed=args.seed, targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        warmup=not args.no_warmup, reference=not args.no_reference, startup_timeout_s=args.startup_timeout)
    report = run_serve_benchmark(settings, args.model, args.llama_server,
                                 Path(args.logdir) if args.logdir else None)
    print(format_table(report))
    print()
    print(format_summary(report))
    write_json(report, args.out)
    print(f"wrote {args.out}")
    return 0
