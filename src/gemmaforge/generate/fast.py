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
  ops and CUDA graphs remove the per-kernel launch cost (REFERENCE.md section 9: HF's eager decode
  is launch-bound at 29.6 tok/s against a ~500 tok/s bandwidth floor).
- CPU, for quantized models: inductor turns the whole step (GEMVs included, quant.py) into a few
  C++ functions, so the ~60 eager ops per layer stop costing a dispatch each. That is what lets
  int8 and int4 decode beat llama.cpp (docs/benchmarks.md). Sizes are symbolic (``kv_lens``, cache
  length, batch), so one compilation serves every prompt and chat turn. A float32 step is bound by
  reading its 1 GB of weights and compiling it gained nothing measurable (10.0 vs 9.5 tok/s), so
  it stays eager.

Compiling costs 30-60 s the first time on 2 cores and ~14 s once inductor's on-disk cache has the
kernels (dynamo still traces every layer), so the CLI compiles only long runs (commands/generate.py).

Prefill (more than one new column) goes through ``Gemma.hidden_states``, whose attention dispatch
already picks FlexAttention on CUDA and chunked attention for long CPU prompts (no T x T scores),
and only the last column goes through the output head.

The soft-caps are always applied: attention's by ``_attend`` (or flex's score_mod), the final one by
``Gemma.logits``. tests/test_fast.py checks every path against the eager reference.
"""

from __future__ import annotations

import warnings

import torch

from ..kv_cache import KVCache
from ..model import Gemma
from ..rope import rope_cos_sin

_NEG = torch.finfo(torch.float32).min  # as attention._NEG: finite, so softmax never sees -inf - -inf


def _bias(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1] query positions, [B, S] slot positions -> additive float32 mask [B, 1, 1, S].

    The rule of ``attention.Mask``: key visible iff it is a real token, not in the future, and (local
    layers) fewer than ``window`` positions back."""
    d = q_pos - k_pos
    ok = (k_pos >= 0) & (d >= 0)
    if window is not None:
        ok = ok & (d < window)
    return torch.where(ok, 0.0, _NEG)[:, None, None, :]


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
    """sqrt(hidden) rounded to the activation dtype first (48.0 in bf16 for 2B, REFERENCE.md 1), as a
    Python float so a compiled step sees a constant."""
    return torch.tensor(model.config.embed_normalizer, dtype=model.final_norm.weight.dtype).item()


def decode_step(model: Gemma, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                col: torch.Tensor, kv_lens: tuple[int, int] | None = None,
                normalizer: float | None = None) -> torch.Tensor:
    """tokens, positions [B, 1]; ``col`` [1] long: the cache column to write -> float32 logits [B, V].

    Writes this step's keys, values and positions into ``cache`` but leaves ``cache.length`` and
    ``col`` to the caller (``FastForward.__call__``), so the function has no host-side state.
    """
    c = model.config
    h = model.embed(tokens) * (normalizer if normalizer is not None else embed_normalizer(model))
    rope = {True: rope_cos_sin(positions, model.inv_freq_local, h.dtype),
            False: rope_cos_sin(positions, model.inv_freq_global, h.dtype)}
    ring_col = col % cache.window
    cache.global_pos.index_copy_(1, col, positions)
    cache.ring_pos.index_copy_(1, ring_col, positions)
    # kv_lens = (global, ring) written slots: attend over those only. The ring fills slot =
    # column % W, so before it wraps its written slots are a prefix too. The caller passes the ring's
    # length rather than this function taking a min(): compiled, the lengths are symbolic ints, and
    # a min() would guard on which side is smaller and recompile when the context outgrows the window.
    kv_len, ring_len = (None, None) if kv_lens is None else kv_lens
    global_pos = cache.global_pos if kv_len is None else cache.global_pos[:, :kv_len]
    ring_pos = cache.ring_pos if ring_len is None else cache.ring_pos[:, :ring_len]
    bias = {True: _bias(positions, ring_pos, c.sliding_window), False: _bias(positions, global_pos, None)}
    for i, block in enumerate(model.layers):
        local = c.is_local(i)
        q, k, v = block.attn.qkv(block.attn_norm(h), rope[local])
        ck, cv = cache.k[i], cache.v[i]
        slot = ring_col if local else col
        ck.index_copy_(2, slot, k)
        cv.index_copy_(2, slot, v)
        y = _attend(q, ck, cv, bias[local], c.attn_scale, c.attn_logit_softcap, ring_len if local else kv_len)
        h = block.mlp_residual(h + block.post_attn_norm(block.attn.out(y)))
    return model.logits(model.final_norm(h)[:, 0]).float()


