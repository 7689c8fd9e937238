"""GGUF (llama.cpp) checkpoints: read into gemmaforge's internal names, write back for llama.cpp.

Facts used here are in docs/reference.md §3: GGUF tensor names, ggml's reversed dimension order,
the +1 the llama.cpp converter adds to every ``*norm.weight``, and the metadata keys.

The header (metadata and tensor table) is parsed by ``gemmaforge.gguf_file`` over one ``mmap``;
the tensor bytes go from that map to ``dequant.dequantize`` without being copied first. Writing
uses ``gguf.GGUFWriter``.
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import (
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
    QuantError,
    RopeScalingType,
)
from gguf import quants as gguf_quants

from .. import gguf_file
from ..config import GLOBAL, GemmaConfig, gemma2_layer_types, gemma3_layer_types
from ..errors import GemmaforgeError
from ..gguf_file import read_gguf_metadata  # noqa: F401  (re-exported: callers read metadata from here)
from . import dequant

# ---- names: GGUF <-> gemmaforge internal (docs/reference.md §3) --------------------------------
GLOBAL_NAMES: dict[str, str] = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "final_norm.weight",
}
# Per layer: "blk.{i}." + GGUF suffix <-> "layers.{i}." + internal suffix.
LAYER_NAMES: dict[str, str] = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.o_proj.weight",
    "attn_q_norm.weight": "attn.q_norm.weight",  # Gemma 3 only
    "attn_k_norm.weight": "attn.k_norm.weight",  # Gemma 3 only
    "post_attention_norm.weight": "post_attn_norm.weight",
    "ffn_norm.weight": "pre_mlp_norm.weight",  # llama.cpp's "ffn_norm" is Gemma's pre-FFW norm
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "post_ffw_norm.weight": "post_mlp_norm.weight",
}
_LAYER_NAMES_BACK = {v: k for k, v in LAYER_NAMES.items()}
_GLOBAL_NAMES_BACK = {v: k for k, v in GLOBAL_NAMES.items()}


def _rename(name: str, globals_: dict, layers: dict, prefix: str, new_prefix: str) -> str | None:
    if name in globals_:
        return globals_[name]
    m = re.fullmatch(rf"{prefix}\.(\d+)\.(.+)", name)
    if m and m.group(2) in layers:
        return f"{new_prefix}.{m.group(1)}.{layers[m.group(2)]}"
    return None


def gguf_to_internal(name: str) -> str | None:
    """``blk.3.ffn_norm.weight`` -> ``layers.3.pre_mlp_norm.weight``; None for a name not in the map."""
    return _rename(name, GLOBAL_NAMES, LAYER_NAMES, "blk", "layers")


def internal_to_gguf(name: str) -> str | None:
    return _rename(name, _GLOBAL_NAMES_BACK, _LAYER_NAMES_BACK, "layers", "blk")


def is_norm(internal_name: str) -> bool:
    """Norm weights are stored as (1 + w) in GGUF (docs/reference.md §3): these get -1 / +1."""
    return internal_name.endswith("norm.weight")


def expected_shapes(config: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter a Gemma model of ``config`` has, internal name -> PyTorch shape."""
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    per_layer = {
        "attn_norm.weight": (d,), "attn.q_proj.weight": (q, d), "attn.k_proj.weight": (kv, d),
        "attn.v_proj.weight": (kv, d), "attn.o_proj.weight": (d, q), "post_attn_norm.weight": (d,),
        "pre_mlp_norm.weight": (d,), "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f), "post_mlp_norm.weight": (d,),
    }
    if config.qk_norm:
        per_layer |= {"attn.q_norm.weight": (hd,), "attn.k_norm.weight": (hd,)}
    shapes = {"embed.weight": (config.vocab_size, d)}
    for i in range(config.num_layers):
        shapes |= {f"layers.{i}.{k}": s for k, s in per_layer.items()}
    shapes["final_norm.weight"] = (d,)
    return shapes


