"""SoRA (Ding et al., 2023): sparse low-rank adaptation, a gate per rank trained to zero.

"Sparse Low-rank Adaptation of Pre-trained Language Models", EMNLP 2023, arXiv
2311.11696, §3 (the method section); the authors' code is github.com/TsinghuaC3I/SoRA
(``src/lora.py``, ``src/sparse_optimizer.py``, ``src/trainer.py``, ``run_glue.py``).

Update (paper §3.1, eq. 2; ``src/lora.py:46-47``)::

    h = W0 x + (α/r) · B (g ⊙ A x),    ΔW = (α/r) · B diag(g) A

``A ∈ R^{r×in}`` (Kaiming-uniform, a = √5), ``B ∈ R^{out×r}`` (zeros), the gate
``g ∈ R^r`` (``gate_init``: N(0, 1) as the authors' ``torch.randn(1, r)``, or ones); B = 0
makes ΔW = 0 at the start whatever g is. ``r`` is the paper's ``r_max``.

Training (paper §3.2): the loss ``L0 + λ Σ‖g‖₁`` (eq. 3) is optimised with a proximal
gradient step on the gates (eq. 4) with the soft-threshold operator (eq. 5)::

    g_{t+1} = T_{η_t·λ}(g_t − η_t ∇_g L0),   T_ξ(x) = x − ξ (x > ξ), 0 (|x| ≤ ξ), x + ξ (x < −ξ)

What the authors' code does instead, and what this file does (docs/methods.md, "SoRA"):

* The gates get their own AdamW (``SparseAdamW``, weight decay 0, the same learning-rate
  schedule); the gradient step of eq. 4 is that Adam step. Here: the run's AdamW, the
  gates in the no-weight-decay group (:attr:`SoRAAdapter.no_weight_decay`), then the
  threshold in :meth:`SoRA.after_optimizer_step` (after the optimizer step, before the
  scheduler advances, so ``optimizer.param_groups`` hold η_t).
* The L1 term is also in the loss (``src/trainer.py:400-407``:
  ``sparse_lambda · Σ|g| / (number of gates)``), so Adam sees its subgradient:
  :meth:`SoRA.extra_loss` with ``l1_weight`` (0 turns it off: the paper's eq. 4 alone).
* The threshold is ``sparse_lambda_2`` itself, not multiplied by the learning rate
  (``src/sparse_optimizer.py:116-119``, what ``run_glue.py`` imports);
  ``src/sparse_optimizer_multiply_lr.py:112-115`` multiplies it by the group's lr, as
  eq. 4 does. ``threshold_scale``: ``constant`` (default, the scripts' ξ = 3e-4) or
  ``lr`` (eq. 4: η_t·threshold).
* The authors' operator is three in-place masked updates; the third tests the already
  shrunk values, so it zeroes every ``|x| < 2ξ`` (x in (ξ, 2ξ) becomes x − ξ < ξ and is
  then zeroed): ``T'_ξ(x) = x − sign(x)·ξ`` for ``|x| ≥ 2ξ`` (exactly ξ stays ξ), else 0.
  ``threshold_operator``: ``soft`` (default, eq. 5) or ``reference`` (that sequence, bit
  for bit).

Zeroed gates drop their ranks: :meth:`SoRAAdapter.lora_factors` (``lrr export --peft``)
and the compact state keep only ``g ≠ 0``, with g folded into B. A gate at zero can come
back (its gradient is not zero while A and B are), as in the paper and the authors' code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_runner.methods.base import (Adapter, AdapterMethod, LayerInfo, adapter_input, gaussian_parameter,
                                         kaiming_parameter, leaf_items)


class SoRAAdapter(Adapter):
    reads_w0 = False  # forward ignores W0 (a quantized base skips dequantizing it)
    no_weight_decay = ("gate",)  # the authors' SparseAdamW has weight decay 0 (run_glue.py:618)

    def __init__(self, layer: LayerInfo, r: int, alpha: float, dropout: float, gate_init: str):
        super().__init__()
        device = layer.device
        self.r, self.scaling = r, alpha / r
        self.lora_A = kaiming_parameter((r, layer.in_features), device)
        self.lora_B = nn.Parameter(torch.zeros(layer.out_features, r, device=device, dtype=torch.float32))
        self.gate = (gaussian_parameter((r,), 1.0, device) if gate_init == "normal"
                     else nn.Parameter(torch.ones(r, device=device, dtype=torch.float32)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x, w0):
        x = adapter_input(self.dropout(x), self.lora_A)
        return F.linear(F.linear(x, self.lora_A) * self.gate, self.lora_B) * self.scaling

    def delta_weight(self, w0):
        return (self.lora_B.float() * self.gate.float()) @ self.lora_A.float() * self.scaling

    def active(self) -> torch.Tensor:
        """Indices of the ranks whose gate is not zero."""
        return self.gate.detach().nonzero().flatten()

    def active_rank(self) -> int:
        """Ranks in use (all of them on the meta device: nothing trained yet)."""
        return self.r if self.gate.is_meta else int(self.gate.detach().count_nonzero().item())

    def lora_factors(self, w0):
        """``B diag(g) A`` over the non-zero gates: ``B' = B[:, g≠0] · g[g≠0]``, ``A' = A[g≠0]``."""
        keep = self.active()
        return self.lora_B[:, keep].float() * self.gate[keep].float(), self.lora_A[keep].float(), self.scaling

    def compact_state(self):
        """Only the ranks whose gate is not zero; the rank is the gate's length."""
        keep = self.active()
        return {"lora_A": self.lora_A[keep], "lora_B": self.lora_B[:, keep], "gate": self.gate[keep]}

    def load_compact_state(self, state):
        n = state["gate"].shape[0]
        if n > self.r:
            raise ValueError(f"saved SoRA adapter has {n} ranks, the module has room for r = {self.r}")
        with torch.no_grad():
            for name, dim in (("lora_A", 0), ("lora_B", 1), ("gate", 0)):
                target = getattr(self, name)
                target.zero_()
                target.narrow(dim, 0, n).copy_(state[name])


