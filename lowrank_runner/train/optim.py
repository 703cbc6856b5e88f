"""The optimizer: AdamW with weight decay by role (biases and normalisation weights are
not decayed; adapter factors, LoRA2's λ, TriAdaptLoRA's packed triangles and head
weights are)."""

from __future__ import annotations

import torch

# Normalisation modules, by type: torch's (batch and instance norms share _NormBase) ...
_NORM_TYPES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase,
               *([torch.nn.RMSNorm] if hasattr(torch.nn, "RMSNorm") else []))
# ... and the classes models define themselves (LlamaRMSNorm, T5LayerNorm, DebertaLayerNorm).
_NORM_CLASS_SUFFIXES = ("LayerNorm", "RMSNorm", "GroupNorm")


def is_norm_module(module: torch.nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(_NORM_CLASS_SUFFIXES)


def weight_decay_groups(model: torch.nn.Module) -> tuple[list, list]:
    """Trainable parameters split by role: (decayed, not decayed). Biases (a module's
    ``bias``) and every parameter of a normalisation module are not decayed; everything
    else is, whatever its shape (adapter factors, LoRA2's λ, TriAdaptLoRA's packed
    triangles, head weights)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        norm = is_norm_module(module)
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if norm or name == "bias" else decay).append(param)
    return decay, no_decay


def build_optimizer(model, training: dict) -> torch.optim.Optimizer:
    """AdamW with ``training.weight_decay`` on every trainable parameter but biases and
    normalisation weights (:func:`weight_decay_groups`)."""
    decay, no_decay = weight_decay_groups(model)
    groups = [{"params": decay, "weight_decay": training["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=training["learning_rate"],
        betas=tuple(training["adam_betas"]), eps=training["adam_epsilon"],
    )

