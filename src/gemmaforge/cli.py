"""``gemmaforge`` command line: a thin dispatcher over ``gemmaforge.commands.<name>`` modules.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int | None`` and is imported
only when used, so ``gemmaforge --help`` stays fast. Errors a user can fix (``GemmaforgeError``, a
missing file, bad flag values) print one line and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import GemmaforgeError

COMMANDS = {
    "generate": "continue prompts with a model (default: the embedded Gemma 3 270M)",
    "chat": "interactive chat with the Gemma turn template",
    "serve": "OpenAI-compatible HTTP server with continuous batching (docs/serving.md)",
    "info": "show a model's config, parameter count, layer types, KV bytes per token, dtypes",
    "convert": "convert checkpoints between HF directories and GGUF",
    "bench": "measure prefill/decode speed against HF transformers and llama.cpp",
    "prepare-data": "tokenize text/JSONL/parquet into memory-mapped token shards",
    "train": "pre-train or fine-tune from a YAML config",
    "distill": "knowledge distillation from a teacher (live or cached logits)",
    "eval": "lm-eval's benchmarks (MMLU, ARC, HellaSwag, GSM8K, MBPP, ...) with lm-eval's numbers",
    "watermark": "SynthID-Text watermark: keygen, detect, calibrate (docs/watermark.md)",
    "sft": "supervised fine-tuning on chat JSONL, loss on the model's replies (docs/post_training.md)",
    "gkd": "on-policy distillation: generalized JSD on the student's own samples and the dataset's",
    "average": "average models: weighted linear, or slerp of task vectors relative to --base (WARP)",
    "reward": "train a Bradley-Terry reward model on preference pairs",
    "reward-score": "score preference pairs or single completions with a reward model",
    "rl": "RLOO with a KL penalty to the frozen reference; rollouts through the engine",
    "compare": "side-by-side comparison of two models rated by a judge model (LLM Comparator JSON + HTML)",
}


def _module(name: str):
    return importlib.import_module(f"gemmaforge.commands.{name.replace('-', '_')}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="gemmaforge", description="Gemma 2 / Gemma 3 in plain PyTorch")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the command being run pays for its imports
            _module(name).add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return int(_module(args.command).run(args) or 0)
    except KeyboardInterrupt:
        print("gemmaforge: interrupted", file=sys.stderr)
        return 130
    except (GemmaforgeError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        if args.debug:
            raise
        print(f"gemmaforge: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
