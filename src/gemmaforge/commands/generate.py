"""``gemmaforge generate``: continue prompts given as arguments, or one per line on stdin.

    gemmaforge generate "The capital of France is" --max-new-tokens 8
    printf 'Hello\\nOnce upon a time\\n' | gemmaforge generate --temperature 0.8 --seed 1 --json

On a terminal the prompt is echoed and the completion streams as it is generated; into a pipe or
file each completion is printed whole (one per prompt, or as JSON lines with ``--json``), and all
prompts are generated in batches. Also home of the model/sampling flags ``chat`` shares.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import GemmaforgeError

_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}
QUANTS = ("auto", "none", "gguf", "int8", "int8-h4", "int4")  # quant.load_quantized


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF directory, .gguf file or preset name (default: the embedded Gemma 3 270M)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json, tokenizer.model or .gguf (default: the one inside --model)")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on GPU; a quantized GGUF on "
                        "the CPU keeps its own quantization unless a dtype is given, see --quant)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--quant", choices=QUANTS, default="auto",
                   help="weights: auto (default) = a quantized GGUF file keeps its own quantization on the "
                        "CPU (its exact values, the fastest path: docs/quantization.md), anything else its "
                        "dtype; none = dequantize to --dtype; gguf = require the file's quantization; "
                        "int8 / int8-h4 / int4 = re-quantize the float weights (docs/benchmarks.md)")
    p.add_argument("--activations", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="precision of the activations entering --quant matmuls: auto = each mode's measured "
                        "default (int8 float32, int4 bfloat16; docs/benchmarks.md)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the decode step: auto = on a GPU, and on CPU for --quant models "
                        "when generating >= 2048 tokens in all (chat: always); costs 30-60 s the first "
                        "time, ~15 s once inductor has cached it, then decodes ~1.7x faster. A quantized "
                        "GGUF file kept as stored (the default) decodes through the native C step "
                        "instead: no compilation, faster than compiled")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (HF generate semantics)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus: smallest set with this mass (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the best (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when TEXT appears (not printed); repeatable; \\n and \\t are understood")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="text to continue (default: read lines from stdin)")
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt: {prompt, completion}")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (pipe mode)")
    p.add_argument("--watermark", default=None, metavar="KEYFILE",
                   help="watermark the completions with SynthID-Text keys from this JSON file (docs/watermark.md); "
                        "check with `gemmaforge watermark detect --keys KEYFILE`")


def unescape(text: str) -> str:
    r"""``\n`` -> newline, ``\t`` -> tab, ``\\`` -> backslash: a shell cannot easily pass a raw newline."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def sampling_params(args: argparse.Namespace):
    from ..generation import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, max_new_tokens=args.max_new_tokens,
        stop=tuple(unescape(s) for s in args.stop),
    )


def load_model_and_tokenizer(args: argparse.Namespace):
    """The model and its tokenizer; a GGUF or an HF directory carries both, a preset needs --tokenizer."""
    from .. import load_tokenizer
    from ..quant import load_quantized
    from ..config import PRESETS

    if args.tokenizer is None and args.model in PRESETS:
        raise GemmaforgeError(f"preset {args.model!r} has no tokenizer: pass --tokenizer (a .gguf or tokenizer.json)")
    if sys.stderr.isatty():
        print("gemmaforge: loading the model...", file=sys.stderr, flush=True)
    model = load_quantized(args.model, args.quant, dtype=args.dtype, device=args.device,
                           activations=args.activations)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise GemmaforgeError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}:"
            " pass the tokenizer that belongs to this model (--tokenizer)"
        )
    return model, tokenizer


# Compiling the quantized CPU step costs ~14 s even with inductor's cache warm (tracing) and saves
# ~10 ms per token (docs/benchmarks.md): below ~1,400 new tokens a one-shot run is faster eagerly.
COMPILE_PAYS_OFF_TOKENS = 2048


def make_engine(model, args: argparse.Namespace, new_tokens: int | None = None):
    """The generation engine for ``--compile``; says so on stderr when the first step will compile.

    ``new_tokens``: how many tokens this run will decode at most (a one-shot run); with
    ``--compile auto`` a CPU run below COMPILE_PAYS_OFF_TOKENS is not compiled."""
    from ..generation import Engine

    compile = {"auto": None, "on": True, "off": False}[args.compile]
    cpu = model.final_norm.weight.device.type == "cpu"
    if compile is None and cpu and new_tokens is not None and new_tokens < COMPILE_PAYS_OFF_TOKENS:
        compile = False
    engine = Engine(model, compile=compile)
    if engine.fast is not None and engine.fast.compiled_for(1) and sys.stderr.isatty():
        print("gemmaforge: the first token compiles the decode step (30-60 s the first time, ~15 s once "
              "cached; --compile off skips it)", file=sys.stderr, flush=True)
    return engine


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts:
        prompts = list(args.prompts)
    elif sys.stdin.isatty():
        raise GemmaforgeError("no prompt: pass the text as an argument, or pipe prompts on stdin (one per line)")
    else:
        prompts = [line.rstrip("\r\n") for line in sys.stdin]
        prompts = [p for p in prompts if p.strip()]
        if not prompts:
            raise GemmaforgeError("stdin held no prompt (only empty lines): give at least one line of text")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise GemmaforgeError(f"prompt {i + 1} is empty: give some text to continue")
    return prompts


def run(args: argparse.Namespace) -> int:
    from ..generation import generate, stream

    params = sampling_params(args)  # checked before the slow model load
    if args.batch_size < 1:
        raise GemmaforgeError(f"invalid --batch-size {args.batch_size}: it must be >= 1")
    prompts = _read_prompts(args)
    keys = None
    if args.watermark is not None:
        from ..watermark import WatermarkConfig

        keys = WatermarkConfig.load(args.watermark)  # a bad keys file fails before the slow model load
    model, tokenizer = load_model_and_tokenizer(args)
    engine = make_engine(model, args, new_tokens=len(prompts) * params.max_new_tokens)
    watermark = keys.watermark(engine.device) if keys is not None else None
    out = sys.stdout
    if out.isatty() and not args.json:
        for prompt in prompts:
            out.write(f"\033[2m{prompt}\033[0m" + ("\n" if args.chat else ""))
            for piece in stream(engine, tokenizer, prompt, chat=args.chat, params=params, watermark=watermark):
                out.write(piece)
                out.flush()
            out.write("\n")
        return 0
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        completions = generate(engine, tokenizer, batch, chat=args.chat, params=params, watermark=watermark)
        for prompt, completion in zip(batch, completions):
            if args.json:
                out.write(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False) + "\n")
            else:
                out.write(completion + "\n")
        out.flush()
    return 0
