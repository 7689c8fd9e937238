"""Model configuration: one frozen dataclass for Gemma 2 and Gemma 3 text models, plus named presets.

Everything that can be derived (GQA group size, attention scale, parameter count, which layers are
local) is a property, never a second stored field. ``layer_types`` is data: one entry per layer.
Numbers come from docs/reference.md §1-2.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Literal

from .errors import GemmaforgeError

LOCAL = "sliding_attention"  # HF's spelling, so config.json round-trips unchanged
GLOBAL = "full_attention"
Family = Literal["gemma2", "gemma3"]


@dataclass(frozen=True)
class GemmaConfig:
    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    sliding_window: int
    max_position_embeddings: int
    query_pre_attn_scalar: int
    rope_theta: float  # global layers
    rope_local_theta: float  # local layers (Gemma 2 uses one theta for both)
    rope_scaling_factor: float = 1.0  # linear position scaling, global layers only (Gemma 3 4B+)
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    qk_norm: bool = False
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        bad = sorted(set(self.layer_types) - {LOCAL, GLOBAL})
        if bad:
            raise GemmaforgeError(f"unknown layer type {bad[0]!r}: use {LOCAL!r} or {GLOBAL!r}")
        if self.num_heads % self.num_kv_heads:
            raise GemmaforgeError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if not self.tie_embeddings:
            raise GemmaforgeError("untied embeddings are not part of Gemma 2/3: set tie_embeddings=True")

    # ---- derived values ------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def attn_scale(self) -> float:
        # query_pre_attn_scalar, not head_dim: they differ for gemma2-27b (docs/reference.md §1).
        return self.query_pre_attn_scalar**-0.5

    @property
    def embed_normalizer(self) -> float:
        # The model rounds this to the activation dtype before multiplying (docs/reference.md §1).
        return math.sqrt(self.hidden_size)

    def is_local(self, layer: int) -> bool:
        return self.layer_types[layer] == LOCAL

    @property
    def num_params(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        norms = 4 * d + (2 * hd if self.qk_norm else 0)
        return self.vocab_size * d + d + self.num_layers * (attn + 3 * d * f + norms)

    def replace(self, **changes: Any) -> "GemmaConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GemmaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            hint = difflib.get_close_matches(unknown[0], names, n=1)
            raise GemmaforgeError(
                f"unknown config key {unknown[0]!r}" + (f": did you mean {hint[0]!r}?" if hint else "")
            )
        return cls(**d)


# ---- layer patterns (docs/reference.md §1-2) ------------------------------------------------
def gemma2_layer_types(n: int) -> tuple[str, ...]:
    """Even layers local, odd layers global."""
    return tuple(LOCAL if i % 2 == 0 else GLOBAL for i in range(n))


def gemma3_layer_types(n: int) -> tuple[str, ...]:
    """Five local layers, then one global: layer i is global iff (i + 1) % 6 == 0."""
    return tuple(GLOBAL if (i + 1) % 6 == 0 else LOCAL for i in range(n))


def _gemma2(layers, hidden, heads, kv, head_dim, inter, qpas, vocab=256000) -> GemmaConfig:
    return GemmaConfig(
        family="gemma2", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim, layer_types=gemma2_layer_types(layers),
        sliding_window=4096, max_position_embeddings=8192, query_pre_attn_scalar=qpas,
        rope_theta=10000.0, rope_local_theta=10000.0, attn_logit_softcap=50.0, final_logit_softcap=30.0,
    )


def _gemma3(layers, hidden, heads, kv, head_dim, inter, window=512, vocab=262144) -> GemmaConfig:
    return GemmaConfig(
        family="gemma3", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim, layer_types=gemma3_layer_types(layers),
        sliding_window=window, max_position_embeddings=32768, query_pre_attn_scalar=256,
        rope_theta=1_000_000.0, rope_local_theta=10000.0, qk_norm=True,
    )


PRESETS: dict[str, GemmaConfig] = {
    "gemma2-2b": _gemma2(26, 2304, 8, 4, 256, 9216, 256),
    "gemma2-9b": _gemma2(42, 3584, 16, 8, 256, 14336, 256),
    "gemma2-27b": _gemma2(46, 4608, 32, 16, 128, 36864, 144),
    "gemma3-270m": _gemma3(18, 640, 4, 1, 256, 2048),
    "gemma3-1b": _gemma3(26, 1152, 4, 1, 256, 6912),
    # Tiny presets for tests: >= 3 layers, GQA, a window shorter than test sequences,
    # query_pre_attn_scalar != head_dim, non-default rope theta.
    "tiny-gemma2": _gemma2(4, 64, 4, 2, 16, 128, 24, vocab=512).replace(
        sliding_window=8, max_position_embeddings=256, rope_theta=5000.0, rope_local_theta=5000.0
    ),
    "tiny-gemma3": _gemma3(7, 64, 4, 2, 16, 128, window=8, vocab=512).replace(
        max_position_embeddings=256, query_pre_attn_scalar=20, rope_theta=40000.0, rope_local_theta=3000.0
    ),
    # Gemma 2 architecture with the Gemma 3 tokenizer (vocab 262144), small enough to train on two
    # CPU cores in minutes: the student of the distillation experiment (docs/distillation.md). The
    # tied 262144 x 128 embedding is 33.6M of its 34.7M parameters.
    "gemma2-small": _gemma2(4, 128, 2, 1, 64, 512, 64, vocab=262144).replace(
        sliding_window=128, max_position_embeddings=2048
    ),
}


def preset(name: str) -> GemmaConfig:
    if name not in PRESETS:
        hint = difflib.get_close_matches(name, PRESETS, n=1)
        raise GemmaforgeError(
            f"unknown preset {name!r}"
            + (f": did you mean {hint[0]!r}?" if hint else f"; choose one of {', '.join(PRESETS)}")
        )
    return PRESETS[name]


# ---- Hugging Face config.json <-> GemmaConfig ----------------------------------------------------
_HF_MODEL_TYPES = {"gemma2": "gemma2", "gemma3_text": "gemma3"}


def _rope_thetas(hf: dict[str, Any], family: str) -> tuple[float, float, float]:
    """(global theta, local theta, global linear factor) from either spelling (docs/reference.md §3)."""
    rp = hf.get("rope_parameters")
    if rp:
        if GLOBAL in rp or LOCAL in rp:  # transformers >= 5, nested per layer type
            g, l = rp.get(GLOBAL, {}), rp.get(LOCAL, rp.get(GLOBAL, {}))
        else:
            g = l = rp
        factor = g.get("factor", 1.0) if g.get("rope_type", "default") == "linear" else 1.0
        return float(g.get("rope_theta", 10000.0)), float(l.get("rope_theta", 10000.0)), float(factor)
    theta = float(hf.get("rope_theta", 10000.0 if family == "gemma2" else 1_000_000.0))
    local = float(hf.get("rope_local_base_freq", theta if family == "gemma2" else 10000.0))
    scaling = hf.get("rope_scaling") or {}
    factor = scaling.get("factor", 1.0) if scaling.get("rope_type", scaling.get("type")) == "linear" else 1.0
    return theta, local, float(factor)


def from_hf_config(hf: dict[str, Any]) -> GemmaConfig:
    model_type = hf.get("model_type")
    if model_type == "gemma3" and "text_config" in hf:  # multimodal wrapper: use its text tower
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    if model_type not in _HF_MODEL_TYPES:
        raise GemmaforgeError(
            f"unsupported model_type {model_type!r} in config.json: gemmaforge loads 'gemma2' and 'gemma3_text'"
        )
    family = _HF_MODEL_TYPES[model_type]
    n = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if layer_types is None:
        if family == "gemma3" and "sliding_window_pattern" in hf:
            p = hf["sliding_window_pattern"]
            layer_types = [GLOBAL if (i + 1) % p == 0 else LOCAL for i in range(n)]
        else:
            layer_types = (gemma2_layer_types if family == "gemma2" else gemma3_layer_types)(n)
    theta, local_theta, factor = _rope_thetas(hf, family)
    heads = hf["num_attention_heads"]
    return GemmaConfig(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        layer_types=tuple(layer_types),
        sliding_window=hf.get("sliding_window") or 4096,
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        rope_theta=theta,
        rope_local_theta=local_theta,
        rope_scaling_factor=factor,
        attn_logit_softcap=hf.get("attn_logit_softcapping") if family == "gemma2" else None,
        final_logit_softcap=hf.get("final_logit_softcapping"),
        qk_norm=family == "gemma3",
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def to_hf_config(c: GemmaConfig) -> dict[str, Any]:
    """config.json contents that transformers (4.x and 5.x) reads back to the same network."""
    hf: dict[str, Any] = {
        "architectures": ["Gemma2ForCausalLM" if c.family == "gemma2" else "Gemma3ForCausalLM"],
        "model_type": "gemma2" if c.family == "gemma2" else "gemma3_text",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "query_pre_attn_scalar": c.query_pre_attn_scalar,
        "sliding_window": c.sliding_window,
        "layer_types": list(c.layer_types),
        "attn_logit_softcapping": c.attn_logit_softcap,
        "final_logit_softcapping": c.final_logit_softcap,
        "attention_bias": False,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "rope_theta": c.rope_theta,
    }
    if c.family == "gemma3":
        hf["rope_local_base_freq"] = c.rope_local_theta
        hf["rope_scaling"] = (
            {"rope_type": "linear", "factor": c.rope_scaling_factor} if c.rope_scaling_factor != 1.0 else None
        )
    global_rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling_factor != 1.0:
        global_rope = {"rope_type": "linear", "factor": c.rope_scaling_factor, "rope_theta": c.rope_theta}
    hf["rope_parameters"] = (
        global_rope
        if c.family == "gemma2"
        else {GLOBAL: global_rope, LOCAL: {"rope_type": "default", "rope_theta": c.rope_local_theta}}
    )
    return hf
