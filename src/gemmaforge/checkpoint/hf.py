"""Hugging Face checkpoints: config.json + model.safetensors (single file or sharded with an index).

Names are translated at this boundary by an explicit two-way map (docs/reference.md §3); the
model never sees HF names. Loading is lazy: safetensors files are memory-mapped and each tensor is
read once, straight into the parameter it becomes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..atomic import publish_dir
from ..config import GemmaConfig, from_hf_config, to_hf_config
from ..errors import GemmaforgeError

# internal name (per layer: relative to "layers.{i}.") <-> HF name (relative to "model.layers.{i}.")
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "post_attn_norm.weight": "post_attention_layernorm.weight",
    "pre_mlp_norm.weight": "pre_feedforward_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "post_mlp_norm.weight": "post_feedforward_layernorm.weight",
}
TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight"}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_TO_LAYER = {v: k for k, v in LAYER_NAMES.items()}
_HF_TO_TOP = {v: k for k, v in TOP_NAMES.items()}
# Tensors some exporters add that carry no information for a tied, text-only Gemma.
_IGNORABLE = {"lm_head.weight"}


def to_hf_name(name: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    m = _LAYER_RE.match(name)
    if not m or m.group(2) not in LAYER_NAMES:
        raise KeyError(name)
    return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"


def from_hf_name(name: str) -> str | None:
    name = name.removeprefix("language_model.")  # multimodal Gemma 3 checkpoints nest the text model
    if name in _HF_TO_TOP:
        return _HF_TO_TOP[name]
    m = _HF_LAYER_RE.match(name)
    if m and m.group(2) in _HF_TO_LAYER:
        return f"layers.{m.group(1)}.{_HF_TO_LAYER[m.group(2)]}"
    return None


def read_config(directory: Path) -> GemmaConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise GemmaforgeError(f"{directory} has no config.json: pass an HF model directory, a .gguf file or a preset name")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GemmaforgeError(f"{path} is not valid JSON ({e}): re-download or re-export the checkpoint") from None
    try:
        return from_hf_config(hf)
    except KeyError as e:
        raise GemmaforgeError(f"{path} lacks key {e.args[0]!r}: is this a Gemma config.json?") from None


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({directory / f for f in weight_map.values()})
    elif (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    else:
        raise GemmaforgeError(
            f"{directory} has neither model.safetensors nor model.safetensors.index.json: "
            "export the checkpoint as safetensors"
        )
    for f in files:
        if not f.is_file():
            raise GemmaforgeError(f"shard {f} listed in model.safetensors.index.json is missing: re-download it")
    return files


def read_tensors(directory: Path, extra: frozenset[str] = frozenset()):
    """Yield (internal name, tensor, file) lazily; unknown tensors are reported, not skipped, except
    the HF names in ``extra`` (a reward model's ``score.weight``), yielded under that name."""
    from safetensors import SafetensorError, safe_open

    for path in _weight_files(directory):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    name = key if key in extra else from_hf_name(key)
                    if name is None:
                        if key in _IGNORABLE:
                            continue
                        raise GemmaforgeError(
                            f"{path} has unexpected tensor {key!r}: not part of a Gemma 2/3 text model"
                        )
                    yield name, f.get_tensor(key), path
        except (SafetensorError, OSError) as e:
            raise GemmaforgeError(f"cannot read {path} ({e}): the file is truncated or corrupt; re-download it") from None


def save_pretrained(model, directory, *, max_shard_bytes: int = 2 << 30, extra_tensors=None,
                    config_overrides=None) -> None:
    """config.json + model.safetensors (sharded with an index above ``max_shard_bytes``), atomically:
    everything is written into a staging sibling directory that replaces ``directory`` at the end.
    ``extra_tensors`` (HF name -> tensor) and ``config_overrides`` add what a model with another head
    needs (a reward model: ``score.weight`` and the sequence-classification architecture).

    A quantized model is refused: save the float model (before ``quant.quantize``) instead."""
    from safetensors.torch import save_file

    from . import check_not_quantized

    check_not_quantized(model, "an HF checkpoint")

    with publish_dir(directory) as tmp:
        tensors = {to_hf_name(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        tensors.update({k: v.detach().contiguous().cpu() for k, v in (extra_tensors or {}).items()})
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata=meta)
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf = to_hf_config(model.config)
        hf["torch_dtype"] = str(model.embed.weight.dtype).removeprefix("torch.")
        hf.update(config_overrides or {})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
