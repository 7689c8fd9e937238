"""The native decode step: all layers of a GGUF-native model's decode step in one C call.

``NativeStep`` is ``fast.decode_step`` for a model whose projections are all
``gguf_quant.BlockQuantLinear`` (the default load of a quantized GGUF file) on CPU: the embedding,
the cache's slot bookkeeping and the output head stay in torch (a few ops per token), and
decode_step.c runs every layer (rope tables and final norm included), calling block_gemv.c for the
projections. Eager torch costs a dispatch per op (~10 ms of a 27 ms token on 2 threads), and
compiling the step costs ~45 s of tracing in every new process; this costs neither, so the first
``gemmaforge generate`` a user runs decodes at full speed (docs/quantization.md, "The native decode step"; docs/benchmarks.md).

The C side reads raw pointers: the weights' once (a FastForward belongs to one model, whose
buffers are not replaced), the cache's whenever another pool comes. tests/test_decode_step.py
compares it with the eager ``decode_step`` on tiny Gemma 2 and Gemma 3 configs, ring wrap-around,
batched rows of different lengths and idle rows included.
"""

from __future__ import annotations

import ctypes
from ctypes import c_float, c_int32, c_int64, c_void_p

import torch

from .. import cpu_kernel
from ..gguf_quant import _GEMV_ROWS, BlockQuantLinear
from ..kv_cache import KVCache
from ..model import Gemma


class _Weight(ctypes.Structure):
    _fields_ = [("codes", c_void_p), ("scale", c_void_p), ("offset", c_void_p), ("n", c_int64), ("k", c_int64),
                ("gs", c_int64), ("half", c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Weight * 3), ("n_qkv", c_int32), ("gate_up", _Weight * 2), ("n_gate_up", c_int32),
                ("o", _Weight), ("down", _Weight), ("attn_norm", c_void_p), ("post_attn_norm", c_void_p),
                ("pre_mlp_norm", c_void_p), ("post_mlp_norm", c_void_p), ("q_norm", c_void_p), ("k_norm", c_void_p),
                ("k_cache", c_void_p), ("v_cache", c_void_p), ("slots", c_int64), ("local", c_int32)]


class _Dims(ctypes.Structure):
    _fields_ = [("hidden", c_int64), ("heads", c_int64), ("kv_heads", c_int64), ("head_dim", c_int64),
                ("intermediate", c_int64), ("window", c_int64), ("eps", c_float), ("attn_scale", c_float),
                ("softcap", c_float), ("final_norm", c_void_p), ("inv_freq_local", c_void_p),
                ("inv_freq_global", c_void_p)]


class _Rows(ctypes.Structure):
    _fields_ = [("M", c_int64), ("rows", c_void_p), ("positions", c_void_p), ("global_cols", c_void_p),
                ("ring_cols", c_void_p), ("global_pos", c_void_p), ("ring_pos", c_void_p), ("global_stride", c_int64),
                ("ring_stride", c_int64), ("kv_len", c_int64), ("ring_len", c_int64)]


def _projections(block) -> tuple[list, list, BlockQuantLinear, BlockQuantLinear]:
    a, m = block.attn, block.mlp
    qkv = [a.fused_qkv] if hasattr(a, "fused_qkv") else [a.q_proj, a.k_proj, a.v_proj]
    gate_up = [m.fused_gate_up] if hasattr(m, "fused_gate_up") else [m.gate_proj, m.up_proj]
    return qkv, gate_up, a.o_proj, m.down_proj


