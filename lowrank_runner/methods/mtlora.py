"""MTLoRA (seed 000): low-rank adaptation with a matrix transformation between A and B.

Eqs. (4)-(7): ``h = W0 x + B T A x`` with ``T ∈ R^{r×r}``:

* SHIM  ``T = C``                          (eq. 4, spatial hierarchical interaction)
* ICFM  ``T = C Cᵀ`` (positive semi-definite) (eq. 5, in-context feature modulation)
* CTCM  ``T = C D``                        (eq. 6, composite transformation)
* DTSM  ``T = C + D``                      (eq. 7, dual transformation superposition)

The update is scaled by ``α/r`` as in the authors' code (the equations omit it).
Initialisation as the authors' code: ``A``, ``C``, ``D`` Kaiming-uniform (``a=√5``),
``B = 0`` so ``ΔW = 0`` at step 0. ``C``/``D`` are never zero-initialised: for ICFM and
CTCM the gradient of ``T`` would then vanish and ``T`` would stay zero forever.

Fused QKV (GPT-2 ``c_attn``, §4.3.2, "MergedLinear stepwise convolution"): with ``g``
selected groups, ``A ∈ R^{gr×in}`` and ``C, D ∈ R^{gr×gr}`` build one dense ``T`` that
couples the groups (step 1, ``T A``), then each group's own ``B_j ∈ R^{(out/3)×r}`` maps
its ``r`` rows (step 2, a grouped product): ``ΔW_j = (α/r) B_j Σ_h T_{jh} A_h``.
Unselected groups are left unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_runner.methods.base import Adapter, AdapterMethod, LayerInfo, adapter_input, kaiming_parameter, stacked_pair
from lowrank_runner.targets import FUSED_GROUPS

STRUCTURES = ("shim", "icfm", "ctcm", "dtsm")


class MTLoRAAdapter(Adapter):
    """One adapter; ``groups`` is None for a plain module, else the selected fused groups."""

    reads_w0 = False  # forward ignores W0 (a quantized base skips dequantizing it)

    def __init__(self, layer: LayerInfo, r: int, alpha: float, dropout: float, structure: str):
        super().__init__()
        if structure not in STRUCTURES:
            raise ValueError(f"unknown MTLoRA structure {structure!r} (one of {', '.join(STRUCTURES)})")
        self.layer = layer
        self.structure = structure
        self.r = r
        self.scaling = alpha / r
        self.groups = layer.groups
        n = len(self.groups) if self.groups else 1
        out_rows = layer.group_size if self.groups else layer.out_features
        device = layer.device
        self.lora_A = kaiming_parameter((n * r, layer.in_features), device)
        # B: one (out_rows x r) block per group, stored stacked as (n, out_rows, r)
        self.lora_B = nn.Parameter(torch.zeros(n, out_rows, r, device=device, dtype=torch.float32))
        self.mt_C = kaiming_parameter((n * r, n * r), device)
        self.mt_D = kaiming_parameter((n * r, n * r), device) if structure in ("ctcm", "dtsm") else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def transformation(self) -> torch.Tensor:
        C, D = self.mt_C, self.mt_D
        if self.structure == "shim":
            return C
        if self.structure == "icfm":
            return C @ C.T
        if self.structure == "ctcm":
            return C @ D
        return C + D

    def forward(self, x, w0):
        x = adapter_input(self.dropout(x), self.lora_A)
        z = F.linear(F.linear(x, self.lora_A), self.transformation())  # (..., n r): T A x
        n = self.lora_B.shape[0]
        z = z.reshape(*z.shape[:-1], n, self.r)
        y = torch.einsum("...gr,gor->...go", z, self.lora_B) * self.scaling  # per-group B_j
        if not self.groups:
            return y.reshape(*y.shape[:-2], -1)
        parts = dict(zip(self.groups, y.unbind(-2)))
        zeros = y.new_zeros(*y.shape[:-2], self.layer.group_size)
        return torch.cat([parts.get(g, zeros) for g in FUSED_GROUPS], dim=-1)

    def delta_weight(self, w0):
        ta = (self.transformation().float() @ self.lora_A.float()).reshape(self.lora_B.shape[0], self.r, -1)
        blocks = torch.einsum("gor,gri->goi", self.lora_B.float(), ta) * self.scaling  # (n, out_rows, in)
        if not self.groups:
            return blocks[0]
        delta = torch.zeros(self.layer.out_features, self.layer.in_features, device=blocks.device)
        for block, group in zip(blocks, self.groups):
            delta[self.layer.group_slice(group)] = block
        return delta

    def lora_factors(self, w0):
        """``B (T A)``: ``A' = T A``; on a fused projection each group's ``B_j`` maps its
        own ``r`` rows of ``A'`` (``ΔW_j = B_j (T A)_j``), a rank ``g·r`` pair."""
        ta = self.transformation().float() @ self.lora_A.float()
        if not self.groups:
            return self.lora_B[0].float(), ta, self.scaling
        pairs = {g: (b.float(), ta[j * self.r: (j + 1) * self.r]) for j, (g, b) in enumerate(zip(self.groups, self.lora_B))}
        return stacked_pair(self.layer, pairs) + (self.scaling,)


class MTLoRA(AdapterMethod):
    name = "mtlora"

    def _make(self, layer: LayerInfo) -> MTLoRAAdapter:
        p = self.params
        return MTLoRAAdapter(layer, p["r"], p["alpha"], p["dropout"], p["structure"])

    def create_adapter(self, layer: LayerInfo, w0: torch.Tensor) -> Adapter:
        return self._make(layer)

    def create_fused_adapter(self, layer: LayerInfo, w0: torch.Tensor) -> Adapter:
        return self._make(layer)  # one coupled T over the selected groups
