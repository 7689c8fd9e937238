"""``gemmaforge average SRC1 SRC2 [...] --out DIR [--weights w1,w2,...] [--method linear|slerp] [--base SRC]``:
average models of one config into an HF directory (train/averaging.py; docs/post_training.md).

Sources are anything ``gemmaforge.load`` reads (HF directories, .gguf files, preset names, ``default``
for the embedded model). The output appears atomically, with the sources' tokenizer when they carry one.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import GemmaforgeError


def add_arguments(p) -> None:
    p.add_argument("sources", nargs="+", metavar="SRC", help="models to average ('default' = the embedded model)")
    p.add_argument("--out", required=True, help="HF directory to write")
    p.add_argument("--weights", default=None, help="comma-separated, one per source (default: equal)")
    p.add_argument("--method", choices=("linear", "slerp"), default="linear")
    p.add_argument("--base", default=None, help="the model the sources were fine-tuned from (slerp: required)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args) -> int:
    from ..atomic import publish_dir
    from ..checkpoint.hf import save_pretrained
    from ..train.averaging import average

    out = Path(args.out)
    if out.exists() and not args.force:
        raise GemmaforgeError(f"{out} exists: choose another --out or pass --force to replace it")
    for src in args.sources + ([args.base] if args.base else []):
        if Path(src).exists() and Path(src).resolve() == out.resolve():
            raise GemmaforgeError(f"--out {out} is also a source: write the average somewhere else")
    weights = None
    if args.weights is not None:
        try:
            weights = [float(x) for x in args.weights.split(",")]
        except ValueError:
            raise GemmaforgeError(f"--weights {args.weights!r}: give numbers separated by commas, e.g. 0.3,0.7") from None
    model, tokenizer = average(args.sources, weights=weights, method=args.method, base=args.base)
    with publish_dir(out) as stage:  # weights and tokenizer appear together, or not at all
        save_pretrained(model, stage)
        if tokenizer is not None:
            tokenizer.save(stage / "tokenizer.json")
    print(f"gemmaforge: {args.method} average of {len(args.sources)} models -> {out}", file=sys.stderr)
    return 0
