"""The fast decode step: one new token per row, written for the machine instead of for generality.

``Gemma.hidden_states`` handles any number of new tokens, padding, chunked prefill and a growing
cache, and pays for it on every call: host-side index tensors, ``Mask`` objects, a cloned ring of
positions, slices whose length changes each step. Decode is always the same shape, [B, 1], so
``decode_step`` does the same math (the model's own modules: norms, projections, MLP, head) with
the bookkeeping cut to the minimum:

- the cache write column is a device tensor, advanced on the device: no host sync, no new tensors;
- the mask is an additive bias built once per step per layer type from the stored slot positions;
- with ``kv_lens=None`` shapes never change between steps (attend over all slots, unwritten ones
  have position -1 and are masked), which is what CUDA graphs need; otherwise ``kv_lens`` limits
  attention to the written slots.

When the step is compiled (``FastForward``):

- CUDA, always, with ``mode="reduce-overhead"`` and ``kv_lens=None``: inductor fuses the element-wise
  ops and CUDA graphs remove the per-kernel launch cost (docs/reference.md §9: HF's eager decode
  is launch-bound at 29.6 tok/s against a ~500 tok/s bandwidth floor).
- CPU, for quantized models: inductor turns the whole step (GEMVs included, quant.py) into a few
  C++ functions, so the ~60 eager ops per layer stop costing a dispatch each. That is what lets
  int8 and int4 decode beat llama.cpp (docs/benchmarks.md). Sizes are symbolic (``kv_lens``, cache
  length, batch), so one compilation serves every prompt and chat turn. A float32 step is bound by
  reading its 1 GB of weights and compiling it gained nothing measurable (10.0 vs 9.5 tok/s), so
  it stays eager.

A GGUF-native model on CPU (the default load of a quantized GGUF file) decodes batches of up to
16 rows through ``native.NativeStep`` instead (decode_step.c: every layer in one C call, the
same math), which is faster than the compiled step and compiles nothing.

Compiling costs 30-60 s the first time on 2 cores and ~14 s once inductor's on-disk cache has the
kernels (dynamo still traces every layer), so the CLI compiles only long runs (commands/generate.py).

Prefill (more than one new column) goes through ``Gemma.hidden_states``, whose attention dispatch
already picks FlexAttention on CUDA and chunked attention for long CPU prompts (no T x T scores),
and only the last column goes through the output head.

The soft-caps are always applied: attention's by ``_attend`` (or flex's score_mod), the final one by
``Gemma.logits``. tests/test_fast.py checks every path against the eager reference.
"""

from __future__ import annotations

import types
import warnings
import weakref

import torch

from ..attention import visible
from ..kv_cache import KVCache
from ..model import Gemma
from ..quant import can_compile_cpu
from ..rope import rope_cos_sin
from .native import NativeStep, supported

_NEG = torch.finfo(torch.float32).min  # as attention._NEG: finite, so softmax never sees -inf - -inf


def _bias(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1] query positions, [B, S] slot positions -> additive float32 mask [B, 1, 1, S].

    The one visibility rule, ``attention.visible``."""
    return torch.where(visible(q_pos, k_pos, window), 0.0, _NEG)[:, None, None, :]


def _attend(q, k, v, bias, scale: float, cap: float | None, n: int | None = None) -> torch.Tensor:
    """One query per row: q [B, H, 1, D], cache k/v [B, Hkv, S, D], attending over the first ``n``
    slots (all if None; ``bias`` [B, 1, 1, n]) -> [B, H, 1, D]. The eager math of
    attention.eager_attention: soft-cap before the mask, softmax in float32.

    Written with bmm over a flattened, then sliced cache, not matmul over a sliced one: compiled,
    ``n`` is symbolic, and matmul's decomposition and reshape's contiguity check compare it with the
    cache's sizes. Each such comparison is a guard, i.e. a recompilation at some context length."""
    b, h, _, d = q.shape
    n_kv = k.shape[1]
    g = h // n_kv
    k3, v3 = k.view(b * n_kv, -1, d), v.view(b * n_kv, -1, d)
    if n is not None:
        k3, v3 = k3[:, :n], v3[:, :n]
    scores = torch.bmm(q.reshape(b * n_kv, g, d), k3.transpose(1, 2)).float().view(b, n_kv, g, -1) * scale
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    probs = torch.softmax(scores + bias, dim=-1).to(v.dtype)
    return torch.bmm(probs.view(b * n_kv, g, -1), v3).reshape(b, h, 1, d)


def embed_normalizer(model: Gemma) -> float:
    """sqrt(hidden) rounded to the activation dtype first (48.0 in bf16 for 2B, docs/reference.md §1), as a
    Python float so a compiled step sees a constant."""
    return torch.tensor(model.config.embed_normalizer, dtype=model.final_norm.weight.dtype).item()


