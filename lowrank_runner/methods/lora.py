"""LoRA (Hu et al., 2022), the baseline of all four seed papers.

Eq. (3) of the LoRA paper: ``h = W0 x + ΔW x = W0 x + (α/r) B A x`` with
``A ∈ R^{r×in}`` (Kaiming-uniform, a=√5, as ``nn.Linear``/PEFT) and ``B ∈ R^{out×r}``
(zeros), so the adapted model starts exactly at the backbone. ``A`` is drawn as PEFT
draws it (``LoraLayer.update_layer``, peft 0.13 to 0.21): ``nn.Linear(in, r)`` and
``nn.Linear(r, out)`` each draw their default weight, then ``reset_lora_parameters``
draws ``A`` again; all on the CPU generator, then moved to the layer's device. So the
same seed gives the same ``A`` and leaves the generator (hence every dropout mask after)
where ``peft.get_peft_model`` leaves it: an lrr run and a plain PEFT loop are the same
run (tests/test_peft_draws.py). Dropout acts on the adapter branch's input only. ``rslora`` uses ``α/√r`` (Kalajdzievski, 2023), like
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
        self.lora_A = peft_drawn_a(r, layer.in_features, layer.out_features, layer.device)
        self.lora_B = nn.Parameter(torch.zeros(layer.out_features, r, device=layer.device, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
        x = adapter_input(self.dropout(x), self.lora_A)
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self, w0: torch.Tensor) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def lora_factors(self, w0):
        return self.lora_B.float(), self.lora_A.float(), self.scaling


def peft_drawn_a(r: int, in_features: int, out_features: int, device) -> nn.Parameter:
    """``A`` as PEFT's LoRA layer draws it: two ``nn.Linear`` default inits (``r × in``, then
    ``out × r``: the generator moves past both), then ``A`` (Kaiming-uniform, a=√5), on the
    CPU generator (PEFT builds its layers on the CPU and moves them); nothing is drawn on the
    meta device."""
    if torch.device(device).type == "meta":
        return kaiming_parameter((r, in_features), device)
    for shape in ((r, in_features), (out_features, r)):  # nn.Linear(in, r), nn.Linear(r, out): drawn, replaced
        nn.init.kaiming_uniform_(torch.empty(*shape, device="cpu"), a=math.sqrt(5))
    a = kaiming_parameter((r, in_features), "cpu")
    return nn.Parameter(a.data.to(device))


class LoRA(AdapterMethod):
    name = "lora"

    def create_adapter(self, layer: LayerInfo, w0: torch.Tensor) -> Adapter:
        p = self.params
        return LoRAAdapter(layer, p["r"], p["alpha"], p["dropout"], p["rslora"])
