"""LoRA (Hu et al., 2022), the baseline of all four seed papers.

Eq. (3) of the LoRA paper: ``h = W0 x + ΔW x = W0 x + (α/r) B A x`` with
``A ∈ R^{r×in}`` (Kaiming-uniform, a=√5, as ``nn.Linear``/PEFT) and ``B ∈ R^{out×r}``
(zeros), so the adapted model starts exactly at the backbone. Dropout acts on the
adapter branch's input only. ``rslora`` uses ``α/√r`` (Kalajdzievski, 2023), like
PEFT's ``use_rslora``. Parameter names (``lora_A``, ``lora_B``) follow PEFT so weights
map one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_runner.methods.base import Adapter, AdapterMethod, LayerInfo, adapter_input, kaiming_parameter


class LoRAAdapter(Adapter):
    reads_w0 = False  # forward ignores W0 (a quantized base skips dequantizing it)

    def __init__(self, layer: LayerInfo, r: int, alpha: float, dropout: float, rslora: bool):
        super().__init__()
        self.r = r
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_A = kaiming_parameter((r, layer.in_features), layer.device)
        self.lora_B = nn.Parameter(torch.zeros(layer.out_features, r, device=layer.device, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
        x = adapter_input(self.dropout(x), self.lora_A)
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self, w0: torch.Tensor) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def lora_factors(self, w0):
        return self.lora_B.float(), self.lora_A.float(), self.scaling


class LoRA(AdapterMethod):
    name = "lora"

    def create_adapter(self, layer: LayerInfo, w0: torch.Tensor) -> Adapter:
        p = self.params
        return LoRAAdapter(layer, p["r"], p["alpha"], p["dropout"], p["rslora"])
