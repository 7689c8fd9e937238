"""``gemmaforge info [MODEL]``: what a checkpoint is, read from its header only (no weights loaded).

    gemmaforge info                      # the embedded Gemma 3 270M
    gemmaforge info path/to/model.gguf --json

Shows the config, the parameter count (counted from the stored tensor shapes, checked against the
config's formula), the local/global layer pattern, the KV-cache bytes per token at the model's full
context against a cache that keeps every position in every layer (docs/reference.md §5), and the
stored tensor types (F32/BF16 for HF files, ggml quant types such as Q4_K for GGUF).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

from ..config import GLOBAL, PRESETS, GemmaConfig, preset
from ..errors import GemmaforgeError
from ..kv_cache import cache_bytes_per_token, full_cache_bytes_per_token


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="HF directory, .gguf file or preset name (default: the embedded model)")
    p.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    p.add_argument("--kv-dtype-bytes", type=int, default=2, choices=(1, 2, 4),
                   help="bytes per cached value for the KV numbers (default 2: bf16)")


# ---- reading headers --------------------------------------------------------------------------
def _gguf_header(path: Path) -> tuple[GemmaConfig, list[tuple[str, str, tuple[int, ...]]], dict]:
    """Config and (name, ggml type, shape) of every tensor, without dequantizing anything."""
    from ..checkpoint import gguf

    metadata, tensors = gguf.read_gguf_header(path)
    return gguf.config_from_metadata(metadata, where=str(path)), tensors, metadata


def _hf_header(directory: Path) -> tuple[GemmaConfig, list[tuple[str, str, tuple[int, ...]]]]:
    from safetensors import safe_open

    from ..checkpoint.hf import read_config

    config = read_config(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise GemmaforgeError(f"{directory} has no .safetensors files: is the checkpoint complete?")
    tensors = []
    for f in files:
        try:
            with safe_open(str(f), "pt") as st:
                for name in st.keys():
                    s = st.get_slice(name)
                    tensors.append((name, s.get_dtype(), tuple(s.get_shape())))
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise GemmaforgeError(f"{f} is not a readable safetensors file ({e}): re-download it") from None
    return config, tensors


def describe(source, kv_dtype_bytes: int = 2) -> dict:
    """Everything ``info`` prints, as a dict (the --json output)."""
    if source is None:
        from ..default_model import default_model_path

        source = default_model_path()
    path = Path(str(source))
    tensors, fmt, extra = None, None, {}
    if path.is_file() and (path.suffix == ".gguf" or _starts_with_gguf_magic(path)):
        config, tensors, metadata = _gguf_header(path)
        fmt = "gguf"
        extra = {k: metadata[k] for k in ("general.name", "general.file_type") if k in metadata}
    elif path.is_dir():
        config, tensors = _hf_header(path)
        fmt = "hf"
    elif str(source) in PRESETS:
        config, fmt = preset(str(source)), "preset"
    elif path.exists():
        raise GemmaforgeError(f"{path} is neither a .gguf file nor an HF model directory")
    else:
        raise GemmaforgeError(f"{source} does not exist: pass an HF directory, a .gguf file or a preset name")

    max_len = config.max_position_embeddings
    local = sum(config.is_local(i) for i in range(config.num_layers))
    facts = {
        "source": str(source),
        "format": fmt,
        **extra,
        "config": config.to_dict(),
        "parameters": config.num_params,
        "layers": {
            "total": config.num_layers,
            "local": local,
            "global": config.num_layers - local,
            "sliding_window": config.sliding_window,
            "pattern": "".join("G" if t == GLOBAL else "L" for t in config.layer_types),
        },
        "kv_cache": {
            "context": max_len,
            "dtype_bytes": kv_dtype_bytes,
            "bytes_per_token": cache_bytes_per_token(config, max_len, kv_dtype_bytes),
            "full_cache_bytes_per_token": full_cache_bytes_per_token(config, kv_dtype_bytes),
        },
    }
    if tensors is not None:
        facts["stored_parameters"] = sum(math.prod(shape) for _, _, shape in tensors)
        facts["tensor_types"] = dict(Counter(kind for _, kind, _ in tensors).most_common())
    return facts


def _starts_with_gguf_magic(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def run(args: argparse.Namespace) -> int:
    facts = describe(args.model, args.kv_dtype_bytes)
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    c, layers, kv = facts["config"], facts["layers"], facts["kv_cache"]
    pattern = layers["pattern"]
    groups = " ".join(pattern[i : i + 6] for i in range(0, len(pattern), 6))
    saving = 1 - kv["bytes_per_token"] / kv["full_cache_bytes_per_token"]
    caps = "none"
    if c["attn_logit_softcap"] is not None:
        caps = f"attention {c['attn_logit_softcap']:g}, final {c['final_logit_softcap']:g}"
    rope = f"theta {c['rope_theta']:,.0f} global, {c['rope_local_theta']:,.0f} local"
    if c["rope_scaling_factor"] != 1.0:
        rope += f", linear scaling x{c['rope_scaling_factor']:g} on global layers"
    rows = [
        ("source", f"{facts['source']} ({facts['format']})"),
        ("family", c["family"]),
        ("parameters", f"{facts['parameters']:,}"
         + (f" (stored: {facts['stored_parameters']:,})" if "stored_parameters" in facts else "")),
        ("layers", f"{layers['total']}: {layers['local']} local (window {layers['sliding_window']}), "
                   f"{layers['global']} global   {groups}"),
        ("hidden", f"{c['hidden_size']}, MLP {c['intermediate_size']}, vocab {c['vocab_size']:,}"),
        ("attention", f"{c['num_heads']} query / {c['num_kv_heads']} KV heads, head_dim {c['head_dim']}, "
                      f"scale {c['query_pre_attn_scalar']}^-0.5, qk-norm {'yes' if c['qk_norm'] else 'no'}"),
        ("soft-caps", caps),
        ("rope", rope),
        ("context", f"{kv['context']:,} tokens"),
        ("KV cache", f"{_human(kv['bytes_per_token'])}/token at {kv['context']:,} tokens vs "
                     f"{_human(kv['full_cache_bytes_per_token'])}/token for a full cache ({saving:.0%} less; "
                     f"{kv['dtype_bytes']}-byte values)"),
    ]
    if "tensor_types" in facts:
        rows.append(("tensors", ", ".join(f"{k} x{n}" for k, n in facts["tensor_types"].items())))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
