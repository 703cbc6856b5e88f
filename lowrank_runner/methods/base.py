"""The protocol every adapter method implements.

A method contributes, for each targeted weight ``W0`` (``out x in``), a low-rank update
``ΔW`` applied as ``h = W0 x + ΔW x``. It never materialises ``ΔW`` in the training
forward when a low-rank product is cheaper; it produces ``ΔW`` explicitly only for
merging. The training loop calls only this protocol and never names a method.

* :class:`Adapter` (per adapted module): ``forward(x) -> ΔW x`` and ``delta_weight()``.
* :class:`AdapterMethod` (per model): builds adapters, may own parameters shared by
  several adapters (CondLoRA), may add a regulariser (``extra_loss``) and act after each
  optimizer step (``after_optimizer_step``, for rank allocation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerInfo:
    """What a method needs to know about the weight it adapts."""

    path: str
    symbols: tuple[str, ...]
    in_features: int
    out_features: int
    fan_in_fan_out: bool  # GPT-2 Conv1D stores the weight as (in, out)
    groups: tuple[str, ...] | None  # selected q/k/v groups of a fused projection
    device: torch.device
    dtype: torch.dtype


class Adapter(nn.Module):
    """The trainable update of one module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # ΔW x, shape (..., out_features)
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:  # ΔW, (out_features, in_features), float32
        raise NotImplementedError


class AdapterMethod:
    """Base class of a registered method. ``params`` are the recipe's, defaults filled."""

    name: str = ""

    def __init__(self, **params):
        self.params = params

    def create_adapter(self, layer: LayerInfo, base_weight: torch.Tensor) -> Adapter:
        raise NotImplementedError

    def shared_modules(self) -> nn.Module | None:
        """Parameters shared across adapters (registered once on the model)."""
        return None

    def extra_loss(self, adapters: dict[str, Adapter]) -> torch.Tensor | None:
        """A regulariser added to the task loss (already weighted), or None."""
        return None

    def after_optimizer_step(self, step: int, adapters: dict[str, Adapter]) -> dict | None:
        """Called once after every optimizer step; may return values to log."""
        return None
