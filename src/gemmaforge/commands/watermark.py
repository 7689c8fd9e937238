"""``gemmaforge watermark``: SynthID-Text keys, detection and calibration (docs/watermark.md).

    gemmaforge watermark keygen --out keys.json                 # 30 secret keys, ngram_len 5
    gemmaforge generate "Write a poem" --watermark keys.json > poem.txt
    gemmaforge watermark detect --keys keys.json --file poem.txt --json
    {"tokens": 212, "mean_score": 0.63, "p_value": 1.2e-40, "watermarked": true}
    gemmaforge watermark calibrate --keys keys.json --n 64 --out docs/   # TPR at 1% FPR, ROC, perplexity

Only the tokenizer of ``--model`` is loaded for ``detect`` (the text must be tokenized as the
generating model did), so detection takes seconds.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import GemmaforgeError
from .generate import add_model_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    keygen = sub.add_parser("keygen", help="write a keys file with fresh secret keys")
    keygen.add_argument("--out", required=True, help="the keys file to write (JSON)")
    keygen.add_argument("--depth", type=int, default=30, help="tournament layers, one key each (default 30)")
    keygen.add_argument("--ngram-len", type=int, default=5, help="context length + 1 (default 5)")

    detect = sub.add_parser("detect", help="is a text watermarked with these keys?")
    detect.add_argument("text", nargs="?", default=None, metavar="TEXT", help="the text (or --file)")
    detect.add_argument("--file", default=None, metavar="F", help="read the text from F ('-' = stdin)")
    _keys_argument(detect)
    detect.add_argument("--model", default=None,
                        help="whose tokenizer the text was made with (default: the embedded model)")
    detect.add_argument("--tokenizer", default=None, help="tokenizer.json, tokenizer.model or .gguf (default: --model's)")
    detect.add_argument("--detector", choices=("mean", "weighted", "bayesian"), default="mean",
                        help="mean score (default), weighted mean, or a trained Bayesian detector")
    detect.add_argument("--detector-file", default=None, metavar="PATH",
                        help="the Bayesian detector (JSON from `calibrate --save-detector`, or a transformers "
                             "BayesianDetectorModel directory)")
    detect.add_argument("--fpr", type=float, default=0.01, help="false-positive rate of the verdict (default 0.01)")
    detect.add_argument("--json", action="store_true",
                        help='print {"tokens", "mean_score", "p_value", "watermarked"} as JSON')

    cal = sub.add_parser("calibrate", help="measure TPR at 1%% FPR vs length, the ROC and the perplexity cost")
    _keys_argument(cal)
    add_model_arguments(cal)  # --model, --tokenizer, --quant, ...: the model that generates
    cal.add_argument("--n", type=int, default=64, help="watermarked and plain completions each (default 64)")
    cal.add_argument("--lengths", default="50,100,200", help="text lengths in tokens (default 50,100,200)")
    cal.add_argument("--batch-size", type=int, default=32, help="completions generated together (default 32)")
    cal.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    cal.add_argument("--top-k", type=int, default=50, help="top-k of the sampling (default 50, transformers' default)")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--prompts", default=None, metavar="FILE", help="one prompt per line (default: built-in)")
    cal.add_argument("--out", default="calibration", help="directory for results.json and the plots")
    cal.add_argument("--completions", default=None, metavar="FILE",
                     help="re-score a previous run's completions.json instead of generating")
    cal.add_argument("--save-detector", default=None, metavar="PATH", help="also save the trained Bayesian detector")


def _keys_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys", required=True, metavar="KEYFILE",
                   help='JSON {"keys": [...], "ngram_len": 5, ...} (docs/watermark.md)')


def run(args: argparse.Namespace) -> int:
    return {"keygen": _keygen, "detect": _detect, "calibrate": _calibrate}[args.action](args)


def _keygen(args) -> int:
    from ..watermark import WatermarkConfig

    config = WatermarkConfig.random(args.depth, ngram_len=args.ngram_len)
    config.save(args.out)
    print(f"wrote {args.depth} keys to {args.out}: keep it private, anyone with it can detect and forge the mark",
          file=sys.stderr)
    return 0


def _read_text(args) -> str:
    if (args.text is None) == (args.file is None):
        raise GemmaforgeError("give the text to check, either as an argument or with --file F (not both)")
    if args.text is not None:
        return args.text
    if args.file == "-":
        return sys.stdin.read()
    try:
        with open(args.file, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise GemmaforgeError(f"text file {args.file} not found") from None
    except UnicodeDecodeError:
        raise GemmaforgeError(f"{args.file} is not UTF-8 text") from None


def _tokenizer(args):
    from .. import load_tokenizer
    from ..config import PRESETS

    if args.tokenizer is None and args.model in PRESETS:
        raise GemmaforgeError(f"preset {args.model!r} has no tokenizer: pass --tokenizer (a .gguf or tokenizer.json)")
    return load_tokenizer(args.tokenizer or args.model)


def _detect(args) -> int:
    from ..watermark import BayesianDetector, Detector, WatermarkConfig

    text = _read_text(args)
    wm = WatermarkConfig.load(args.keys).watermark()
    bayesian = BayesianDetector.load(args.detector_file) if args.detector_file else None
    detector = Detector(wm, args.detector, bayesian=bayesian, fpr=args.fpr)
    result = detector.detect_text(text, _tokenizer(args))
    if args.json:
        print(json.dumps(result.as_json()))
    else:
        verdict = "watermarked" if result.watermarked else "not watermarked"
        extra = "" if args.detector == "mean" else f", {args.detector} score {result.score:.4g}"
        print(f"{verdict} at {args.fpr:g} false-positive rate: mean score {result.mean_score:.4f}, "
              f"p = {result.p_value:.3g}{extra} ({result.tokens} tokens, {result.scored} scored)")
    return 0


def _calibrate(args) -> int:
    from ..watermark.calibrate import run_calibration

    return run_calibration(args)