# ---- the header (parsed by gemmaforge.gguf_file, which the tokenizer uses without torch) -----------
@dataclass
class _TensorInfo:
    name: str
    qtype: GGMLQuantizationType | int  # an int: a type newer than the installed gguf package
    shape: tuple[int, ...]  # PyTorch order: ggml dims reversed
    offset: int  # absolute byte offset in the file


def _parse(buf: mmap.mmap, with_tensors: bool, strings: bool = True) -> tuple[dict[str, Any], list[_TensorInfo]]:
    metadata, entries = gguf_file.parse(buf, with_tensors, strings)
    known = GGMLQuantizationType._value2member_map_
    return metadata, [
        _TensorInfo(e.name, GGMLQuantizationType(e.type_code) if e.type_code in known else e.type_code,
                    e.shape, e.offset)
        for e in entries
    ]


_open = gguf_file.open_gguf


def read_gguf_header(path: str | os.PathLike, strings: bool = True
                     ) -> tuple[dict[str, Any], list[tuple[str, str, tuple[int, ...]]]]:
    """Metadata and the tensor table ((GGUF name, ggml type name, PyTorch-order shape) per tensor),
    without reading any tensor data: what ``gemmaforge info`` shows. ``strings=False``: string arrays
    are skipped (gguf_file.SkippedStrings)."""
    path, buf = _open(path)
    try:
        metadata, infos = _parse(buf, with_tensors=True, strings=strings)
    except gguf_file.CorruptGGUF as e:
        raise gguf_file.unreadable(path, e) from None
    finally:
        buf.close()
    return metadata, [(i.name, getattr(i.qtype, "name", str(i.qtype)), i.shape) for i in infos]


# ---- metadata -> GemmaConfig -----------------------------------------------------------------------
_ARCHS = ("gemma2", "gemma3")
_GEMMA3_LOCAL_THETA = 10000.0  # llama.cpp hard-codes it for gemma3 local layers; GGUF does not store it
# llama.cpp recognises the 27B models by block count and scales queries by hidden/heads for them,
# by head_dim otherwise (llama-model.cpp, LLM_ARCH_GEMMA2/GEMMA3; docs/reference.md §1 table).
_27B_BLOCK_COUNT = {"gemma2": 46, "gemma3": 62}


def _query_scalar(family: str, n_layers: int, hidden: int, heads: int, head_dim: int) -> int:
    return hidden // heads if n_layers == _27B_BLOCK_COUNT[family] else head_dim