def decode_step(model: Gemma, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                kv_lens: tuple[int, int] | None = None, normalizer: float | None = None) -> torch.Tensor:
    """tokens, positions [S, 1] for every pool row (position -1 = an idle row) -> float32 logits [S, V].

    The cache does the writes (``decode_columns``, ``write``); the host-side lengths are left to the
    caller (``FastForward.__call__``), so the function has no host-side state.
    """
    c = model.config
    h = model.embed(tokens) * (normalizer if normalizer is not None else embed_normalizer(model))
    rope = {True: rope_cos_sin(positions, model.inv_freq_local, h.dtype),
            False: rope_cos_sin(positions, model.inv_freq_global, h.dtype)}
    global_cols, ring_cols = cache.decode_columns(positions)
    # kv_lens = (global, ring) slots to attend over: the longest row's length, and that capped at the
    # ring. The caller passes both rather than this function taking a min(): compiled, the lengths
    # are symbolic ints, and a min() would guard on which side is smaller and recompile when the
    # context outgrows the window.
    kv_len, ring_len = (None, None) if kv_lens is None else kv_lens
    global_pos = cache.global_pos if kv_len is None else cache.global_pos[:, :kv_len]
    ring_pos = cache.ring_pos if ring_len is None else cache.ring_pos[:, :ring_len]
    bias = {True: _bias(positions, ring_pos, c.sliding_window), False: _bias(positions, global_pos, None)}
    for i, block in enumerate(model.layers):
        local = c.is_local(i)
        q, k, v = block.attn.qkv(block.attn_norm(h), rope[local])
        cache.write(i, k, v, ring_cols if local else global_cols)
        y = _attend(q, cache.k[i], cache.v[i], bias[local], c.attn_scale, c.attn_logit_softcap,
                    ring_len if local else kv_len)
        h = block.mlp_residual(h + block.post_attn_norm(block.attn.out(y)))
    return model.logits(model.final_norm(h)[:, 0]).float()


