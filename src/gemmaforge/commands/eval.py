"""``gemmaforge eval``: lm-eval's benchmarks on a gemmaforge model, with lm-eval's numbers (docs/evaluation.md).

    gemmaforge eval --tasks arc_easy,mmlu --data eval_data --limit 100 --output results/
    gemmaforge eval --model gemma-2-2b/ --tasks gsm8k,mbpp --data eval_data --batch-size 8

Data: ``DIR/TASK/SPLIT.parquet`` or ``.jsonl`` in the original Hugging Face datasets' columns
(``--data DIR``), or, without ``--data``, the Hugging Face datasets cache (offline). The data are read
and every prompt is built before the model loads, so bad input fails at once: one line, exit 2.
Prints a markdown table; ``--output DIR`` also writes lm-eval's results JSON and per-sample JSONL.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import GemmaforgeError
from .generate import add_model_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..eval.tasks import known_names

    p.add_argument("--tasks", required=True, help=f"comma-separated: {known_names()}")
    add_model_arguments(p)
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="few-shot examples per prompt (default: lm-eval's per task: 5 for gsm8k, 3 for mbpp, else 0)")
    p.add_argument("--limit", type=float, default=None,
                   help="evaluate the first N documents of each task (or a fraction, if below 1)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences scored or generated together (default 16)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="folder with TASK/SPLIT.parquet or .jsonl files (default: the HF datasets cache, offline)")
    p.add_argument("--output", default=None, metavar="DIR", help="write results.json and samples_TASK.jsonl here")
    p.add_argument("--code-timeout", type=float, default=3.0, help="mbpp: seconds per program (default 3, as lm-eval)")
    p.add_argument("--code-memory-mb", type=int, default=1024,
                   help="mbpp: address-space limit per program, MiB (default 1024)")


def run(args: argparse.Namespace) -> int:
    from ..eval.data import DataSource
    from ..eval.harness import check_limit, markdown_table, plan, run as run_plan, write_outputs
    from ..eval.sandbox import Limits, isolation

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise GemmaforgeError("--tasks is empty: name at least one task, e.g. --tasks arc_easy")
    check_limit(args.limit)
    if args.limit is not None and args.limit >= 1 and args.limit == int(args.limit):
        args.limit = int(args.limit)  # a count, as lm-eval records it
    if args.batch_size < 1:
        raise GemmaforgeError(f"--batch-size {args.batch_size} must be at least 1")
    if args.code_timeout <= 0 or args.code_memory_mb <= 0:
        raise GemmaforgeError("--code-timeout and --code-memory-mb must be positive")
    progress = sys.stderr.isatty()
    the_plan = plan(names, DataSource(args.data), num_fewshot=args.num_fewshot, limit=args.limit, progress=progress)
    if the_plan.skipped:
        print(f"gemmaforge eval: the data have no test documents for {len(the_plan.skipped)} MMLU subjects "
              f"(skipped: {', '.join(the_plan.skipped[:3])}{', ...' if len(the_plan.skipped) > 3 else ''})",
              file=sys.stderr)
    counts = {k: len(the_plan.requests(k)) for k in ("loglikelihood", "loglikelihood_rolling", "generate_until")}
    print("gemmaforge eval: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n)
          + f" requests over {len(the_plan.tasks)} tasks", file=sys.stderr)
    if any(t.spec.unsafe_code for t in the_plan.tasks):
        print(f"gemmaforge eval: mbpp runs the generated code in a sandbox: {isolation()}", file=sys.stderr)

    from ..eval.scorer import Scorer
    from .generate import load_model_and_tokenizer, make_engine

    model, tokenizer = load_model_and_tokenizer(args)
    engine = make_engine(model, args, new_tokens=the_plan.max_new_tokens())
    scorer = Scorer(model, tokenizer, batch_size=args.batch_size, engine=engine, progress=progress)
    model_args = {k: getattr(args, k) for k in ("tokenizer", "dtype", "device", "quant", "activations")
                  if getattr(args, k, None)}
    config = {"model": args.model or "embedded gemma3-270m", "model_args": model_args,
              "batch_size": args.batch_size, "device": str(engine.device), "limit": args.limit}
    out = run_plan(the_plan, scorer, limits=Limits(args.code_timeout, args.code_memory_mb << 20),
                   progress=progress, config=config)
    print(markdown_table(out.results))
    if args.output:
        paths = write_outputs(out, args.output)
        print(f"gemmaforge eval: wrote {paths[0]} and {len(paths) - 1} samples_*.jsonl", file=sys.stderr)
    return 0
