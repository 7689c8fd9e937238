"""One config-driven network for Gemma 2 and Gemma 3 text models (docs/reference.md §1-2).

    h = embed(tokens) * round_to_dtype(sqrt(hidden))
    for each layer:  h = h + post_attn_norm(attn(attn_norm(h)))
                     h = h + post_mlp_norm(mlp(pre_mlp_norm(h)))
    logits = softcap(final_norm(h) @ embed.T)

The family differences are config values, not code paths: soft-caps are ``None`` for Gemma 3, QK-norm
is a flag, the rope theta and window follow each layer's entry in ``config.layer_types``.

The model is pure math: ``forward(tokens, positions, cache) -> logits``. Tokenizers, sampling and
checkpoint formats live elsewhere. ``hidden_states`` and ``logits`` are exposed separately so losses
can apply the output head chunk by chunk instead of materialising [B, T, vocab] at once.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import Mask, attention
from .config import GemmaConfig
from .kv_cache import CacheStep, KVCache
from .rope import apply_rope, inv_frequencies, rope_cos_sin


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + w), in float32, then cast back; w starts at 0."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class MLP(nn.Module):
    """GeGLU with the tanh approximation of GELU; no biases."""

    def __init__(self, c: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "fused_gate_up"):  # set by quant.quantize: one matmul instead of two
            gate, up = self.fused_gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Attention(nn.Module):
    def __init__(self, c: GemmaConfig, layer: int):
        super().__init__()
        self.layer, self.c = layer, c
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        if c.qk_norm:  # Gemma 3: normalise q and k over head_dim before RoPE, instead of soft-capping
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def project_qkv(self, x):
        """x [B, T, hidden] -> q [B, T, H*D], k and v [B, T, Hkv*D]."""
        if hasattr(self, "fused_qkv"):  # set by quant.quantize: one matmul instead of three
            c = self.c
            return self.fused_qkv(x).split([c.num_heads * c.head_dim] + [c.num_kv_heads * c.head_dim] * 2, -1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def qkv(self, x, rope):
        """x [B, T, hidden] -> q [B, H, T, D], k and v [B, Hkv, T, D], QK-normed and rotated."""
        b, t, _ = x.shape
        c = self.c
        q, k, v = self.project_qkv(x)
        q = q.view(b, t, c.num_heads, c.head_dim).transpose(1, 2)
        k = k.view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, y):
        """y [B, H, T, D] -> [B, T, hidden]."""
        b, _, t, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.c.num_heads * self.c.head_dim))

    def forward(self, x, rope, mask: Mask, cache: KVCache | None, step: CacheStep | None, impl):
        q, k, v = self.qkv(x, rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, step)
        c = self.c
        return self.out(attention(q, k, v, mask, scale=c.attn_scale, softcap=c.attn_logit_softcap, impl=impl))


class Embedding(nn.Embedding):
    """The tied table: ``forward`` looks rows up, ``head`` is the output matmul (quant.QuantEmbedding
    has the same two methods for a quantized table)."""

    def reset_parameters(self) -> None:
        # A table on the meta device is about to be loaded into: nothing to draw, and meta-device
        # normal_ goes through torch._refs, whose first use imports torch._dynamo (~2 s of a load).
        if not self.weight.is_meta:
            super().reset_parameters()

    def head(self, h: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """h [..., D] -> h @ weight^T [..., vocab]; written into ``out`` (no autograd) when given."""
        return F.linear(h, self.weight) if out is None else torch.matmul(h, self.weight.T, out=out)


class Block(nn.Module):
    def __init__(self, c: GemmaConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = Attention(c, layer)
        self.post_attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.pre_mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)
        self.post_mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, h, rope, mask, cache=None, step=None, impl=None):
        h = h + self.post_attn_norm(self.attn(self.attn_norm(h), rope, mask, cache, step, impl))
        return self.mlp_residual(h)

    def mlp_residual(self, h):
        return h + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(h)))


class Gemma(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        c = self.config = config
        self.embed = Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.num_layers))
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn_impl: str | None = None  # None = choose per call (attention.choose_impl)
        self.activation_checkpointing = False
        self.reset_buffers()

    def reset_buffers(self, device=None) -> None:
        """(Re)compute the non-persistent rope tables, e.g. after building on the meta device."""
        c = self.config
        local = inv_frequencies(c.head_dim, c.rope_local_theta)
        glob = inv_frequencies(c.head_dim, c.rope_theta, c.rope_scaling_factor)
        self.register_buffer("inv_freq_local", local.to(device), persistent=False)
        self.register_buffer("inv_freq_global", glob.to(device), persistent=False)

    # ---- the network -------------------------------------------------------------------------
    def hidden_states(self, tokens, positions=None, cache: KVCache | None = None, *, rows: slice | None = None,
                      segment_ids=None, attn_impl=None):
        """tokens [B, T] -> final-normed hidden states [B, T, hidden].

        With a cache, the tokens extend pool rows ``rows`` (default: all) and positions default to
        each row's length onwards. ``segment_ids`` [B, T] (no cache): documents packed into one
        window; a token sees only keys of its own segment (attention.visible). Positions should
        then restart at 0 per document."""
        c = self.config
        b, t = tokens.shape
        if positions is None:
            start = torch.zeros(b, 1, dtype=torch.long)
            if cache is not None:
                start = torch.tensor(cache.lengths[rows or slice(None)])[:, None]
            positions = (start + torch.arange(t)).to(tokens.device)
        h = self.embed(tokens)
        # sqrt(hidden) rounded to the activation dtype first: 48.0 in bf16 for 2B (docs/reference.md §1).
        h = h * torch.tensor(c.embed_normalizer, dtype=h.dtype, device=h.device)
        rope = {
            True: rope_cos_sin(positions, self.inv_freq_local, h.dtype),
            False: rope_cos_sin(positions, self.inv_freq_global, h.dtype),
        }
        step = None
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids are for packed training windows, not cached decoding")
            step = cache.prepare(positions, rows)
            masks = {True: Mask(positions, step.local_k_pos, c.sliding_window),
                     False: Mask(positions, step.global_k_pos)}
        else:
            seg = (segment_ids, segment_ids)
            masks = {True: Mask(positions, positions, c.sliding_window, *seg),
                     False: Mask(positions, positions, None, *seg)}
        impl = attn_impl or self.attn_impl
        for i, block in enumerate(self.layers):
            local = c.is_local(i)
            if self.activation_checkpointing and self.training and cache is None:
                h = checkpoint(block, h, rope[local], masks[local], None, None, impl, use_reentrant=False)
            else:
                h = block(h, rope[local], masks[local], cache, step, impl)
        if cache is not None:
            cache.commit(step)
        return self.final_norm(h)

    def logits(self, h: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tied output head and the final soft-cap (Gemma 2: 30). Works on any slice of tokens. With
        ``out`` (a preallocated [..., vocab] buffer, no autograd) the logits are written there and
        soft-capped in place, so a chunked loop allocates nothing per chunk."""
        cap = self.config.final_logit_softcap
        if out is None:
            return softcap(self.embed.head(h), cap)
        z = self.embed.head(h, out=out)
        return z if cap is None else z.div_(cap).tanh_().mul_(cap)

    def forward(self, tokens, positions=None, cache: KVCache | None = None, *, rows: slice | None = None,
                segment_ids=None, attn_impl=None):
        """tokens [B, T] (positions [B, T], -1 = padding) -> logits [B, T, vocab] after the soft-cap."""
        h = self.hidden_states(tokens, positions, cache, rows=rows, segment_ids=segment_ids, attn_impl=attn_impl)
        return self.logits(h)

    # ---- conveniences ------------------------------------------------------------------------
    def new_cache(self, num_rows: int, max_len: int | None = None, slack: int = 0) -> KVCache:
        p = self.final_norm.weight  # not embed.weight: a quantized table has none
        max_len = max_len or self.config.max_position_embeddings
        return KVCache(self.config, num_rows, max_len, device=p.device, dtype=p.dtype, slack=slack)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> "Gemma":
        """Random init (for presets and training from scratch); norms start at 0, i.e. scale 1."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        return self