def soft_threshold(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Eq. 5, ``T_ξ(x) = sign(x) · max(|x| − ξ, 0)`` (``x − ξ`` and ``x + ξ`` exactly)."""
    return x.sign() * (x.abs() - threshold).clamp(min=0)


def reference_threshold(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """The authors' three in-place updates (``src/sparse_optimizer.py:117-119``), each on
    the result of the one before, without boolean indexing (no host sync)::

        p[p > ξ] -= ξ;  p[p < -ξ] += ξ;  p[abs(p) < ξ] = 0
    """
    x = torch.where(x > threshold, x - threshold, x)
    x = torch.where(x < -threshold, x + threshold, x)
    return torch.where(x.abs() < threshold, torch.zeros_like(x), x)


OPERATORS = {"soft": soft_threshold, "reference": reference_threshold}


class SoRA(AdapterMethod):
    """Gated LoRA, the gates' L1 term in the loss and a proximal step on them after every
    optimizer step; zeroed gates are the pruned ranks."""

    name = "sora"

    def create_adapter(self, layer: LayerInfo, w0: torch.Tensor) -> Adapter:
        p = self.params
        return SoRAAdapter(layer, p["r"], p["alpha"], p["dropout"], p["gate_init"])

    def _leaves(self, adapters) -> list[tuple[str, SoRAAdapter]]:
        return [(path, a) for path, a in leaf_items(adapters) if isinstance(a, SoRAAdapter)]

    def extra_loss(self, adapters):
        """``l1_weight · Σ|g| / n``, ``n`` every gate of every module (``src/trainer.py:400-407``)."""
        weight = self.params["l1_weight"]
        gates = [a.gate for _, a in self._leaves(adapters)]
        if not weight or not gates:
            return None
        return weight * torch.stack([g.abs().sum() for g in gates]).sum() / sum(g.numel() for g in gates)

    def threshold(self, optimizer, gate: torch.Tensor) -> float:
        """ξ, or η_t·ξ with η_t the learning rate of the gate's parameter group now (the
        rate the step just used: the scheduler advances after the hook)."""
        xi = self.params["threshold"]
        if self.params["threshold_scale"] == "constant":
            return xi
        if optimizer is None:
            raise RuntimeError("sora with threshold_scale 'lr' needs the optimizer in after_optimizer_step")
        groups = optimizer.param_groups
        for group in groups:
            if any(p is gate for p in group["params"]):
                return xi * group["lr"]
        rates = {group["lr"] for group in groups}
        if len(rates) != 1:
            raise RuntimeError("sora: the gates are in none of the optimizer's parameter groups, which differ in lr")
        return xi * rates.pop()

    def after_optimizer_step(self, step, adapters, optimizer=None):
        """The proximal step on every gate that has a gradient (the authors' optimizer
        skips the others, and so a step the fp16 scaler skipped: its gradients are
        cleared); returns the ranks in use and the threshold applied."""
        leaves = self._leaves(adapters)
        if not leaves:
            return None
        operator = OPERATORS[self.params["threshold_operator"]]
        applied = None
        with torch.no_grad():
            for _, adapter in leaves:
                gate = adapter.gate
                if gate.grad is None:
                    continue
                if applied is None:  # one lookup: the gates share a parameter group
                    applied = self.threshold(optimizer, gate)
                if applied > 0:
                    gate.copy_(operator(gate, applied))
            # one host sync per step for all modules
            active = int(torch.stack([a.gate.count_nonzero() for _, a in leaves]).sum().item())
        logs = {"active_ranks": active}
        if applied is not None:
            logs["gate_threshold"] = applied
        return logs

    def rank_pattern(self, adapters):
        return {path: a.active_rank() for path, a in self._leaves(adapters)}

    def active_parameter_count(self, adapters):
        """``Σ active_rank · (in + out)``: the A rows and B columns of the non-zero gates,
        what the paper's "# Params" counts (``src/util.py:8-21`` leaves the gates out);
        ``r (in + out)`` before training (``lrr inspect``)."""
        return sum(a.active_rank() * (a.lora_A.shape[1] + a.lora_B.shape[0]) for _, a in self._leaves(adapters))
