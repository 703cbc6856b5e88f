import math

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_runner.methods.base import Adapter, AdapterMethod, adapter_input


class LoRAFAAdapter(Adapter):
    def __init__(self, layer, r, alpha, dropout):
        super().__init__()
        a = torch.empty(r, layer.in_features, device=layer.device)
        if layer.device.type != "meta":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.register_buffer("fa_A", a)  # frozen projection, saved with the adapter
        self.fa_B = nn.Parameter(torch.zeros(layer.out_features, r, device=layer.device))
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x, w0):
        x = adapter_input(self.dropout(x), self.fa_B)
        return F.linear(F.linear(x, self.fa_A), self.fa_B) * self.scaling

    def delta_weight(self, w0):
        return (self.fa_B.float() @ self.fa_A.float()) * self.scaling


class LoRAFA(AdapterMethod):
    name = "lora_fa"

    def create_adapter(self, layer, w0):
        p = self.params
        return LoRAFAAdapter(layer, p["r"], p["alpha"], p["dropout"])
