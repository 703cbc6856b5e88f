"""TriAdaptLoRA (seed 002): low-rank adaptation through a triangular transform.

Eqs. (4)-(5): ``h = W0 x + α/(r + ε) · B (L + U) A x`` with ``A ∈ R^{r×in}``,
``B ∈ R^{out×r}``, ``L`` lower- and ``U`` upper-triangular ``r × r``. Both triangles hold
the diagonal (the paper initialises 1×1 ``L`` and ``U`` at ``r = 1`` and gives each
augmented block its own diagonal), so ``D = L + U`` is dense and ``D_ii = L_ii + U_ii``.

Only the structurally non-zero triangle entries are parameters (stored packed, scattered
into ``r × r`` in the forward), so the triangular structure is exact by construction and
counts are exact: ``r·(in + out) + r·(r + 1)`` per module.

Initialisation (§III-B): ``B = 0`` (ΔW = 0 at step 0); ``A``, ``L``, ``U`` Gaussian (the
paper gives no standard deviation: ``init_std``, 0.02 as AdaLoRA). Scaling ``α/(r + ε)``
uses the module's current rank.

Orthogonality regulariser (eq. 10) read with the ``r × r`` Grams (the paper's ``AᵀA`` is
``in × in`` of rank ≤ r and cannot approach I; AdaLoRA, which the paper follows, uses
``AAᵀ``): ``‖AAᵀ − I_r‖²_F + ‖BᵀB − I_r‖²_F``, averaged over modules, times ``orth_reg``.

This file trains at a fixed rank; adaptive rank growth (§III-C/D) is the rank allocator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_runner.methods.base import (
    Adapter,
    AdapterMethod,
    LayerInfo,
    adapter_input,
    gaussian_parameter,
    gram_penalty,
    leaf_adapters,
)


class TriAdaptLoRAAdapter(Adapter):
    def __init__(self, layer: LayerInfo, r: int, alpha: float, eps: float, dropout: float, init_std: float):
        super().__init__()
        device = layer.device
        self.r = r
        self.scaling = alpha / (r + eps)
        n_tri = r * (r + 1) // 2
        self.tri_A = gaussian_parameter((r, layer.in_features), init_std, device)
        self.tri_B = nn.Parameter(torch.zeros(layer.out_features, r, device=device, dtype=torch.float32))
        self.tri_L = gaussian_parameter((n_tri,), init_std, device)
        self.tri_U = gaussian_parameter((n_tri,), init_std, device)
        self.register_buffer("lower_index", torch.tril_indices(r, r, device=device), persistent=False)
        self.register_buffer("upper_index", torch.triu_indices(r, r, device=device), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def lower(self) -> torch.Tensor:
        out = self.tri_L.new_zeros(self.r, self.r)
        return out.index_put((self.lower_index[0], self.lower_index[1]), self.tri_L)

    def upper(self) -> torch.Tensor:
        out = self.tri_U.new_zeros(self.r, self.r)
        return out.index_put((self.upper_index[0], self.upper_index[1]), self.tri_U)

    def transform(self) -> torch.Tensor:
        return self.lower() + self.upper()

    def forward(self, x, w0):
        x = adapter_input(self.dropout(x), self.tri_A)
        return F.linear(F.linear(F.linear(x, self.tri_A), self.transform()), self.tri_B) * self.scaling

    def delta_weight(self, w0):
        return (self.tri_B.float() @ self.transform().float() @ self.tri_A.float()) * self.scaling

    def orthogonality(self) -> torch.Tensor:
        return gram_penalty(self.tri_A @ self.tri_A.T) + gram_penalty(self.tri_B.T @ self.tri_B)


class TriAdaptLoRA(AdapterMethod):
    name = "triadaptlora"

    def create_adapter(self, layer: LayerInfo, w0: torch.Tensor) -> Adapter:
        p = self.params
        return TriAdaptLoRAAdapter(layer, p["r"], p["alpha"], p["eps"], p["dropout"], p["init_std"])

    def extra_loss(self, adapters):
        if not self.params["orth_reg"]:
            return None
        modules = [a for a in leaf_adapters(adapters) if isinstance(a, TriAdaptLoRAAdapter)]
        return self.params["orth_reg"] * torch.stack([m.orthogonality() for m in modules]).mean()
