"""GGUF weights kept in the file's own quantization: int8 codes with per-block scales (docs/quantization.md).

Every block-quantized ggml type the embedded model and common Gemma GGUFs use dequantizes as

    w = scale[block] * q                      Q8_0, Q4_0, Q5_0 (blocks of 32), Q3_K, Q6_K (16)
    w = scale[block] * q + offset[block]      Q4_1, Q5_1 (32), Q4_K, Q5_K (32), Q2_K (16)

with a small integer code ``q`` per weight and a ``scale``/``offset`` per block. For the K-quants
they are per sub-block, ``d * sc`` and ``-(dmin * m)``, each a product of an fp16 and a 6-bit
integer: exact in float32, not in float16. The legacy types' ``d`` (and ``m``) are float16 in the
file and stay float16 (half the scale bytes the decode step streams: the embedded model's Q8_0
head reads 178 MB a token instead of 189), except where the AMX kernel, which reads float32, is on.
``unpack`` turns the file's blocks into that one form: ``codes`` int8 [N, K], ``scale`` and
``offset`` [N, K / group]. ``dequantize_codes`` does the same float32 operations in the same order
as ``gguf.quants.dequantize`` (multiply, then add), so the values are bit-identical to the file's
dequantization (tests/test_gguf_native.py).

One byte per code (4-bit codes too): on the AVX2 CPUs measured here the int8 -> float32
conversion is the cost, not the bytes, and one layout keeps one kernel (docs/quantization.md).

``BlockQuantLinear`` computes ``x @ w.T`` without ever holding the float weight of a layer: for a
few rows (decode) the C kernel block_gemv.c streams the codes once (cpu_kernel.py builds it on
first use); for many rows (prefill) it dequantizes ``_CHUNK_WEIGHTS`` weights at a time into one
reused, cache-sized float32 buffer and runs an ordinary matmul on it. Neither needs torch.compile,
so nothing waits on a compiler. Activations stay float32 (weight-only), so results equal the
float32 dequantized model up to accumulation order.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from .checkpoint.dequant import (
    _bits,
    _bits_by_32,
    _crumbs,
    _f16,
    _k_scale_min,
    _nibbles,
    _nibbles_by_32,
    _q3_k_scales,
    QK_K,
    _SHIFT_0_4,
)
from .errors import GemmaforgeError
from . import cpu_kernel


# ---- unpacking: blocks [n, type_size] uint8 -> codes [n, block] int8, scale/offset [n, block/group] ---
def _q4_0(b):
    return (_nibbles(b[:, 2:]).to(torch.int8) - 8), _f16(b, 0), None


def _q4_1(b):
    return _nibbles(b[:, 4:]).to(torch.int8), _f16(b, 0), _f16(b, 2)


def _q5_0(b):
    return (_nibbles(b[:, 6:]) | (_bits(b[:, 2:6]) << 4)).to(torch.int8) - 16, _f16(b, 0), None


def _q5_1(b):
    return (_nibbles(b[:, 8:]) | (_bits(b[:, 4:8]) << 4)).to(torch.int8), _f16(b, 0), _f16(b, 2)


def _q8_0(b):
    return b[:, 2:].view(torch.int8), _f16(b, 0), None  # copied into ``codes`` by unpack


def _q2_k(b):
    s = b[:, :16]
    scale = _f16(b, 80) * (s & 0x0F).to(torch.float32)
    # ggml: dl * q - ml. Storing -ml and adding is the same IEEE operation (negation is exact).
    offset = -(_f16(b, 82) * (s >> 4).to(torch.float32))
    return _crumbs(b[:, 16:80], 32).to(torch.int8), scale, offset


def _q3_k(b):
    n = b.shape[0]
    scale = _f16(b, 108) * _q3_k_scales(b[:, 96:108])
    high = _bits_by_32(b[:, :32]).reshape(n, -1) ^ 1  # a cleared hmask bit means "subtract 4"
    return _crumbs(b[:, 32:96], 32).to(torch.int8) - (high << 2).to(torch.int8), scale, None


def _q4_k(b):
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    codes = _nibbles_by_32(b[:, 16:144]).reshape(n, QK_K).to(torch.int8)
    return codes, _f16(b, 0) * sc, -(_f16(b, 2) * mn)


def _q5_k(b):
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    codes = (_nibbles_by_32(b[:, 48:176]) | (_bits_by_32(b[:, 16:48]) << 4)).reshape(n, QK_K).to(torch.int8)
    return codes, _f16(b, 0) * sc, -(_f16(b, 2) * mn)


def _q6_k(b):
    n = b.shape[0]
    scale = _f16(b, 208) * b[:, 192:208].view(torch.int8).to(torch.float32)
    low = (b[:, :128].reshape(n, 2, 1, 64) >> _SHIFT_0_4.reshape(1, 1, 2, 1)) & 0x0F
    codes = (low.reshape(n, -1) | (_crumbs(b[:, 128:192], 32) << 4)).to(torch.int8) - 32
    return codes, scale, None


# qtype -> (block size, bytes per block, group size of one scale, unpack)
FORMATS = {
    Q.Q4_0: (32, 18, 32, _q4_0), Q.Q4_1: (32, 20, 32, _q4_1), Q.Q5_0: (32, 22, 32, _q5_0),
    Q.Q5_1: (32, 24, 32, _q5_1), Q.Q8_0: (32, 34, 32, _q8_0),
    Q.Q2_K: (QK_K, 84, 16, _q2_k), Q.Q3_K: (QK_K, 110, 16, _q3_k), Q.Q4_K: (QK_K, 144, 32, _q4_k),
    Q.Q5_K: (QK_K, 176, 32, _q5_k), Q.Q6_K: (QK_K, 210, 16, _q6_k),
}
HAS_OFFSET = frozenset({Q.Q4_1, Q.Q5_1, Q.Q2_K, Q.Q4_K, Q.Q5_K})
HALF_SCALES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0})  # float16 d (and m) in the file
_UNPACK_BLOCKS = 1 << 14  # blocks per step: bounds the int temporaries of unpacking


def is_packable(qtype) -> bool:
    return qtype in FORMATS


def half_scales() -> bool:
    """Whether the legacy types' scales stay float16: everywhere but where the AMX kernel is on."""
    return not (cpu_kernel.available() and cpu_kernel.amx_on())


