"""Run configuration for ``gemmaforge train`` / ``distill`` / ``sft`` / ``gkd`` / ``reward`` / ``rl``: one
frozen dataclass, read from YAML.

Every key has a default, so a YAML file lists only what differs. Command-line flags override keys
(``--lr 1e-3`` overrides ``lr:``); both go through the same coercion, so ``lr: 1e-3`` (which YAML 1.1
reads as a *string*) still becomes a float. An unknown key is an error with a "did you mean",
because a misspelt ``warmup_step:`` that is silently ignored ruins a run hours later.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import GemmaforgeError


@dataclass(frozen=True)
class TrainConfig:
    # ---- what to train, on what, where to write -------------------------------------------------
    model: str = "tiny-gemma2"  # preset name (random init), checkpoint (HF dir, .gguf) or "default"
    data: str = ""  # directory written by `gemmaforge prepare-data`
    out: str = ""  # run directory: checkpoints/, model/, metrics.jsonl, tensorboard/
    seed: int = 0  # weight init of presets and the data order

    # ---- batch ------------------------------------------------------------------------------------
    seq_len: int = 512
    packing: str = "segments"  # segments: documents in a window never attend to each other; or concat
    batch_size: int = 8  # sequences per optimizer step, summed over all processes
    micro_batch_size: int = 0  # sequences per forward per process; 0 = batch_size / processes
    max_steps: int = 1000

    # ---- optimizer: AdamW with decoupled weight decay, linear warmup then cosine ------------------
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = off

    # ---- numerics and memory ----------------------------------------------------------------------
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: str = "float32"  # parameter (master weight) dtype
    autocast: str = "auto"  # auto = bf16 autocast on GPU, off on CPU; or bfloat16 / off
    activation_checkpointing: bool = False
    loss_chunk: int = 1024  # tokens per output-head chunk (docs/reference.md §6)
    attn_impl: str | None = None

    # ---- evaluation, logging, checkpoints --------------------------------------------------------
    eval_every: int = 100
    eval_batches: int = 8  # validation batches (of batch_size windows) per evaluation
    log_every: int = 10
    save_every: int = 200
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: bool = True

    # ---- distillation (gemmaforge distill) -------------------------------------------------------
    teacher: str | None = None  # anything gemmaforge.load accepts; "default" = the embedded model
    teacher_dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    teacher_quant: str | None = None  # int8 or int4: weight-only quantized teacher (gemmaforge.quant)
    teacher_cache: str | None = None  # directory of cached teacher logits (distill --cache-teacher)
    cache_mode: str = "topk"  # topk, or sample (Gemma 3: sampled tokens, docs/reference.md §6)
    cache_k: int = 256
    alpha: float = 0.5  # loss = (1 - alpha) * CE(labels) + alpha * tau^2 * KD
    temperature: float = 1.0
    distill_loss: str = "kl"  # kl (forward KL) or soft_ce; same gradient, different reported value

    # ---- JSONL data: sft, gkd, reward, rl (docs/post_training.md) --------------------------------
    # For these commands ``data`` is a JSONL file, tokenized at start-up with ``tokenizer``.
    tokenizer: str | None = None  # None = the model's own (a checkpoint that ships one, or the default)
    val_data: str | None = None  # held-out JSONL; None = every ~1/val_fraction-th record of ``data``
    val_fraction: float = 0.05
    chat_template: bool = True  # false: prompts are <bos> + plain text, replies plain text (pre-trained models)
    lora_rank: int = 0  # > 0: train rank-r adapters on lora_targets only, merged into the saved weights
    lora_alpha: float = 16.0  # adapter scale alpha / rank
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

    # ---- on-policy sampling through the engine: gkd, rl ---------------------------------------
    lmbda: float = 0.5  # gkd: fraction of steps whose completions the student writes itself
    beta: float = 0.5  # gkd: generalized JSD mixture (0 = forward KL, 1 = reverse KL)
    max_new_tokens: int = 128
    sample_temperature: float = 1.0  # of the rollouts (the loss's temperature is ``temperature``)
    sample_top_p: float = 1.0
    rollouts_per_prompt: int = 4  # rl: k samples per prompt (RLOO's leave-one-out baseline)
    kl_coef: float = 0.05  # rl: reward - kl_coef * KL(policy || reference) per sequence
    reward: str | None = None  # rl: module:function, or a reward model directory (gemmaforge reward)
    reference: str | None = None  # rl: frozen reference policy; None = the initial ``model``

    def __post_init__(self):
        positive = ("seq_len", "batch_size", "max_steps", "loss_chunk", "eval_every", "log_every",
                    "save_every", "keep_checkpoints", "eval_batches", "cache_k", "max_new_tokens",
                    "rollouts_per_prompt")
        for name in positive:
            if getattr(self, name) < 1:
                raise GemmaforgeError(f"config key {name!r} must be >= 1, got {getattr(self, name)}")
        for name in ("micro_batch_size", "warmup_steps", "weight_decay", "grad_clip", "lr", "min_lr"):
            if getattr(self, name) < 0:
                raise GemmaforgeError(f"config key {name!r} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise GemmaforgeError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise GemmaforgeError(f"temperature must be > 0, got {self.temperature}")
        for name in ("lmbda", "beta"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise GemmaforgeError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise GemmaforgeError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if not 0.0 < self.sample_top_p <= 1.0:
            raise GemmaforgeError(f"sample_top_p must be in (0, 1], got {self.sample_top_p}")
        for name in ("lora_rank", "kl_coef", "sample_temperature"):
            if getattr(self, name) < 0:
                raise GemmaforgeError(f"config key {name!r} must be >= 0, got {getattr(self, name)}")
        choices = {"autocast": ("auto", "bfloat16", "off"), "cache_mode": ("topk", "sample"),
                   "distill_loss": ("kl", "soft_ce"), "packing": ("segments", "concat"),
                   "teacher_quant": (None, "int8", "int4")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                names = ", ".join(str(a) if a is not None else "none" for a in allowed)
                raise GemmaforgeError(f"config key {name!r} is {getattr(self, name)!r}: use one of {names}")

    def replace(self, **changes: Any) -> "TrainConfig":
        return load_config(None, {**dataclasses.asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: Any) -> Any:
    """YAML or command-line value -> the field's type, or a one-line error."""
    kind = _TYPES[name]
    optional = type(None) in typing.get_args(kind)
    base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise GemmaforgeError(f"config key {name!r} cannot be empty")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "on", "1"):
                return True
            if str(value).lower() in ("false", "no", "off", "0"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise GemmaforgeError(f"config key {name!r} expects {base.__name__}, got {value!r}") from None


def unknown_key_error(key: str) -> GemmaforgeError:
    hint = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.5)
    return GemmaforgeError(
        f"unknown config key {key!r}" + (f": did you mean {hint[0]!r}?" if hint else "; see docs/training.md for the keys")
    )


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """YAML file (or None) + overrides (e.g. from flags) -> a validated TrainConfig."""
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise GemmaforgeError(f"config file {path} does not exist: pass a YAML file (see examples/*.yaml)")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else "syntax error"
            raise GemmaforgeError(f"{path} is not valid YAML ({first}): fix the file") from None
        if not isinstance(loaded, dict):
            raise GemmaforgeError(f"{path} must be a mapping of key: value, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides or {})
    for key in values:
        if key not in FIELDS:
            raise unknown_key_error(str(key))
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})


# ---- command-line flags: one --key per config key --------------------------------------------------
def add_config_flags(parser) -> None:
    """``CONFIG.yaml`` plus ``--seq-len 256`` style overrides for every key (type-checked later)."""
    parser.add_argument("config", nargs="?", help="YAML run config (keys: docs/training.md); flags override it")
    group = parser.add_argument_group("config overrides")
    for name in FIELDS:
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"cfg_{name}", metavar="VALUE", default=None)


def config_from_args(args) -> TrainConfig:
    overrides = {name: getattr(args, f"cfg_{name}") for name in FIELDS if getattr(args, f"cfg_{name}") is not None}
    return load_config(args.config, overrides)
