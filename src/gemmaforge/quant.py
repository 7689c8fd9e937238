"""Weight-only quantization: int8 per output channel, int4 in groups along the input dimension.

Activations stay in floating point; only the stored weights shrink. Decode reads every weight once
per token, so it is bound by memory bandwidth, and fewer bytes per weight is the speed-up. For the
Gemma 3 270M model the tied 640 x 262144 embedding/output head is ~60% of all weights, so it is
quantized too (``QuantEmbedding``: row gathers for the input side, one matmul for the output side).

    int8:  w ~ q * scale[row]                        q in [-127, 127], scale = max|w_row| / 127
    int4:  w ~ (q - 8) * scale[row, g] + zero[row, g]  q in [0, 15], per group of ``group_size`` inputs,
                                                       scale = (max - min) / 15, zero = min + 8 * scale

The int4 form (asymmetric, "mid-point" zero) is the one PyTorch's packed int4 CPU kernel
(``_weight_int4pack_mm_for_cpu``) expects, so the same codes serve the fast kernel and the plain
dequantize-then-matmul fallback (other devices, odd shapes).

``quantize(model, "int8" | "int4", head=...)`` swaps modules in place and also fuses q/k/v and gate/up
into one matmul each (``fused_qkv`` / ``fused_gate_up`` in model.py): per-row scales make fusing exact.
A quantized model is for inference: it no longer saves to HF/GGUF. Speed and perplexity of each
precision on the embedded model: docs/benchmarks.md.
"""

from __future__ import annotations

import functools
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import GemmaforgeError

MODES = ("int8", "int4")