class FastForward:
    """``(tokens, positions, cache) -> float32 logits [B, V]`` of the last column: the contract of
    ``Engine._forward``. Decode columns take ``decode_step`` (compiled + CUDA graphs on CUDA),
    prefill chunks ``Gemma.hidden_states``.

    ``compile``: None = on CUDA, and on CPU for a quantized model (module docstring); ``mode``: None =
    "reduce-overhead" on CUDA (CUDA graphs), "default" elsewhere. With CUDA graphs the caches must
    stay at fixed addresses (graphs replay recorded pointers): caches are marked static the first
    time they are seen, and each new cache shape costs one compilation (``new_cache`` rounds lengths
    up and reuses caches to limit that). On CPU the cache length is dynamic instead.
    """

    def __init__(self, model: Gemma, *, compile: bool | None = None, mode: str | None = None):
        self.model = model.eval()
        device = model.final_norm.weight.device
        if compile is None:
            compile = device.type == "cuda" or bool(getattr(model, "quantization", None))
        mode = mode or ("reduce-overhead" if device.type == "cuda" else "default")
        self.compile = compile
        self.graphs = compile and mode in ("reduce-overhead", "max-autotune")  # the CUDA-graph modes
        self.normalizer = embed_normalizer(model)
        self._step = decode_step
        if compile:
            # Without CUDA graphs, sizes are symbolic (kv_len, the cache length, the batch): one
            # compilation serves a whole chat. Weights keep static shapes (inductor's default).
            self._step = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=not self.graphs)
            # No duck sizing: it would give two lengths that happen to be equal on the first call
            # (global and ring, before the ring fills) one symbol, and recompile once they differ.
            self._step = torch.fx.experimental._config.patch(use_duck_shape=False)(self._step)
        self._compiled = False  # a compiled step has run (after that, errors are not compile errors)
        self._cols: dict[int, tuple[KVCache, torch.Tensor, int]] = {}
        self._pool: dict[tuple[int, int], KVCache] = {}

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A cache for one generation.

        CUDA graphs: lengths rounded up to 256 and caches reused per shape (a new tensor would mean
        a new graph), so one FastForward serves one generation at a time. Compiled without graphs:
        at least a window long, so that the local layers' rings always hold ``sliding_window`` slots
        and only the global length varies (a dynamic dimension: no recompilation per length)."""
        if not self.compile:
            return self.model.new_cache(batch_size, max_len)
        c = self.model.config
        if not self.graphs:
            cache = self.model.new_cache(batch_size, min(max(max_len, c.sliding_window), c.max_position_embeddings),
                                         spare=1)
            # The ring length is the constant window. Marked static, or dynamo's "duck sizing"
            # would tie it to a global length that happens to be equal, and recompile later.
            for i in range(c.num_layers):
                if c.is_local(i):
                    torch._dynamo.mark_static(cache.k[i], 2)
                    torch._dynamo.mark_static(cache.v[i], 2)
            torch._dynamo.mark_static(cache.ring_pos, 1)
            return cache
        max_len = min(-(-max_len // 256) * 256, self.model.config.max_position_embeddings)
        cache = self._pool.get((batch_size, max_len))
        if cache is None:
            cache = self._pool[batch_size, max_len] = self.model.new_cache(batch_size, max_len)
        cache.reset()
        return cache

    def _column(self, cache: KVCache) -> torch.Tensor:
        """The device-side copy of ``cache.length``; re-read from the host only after a prefill."""
        entry = self._cols.get(id(cache))
        if entry is None or entry[0] is not cache:
            if self.graphs:
                for t in [*cache.k, *cache.v, cache.global_pos, cache.ring_pos]:
                    torch._dynamo.mark_static_address(t)
            entry = (cache, torch.tensor([cache.length], device=cache.global_pos.device), cache.length)
        elif entry[2] != cache.length:
            entry[1].fill_(cache.length)
            entry = (cache, entry[1], cache.length)
        self._cols = {id(cache): entry}  # only the newest cache is tracked
        return entry[1]

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if tokens.shape[1] > 1:
            h = self.model.hidden_states(tokens, positions, cache)
            return self.model.logits(h[:, -1]).float()
        if cache.length + 1 > cache.max_len:
            raise ValueError(f"KV cache full: {cache.length} + 1 tokens > max_len {cache.max_len}")
        col = self._column(cache)
        n = cache.length + 1
        kv_lens = None if self.graphs else (n, min(n, cache.window))
        try:
            logits = self._step(self.model, tokens, positions, cache, col, kv_lens, self.normalizer)
        except Exception as e:  # noqa: BLE001 - a missing C++ compiler surfaces as whatever inductor raises
            if not self.compile or self._compiled or self.graphs:
                raise
            warnings.warn(f"compiling the decode step failed ({type(e).__name__}: {str(e)[:200]}); "
                          "running it eagerly")
            self.compile, self._step = False, decode_step
            logits = decode_step(self.model, tokens, positions, cache, col, kv_lens, self.normalizer)
        self._compiled = self.compile
        if self.graphs:
            logits = logits.clone()  # CUDA graph outputs are overwritten by the next replay
        col.add_(1)
        cache.length += 1
        self._cols[id(cache)] = (cache, col, cache.length)
        return logits
