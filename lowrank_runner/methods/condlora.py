"""CondLoRA (seed 004): one shared pair of linear maps per target module type derives
every layer's low-rank matrices from that layer's frozen weight.

Eqs. (5)-(7) write ``W0 ∈ R^{d1×d2}`` with ``A ∈ R^{r×d1}``, ``B ∈ R^{d2×r}``, which only
type-checks for square weights (the authors' code only runs when in = out). Read with
PyTorch's ``W0 ∈ R^{out×in}`` consistently::

    A^l = θ_Aᵀ W0^l ∈ R^{r×in},   θ_A ∈ R^{out×r}
    B^l = W0^l θ_B  ∈ R^{out×r},  θ_B ∈ R^{in×r}
    ΔW^l = (α/r) B^l A^l

which works for non-square weights (Wm, Wo) too. ``θ_A`` is initialised like the
``nn.Linear`` of the authors' code (Kaiming-uniform, ``a = √5``, fan-in ``out``), ``θ_B = 0``
so ΔW = 0 at step 0. One ``(θ_A, θ_B)`` per module *type* (the module path with the layer
index removed, e.g. every ``attention.self.query``), shared by all layers: the trainable
count does not grow with depth (RoBERTa-base, Wq+Wv, r=8: 24,576; Table 4).

``W0`` is frozen (no gradient reaches it); ``A^l`` and ``B^l`` are computed once per forward
call of each layer, not per token.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_runner.methods.base import Adapter, AdapterMethod, LayerInfo, adapter_input, kaiming_parameter


class CondLoRAShared(nn.Module):
    """``θ_Aᵀ`` (stored ``r × out``, like ``nn.Linear(out, r).weight``) and ``θ_Bᵀ``
    (stored ``r × in``) for one module type."""

    def __init__(self, r: int, in_features: int, out_features: int, device):
        super().__init__()
        self.theta_A = kaiming_parameter((r, out_features), device)
        self.theta_B = nn.Parameter(torch.zeros(r, in_features, device=device, dtype=torch.float32))


class CondLoRAAdapter(Adapter):
    def __init__(self, shared: CondLoRAShared, alpha: float, r: int, dropout: float):
        super().__init__()
        # Not a submodule: the shared maps are registered once, on the model (lrr_shared).
        self.__dict__["shared"] = shared
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def factors(self, w0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta_a, theta_b = self.shared.theta_A, self.shared.theta_B
        w = w0.detach()
        if not torch.is_autocast_enabled(w.device.type):
            w = w.to(theta_a.dtype)
        a = theta_a @ w  # (r x out)(out x in) = r x in
        b = w @ theta_b.T  # (out x in)(in x r) = out x r
        return a, b

    def forward(self, x, w0):
        a, b = self.factors(w0)
        x = adapter_input(self.dropout(x), a)
        return F.linear(F.linear(x, a), b) * self.scaling

    def delta_weight(self, w0):
        a, b = self.factors(w0.float())
        return (b.float() @ a.float()) * self.scaling

    def lora_factors(self, w0):
        """This layer's own pair, computed from its frozen ``W0`` once: ``B = W0 θ_B``, ``A = θ_A W0``."""
        a, b = self.factors(w0.float())
        return b.float(), a.float(), self.scaling


def module_type(path: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` → ``bert_encoder_layer_N_attention_self_query``."""
    return re.sub(r"[^0-9A-Za-z_]", "_", re.sub(r"\.\d+\.", ".N.", path)).strip("_")


class CondLoRA(AdapterMethod):
    name = "condlora"

    def __init__(self, **params):
        super().__init__(**params)
        self.shared = nn.ModuleDict()

    def create_adapter(self, layer: LayerInfo, w0: torch.Tensor) -> Adapter:
        r = self.params["r"]
        key = module_type(layer.path)
        if key not in self.shared:
            self.shared[key] = CondLoRAShared(r, layer.in_features, layer.out_features, layer.device)
        shared = self.shared[key]
        if shared.theta_A.shape[1] != layer.out_features or shared.theta_B.shape[1] != layer.in_features:
            raise ValueError(f"{layer.path}: CondLoRA shares maps across layers of one type, but this layer's weight "
                             f"is {layer.out_features}x{layer.in_features}, not {shared.theta_A.shape[1]}x{shared.theta_B.shape[1]}")
        return CondLoRAAdapter(shared, self.params["alpha"], r, self.params["dropout"])

    def shared_modules(self):
        return self.shared