def unpack(blocks: torch.Tensor, qtype, shape: tuple[int, int], half: bool | None = None):
    """uint8 blocks of a [N, K] tensor -> (codes int8 [N, K], scale [N, K/g], offset [N, K/g] | None, g).
    Scale and offset are float16 for the legacy types if ``half`` (default: ``half_scales()``),
    else float32; either way exactly the file's values.

    Every output is a new tensor: none aliases ``blocks`` (which may be the file's mmap)."""
    block, type_size, group, fn = FORMATS[qtype]
    n, k = shape
    if k % block or blocks.numel() != n * k // block * type_size:
        raise GemmaforgeError(f"{Q(qtype).name} tensor of shape {shape} does not match its {blocks.numel()} bytes")
    if half is None:
        half = half_scales()
    dtype = torch.float16 if half and qtype in HALF_SCALES else torch.float32
    blocks = blocks.reshape(-1, type_size)
    nb = blocks.shape[0]
    # huge pages where a tensor spans whole 2 MB ones: the tied head, which decode streams per token
    codes = cpu_kernel.empty_on_huge_pages((nb, block), torch.int8)
    scale = cpu_kernel.empty_on_huge_pages((nb, block // group), dtype)
    offset = cpu_kernel.empty_on_huge_pages((nb, block // group), dtype) if qtype in HAS_OFFSET else None
    for s in range(0, nb, _UNPACK_BLOCKS):
        c, sc, off = fn(blocks[s : s + _UNPACK_BLOCKS])
        codes[s : s + _UNPACK_BLOCKS] = c
        scale[s : s + _UNPACK_BLOCKS] = sc.expand(-1, block // group)  # legacy types: one scale per block
        if offset is not None:
            offset[s : s + _UNPACK_BLOCKS] = off.expand(-1, block // group)
    g = k // group
    return codes.view(n, k), scale.view(n, g), None if offset is None else offset.view(n, g), group


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """(codes [R, K], scale/offset [R, G]) -> float32 [R, K]: multiply, then add, as ggml does
    (float16 scales are widened first, exactly)."""
    r, k = codes.shape
    g = scale.shape[1]
    w = codes.view(r, g, k // g).float() * scale.float().unsqueeze(-1)
    if offset is not None:
        w = w + offset.float().unsqueeze(-1)
    return w.view(r, k)


# ---- the matmul -----------------------------------------------------------------------------------
# Fewer rows than this (decode, batched decode): block_gemv.c, which reads each code once per call
# and converts it in registers; from here on (prefill) dequantizing a chunk of the weight into a
# float32 buffer and one sgemm per chunk is cheaper. quant.py's threshold, for the same reason.
_GEMV_ROWS = 16
# Weights dequantized per sgemm step: the float32 buffer (2 MB) stays in cache between the
# dequantization and the matmul that reads it. Measured on the 640 x 262,144 head, 1 thread: 1,024-row
# steps ran as fast as the float32 sgemv over the whole dequantized table (docs/benchmarks.md, issue 14).
_CHUNK_WEIGHTS = 1 << 19
_local = threading.local()  # one buffer per thread: serving threads must not share it


def _workspace(n: int, device: torch.device) -> torch.Tensor:
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < n or buf.device != device:
        buf = _local.buf = torch.empty(n, dtype=torch.float32, device=device)
    return buf[:n]


class BlockQuantLinear(nn.Module):
    """y = x @ w.T for a block-quantized weight w (codes, per-group scales and offsets).

    Which kernel, by where it runs and how many rows x has:
      CPU, < 16 rows        block_gemv.c (cpu_kernel.py); inside a compiled step as the custom
                            op ``gemmaforge::block_gemv`` (no C compiler: the sgemm path); from
                            6 rows on a CPU with AMX, block_gemv.c hands over to amx_gemm.c
      CPU with AMX, >= 16   the same kernel call (amx_gemm.c): 1.4-2.2x faster than the sgemm below
      CPU, >= 16 rows       dequantize ``_CHUNK_WEIGHTS`` at a time into a reused buffer and
                            sgemm into the matching rows of y^T (never the whole float weight)
      compiled (>= 16 rows), dequantize the whole weight, then F.linear (the reference the
      autograd, other       others are tested against)
      devices"""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group: int,
                 qtype: str = ""):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group = group
        self.qtype = qtype
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.kernel = cpu_kernel.available()  # a constant for a compiled step, like the shapes
        # Whether prefill may go to the C kernel: only if its AMX form takes this shape, else
        # gf_block_gemv would run the many rows through the GEMV, slower than the sgemm path.
        self.amx_shape = (self.kernel and scale.dtype == torch.float32
                          and cpu_kernel.amx_takes(self.out_features, self.in_features, group))

    def dequantize(self, rows=None) -> torch.Tensor:
        if rows is None:
            return dequantize_codes(self.codes, self.scale, self.offset)
        off = None if self.offset is None else self.offset[rows]
        return dequantize_codes(self.codes[rows], self.scale[rows], off)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features).float()
        y = self._matmul(x2)
        return y.to(dtype).reshape(*shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled() and x.requires_grad
        compiling = torch.compiler.is_compiling()
        few = x.shape[0] < _GEMV_ROWS
        if x.device.type == "cpu" and not grad and self.kernel and (few or (self.amx_shape and cpu_kernel.amx_on())):
            if compiling:  # one opaque node in the compiled graph
                return torch.ops.gemmaforge.block_gemv(x, self.codes, self.scale, self.offset)
            return cpu_kernel.run_block_gemv(x, self.codes, self.scale, self.offset)
        if x.device.type != "cpu" or grad or compiling:
            return F.linear(x, self.dequantize())
        return self._chunked(x)

    def _chunked(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        g = self.scale.shape[1]
        rows = max(1, min(n, _CHUNK_WEIGHTS // k))
        buf = _workspace(rows * k, x.device)
        yt = torch.empty(n, x.shape[0], dtype=torch.float32, device=x.device)  # y^T: row slices are contiguous
        xt = x.t()
        for r in range(0, n, rows):
            m = min(rows, n - r)
            off = None if self.offset is None else self.offset[r : r + m]
            if self.kernel:
                w = cpu_kernel.dequantize_into(buf[: m * k].view(m, k), self.codes[r : r + m], self.scale[r : r + m], off)
            else:
                w = buf[: m * k].view(m, g, k // g)
                w.copy_(self.codes[r : r + m].view(m, g, k // g))
                w.mul_(self.scale[r : r + m, :, None])
                if off is not None:
                    w.add_(off[:, :, None])
            torch.mm(w.view(m, k), xt, out=yt[r : r + m])
        return yt.t()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.qtype} (int8 codes, groups of {self.group})"


def concat(parts: list[BlockQuantLinear]) -> BlockQuantLinear | None:
    """One module for several weights stacked by rows (fused q/k/v, gate/up), if they share the
    layout (group size, offsets or not); exact, as every block keeps its own scale (float16 ones
    widened to float32 if the parts' scale types differ). Else None."""
    if len({(p.group, p.offset is None, p.in_features) for p in parts}) != 1:
        return None
    dtype = functools.reduce(torch.promote_types, [p.scale.dtype for p in parts])
    cat = lambda ts: torch.cat([t.to(dtype) for t in ts])
    off = None if parts[0].offset is None else cat([p.offset for p in parts])
    return BlockQuantLinear(torch.cat([p.codes for p in parts]), cat([p.scale for p in parts]), off,
                            parts[0].group, "+".join(dict.fromkeys(p.qtype for p in parts)))


class BlockQuantEmbedding(nn.Module):
    """The tied table in its file quantization: ``forward`` gathers and dequantizes rows (the exact
    file values), ``head`` is the output matmul. Same interface as ``model.Embedding``."""

    def __init__(self, table: BlockQuantLinear):
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.dtype = torch.float32
        self.table = table

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.table.dequantize(tokens.reshape(-1))
        return rows.reshape(*tokens.shape, self.embedding_dim)

    def head(self, h: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        z = self.table(h)
        return z if out is None else out.copy_(z)


# ---- the whole model --------------------------------------------------------------------------------
_LINEARS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
            "mlp.down_proj")


def build_model(config, tensors: dict, device=None):
    """A Gemma whose block-quantized weights are ``BlockQuantLinear`` modules, from
    ``checkpoint.gguf.read_gguf_packed``'s (internal name -> float tensor or module) map, which
    has already checked that every tensor is there once with its shape.

    q/k/v and gate/up are fused when their layouts agree (model.py's ``fused_qkv``/``fused_gate_up``);
    float weights (norms, F16/F32 tensors) are assigned by a strict ``load_state_dict``."""
    from .model import Gemma

    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Gemma(config)
    floats = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    packed = {k: v for k, v in tensors.items() if isinstance(v, BlockQuantLinear)}
    for i, block in enumerate(model.layers):
        mods = {n: packed.get(f"layers.{i}.{n}.weight") for n in _LINEARS}
        a, m = block.attn, block.mlp
        qkv = [mods["attn.q_proj"], mods["attn.k_proj"], mods["attn.v_proj"]]
        fused = concat(qkv) if None not in qkv else None
        if fused is not None:
            a.fused_qkv = fused
            del a.q_proj, a.k_proj, a.v_proj
            for n in _LINEARS[:3]:
                mods[n] = None
        gu = [mods["mlp.gate_proj"], mods["mlp.up_proj"]]
        fused = concat(gu) if None not in gu else None
        if fused is not None:
            m.fused_gate_up = fused
            del m.gate_proj, m.up_proj
            mods["mlp.gate_proj"] = mods["mlp.up_proj"] = None
        for n, mod in mods.items():
            if mod is not None:
                parent, attr = block.get_submodule(n.split(".")[0]), n.split(".")[1]
                setattr(parent, attr, mod)
    if "embed.weight" in packed:
        model.embed = BlockQuantEmbedding(packed["embed.weight"])
    state = dict(floats)
    for k, v in model.state_dict().items():
        if k not in state:
            if v.is_meta:  # a float weight that read_gguf_packed did not deliver: a bug, not a file problem
                raise GemmaforgeError(f"internal error: no tensor for {k!r} in the packed GGUF load")
            state[k] = v
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_buffers()  # the rope tables (non-persistent, still on meta)
    model.to(device)
    kinds = "/".join(sorted({p.qtype for p in packed.values()}))
    model.quantization = f"gguf {kinds} as stored (int8 codes, block scales), float32 activations"
    return model.eval()
