"""``load(source)``: an HF directory, a ``.gguf`` file, or a preset name -> a ready ``Gemma``.

Every format yields (internal name, tensor) pairs; ``materialize`` is the one place that checks
them strictly against the network (no missing, unexpected, duplicated or mis-shaped tensor) and
assigns them into a model built on the meta device, so weights are never held twice in memory.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable

import torch

from ..config import GemmaConfig, PRESETS, preset
from ..errors import GemmaforgeError
from ..model import Gemma

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16}


def resolve_dtype(dtype, device) -> torch.dtype:
    """Default: bf16 on GPU, fp32 on CPU; fp16 is allowed but warned about (docs/reference.md §1)."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device or "cpu").type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise GemmaforgeError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
        dtype = _DTYPES[dtype]
    if dtype == torch.float16:
        warnings.warn("float16 overflows in Gemma 2 activations (27B especially); prefer bfloat16", stacklevel=3)
    return dtype


def check_not_quantized(model, target: str) -> None:
    """Refuse to save a model that ``quant.quantize`` changed: its int8/int4 buffers and fused
    projections have no name in HF or GGUF checkpoints, and its float weights are gone."""
    how = getattr(model, "quantization", None)
    if how:
        raise GemmaforgeError(
            f"cannot save the model as {target}: it is quantized ({how}) and its float weights are gone;"
            " save the float model before quantizing, or load it again"
        )


def materialize(config: GemmaConfig, tensors: Iterable[tuple[str, torch.Tensor, object]], *, dtype=None,
                device=None) -> Gemma:
    """Strictly load (name, tensor, source-file) pairs into a new model."""
    dtype = resolve_dtype(dtype, device)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Gemma(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    source = None
    for name, t, source in tensors:
        if name not in expected:
            raise GemmaforgeError(f"{source} has unexpected tensor {name!r} for a {config.family} model")
        if name in state:
            raise GemmaforgeError(f"{source} has tensor {name!r} twice: the checkpoint is malformed")
        if tuple(t.shape) != tuple(expected[name]):
            raise GemmaforgeError(
                f"{source}: tensor {name!r} has shape {tuple(t.shape)}, the config implies "
                f"{tuple(expected[name])}: config.json and weights disagree"
            )
        state[name] = t.to(device=device, dtype=dtype)
    missing = [k for k in expected if k not in state]
    if missing:
        raise GemmaforgeError(f"{source or 'checkpoint'} is missing tensor {missing[0]!r}"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: "
                              "is it complete, and of the same model as its config?")
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_buffers(device)
    return model.eval()


# What ``load`` does with a block-quantized GGUF file on the CPU when neither ``dtype`` nor ``quant``
# says: "gguf" keeps the file's quantization (docs/quantization.md: exact file values, a quarter of
# the memory, decode 1.5-2x the float32 model's), "none" dequantizes to float32.
DEFAULT_GGUF_QUANT = "gguf"
GGUF_QUANTS = ("auto", "none", "gguf")


def load(source, dtype=None, device=None, *, seed: int = 0, quant: str = "auto") -> Gemma:
    """Load a model from an HF directory, a GGUF file, or a preset name (random weights, ``seed``).

    ``quant`` (GGUF files only): "gguf" keeps block-quantized weights as stored (int8 codes and
    block scales, gguf_quant.py; float32 activations), "none" dequantizes every tensor to ``dtype``,
    "auto" is DEFAULT_GGUF_QUANT for a quantized file loaded on the CPU without a ``dtype``, else
    "none" (an explicit ``dtype``, float32 included, asks for the dequantized model; other devices
    have no kernel for the packed form yet, docs/quantization.md)."""
    if quant not in GGUF_QUANTS:
        raise GemmaforgeError(f"unknown quant {quant!r} for load: use one of {', '.join(GGUF_QUANTS)}")
    if source is None:
        from ..default_model import default_model_path

        source = default_model_path()
    if isinstance(source, GemmaConfig):
        return _random(source, dtype, device, seed)
    path = Path(source)
    if path.suffix == ".gguf" or _is_gguf(path):
        if not path.is_file():
            raise GemmaforgeError(f"GGUF file {path} does not exist: check the path")
        from .gguf import is_quantized_file, read_gguf, read_gguf_packed

        if quant == "auto":
            # The header read only matters when the default keeps files quantized.
            cpu = device is None or torch.device(device).type == "cpu"
            keep = DEFAULT_GGUF_QUANT != "none" and dtype is None and cpu and is_quantized_file(path)
            quant = DEFAULT_GGUF_QUANT if keep else "none"
        if quant == "gguf":
            if dtype is not None and resolve_dtype(dtype, device) != torch.float32:
                raise GemmaforgeError("quant='gguf' keeps float32 activations: leave dtype unset (or float32)")
            from ..gguf_quant import build_model

            config, tensors, _ = read_gguf_packed(path)
            return build_model(config, tensors, device)
        ckpt = read_gguf(path)
        return materialize(ckpt.config, ((k, v, path) for k, v in ckpt.tensors.items()), dtype=dtype, device=device)
    if quant == "gguf":
        raise GemmaforgeError(f"quant='gguf' keeps a GGUF file's own quantization; {source} is not a GGUF file")
    if path.is_dir():
        from .hf import read_config, read_tensors

        return materialize(read_config(path), read_tensors(path), dtype=dtype, device=device)
    if path.exists():
        raise GemmaforgeError(f"{path} is neither a .gguf file nor an HF model directory")
    if str(source) not in PRESETS and ("/" in str(source) or "." in str(source)):
        raise GemmaforgeError(f"{source} does not exist: pass an HF directory, a .gguf file or a preset name")
    return _random(preset(str(source)), dtype, device, seed)  # preset() names close matches if unknown


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def _random(config: GemmaConfig, dtype, device, seed: int) -> Gemma:
    model = Gemma(config).init_weights(seed)
    return model.to(device=device or "cpu", dtype=resolve_dtype(dtype, device)).eval()