def _float32(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()


def supported(model: Gemma) -> bool:
    """Whether ``NativeStep`` can run ``model``: every projection a BlockQuantLinear on CPU, float32
    norms, rope frequencies and activations, and the C kernels built here."""
    if not cpu_kernel.available() or not all(map(_float32, (model.final_norm.weight, model.inv_freq_local,
                                                            model.inv_freq_global))):
        return False
    for block in model.layers:
        qkv, gate_up, o, down = _projections(block)
        for w in (*qkv, *gate_up, o, down):
            if not isinstance(w, BlockQuantLinear) or w.codes.device.type != "cpu" or w.group % 16:
                return False
        if not all(_float32(p) for p in block.parameters()):
            return False
    return True


def _weight(w: BlockQuantLinear) -> _Weight:
    off = None if w.offset is None else w.offset.data_ptr()
    return _Weight(w.codes.data_ptr(), w.scale.data_ptr(), off, w.out_features, w.in_features, w.group,
                   cpu_kernel.half_flag(w.scale, w.offset))


class NativeStep:
    """``(tokens, positions, cache, kv_lens, normalizer) -> float32 logits [S, V]``: the contract of
    ``fast.decode_step`` for up to 16 rows. More rows go to the torch step, whose dequantize-and-
    sgemm matmuls then win (embedded 270M, 2 threads, ms per step, native / eager torch: 12 rows
    65 / 65, 16 rows 82 / 93, 24 rows 123 / 115, 32 rows 152 / 125)."""

    max_rows = _GEMV_ROWS  # 16

    def __init__(self, model: Gemma):
        if not supported(model):
            raise ValueError("NativeStep needs a GGUF-native model on CPU (gguf_quant.build_model)")
        c = model.config
        self.model = model
        self.dims = _Dims(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size,
                          c.sliding_window, c.rms_norm_eps, c.attn_scale, c.attn_logit_softcap or 0.0,
                          model.final_norm.weight.data_ptr(), model.inv_freq_local.data_ptr(),
                          model.inv_freq_global.data_ptr())
        self.layers = (_Layer * c.num_layers)()
        for i, (block, layer) in enumerate(zip(model.layers, self.layers)):
            qkv, gate_up, o, down = _projections(block)
            layer.n_qkv, layer.n_gate_up = len(qkv), len(gate_up)
            for j, w in enumerate(qkv):
                layer.qkv[j] = _weight(w)
            for j, w in enumerate(gate_up):
                layer.gate_up[j] = _weight(w)
            layer.o, layer.down = _weight(o), _weight(down)
            layer.attn_norm = block.attn_norm.weight.data_ptr()
            layer.post_attn_norm = block.post_attn_norm.weight.data_ptr()
            layer.pre_mlp_norm = block.pre_mlp_norm.weight.data_ptr()
            layer.post_mlp_norm = block.post_mlp_norm.weight.data_ptr()
            if c.qk_norm:
                layer.q_norm = block.attn.q_norm.weight.data_ptr()
                layer.k_norm = block.attn.k_norm.weight.data_ptr()
            layer.local = int(c.is_local(i))
        self._pool = None  # (address, slots) per layer of the cache whose pointers the layers hold

    def _bind(self, cache: KVCache) -> None:
        key = tuple((k.data_ptr(), k.shape[2]) for k in cache.k)
        if key == self._pool:
            return
        for k, v, layer in zip(cache.k, cache.v, self.layers):
            if not (_float32(k) and _float32(v)):
                raise ValueError("the native decode step needs a contiguous float32 CPU cache")
            layer.k_cache, layer.v_cache, layer.slots = k.data_ptr(), v.data_ptr(), k.shape[2]
        self._pool = key

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, kv_lens: tuple[int, int],
                 normalizer: float) -> torch.Tensor:
        """Idle rows (position -1) are left out of the layers and the head, which cost per row as
        much for an idle row as for a live one; their logits are zeros (the scheduler reads only
        live rows)."""
        model = self.model
        self._bind(cache)
        global_cols, ring_cols = cache.decode_columns(positions)
        rows = torch.nonzero(positions[:, 0] >= 0)[:, 0]
        every = rows.numel() == positions.shape[0]
        if not every:
            tokens, positions = tokens[rows], positions[rows]
            global_cols, ring_cols = global_cols[rows], ring_cols[rows]
        positions, global_cols, ring_cols = positions.contiguous(), global_cols.contiguous(), ring_cols.contiguous()
        m = rows.numel()
        h = (model.embed(tokens) * normalizer).contiguous()  # [m, 1, hidden] float32
        gpos, rpos = cache.global_pos, cache.ring_pos
        step = _Rows(m, rows.data_ptr(), positions.data_ptr(), global_cols.data_ptr(), ring_cols.data_ptr(),
                     gpos.data_ptr(), rpos.data_ptr(), gpos.stride(0), rpos.stride(0), kv_lens[0], kv_lens[1])
        if m:
            rc = cpu_kernel.library().gf_decode_layers(ctypes.byref(self.dims), self.layers, len(self.layers),
                                                       ctypes.byref(step), h.data_ptr(), torch.get_num_threads())
            if rc:
                raise MemoryError("native decode step: out of memory for its scratch buffers")
        logits = model.logits(h[:, 0]).float()  # h is final-normed by the C step
        if every:
            return logits
        out = logits.new_zeros(cache.num_rows, logits.shape[-1])
        out[rows] = logits
        return out