def config_from_metadata(
    md: dict[str, Any], where: str = "GGUF file", vocab_size: int | None = None
) -> GemmaConfig:
    """GemmaConfig from GGUF metadata (the keys llama.cpp's converter writes; docs/reference.md §3).

    The vocabulary size is the token count, as in llama.cpp; ``vocab_size`` (the embedding's rows)
    is used only for a file without a tokenizer.
    """
    arch = md.get("general.architecture")
    if arch not in _ARCHS:
        raise GemmaforgeError(
            f"{where} has general.architecture={arch!r}: gemmaforge loads 'gemma2' and 'gemma3' GGUF files"
        )

    def get(key: str, default: Any = KeyError) -> Any:
        if f"{arch}.{key}" in md:
            return md[f"{arch}.{key}"]
        if default is KeyError:
            raise GemmaforgeError(f"{where} lacks metadata key '{arch}.{key}': re-convert it with llama.cpp")
        return default

    n_layers, hidden = get("block_count"), get("embedding_length")
    heads = get("attention.head_count")
    head_dim = get("attention.key_length", hidden // heads)
    if get("attention.value_length", head_dim) != head_dim:
        raise GemmaforgeError(f"{where}: {arch}.attention.key_length != value_length (no Gemma has that)")
    if "tokenizer.ggml.tokens" in md:
        vocab_size = len(md["tokenizer.ggml.tokens"])
    elif vocab_size is None:
        raise GemmaforgeError(f"{where} has no tokenizer.ggml.tokens: the vocabulary size is unknown")
    window = get("attention.sliding_window", 0)
    max_pos = get("context_length")
    # The local/global pattern is not stored: llama.cpp applies the family rule (docs/reference.md §1-2),
    # and for gemma3 treats a missing or zero window as "no sliding window at all".
    if not window:
        layer_types, window = (GLOBAL,) * n_layers, max_pos
    else:
        layer_types = (gemma2_layer_types if arch == "gemma2" else gemma3_layer_types)(n_layers)

    if arch == "gemma2":
        theta = local_theta = float(get("rope.freq_base", 10000.0))
        # llama.cpp's defaults when the keys are absent are Gemma 2's values (50, 30).
        softcaps = float(get("attn_logit_softcapping", 50.0)), float(get("final_logit_softcapping", 30.0))
    else:
        theta, local_theta = float(get("rope.freq_base", 1_000_000.0)), _GEMMA3_LOCAL_THETA
        softcaps = (None, None)
    factor = 1.0
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":  # Gemma 3 4B+: global layers only (llama.cpp: rope_freq_scale_train_swa = 1)
        factor = float(get("rope.scaling.factor"))
    elif scaling != "none":
        raise GemmaforgeError(f"{where} uses rope scaling {scaling!r}: gemmaforge supports only 'linear'")
    return GemmaConfig(
        family=arch,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", heads),
        head_dim=head_dim,
        layer_types=layer_types,
        sliding_window=window,
        max_position_embeddings=max_pos,
        query_pre_attn_scalar=_query_scalar(arch, n_layers, hidden, heads, head_dim),
        rope_theta=theta,
        rope_local_theta=local_theta,
        rope_scaling_factor=factor,
        attn_logit_softcap=softcaps[0],
        final_logit_softcap=softcaps[1],
        qk_norm=arch == "gemma3",
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
    )


# ---- reading ---------------------------------------------------------------------------------------
@dataclass
class GGUFCheckpoint:
    path: Path
    config: GemmaConfig
    tensors: dict[str, torch.Tensor]  # internal names, PyTorch shapes, norms as w (not 1 + w)
    metadata: dict[str, Any] = field(repr=False)  # every key of the file, tokenizer.* included
    tensor_types: dict[str, str] = field(repr=False)  # internal name -> ggml type name, e.g. "Q4_K"


def _checked_tensors(path: Path, buf: mmap.mmap, infos: list[_TensorInfo], config: GemmaConfig):
    """(internal name, info, raw bytes as a uint8 view of the map) for every tensor, in file order,
    after the strict checks: known name, no duplicate, expected shape, supported type, in bounds;
    then that no tensor is missing. The one place both readers (float and packed) check a file."""
    shapes = expected_shapes(config)
    seen: set[str] = set()
    for info in infos:
        name = gguf_to_internal(info.name)
        if name not in shapes:
            raise GemmaforgeError(
                f"{path} has unexpected tensor {info.name!r}: not part of a {config.family} model"
                " of this shape"
            )
        if name in seen:
            raise GemmaforgeError(f"{path} has tensor {info.name!r} twice: the file is malformed")
        if info.shape != shapes[name]:
            raise GemmaforgeError(
                f"{path}: tensor {info.name!r} has shape {list(info.shape)}, expected {list(shapes[name])}"
                " from the file's metadata (and tokenizer size): the file is inconsistent"
            )
        if not isinstance(info.qtype, GGMLQuantizationType) or not dequant.is_supported(info.qtype):
            kind = getattr(info.qtype, "name", f"number {info.qtype}")
            raise GemmaforgeError(
                f"{path}: tensor {info.name!r} uses ggml type {kind}, which gemmaforge cannot"
                " dequantize: requantize the file (e.g. llama-quantize ... Q4_K_M)"
            )
        size = dequant.nbytes(info.qtype, info.shape)
        if info.offset + size > len(buf):
            raise GemmaforgeError(
                f"{path} is truncated: tensor {info.name!r} ends at byte {info.offset + size:,} of"
                f" {len(buf):,}: re-download it"
            )
        seen.add(name)
        yield name, info, np.frombuffer(buf, dtype=np.uint8, count=size, offset=info.offset)
    missing = [n for n in shapes if n not in seen]
    if missing:
        raise GemmaforgeError(
            f"{path} is missing tensor {internal_to_gguf(missing[0])!r} ({len(missing)} missing):"
            " is this a complete text-model GGUF?"
        )


def _open_checked(path: str | os.PathLike, strings: bool = True):
    """(path, map, metadata, config, infos) of a GGUF file whose header parses; the caller closes the map."""
    path, buf = _open(path)
    try:
        metadata, infos = _parse(buf, with_tensors=True, strings=strings)
    except gguf_file.CorruptGGUF as e:
        buf.close()
        raise gguf_file.unreadable(path, e) from None
    embed_rows = next((i.shape[0] for i in infos if i.name == "token_embd.weight"), None)
    config = config_from_metadata(metadata, where=str(path), vocab_size=embed_rows)
    return path, buf, metadata, config, infos


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Read a gemma2/gemma3 GGUF file: config, dequantized tensors (float32, or the file's F16/BF16)."""
    path, buf, metadata, config, infos = _open_checked(path)
    tensors: dict[str, torch.Tensor] = {}
    tensor_types: dict[str, str] = {}
    for name, info, raw in _checked_tensors(path, buf, infos, config):
        t = dequant.dequantize(raw, info.qtype, info.shape)
        tensors[name] = t.float() - 1.0 if is_norm(name) else t
        tensor_types[name] = info.qtype.name
    return GGUFCheckpoint(path, config, tensors, metadata, tensor_types)


def is_quantized_file(path: str | os.PathLike) -> bool:
    """Whether any 2-D weight of the file is block-quantized (Q8_0, Q4_K, ...): a header-only read."""
    from ..gguf_quant import is_packable

    _, types_ = read_gguf_header(path, strings=False)
    return any(is_packable(GGMLQuantizationType[t]) for _, t, _ in types_ if t in GGMLQuantizationType.__members__)


def read_gguf_packed(path: str | os.PathLike):
    """(config, {internal name: float tensor or BlockQuantLinear}, ggml type names) without building the
    float model: block-quantized weights are unpacked to int8 codes and block scales
    (gguf_quant.py), one tensor at a time from the map, and each tensor's pages are dropped from
    memory once unpacked, so the peak stays near the packed size (docs/quantization.md)."""
    from ..gguf_quant import BlockQuantLinear, is_packable, unpack

    path, buf, _, config, infos = _open_checked(path, strings=False)  # the vocabulary is the tokenizer's
    out: dict[str, Any] = {}
    types_: dict[str, str] = {}
    for name, info, raw in _checked_tensors(path, buf, infos, config):
        if is_packable(info.qtype) and not is_norm(name) and len(info.shape) == 2:
            out[name] = BlockQuantLinear(*unpack(dequant.as_tensor(raw), info.qtype, info.shape), info.qtype.name)
        else:
            t = dequant.dequantize(raw, info.qtype, info.shape).float()
            out[name] = t - 1.0 if is_norm(name) else t
        types_[name] = info.qtype.name
        del raw  # the outputs never alias the map (unpack and dequantize copy)
        start = info.offset // mmap.PAGESIZE * mmap.PAGESIZE
        end = info.offset + dequant.nbytes(info.qtype, info.shape)
        buf.madvise(mmap.MADV_DONTNEED, start, end - start)  # read-only file pages: dropped, not lost
    buf.close()
    return config, out, types_


# ---- writing ---------------------------------------------------------------------------------------
_WRITE_TYPES = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
# Keys write_gguf derives itself; copies of them in metadata_extra are dropped, not duplicated.
_OWN_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


def _check_representable(config: GemmaConfig) -> None:
    """GGUF stores only what llama.cpp reads: refuse configs it would silently run differently."""
    fam = config.family
    problems = []
    rule = (gemma2_layer_types if fam == "gemma2" else gemma3_layer_types)(config.num_layers)
    if config.layer_types != rule:
        problems.append("layer_types differ from the family's local/global pattern")
    qpas = _query_scalar(fam, config.num_layers, config.hidden_size, config.num_heads, config.head_dim)
    if config.query_pre_attn_scalar != qpas:
        problems.append(f"query_pre_attn_scalar={config.query_pre_attn_scalar} (llama.cpp derives {qpas})")
    if fam == "gemma2" and config.rope_local_theta != config.rope_theta:
        problems.append("gemma2 with different local and global rope theta")
    if fam == "gemma3" and config.rope_local_theta != _GEMMA3_LOCAL_THETA:
        problems.append(f"rope_local_theta={config.rope_local_theta} (llama.cpp fixes {_GEMMA3_LOCAL_THETA})")
    if fam == "gemma2" and config.rope_scaling_factor != 1.0:
        problems.append("gemma2 with rope scaling")
    if fam == "gemma3" and (config.attn_logit_softcap or config.final_logit_softcap):
        problems.append("gemma3 with logit soft-capping")
    if fam == "gemma2" and None in (config.attn_logit_softcap, config.final_logit_softcap):
        problems.append("gemma2 without logit soft-capping (llama.cpp always applies it)")
    if config.qk_norm != (fam == "gemma3"):
        problems.append(f"qk_norm={config.qk_norm} for {fam}")
    if problems:
        raise GemmaforgeError(
            f"this {fam} config cannot be stored in GGUF ({'; '.join(problems)}):"
            " save a HF checkpoint instead"
        )


def _arch_metadata(w: GGUFWriter, c: GemmaConfig) -> None:
    """Architecture keys, in the order of llama.cpp's convert_hf_to_gguf.py (Gemma2Model, Gemma3Model)."""
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    if c.family == "gemma2":
        w.add_head_count_kv(c.num_kv_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    if c.family == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcap)
        w.add_final_logit_softcapping(c.final_logit_softcap)
        w.add_sliding_window(c.sliding_window)
        if c.rope_theta != 10000.0:  # the converter never writes it, but llama.cpp reads it if present
            w.add_rope_freq_base(c.rope_theta)
    else:
        w.add_rope_freq_base(c.rope_theta)  # global layers
        w.add_sliding_window(c.sliding_window)
        w.add_head_count_kv(c.num_kv_heads)
        if c.rope_scaling_factor != 1.0:
            w.add_rope_scaling_type(RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(c.rope_scaling_factor)


def _value_type(key: str, value: Any) -> tuple[GGUFValueType, GGUFValueType | None]:
    """GGUF type for a Python metadata value, chosen to match what llama.cpp writes for the tokenizer
    fields: ids u32, flags bool, scores f32 array, token_type i32 array, tokens/merges string array."""
    if isinstance(value, (list, tuple)):
        kinds = {type(v) for v in value}
        for item, allowed in ((GGUFValueType.BOOL, {bool}), (GGUFValueType.INT32, {int}),
                              (GGUFValueType.FLOAT32, {int, float}), (GGUFValueType.STRING, {str})):
            if kinds <= allowed:
                return GGUFValueType.ARRAY, item
        names = sorted(k.__name__ for k in kinds)
        raise GemmaforgeError(f"metadata key {key!r}: cannot store a list of {names} in GGUF")
    if isinstance(value, bool):
        return GGUFValueType.BOOL, None
    if isinstance(value, int):
        return (GGUFValueType.UINT32 if 0 <= value < 2**32 else GGUFValueType.INT64), None
    if isinstance(value, float):
        return GGUFValueType.FLOAT32, None
    if isinstance(value, str):
        return GGUFValueType.STRING, None
    raise GemmaforgeError(f"metadata key {key!r}: cannot store a {type(value).__name__} in GGUF")


def _encode(t: torch.Tensor, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    """(array for GGUFWriter.add_tensor, raw_dtype) for a 2-D weight in the requested type."""
    t = t.detach().cpu()
    if qtype == GGMLQuantizationType.F32:
        return t.to(torch.float32).numpy(), None
    if qtype == GGMLQuantizationType.F16:
        return t.to(torch.float16).numpy(), None
    if qtype == GGMLQuantizationType.BF16:  # torch rounds to nearest even, like ggml's fp32 -> bf16
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8), qtype
    try:
        return gguf_quants.quantize(t.to(torch.float32).numpy(), qtype), qtype
    except QuantError:  # row not a multiple of 32: llama.cpp's converter falls back to F16 likewise
        return t.to(torch.float16).numpy(), None


# Buffer names of gemmaforge.quant's Int8Linear / Int4Linear / QuantEmbedding: a state dict holding
# them comes from a quantized model (write_gguf has no model to ask for ``quantization``).
_QUANT_BUFFERS = frozenset({"qweight", "scale", "scales_zeros", "codes", "packed", "kernel_scales_zeros"})


def save_gguf(model, path: str | os.PathLike, metadata_extra: dict[str, Any] | None = None,
              dtype: str = "f32") -> Path:
    """``write_gguf`` for a model object; a quantized model is refused with one clear line."""
    from . import check_not_quantized

    check_not_quantized(model, "GGUF")
    return write_gguf(path, model.config, dict(model.state_dict()), metadata_extra, dtype)


def write_gguf(
    path: str | os.PathLike,
    config: GemmaConfig,
    tensors: dict[str, torch.Tensor],
    metadata_extra: dict[str, Any] | None = None,
    dtype: str = "f32",
) -> Path:
    """Write a GGUF file that llama.cpp and transformers load as this model.

    ``tensors`` use internal names with norms as w (this adds the +1, docs/reference.md §3).
    ``metadata_extra`` adds keys such as the tokenizer fields of ``read_gguf_metadata``; keys the
    config determines (``general.architecture``, ``gemma*.``...) are taken from the config instead.
    Norms (1-D) are always F32; 2-D weights use ``dtype`` (f32, f16, bf16, q8_0).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise GemmaforgeError(f"cannot write {path}: the directory {path.parent} does not exist")
    if dtype not in _WRITE_TYPES:
        raise GemmaforgeError(f"unknown GGUF dtype {dtype!r}: choose one of {', '.join(_WRITE_TYPES)}")
    qtype, file_type = _WRITE_TYPES[dtype]
    _check_representable(config)
    shapes = expected_shapes(config)
    for name, t in tensors.items():
        if name not in shapes and name.rsplit(".", 1)[-1] in _QUANT_BUFFERS:
            raise GemmaforgeError(
                f"cannot write tensor {name!r} to GGUF: it is from a quantized model, whose float weights"
                " are gone; save the float model before quantizing, or load it again"
            )
        if name not in shapes:
            raise GemmaforgeError(f"cannot write unexpected tensor {name!r}: not a {config.family} parameter")
        if tuple(t.shape) != shapes[name]:
            raise GemmaforgeError(
                f"tensor {name!r} has shape {list(t.shape)}, the config expects {list(shapes[name])}"
            )
    missing = [n for n in shapes if n not in tensors]
    if missing:
        raise GemmaforgeError(f"cannot write GGUF: tensor {missing[0]!r} is missing ({len(missing)} missing)")
    extra = {
        k: v for k, v in (metadata_extra or {}).items()
        if k not in _OWN_KEYS and not k.startswith(("GGUF.", *(f"{a}." for a in _ARCHS)))
    }
    tokens = extra.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != config.vocab_size:
        raise GemmaforgeError(
            f"tokenizer.ggml.tokens has {len(tokens)} tokens but vocab_size is {config.vocab_size}:"
            " llama.cpp and transformers take the vocabulary size from the token list"
        )

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        w = GGUFWriter(tmp, config.family)
        _arch_metadata(w, config)
        w.add_file_type(file_type)
        w.add_quantization_version(GGML_QUANT_VERSION)
        for key, value in extra.items():
            w.add_key_value(key, value, *_value_type(key, value))
        for name in shapes:  # embedding, layers in order, final norm
            t = tensors[name]
            if is_norm(name):
                array, raw = (t.detach().cpu().to(torch.float32) + 1.0).numpy(), None
            else:
                array, raw = _encode(t, qtype)
            w.add_tensor(internal_to_gguf(name), array, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