def _private_copy(fn):
    """``fn`` with its own code object. Dynamo keeps compiled entries per code object, and the
    CPU entries of this step carry no guards on the model (``_compile_options``): a copy per
    FastForward keeps one model's compiled step from ever being reused for another model."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__)


def _compile_options(mode: str, device: torch.device) -> dict:
    """On CPU: no guards on the model's modules and parameters. A FastForward belongs to one model
    (its config is frozen, its modules are not swapped after the engine is built), and a weight
    update in place, as in training between rollouts, is still read, because the parameters are
    graph inputs. Checking the ~2,000 guards of an 18-layer model costs ~0.8 ms per step on CPU, 4-6%
    of int4 decode (docs/benchmarks.md). CUDA keeps its guards until this is measured on a GPU."""
    if device.type != "cpu":
        return {"mode": mode}
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    # torch.compile takes a mode or options, not both: the mode's options plus the filter.
    return {"options": {**torch._inductor.list_mode_options(mode), **options}}


class FastForward:
    """``(tokens, positions, cache, rows, columns) -> float32 logits``: the contract of
    ``Engine._forward``. A decode step over the whole pool ([S, 1]) takes ``decode_step`` (compiled,
    plus CUDA graphs on CUDA); anything else (prefill chunks, a slice of the pool, several columns
    to verify or score) takes ``Gemma.hidden_states``, and only the requested columns go through
    the output head.

    ``native``: None = decode steps of up to 16 rows of a GGUF-native CPU model go through
    ``native.NativeStep`` (decode_step.c), False = never, True = required (an error if the model
    cannot take it). ``compile``: None = on CUDA, and on CPU for a quantized model (module docstring),
    which the native step then serves only above 16 rows; ``mode``: None =
    "reduce-overhead" on CUDA (CUDA graphs), "default" elsewhere. With CUDA graphs the caches must
    stay at fixed addresses (graphs replay recorded pointers): caches are marked static the first
    time they are seen, and each new pool shape costs one compilation (``new_cache`` rounds lengths
    up and reuses pools to limit that). On CPU the lengths are dynamic instead.
    """

    def __init__(self, model: Gemma, *, compile: bool | None = None, mode: str | None = None,
                 native: bool | None = None):
        self.model = model
        device = model.final_norm.weight.device
        # A GGUF-native model on CPU decodes small batches through decode_step.c (native.py): faster
        # than the compiled step and nothing to compile. ``native=False`` keeps the torch step.
        self.native = NativeStep(model) if native is not False and supported(model) else None
        if native and self.native is None:
            raise ValueError("native=True needs a GGUF-native model on CPU and a C compiler")
        if compile is None:
            compile = device.type == "cuda" or bool(getattr(model, "quantization", None))
        if compile and device.type == "cpu" and not can_compile_cpu():
            # Checked up front, not caught after the fact: a compile error is then a real bug.
            warnings.warn("no C++ compiler found (g++, c++ or clang++): the decode step runs eagerly")
            compile = False
        mode = mode or ("reduce-overhead" if device.type == "cuda" else "default")
        self.compile = compile
        self.graphs = compile and mode in ("reduce-overhead", "max-autotune")  # the CUDA-graph modes
        self.normalizer = embed_normalizer(model)
        self._mode = mode
        self._step = decode_step
        # With the native step the compiled one serves only pools of more than 16 rows: it is built
        # when one comes, not here (torch.compile's set-up imports dynamo, ~0.9 s of every start).
        if compile and self.native is None:
            self._compile_step()
        self._static: set[int] = set()
        self._marked: weakref.WeakSet = weakref.WeakSet()  # caches and views marked for dynamo
        self._pool: dict[tuple[int, int, int], KVCache] = {}

    def _compile_step(self) -> None:
        device = self.model.final_norm.weight.device
        # Without CUDA graphs, sizes are symbolic (kv_len, the cache length, the pool size): one
        # compilation serves a whole chat. Weights keep static shapes (inductor's default).
        step = torch.compile(_private_copy(decode_step), fullgraph=True, dynamic=not self.graphs,
                             **_compile_options(self._mode, device))
        # No duck sizing: it would give two lengths that happen to be equal on the first call
        # (global and ring, before the ring fills) one symbol, and recompile once they differ.
        self._step = torch.fx.experimental._config.patch(use_duck_shape=False)(step)

    def compiled_for(self, num_rows: int) -> bool:
        """Whether decode steps over ``num_rows`` pool rows take the compiled step (else the native
        or the eager one)."""
        return self.compile and (self.native is None or num_rows > self.native.max_rows)

    def new_cache(self, num_rows: int, max_len: int, slack: int = 0) -> KVCache:
        """A cache for the engine.

        CUDA graphs: lengths rounded up to 256 and pools reused per shape (a new tensor would mean
        a new graph), so one FastForward serves one pool at a time. Compiled without graphs: at
        least a window long, so that the local layers' rings always hold the same number of slots
        and only the global length varies (a dynamic dimension: no recompilation per length)."""
        c = self.model.config
        if not self.compiled_for(num_rows):
            return self.model.new_cache(num_rows, max_len, slack)
        if not self.graphs:
            max_len = min(max(max_len, c.sliding_window + slack), c.max_position_embeddings)
            cache = self.model.new_cache(num_rows, max_len, slack)
            self._mark_ring_static(cache)
            return cache
        max_len = min(-(-max_len // 256) * 256, c.max_position_embeddings)
        cache = self._pool.get((num_rows, max_len, slack))
        if cache is None:
            cache = self._pool[num_rows, max_len, slack] = self.model.new_cache(num_rows, max_len, slack)
        cache.reset()
        return cache

    def _mark_ring_static(self, cache: KVCache) -> None:
        """The ring length is a constant. Marked static, or dynamo's "duck sizing" would tie it to
        a global length that happens to be equal, and recompile later. The pool and every
        ``prefix`` view of it get the same marks: dynamo guards on their presence, and a pool
        marked unlike its views recompiled the step (~45 s on 2 cores) the first time a server's
        batch filled the whole pool."""
        c = self.model.config
        for i in range(c.num_layers):
            if c.is_local(i):
                torch._dynamo.mark_static(cache.k[i], 2)
                torch._dynamo.mark_static(cache.v[i], 2)
        torch._dynamo.mark_static(cache.ring_pos, 1)
        self._marked.add(cache)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, rows: slice | None = None,
                 columns: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Logits of the last column [B, V] (``columns`` None) or of the given columns [B, C, V]."""
        start, stop, stride = (0, cache.num_rows, 1) if rows is None else rows.indices(cache.num_rows)
        # The first rows of the pool (the scheduler's live rows) take the compiled step too, over a
        # view of them; not with CUDA graphs, which replay one recorded batch size.
        first_rows = start == 0 and stride == 1 and (stop == cache.num_rows or not self.graphs)
        if tokens.shape[1] > 1 or not first_rows or columns is not None:
            h = self.model.hidden_states(tokens, positions, cache, rows=rows)
            return self.model.logits(h[:, -1] if columns is None else h[:, columns]).float()
        compiled = self.compiled_for(stop)
        if not self.graphs:  # CUDA graphs keep the pool's own tensors (their recorded addresses)
            cache = cache.prefix(stop)
            if compiled and cache not in self._marked:
                self._mark_ring_static(cache)
        # Read once on the host: the attended length is the longest *live* row's (idle rows, which
        # may still hold a finished request's keys for prefix reuse, have position -1).
        pos = positions[:, 0].tolist()
        n = max(max(pos) + 1, 1)
        if n > cache.max_len:
            raise ValueError(f"KV cache full: {n - 1} + 1 tokens > max_len {cache.max_len}")
        if self.graphs and id(cache) not in self._static:
            for t in [*cache.k, *cache.v, cache.global_pos, cache.ring_pos]:
                torch._dynamo.mark_static_address(t)
            self._static.add(id(cache))
        kv_lens = None if self.graphs else (n, min(n, cache.ring))
        if self.native is not None and stop <= self.native.max_rows:
            logits = self.native(tokens, positions, cache, kv_lens, self.normalizer)
        else:
            if compiled and self._step is decode_step:
                self._compile_step()
            logits = self._step(self.model, tokens, positions, cache, kv_lens, self.normalizer)
        if self.graphs:
            logits = logits.clone()  # CUDA graph outputs are overwritten by the next replay
        cache.advance(pos)
        return logits
