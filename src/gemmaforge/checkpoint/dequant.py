"""Table-driven dequantization of GGML tensor data (the payload of GGUF files), vectorized in torch.

GGML stores a tensor row as a run of fixed-size *blocks*: ``block_size`` weights packed into
``type_size`` bytes (a few float16 scales plus packed integer codes). Dequantizing is therefore
"reshape the bytes to [n_blocks, type_size], unpack every block the same way", which is one table
entry per type below (the layout tinygrad's ``llm/`` GGUF loader uses).

Every unpacking function follows the reference implementation in the ``gguf`` package
(``gguf/quants.py``, itself a port of ggml-quants.c) operation by operation: float32 rounding
depends on the order of multiplies and subtracts (``d * q - m`` vs ``d * (q - m/d)``), so matching
the order makes the result bit-exact, which tests/test_gguf.py checks for every type.
Types without an entry here (IQ*, TQ*, MXFP4, ...) fall back to ``gguf.quants.dequantize`` (numpy,
slower, but rare in Gemma files).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from ..errors import GemmaforgeError

QK_K = 256  # weights per "super-block" of the K-quants
# Blocks dequantized per step: big enough for torch's intra-op threads, small enough that the
# int/float temporaries of one step stay in cache instead of costing a full-tensor copy each.
_CHUNK_WEIGHTS = 1 << 21
_SHIFT_0_4 = torch.tensor([0, 4], dtype=torch.uint8)


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The little-endian float16 stored at byte offset ``at`` of every block, as float32 [n, 1]."""
    # .contiguous(): viewing 2 bytes as one float16 needs them packed; the copy is 2 bytes per block.
    return blocks[:, at : at + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 2k] codes: all low nibbles first, then all high nibbles (ggml's order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 8k] bits, bit i of the little-endian bitfield at position i."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], -1)


def _crumbs(qs: torch.Tensor, group: int) -> torch.Tensor:
    """2-bit codes: each run of ``group`` bytes yields 4 runs of ``group`` codes (shift 0, 2, 4, 6)."""
    n = qs.shape[0]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(n, -1, 1, group) >> shifts) & 3).reshape(n, -1)


# Each unpacking function below reads uint8 blocks [n, type_size] and writes the float32 weights
# into ``out`` [n, block_size] (a slice of the result), with ``out=``/in-place ops for the last step
# so that no full-size temporary is made and copied.

# ---- legacy 32-weight blocks --------------------------------------------------------------------
def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:  # d f16 | 16 B of 4-bit codes: d * (q - 8)
    q = (_nibbles(b[:, 2:]).to(torch.int8) - 8).to(torch.float32)
    torch.mul(_f16(b, 0), q, out=out)


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:  # d f16 | m f16 | 16 B codes: d * q + m
    q = _nibbles(b[:, 4:]).to(torch.float32)
    torch.mul(_f16(b, 0), q, out=out).add_(_f16(b, 2))


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:  # d | 32 high bits (u32) | 16 B low nibbles
    q = (_nibbles(b[:, 6:]) | (_bits(b[:, 2:6]) << 4)).to(torch.int8) - 16
    torch.mul(_f16(b, 0), q.to(torch.float32), out=out)


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:  # d | m | 32 high bits | 16 B low nibbles
    q = (_nibbles(b[:, 8:]) | (_bits(b[:, 4:8]) << 4)).to(torch.float32)
    torch.mul(_f16(b, 0), q, out=out).add_(_f16(b, 2))


def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:  # d f16 | 32 signed bytes
    out.copy_(b[:, 2:].view(torch.int8))  # int8 -> float32 in the copy
    out.mul_(_f16(b, 0))