# ---- quantize / dequantize (pure functions, the numerical reference) --------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q int8 [N, K], scale float32 [N]); symmetric, one scale per output row."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def quantize_int4(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float -> (codes uint8 [N, K] in 0..15, scale [N, K/g], zero [N, K/g]) float32."""
    n, k = w.shape
    if k % group_size:
        raise GemmaforgeError(f"int4 group size {group_size} does not divide the input size {k}: use 32 or 64")
    wg = w.float().reshape(n, k // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(n, k), scale, lo + 8.0 * scale


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    g = k // scale.shape[1]
    qg = q.reshape(n, k // g, g).float() - 8.0
    return (qg * scale[..., None].float() + zero[..., None].float()).reshape(n, k)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in 0..15 -> [N, K/2], two codes a byte (low nibble first)."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)


# ---- kernels ----------------------------------------------------------------------------------------
# Activation precision is a property of the quantized model, the same on every path (eager, compiled,
# one row or many, prefill or decode), so that a path never differs from another by a silent bf16
# rounding (docs/benchmarks.md, "activation precision", has the measured cost of each choice):
#   "float32"   activations stay float32; products accumulate in float32. Exact up to summation order.
#   "bfloat16"  what enters a quantized matmul is rounded to bf16, and so is what leaves it; products
#               still accumulate in float32 (as every bf16 kernel here does). The scales are rounded
#               to bf16 once at quantization, because the bf16 kernels read them in bf16.
ACTIVATIONS = ("float32", "bfloat16")
# int8: the float32 GEMV is as fast as the bf16 kernel at decode, and bf16 costs perplexity.
# int4: PyTorch's packed int4 kernel takes bf16 activations only; its float32 form is 10-20x slower.
DEFAULT_ACTIVATIONS = {"int8": "float32", "int4": "bfloat16"}


def _check_activations(activations: str) -> str:
    if activations not in ACTIVATIONS:
        raise GemmaforgeError(f"unknown activation precision {activations!r}: use float32 or bfloat16")
    return activations


def _int4_kernel_ok(device: torch.device, n: int, k: int) -> bool:
    """Whether PyTorch's packed int4 CPU kernel takes this [n, k] weight (else: dequantize, then matmul).
    The CUDA kernel (``_weight_int4pack_mm``) packs nibbles in another order and is not used: this
    project had no GPU to test it on."""
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and n % 16 == 0


def _materialize(x: torch.Tensor) -> torch.Tensor:
    """Inside torch.compile: make inductor write ``x`` to memory before the GEMV reads it.

    Otherwise inductor inlines x's producer (the RMSNorm, or the embedding dequantization) into the
    GEMV's inner loop and recomputes it once per output row: 1,536 times for q/k/v, 262,144 times
    for the head. Measured on the 270M int8 decode step, 2 cores: 16.4 -> 12.9 ms/token."""
    from torch._inductor import inductor_prims  # registers the op (only traced, never run eagerly)

    return inductor_prims.force_stride_order(x, x.stride())


def _int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 (M small), q [N, K] int8 -> [M, N]: written as a reduction so that inductor
    emits one streaming loop (int8 load, convert, fused multiply-add), float32 throughout."""
    return (x[:, None, :] * q).sum(-1) * scale


@functools.cache
def _compiled_gemv():
    return torch.compile(_int8_gemv, dynamic=True)


@functools.cache
def can_compile_cpu() -> bool:
    """Inductor's CPU backend needs a C++ compiler. Checked up front instead of catching whatever a
    failed compile raises: a try/except around the hot path would turn real bugs into slow paths."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


# float32, fewer rows than this (batched decode): the GEMV reduction, which reads the int8 weight once
# per row; from here on (prefill) converting the weight to float32 once and one sgemm is cheaper.
_SGEMM_MIN_ROWS = 16


def _round_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T, never materialising the float weight of the whole layer for one row.

    Which kernel (measured on 2 cores, docs/benchmarks.md), by activation precision:
      float32, < 16 rows   a GEMV written as a reduction, compiled (eagerly: its own small graph)
      float32, >= 16 rows  dequantize to float32 and sgemm (converting costs less than the rows save)
      bfloat16, any rows   torch._weight_int8pack_mm (bf16 in and out, float32 accumulation)
      other devices        dequantize to the activation dtype, then F.linear
    """

    def __init__(self, weight: torch.Tensor, activations: str = "float32"):
        super().__init__()
        self.activations = _check_activations(activations)
        q, scale = quantize_int8(weight)
        if activations == "bfloat16":
            scale = _round_bf16(scale)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("qweight", q.to(weight.device))
        self.register_buffer("scale", scale.to(weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        y = self._matmul(x.reshape(-1, self.in_features))
        return y.to(dtype).reshape(*shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        compiling = torch.compiler.is_compiling()
        if self.activations == "bfloat16":
            bf = torch.bfloat16
            x, scale = x.to(bf), self.scale.to(bf)
            if compiling:  # the kernel's lowering takes buffers, not fused expressions
                x, scale = _materialize(x), _materialize(scale)
            return torch._weight_int8pack_mm(x, self.qweight, scale).float()
        x = x.float()
        if x.shape[0] < _SGEMM_MIN_ROWS:
            if compiling:
                return _int8_gemv(_materialize(x), self.qweight, self.scale)
            if not torch.is_grad_enabled() and can_compile_cpu():
                return _compiled_gemv()(x, self.qweight, self.scale)
        return F.linear(x, self.qweight.float()) * self.scale

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scale)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel, {self.activations} activations"


class Int4Linear(nn.Module):
    """Group-wise int4 weight; PyTorch's packed int4 CPU kernel where it applies (bf16 activations).

    float32 activations dequantize the weight and run an sgemm: exact, and the reference for the
    kernel, but 10-20x slower at decode (docs/benchmarks.md)."""

    def __init__(self, weight: torch.Tensor, group_size: int = 32, *, keep_codes: bool = False,
                 activations: str = "bfloat16"):
        super().__init__()
        self.activations = _check_activations(activations)
        q, scale, zero = quantize_int4(weight, group_size)
        # The kernel reads scales and zeros in bf16: every path (plain codes for embedding rows
        # included) uses those same rounded values, so that the kernel and its reference agree.
        scale, zero = _round_bf16(scale), _round_bf16(zero)
        dev = weight.device
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        self.kernel = activations == "bfloat16" and _int4_kernel_ok(dev, self.out_features, self.in_features)
        # The kernel's packed layout is opaque: embeddings (row gathers) keep plain codes as well.
        plain = keep_codes or not self.kernel
        # [K/g, N, 2] is the kernels' scale-and-zero layout.
        sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(dev)
        self.register_buffer("scales_zeros", sz if plain else None)
        self.register_buffer("codes", pack_nibbles(q).to(dev) if plain else None)
        if self.kernel:
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
            self.register_buffer("kernel_scales_zeros", sz.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features)
        if self.kernel:
            x2 = x2.to(torch.bfloat16)
            if torch.compiler.is_compiling():
                x2 = _materialize(x2)  # the kernel's lowering takes a buffer, not a fused expression
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.kernel_scales_zeros)
        elif self.activations == "bfloat16":  # the kernel's arithmetic: bf16 in and out, float32 sums
            y = _round_bf16(F.linear(_round_bf16(x2), self.dequantize()))
        else:
            y = F.linear(x2.float(), self.dequantize())
        return y.to(dtype).reshape(*shape[:-1], self.out_features)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float weight (or only ``rows`` of it); needs ``codes`` (kept for embeddings)."""
        if self.codes is None:
            raise RuntimeError("this Int4Linear kept no plain codes; build it with keep_codes=True")
        codes, sz = self.codes, self.scales_zeros
        if rows is not None:
            codes, sz = codes[rows], sz[:, rows]
        return dequantize_int4(unpack_nibbles(codes), sz[..., 0].t(), sz[..., 1].t())

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, int4 group={self.group_size}, "
                f"{self.activations} activations")


class QuantEmbedding(nn.Module):
    """The tied table, quantized once, used both ways: ``forward`` gathers and dequantizes rows
    (input embedding), ``head`` is the output matmul. Same interface as ``model.Embedding``."""

    def __init__(self, weight: torch.Tensor, mode: str, group_size: int = 32, activations: str | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.dtype = weight.dtype
        self.mode = mode
        self.table = _make(weight, mode, group_size, activations, keep_codes=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        t = self.table
        if self.mode == "int8":
            rows = t.qweight[flat].float() * t.scale[flat, None]
        else:
            rows = t.dequantize(flat)
        return rows.to(self.dtype).reshape(*tokens.shape, self.embedding_dim)

    def head(self, h: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        z = self.table(h)
        return z if out is None else out.copy_(z)


# ---- whole-model transformation ---------------------------------------------------------------------
def _make(weight: torch.Tensor, mode: str, group_size: int, activations: str | None,
          keep_codes: bool = False) -> nn.Module:
    activations = activations or DEFAULT_ACTIVATIONS[mode]
    if mode == "int8":
        return Int8Linear(weight, activations)
    return Int4Linear(weight, group_size, keep_codes=keep_codes, activations=activations)


@torch.no_grad()
def quantize(model, mode: str, *, group_size: int = 32, head: str | None = "same", activations: str | None = None):
    """Quantize ``model`` in place: every linear layer to ``mode``, the tied embedding/head to ``head``
    ("same" = ``mode``, "int8", "int4", or None to keep it in float). ``activations``: "float32" or
    "bfloat16" for every quantized matmul (None: each mode's measured default, DEFAULT_ACTIVATIONS).

    q/k/v and gate/up are fused first: one matmul instead of three (two) per layer and token.
    Measured on the embedded 270M model (docs/benchmarks.md), 4-bit costs much more perplexity in the
    layers than in the head, so "int8 layers + int4 head" is the better trade than all-int4.
    """
    head = mode if head == "same" else head
    for m in (mode, head):
        if m is not None and m not in MODES:
            raise GemmaforgeError(f"unknown quantization {m!r}: use one of {', '.join(MODES)} (or none)")
    if activations is not None:
        _check_activations(activations)
    if getattr(model, "quantization", None):
        raise GemmaforgeError(f"model is already quantized ({model.quantization}): load it again first")
    for block in model.layers:
        a, m = block.attn, block.mlp
        qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        a.fused_qkv = _make(qkv, mode, group_size, activations)
        del a.q_proj, a.k_proj, a.v_proj
        a.o_proj = _make(a.o_proj.weight, mode, group_size, activations)
        m.fused_gate_up = _make(torch.cat([m.gate_proj.weight, m.up_proj.weight]), mode, group_size, activations)
        del m.gate_proj, m.up_proj
        m.down_proj = _make(m.down_proj.weight, mode, group_size, activations)
    if head is not None:
        model.embed = QuantEmbedding(model.embed.weight, head, group_size, activations)
    acts = activations or "/".join(sorted({DEFAULT_ACTIVATIONS[m] for m in (mode, head) if m}))
    model.quantization = f"{mode}, head {head or 'float'}, {acts} activations"
    return model


_REQUANTIZE = {"int8": ("int8", "same"), "int8-h4": ("int8", "int4"), "int4": ("int4", "same")}


def load_quantized(source, quant: str = "auto", *, dtype=None, device=None, activations: str = "auto"):
    """``gemmaforge.load`` plus the CLI's ``--quant``: "auto", "none" and "gguf" are ``load``'s own
    (a GGUF file's quantization kept as stored, or not); "int8", "int8-h4" (int8 layers, int4 head)
    and "int4" load the float weights and re-quantize them (``quantize``)."""
    from .checkpoint import load

    if quant not in _REQUANTIZE:
        return load(source, dtype=dtype, device=device, quant=quant)
    model = load(source, dtype=dtype, device=device, quant="none")
    mode, head = _REQUANTIZE[quant]
    precision = {} if activations == "auto" else {"activations": activations}
    return quantize(model, mode, head=head, **precision)


def weight_bytes(model) -> int:
    """Bytes of all parameters and buffers that hold weights (not rope tables)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "inv_freq" not in n)
