"""LoRA (Hu et al. 2021) on our own modules: ``W x + (alpha / r) B A x`` on chosen projections.

``add_lora(model, r, alpha, "q_proj,v_proj")`` turns those ``nn.Linear`` modules into ``LoRALinear``
in place (same ``weight``, so the model's state-dict names stay the HF-mappable ones) and freezes
everything else: only ``lora_a`` [r, in] and ``lora_b`` [out, r] train. ``lora_b`` starts at zero, so
the adapted model starts as the base model. Every consumer (training forward, the engine's decode step)
calls the module, so the adapters are always in the path.

Saving merges: ``merge_state`` folds ``W + (alpha / r) B A`` into each weight and drops the adapter
entries, so a saved model is a plain Gemma that gemmaforge and transformers load. A checkpoint keeps
the adapters separately (``adapter_state``) for resume: the base weights are frozen, so a resumed run
gets them from ``model`` again and only the adapters (and their AdamW state) from the checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import GemmaforgeError

_SUFFIXES = (".lora_a", ".lora_b", ".lora_scale")


class LoRALinear(nn.Linear):
    lora_a: nn.Parameter
    lora_b: nn.Parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.lora_scale


def add_lora(model: nn.Module, rank: int, alpha: float, targets: str, seed: int = 0) -> list[str]:
    """Adapt the ``nn.Linear`` modules whose name ends with one of ``targets`` (comma-separated);
    returns their names. A's init is Kaiming-uniform (as peft), seeded, so runs are reproducible."""
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    done = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or not any(name.split(".")[-1] == t for t in wanted):
            continue
        w = module.weight
        module.__class__ = LoRALinear  # keeps ``weight`` (and its name) where it is
        bound = 1.0 / math.sqrt(module.in_features)
        a = (torch.rand(rank, module.in_features, generator=g) * 2 - 1) * bound
        module.lora_a = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        module.lora_b = nn.Parameter(torch.zeros(module.out_features, rank, device=w.device, dtype=w.dtype))
        module.register_buffer("lora_scale", torch.tensor(alpha / rank, device=w.device, dtype=w.dtype))
        done.append(name)
    if not done:
        raise GemmaforgeError(f"lora_targets {targets!r} matches no projection: use names among "
                              "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")
    return done


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter entries of a full state dict (empty without LoRA)."""
    return {k: v for k, v in state.items() if k.endswith(_SUFFIXES)}


def merge_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state dict with the adapters folded into their weights (unchanged without LoRA)."""
    if not adapter_state(state):
        return state
    out = {k: v for k, v in state.items() if not k.endswith(_SUFFIXES)}
    for key in state:
        if key.endswith(".lora_a"):
            base = key[: -len("lora_a")]
            w = out[base + "weight"]
            a, b = state[key].float(), state[base + "lora_b"].float()
            out[base + "weight"] = (w.float() + (b @ a) * state[base + "lora_scale"].float()).to(w.dtype)
    return out
