"""LoRA2 (seed 001): multi-scale orthogonal low-rank adaptation.

Eq. (4), written for row vectors (``h = x W``): ``W = W0 + P Λ Q``, ``P = v u``,
``Q = U V`` with ``v ∈ R^{in×k}``, ``u ∈ R^{k×r}``, ``Λ = diag(λ)``, ``λ ∈ R^r``,
``U ∈ R^{r×k}``, ``V ∈ R^{k×out}``. In PyTorch's ``out × in`` convention
``ΔW = s · (v u Λ U V)ᵀ``; the forward evaluates it right to left on the activations,
``x → x v → · u → ⊙ λ → · U → · V`` (never forming ΔW), and ``s = α/(r₀ + 1e-5)`` with
``r₀`` the initial rank (authors' code, as AdaLoRA; the paper states no scaling).

Initialisation (§3.1): ``λ = 0`` (so ΔW = 0) and ``u, v, U, V ~ N(0, σ²)``, ``σ = 0.02``
(authors' code). Parameters per module: ``(in + out)·k + 2·r·k + r`` (λ counted), which
reproduces LoRA2's Table 4 at ``k = 1, r = 8``.

Orthogonality regularisers (eq. 5), each switchable for the Table 3 ablation, squared
Frobenius norms, summed per module, averaged over modules, times ``orth_reg``:

* ``PQ``: ``‖PᵀP − I_r‖² + ‖QQᵀ − I_r‖²`` with ``PᵀP = uᵀ(vᵀv)u``, ``QQᵀ = U(VVᵀ)Uᵀ``;
* ``UV``: ``‖UᵀU − I_k‖² + ‖VVᵀ − I_k‖²``;
* ``uv``: ``‖uᵀu − I_r‖² + ‖vᵀv − I_k‖²``. The paper writes ``‖vvᵀ − I‖²`` (an in × in
  Gram); ``‖vᵀv − I_k‖²`` differs from it by the constant ``in − k`` and has the same
  gradient, at a fraction of the cost. When ``k < r``, the r×r terms cannot reach 0
  (rank ≤ k): their floor ``r − k`` is constant and does not affect training.
"""

from __future__ import annotations

import torch
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


class LoRA2Adapter(Adapter):
    def __init__(self, layer: LayerInfo, r: int, k: int, alpha: float, dropout: float, init_std: float):
        super().__init__()
        device = layer.device
        self.r, self.k = r, k
        self.scaling = alpha / (r + 1e-5)
        self.lora2_v = gaussian_parameter((layer.in_features, k), init_std, device)
        self.lora2_u = gaussian_parameter((k, r), init_std, device)
        self.lora2_lambda = nn.Parameter(torch.zeros(r, device=device, dtype=torch.float32))
        self.lora2_U = gaussian_parameter((r, k), init_std, device)
        self.lora2_V = gaussian_parameter((k, layer.out_features), init_std, device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x, w0):
        x = adapter_input(self.dropout(x), self.lora2_v)
        h = (x @ self.lora2_v) @ self.lora2_u
        h = (h * self.lora2_lambda) @ self.lora2_U
        return (h @ self.lora2_V) * self.scaling

    def delta_weight(self, w0):
        p = self.lora2_v.float() @ self.lora2_u.float()  # in x r
        q = self.lora2_U.float() @ self.lora2_V.float()  # r x out
        return ((p * self.lora2_lambda.float()) @ q).T * self.scaling

    def orthogonality(self, terms) -> torch.Tensor:
        u, v, U, V = self.lora2_u, self.lora2_v, self.lora2_U, self.lora2_V
        vtv, vvt = v.T @ v, V @ V.T  # k x k
        total = u.new_zeros(())
        if "PQ" in terms:
            total = total + gram_penalty(u.T @ vtv @ u) + gram_penalty(U @ vvt @ U.T)
        if "UV" in terms:
            total = total + gram_penalty(U.T @ U) + gram_penalty(vvt)
        if "uv" in terms:
            total = total + gram_penalty(u.T @ u) + gram_penalty(vtv)
        return total


class LoRA2(AdapterMethod):
    name = "lora2"

    def create_adapter(self, layer: LayerInfo, w0: torch.Tensor) -> Adapter:
        p = self.params
        return LoRA2Adapter(layer, p["r"], p["k"], p["alpha"], p["dropout"], p["init_std"])

    def extra_loss(self, adapters):
        coefficient, terms = self.params["orth_reg"], self.params["orth_terms"]
        if not coefficient or not terms:
            return None
        modules = [a for a in leaf_adapters(adapters) if isinstance(a, LoRA2Adapter)]
        return coefficient * torch.stack([m.orthogonality(terms) for m in modules]).mean()