# ---- K-quants: 256-weight super-blocks of 16 or 8 sub-blocks with their own scales ------------
def _q2_k(b: torch.Tensor, out: torch.Tensor) -> None:
    """16 B scales (low nibble: scale, high: min) | 64 B 2-bit codes | d | dmin"""
    n = b.shape[0]
    scales = b[:, :16]
    dl = (_f16(b, 80) * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (_f16(b, 82) * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = _crumbs(b[:, 16:80], 32).reshape(n, 16, 16).to(torch.float32)
    torch.mul(dl, q, out=out.view(n, 16, 16)).sub_(ml)


def _q3_k_scales(s: torch.Tensor) -> torch.Tensor:
    """12 bytes -> 16 six-bit scales: low 4 bits from bytes 0-7 (lo, hi nibble), high 2 from 8-11."""
    n = s.shape[0]
    lo = (s[:, :8].reshape(n, 1, 8) >> _SHIFT_0_4.reshape(1, 2, 1)).reshape(n, 16)
    hi = _crumbs(s[:, 8:12], 4)
    return (((lo & 0x0F) | ((hi & 3) << 4)).to(torch.int8) - 32).to(torch.float32)


def _q3_k(b: torch.Tensor, out: torch.Tensor) -> None:  # 32 B hmask | 64 B low 2 bits | 12 B scales | d
    n = b.shape[0]
    dl = (_f16(b, 108) * _q3_k_scales(b[:, 96:108])).reshape(n, 16, 1)
    low = _crumbs(b[:, 32:96], 32)
    # A cleared hmask bit means "subtract 4" (ggml's convention), so the bit is flipped first.
    high = _bits_by_32(b[:, :32]).reshape(n, -1) ^ 1
    q = (low.to(torch.int8) - (high << 2).to(torch.int8)).to(torch.float32)
    torch.mul(dl, q.reshape(n, 16, 16), out=out.view(n, 16, 16))


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (get_scale_min_k4 in ggml)."""
    s = s.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.to(torch.float32), mn.to(torch.float32)


def _nibbles_by_32(qs: torch.Tensor) -> torch.Tensor:
    """[n, 128] bytes -> [n, 8, 32]: each 32-byte run gives 32 low nibbles, then 32 high nibbles."""
    n = qs.shape[0]
    return ((qs.reshape(n, -1, 1, 32) >> _SHIFT_0_4.reshape(1, 1, 2, 1)) & 0x0F).reshape(n, 8, 32)


def _bits_by_32(qh: torch.Tensor) -> torch.Tensor:
    """[n, 32] bytes -> [n, 8, 32]: row j holds bit j of each of the 32 bytes."""
    return (qh.reshape(-1, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)) & 1


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:  # d | dmin | 12 B scales/mins | 128 B nibbles
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn).reshape(n, 8, 1)
    q = _nibbles_by_32(b[:, 16:144]).to(torch.float32)
    torch.mul(d, q, out=out.view(n, 8, 32)).sub_(dm)


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    """d | dmin | 12 B scales/mins | 32 B high bits | 128 B nibbles"""
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn).reshape(n, 8, 1)
    q = (_nibbles_by_32(b[:, 48:176]) | (_bits_by_32(b[:, 16:48]) << 4)).to(torch.float32)
    torch.mul(d, q, out=out.view(n, 8, 32)).sub_(dm)


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    """128 B low nibbles | 64 B high 2 bits | 16 int8 scales | d"""
    n = b.shape[0]
    scales = b[:, 192:208].view(torch.int8).to(torch.float32)
    d = (_f16(b, 208) * scales).reshape(n, 16, 1)
    low = (b[:, :128].reshape(n, 2, 1, 64) >> _SHIFT_0_4.reshape(1, 1, 2, 1)) & 0x0F
    high = _crumbs(b[:, 128:192], 32)
    q = (low.reshape(n, -1) | (high << 4)).to(torch.int8) - 32
    torch.mul(d, q.reshape(n, 16, 16).to(torch.float32), out=out.view(n, 16, 16))


# ---- the table ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantFormat:
    block_size: int  # weights per block
    type_size: int  # bytes per block
    unpack: Callable[[torch.Tensor, torch.Tensor], None] | None  # (blocks, out), see above
    keep_dtype: torch.dtype | None = None  # plain float types: reinterpret the bytes, no arithmetic


FORMATS: dict[Q, QuantFormat] = {
    Q.F32: QuantFormat(1, 4, None, torch.float32),
    Q.F16: QuantFormat(1, 2, None, torch.float16),
    Q.BF16: QuantFormat(1, 2, None, torch.bfloat16),
    Q.Q4_0: QuantFormat(32, 18, _q4_0),
    Q.Q4_1: QuantFormat(32, 20, _q4_1),
    Q.Q5_0: QuantFormat(32, 22, _q5_0),
    Q.Q5_1: QuantFormat(32, 24, _q5_1),
    Q.Q8_0: QuantFormat(32, 34, _q8_0),
    Q.Q2_K: QuantFormat(QK_K, 84, _q2_k),
    Q.Q3_K: QuantFormat(QK_K, 110, _q3_k),
    Q.Q4_K: QuantFormat(QK_K, 144, _q4_k),
    Q.Q5_K: QuantFormat(QK_K, 176, _q5_k),
    Q.Q6_K: QuantFormat(QK_K, 210, _q6_k),
}


def _gguf_can_dequantize(qtype: Q) -> bool:
    return qtype in getattr(gguf_quants, "_type_traits", {})  # the package's registry of unpackers


def is_supported(qtype: int | Q) -> bool:
    qtype = Q(qtype)
    return qtype in FORMATS or _gguf_can_dequantize(qtype)


def nbytes(qtype: int | Q, shape: tuple[int, ...]) -> int:
    """Bytes that a tensor of ``shape`` (PyTorch order) takes in GGML type ``qtype``."""
    block_size, type_size = GGML_QUANT_SIZES[Q(qtype)]
    return math.prod(shape) // block_size * type_size


def as_tensor(data: np.ndarray) -> torch.Tensor:
    """A uint8 tensor over ``data``'s bytes, without a copy (``data`` may be a read-only map)."""
    with warnings.catch_warnings():
        # A read-only memmap is fine here: every user writes only to new tensors.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(data).reshape(-1).view(np.uint8))


def dequantize(raw: np.ndarray, qtype: int | Q, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Unpack GGML tensor bytes into a torch tensor of ``shape`` (PyTorch order, row-major).

    ``raw`` holds the tensor's bytes (uint8, or any dtype whose buffer is those bytes, e.g. a
    memmap slice). Quantized types come back as float32; F32/F16/BF16 keep their dtype. The result
    never aliases ``raw``, so the file behind a memmap can be closed or replaced afterwards.
    """
    qtype = Q(qtype)
    shape = tuple(int(s) for s in shape)
    if not is_supported(qtype):
        raise GemmaforgeError(f"quant type {qtype.name} is not supported: requantize the file (e.g. Q4_K_M)")
    fmt = FORMATS.get(qtype)
    block_size = GGML_QUANT_SIZES[qtype][0]
    if shape and shape[-1] % block_size:
        raise GemmaforgeError(f"{qtype.name} rows hold a multiple of {block_size} weights, not shape {shape}")
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    expected = nbytes(qtype, shape)
    if data.size != expected:
        raise GemmaforgeError(f"{qtype.name} tensor of shape {shape} needs {expected} bytes, got {data.size}")

    if fmt is None:
        rows = data.reshape(-1, data.size // max(1, math.prod(shape[:-1])))
        values = gguf_quants.dequantize(rows, qtype).astype(np.float32, copy=False)
        return torch.from_numpy(values).reshape(shape)

    blocks = as_tensor(data).reshape(-1, fmt.type_size)
    if fmt.keep_dtype is not None:
        return blocks.view(fmt.keep_dtype).clone().reshape(shape)

    out = torch.empty(blocks.shape[0], fmt.block_size, dtype=torch.float32)
    step = max(1, _CHUNK_WEIGHTS // fmt.block_size)
    for start in range(0, blocks.shape[0], step):
        fmt.unpack(blocks[start : start + step], out[start : start + step])
    return out.reshape(shape)
