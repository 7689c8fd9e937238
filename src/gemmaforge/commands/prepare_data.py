"""``gemmaforge prepare-data INPUTS... --out DIR``: tokenize text / JSONL / parquet into token shards.

Rerunning the same command after an interruption resumes it; see train/data.py for the format.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="+", help=".txt/.md files (one document each), .jsonl or .parquet, or directories")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer: .gguf, tokenizer.model, tokenizer.json or a directory (default: the embedded model's)")
    parser.add_argument("--field", default="text", help="JSONL key / parquet column holding the text (default: text)")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default: 0.01)")
    parser.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard (default: 16M)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..train.data import prepare_data

    meta = prepare_data(args.inputs, args.out, args.tokenizer, field=args.field, val_fraction=args.val_fraction,
                        shard_tokens=args.shard_tokens, progress=not args.no_progress)
    s = meta["splits"]
    print(f"gemmaforge: {meta['documents']:,} documents -> train {s['train']['tokens']:,} tokens "
          f"({s['train']['docs']:,} docs), val {s['val']['tokens']:,} tokens ({s['val']['docs']:,} docs) in {args.out}")
    return 0
