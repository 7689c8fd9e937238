"""``gemmaforge compare``: two models answer the same prompts; a judge model rates each pair twice.

    gemmaforge compare --model-a embedded --model-b embedded --quant-b int4 \\
        --prompts prompts.jsonl --judge embedded --out cmp/
    # cmp/comparison.json: open it in LLM Comparator; cmp/report.html: open it in any browser

``prompts.jsonl``: one ``{"prompt": "...", "tags": ["..."]}`` per line. docs/compare.md has the rest.
"""

from __future__ import annotations

import argparse

from .generate import QUANTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    for side in ("a", "b"):
        p.add_argument(f"--model-{side}", required=True, metavar="SRC",
                       help=f"model {side.upper()}: HF directory, .gguf, or 'embedded' (the embedded Gemma 3 270M)")
        p.add_argument(f"--quant-{side}", choices=QUANTS, default="auto",
                       help=f"weights of model {side.upper()} (as generate --quant)")
        p.add_argument(f"--name-{side}", default=None, help=f"model {side.upper()}'s name in the report")
    p.add_argument("--prompts", required=True, metavar="FILE.jsonl", help='one {"prompt": ..., "tags": [...]} per line')
    p.add_argument("--judge", required=True, metavar="SRC", help="the judge model (any source, or 'embedded')")
    p.add_argument("--judge-quant", choices=QUANTS, default="auto")
    p.add_argument("--out", required=True, metavar="DIR", help="where comparison.json and report.html go")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="answers' sampling temperature (default 0: greedy)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge-temperature", type=float, default=0.0, help="judge's first try (default 0: greedy)")
    p.add_argument("--judge-max-new-tokens", type=int, default=192)
    p.add_argument("--retries", type=int, default=2,
                   help="times an unparsable judge answer is asked again, sampled (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="as generate --compile")


def run(args: argparse.Namespace) -> int:
    from ..compare.run import run_compare

    return run_compare(args)
