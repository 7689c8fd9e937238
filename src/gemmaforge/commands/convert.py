"""``gemmaforge convert SRC DST``: between HF directories and GGUF files, in either direction.

    gemmaforge convert model.gguf out_dir --dtype bf16         # GGUF -> HF (config.json + safetensors)
    gemmaforge convert hf_dir model.gguf --dtype q8_0          # HF -> GGUF for llama.cpp
    gemmaforge convert model-q4.gguf model-f16.gguf --dtype f16  # re-encode a GGUF

The destination's kind follows its name: ``*.gguf`` is a GGUF file, anything else an HF directory.
Quantized sources are dequantized first, so any source converts to any type. The tokenizer travels
too: a GGUF's ``tokenizer.*`` metadata is copied as is, or written out as ``tokenizer.json`` for an
HF directory; an HF directory's ``tokenizer.json`` (or ``tokenizer.model``) becomes GGUF metadata in
llama.cpp's layout (docs/reference.md §3). Outputs appear atomically (temp name, then rename).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from ..atomic import publish_dir
from ..errors import GemmaforgeError

DTYPES = ("f32", "f16", "bf16", "q8_0")
_TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# Copied verbatim from an HF source directory to an HF destination.
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                       "generation_config.json", "chat_template.jinja")
# SentencePiece piece types, which GGUF's tokenizer.ggml.token_type reuses.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a .gguf file, an HF model directory (or a preset name: random weights)")
    p.add_argument("dst", help="a .gguf file name, or an HF directory to create")
    p.add_argument("--dtype", choices=DTYPES, default="f32",
                   help="weights of the output (default f32: lossless from any source; q8_0 is GGUF only)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer to embed or write (default: the one in SRC)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")


def _log(message: str) -> None:
    print(f"gemmaforge: {message}", file=sys.stderr, flush=True)


# ---- reading the source ---------------------------------------------------------------------------
def _read_source(src: str):
    """(config, internal-name tensors, GGUF metadata to carry over or None)."""
    from ..checkpoint import load
    from ..checkpoint.gguf import read_gguf

    path = Path(src)
    if path.is_file() and path.suffix == ".gguf":
        ckpt = read_gguf(path)
        carried = {k: v for k, v in ckpt.metadata.items() if k.startswith(("general.", "tokenizer."))}
        return ckpt.config, ckpt.tensors, carried
    model = load(src, dtype=torch.float32)
    return model.config, dict(model.state_dict()), None


def gguf_tokenizer_metadata(source: str | Path, vocab_size: int) -> dict:
    """llama.cpp's ``tokenizer.ggml.*`` keys for the tokenizer in ``source`` (a directory or file).

    Types follow SentencePiece: control for special tokens, byte for ``<0xNN>``, user-defined for the
    non-special added tokens that ``tokenizer.json`` lists ("\\n\\n", "<table>", ...), normal
    otherwise. Scores give earlier (higher-priority) pieces the higher score, as Gemma's files do.
    A vocabulary shorter than the model's embedding is padded with unused ``[PADn]`` tokens, as
    llama.cpp's converter does.
    """
    from ..tokenizer import load_tokenizer

    tok = load_tokenizer(source)
    if tok.vocab_size > vocab_size:
        raise GemmaforgeError(
            f"the tokenizer in {source} has {tok.vocab_size} tokens but the model's embedding only {vocab_size} rows:"
            " pass the model's own tokenizer (--tokenizer)"
        )
    user_defined = set()
    json_path = Path(source) / "tokenizer.json" if Path(source).is_dir() else Path(source)
    if json_path.suffix == ".json" and json_path.is_file():
        added = json.loads(json_path.read_text(encoding="utf-8")).get("added_tokens", [])
        user_defined = {a["id"] for a in added if not a.get("special")}
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        piece = tok.id_to_token(i) if i < tok.vocab_size else None
        if piece is None:
            piece, kind = f"[PAD{i}]", UNUSED
        elif tok.is_special(i):
            kind = CONTROL
        elif i in user_defined:
            kind = USER_DEFINED
        elif i == tok.unk_id:
            kind = UNKNOWN
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            kind = BYTE
        else:
            kind = NORMAL
        tokens.append(piece)
        types.append(kind)
        scores.append(-1000.0 if kind in (CONTROL, USER_DEFINED, UNUSED) else float(-i))
    md = {
        "tokenizer.ggml.model": "llama",  # llama.cpp's name for a SentencePiece vocabulary
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": tok.bos_id,
        "tokenizer.ggml.eos_token_id": tok.eos_id,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": False,  # Gemma: no dummy prefix (docs/reference.md §4)
    }
    for key, value in (("unknown", tok.unk_id), ("padding", tok.pad_id)):
        if value is not None:
            md[f"tokenizer.ggml.{key}_token_id"] = value
    return md


# ---- writing ----------------------------------------------------------------------------------------
def _write_gguf(dst: Path, config, tensors, carried: dict | None, args, src: str) -> None:
    from ..checkpoint.gguf import write_gguf

    if carried is not None and args.tokenizer is None:
        extra = carried
    else:
        tokenizer_source = args.tokenizer or src
        if not Path(tokenizer_source).exists():
            raise GemmaforgeError(f"{src} has no tokenizer to embed in the GGUF file: pass --tokenizer")
        extra = {"general.name": Path(src).name, **gguf_tokenizer_metadata(tokenizer_source, config.vocab_size)}
    _log(f"writing {dst} ({args.dtype})...")
    write_gguf(dst, config, tensors, metadata_extra=extra, dtype=args.dtype)


def _write_hf(dst: Path, config, tensors, args, src: str) -> None:
    from ..checkpoint import materialize
    from ..checkpoint.hf import save_pretrained
    from ..tokenizer import load_tokenizer

    if args.dtype not in _TORCH_DTYPES:
        raise GemmaforgeError(f"--dtype {args.dtype} is a GGUF type: an HF directory takes f32, f16 or bf16")
    model = materialize(config, ((k, v, src) for k, v in tensors.items()), dtype=_TORCH_DTYPES[args.dtype])
    _log(f"writing {dst}/ ({args.dtype})...")
    with publish_dir(dst) as tmp:  # dst is never half-written
        save_pretrained(model, tmp)
        source_dir = Path(src) if Path(src).is_dir() and args.tokenizer is None else None
        if source_dir is not None:
            for name in _HF_TOKENIZER_FILES:
                if (source_dir / name).is_file():
                    shutil.copy2(source_dir / name, tmp / name)
        elif args.tokenizer or Path(src).is_file():
            tok = load_tokenizer(args.tokenizer or src)
            tok.save(tmp / "tokenizer.json")
            (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tok), indent=2))


def _tokenizer_config(tok) -> dict:
    """The small tokenizer_config.json transformers needs to pick Gemma's tokenizer for tokenizer.json."""
    names = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": tok.pad_id, "unk_token": tok.unk_id}
    config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False}
    config.update({k: tok.id_to_token(i) for k, i in names.items() if i is not None})
    return config


def run(args: argparse.Namespace) -> int:
    dst = Path(args.dst)
    to_gguf = dst.suffix == ".gguf"
    if not to_gguf and args.dtype == "q8_0":
        raise GemmaforgeError("--dtype q8_0 is a GGUF type: name the output *.gguf, or use f32, f16 or bf16")
    if dst.exists() and not args.force:
        raise GemmaforgeError(f"{dst} already exists: choose another name or pass --force to replace it")
    if to_gguf and dst.is_dir():
        raise GemmaforgeError(f"{dst} is a directory: a GGUF output must be a file name")
    if dst.resolve() == Path(args.src).resolve():
        raise GemmaforgeError("SRC and DST are the same path: write to a new name")
    _log(f"reading {args.src}...")
    config, tensors, carried = _read_source(args.src)
    if to_gguf:
        _write_gguf(dst, config, tensors, carried, args, args.src)
    else:
        _write_hf(dst, config, tensors, args, args.src)
    _log(f"wrote {dst}")
    return 0
