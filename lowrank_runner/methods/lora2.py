"""LoRA2 (seed 001): multi-scale orthogonal low-rank adaptation.

Eq. (4), written for row vectors (``h = x W``): ``W = W0 + P Λ Q``, ``P = v u``,
``Q = U V`` with ``v ∈ R^{in×k}``, ``u ∈ R^{k×r}``, ``Λ = diag(λ)``, ``λ ∈ R^r``,
``U ∈ R^{r×k}``, ``V ∈ R^{k×out}``. In PyTorch's ``out × in`` convention
``ΔW = s · (v u Λ U V)ᵀ``; the forward evaluates it right to left on the activations,
``x → x v → · u → ⊙ λ → · U → · V`` (never forming ΔW), and ``s = α/(r₀ + 1e-5)`` with
``r₀`` the initial rank (authors' code, as AdaLoRA; the paper states no scaling).

Initialisation (§3.1, ``init: gaussian``, the default): ``λ = 0`` (so ΔW = 0) and
``u, v, U, V ~ N(0, σ²)``, ``σ = 0.02`` (authors' code). ``init: orthonormal`` (ours,
docs/methods.md "LoRA2's start"): λ = 0 and u, v, U, V semi-orthogonal, the minimum of
every term of eq. 5 (all exactly 0 at k = r), and λ enters as ``γ λ`` with
``γ = √(out/3)·r/min(k, r)`` (``lambda_scale``), so Adam's first step (λ_i ← ±lr) moves
the update by LoRA's ``s·lr·√(out·r/3)`` at the same r and α (LoRA's A is
Kaiming-uniform, entries of variance 1/(3·in)): exactly for k ≥ r, in expectation below. Parameters per module:
``(in + out)·k + 2·r·k + r`` (λ counted), which reproduces LoRA2's Table 4 at ``k = 1, r = 8``.

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

import math

import torch
from torch import nn

from lowrank_runner.methods.base import (
    Adapter,
    AdapterMethod,
    LayerInfo,
    adapter_input,
    check_same_across_processes,
    gaussian_parameter,
    gram_penalty,
    leaf_adapters,
    leaf_items,
    orthonormal_parameter,
    )
from lowrank_runner.methods.rank_budget import cubic_budget


class LoRA2Adapter(Adapter):
    reads_w0 = False  # forward ignores W0 (a quantized base skips dequantizing it)

    def __init__(self, layer: LayerInfo, r: int, k: int, alpha: float, dropout: float, init_std: float,
                 init: str = "gaussian", lambda_scale: float | None = None):
        super().__init__()
        device = layer.device
        self.r, self.k = r, k
        self.scaling = alpha / (r + 1e-5)
        factor = gaussian_parameter if init == "gaussian" else orthonormal_parameter
        self.lora2_v = factor((layer.in_features, k), init_std, device)
        self.lora2_u = factor((k, r), init_std, device)
        self.lora2_lambda = nn.Parameter(torch.zeros(r, device=device, dtype=torch.float32))
        self.lora2_U = factor((r, k), init_std, device)
        self.lora2_V = factor((k, layer.out_features), init_std, device)
        # γ: λ enters as γ λ (a fixed reparameterisation, part of the recipe, never saved)
        self.lambda_scale = lambda_scale or (orthonormal_lambda_scale(layer.out_features, r, k) if init == "orthonormal"
                                             else 1.0)
        # Which singular values are active (pruning); saved with the adapter.
        self.register_buffer("rank_mask", torch.ones(r, device=device, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def singular_values(self) -> torch.Tensor:
        return self.lora2_lambda * (self.rank_mask * self.lambda_scale)

    def forward(self, x, w0):
        x = adapter_input(self.dropout(x), self.lora2_v)
        h = (x @ self.lora2_v) @ self.lora2_u
        h = (h * self.singular_values()) @ self.lora2_U
        return (h @ self.lora2_V) * self.scaling

    def delta_weight(self, w0):
        p = self.lora2_v.float() @ self.lora2_u.float()  # in x r
        q = self.lora2_U.float() @ self.lora2_V.float()  # r x out
        return ((p * self.singular_values().float()) @ q).T * self.scaling

    def lora_factors(self, w0):
        """``(P Λ Q)ᵀ = (Λ Q)ᵀ Pᵀ`` over the active singular values only:
        ``B = (U V)ᵀ diag(λ)``, ``A = (v u)ᵀ``, rank = the unmasked λ."""
        keep = self.rank_mask.nonzero().flatten()
        p = self.lora2_v.float() @ self.lora2_u[:, keep].float()  # in x r'
        q = self.lora2_U[keep].float() @ self.lora2_V.float()  # r' x out
        return q.T * (self.lora2_lambda[keep].float() * self.lambda_scale), p.T, self.scaling

    def compact_state(self):
        """Only the active singular values (their λ, u columns and U rows); the rank is
        the length of λ. Loading puts them first and masks the rest."""
        keep = self.rank_mask.nonzero().flatten()
        return {"lora2_v": self.lora2_v, "lora2_u": self.lora2_u[:, keep], "lora2_lambda": self.lora2_lambda[keep],
                "lora2_U": self.lora2_U[keep], "lora2_V": self.lora2_V, "rank_mask": self.rank_mask[keep]}

    def load_compact_state(self, state):
        n = state["lora2_lambda"].shape[0]
        if n > self.r:
            raise ValueError(f"saved LoRA2 adapter has {n} singular values, the module has room for {self.r}")
        with torch.no_grad():
            self.lora2_v.copy_(state["lora2_v"])
            self.lora2_V.copy_(state["lora2_V"])
            for name, dim in (("lora2_u", 1), ("lora2_lambda", 0), ("lora2_U", 0)):
                target = getattr(self, name)
                target.zero_()
                target.narrow(dim, 0, n).copy_(state[name])
            self.rank_mask.zero_()
            self.rank_mask[:n] = 1.0

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


def orthonormal_lambda_scale(out_features: int, r: int, k: int) -> float:
    """γ that makes the first Adam step of an orthonormal start (λ_i ← ±lr) move ΔW as far
    as LoRA's, ``s·lr·√(out·r/3)``: with semi-orthogonal factors ``‖P diag(±1) Q‖_F`` is
    ``√r`` for ``k ≥ r`` and ``k/√r`` in expectation for ``k < r`` (docs/methods.md), so
    ``γ = √(out/3) · r / min(k, r)``."""
    return math.sqrt(out_features / 3) * r / min(k, r)


class Sensitivity:
    """Eq. 9's smoothed importance of named parameters: ``s = |p ⊙ ∇p|``,
    ``Ī ← β1 Ī + (1−β1) s``, ``Ū ← β2 Ū + (1−β2) |s − Ī|``, ``score = Ī ⊙ Ū``.

    A step without usable gradients (none: the optimizer skipped the step; or some not
    finite) is no evidence: the statistics keep their values, exactly as if the step had
    not happened, so one fp16 overflow cannot turn them into NaN for the rest of the run."""

    def __init__(self, beta1: float, beta2: float):
        self.beta1, self.beta2 = beta1, beta2
        self.mean: dict[str, torch.Tensor] = {}
        self.uncertainty: dict[str, torch.Tensor] = {}

    def update(self, key: str, param: nn.Parameter, usable: torch.Tensor | None = None) -> torch.Tensor:
        """The score after this step; ``usable`` (a 0-dim bool tensor, no host sync)
        false, or no gradient: the statistics are left as they are."""
        mean = self.mean.get(key, torch.zeros_like(param, dtype=torch.float32))  # float32 whatever the adapter dtype
        unc = self.uncertainty.get(key, torch.zeros_like(param, dtype=torch.float32))
        if param.grad is not None:
            s = (param.float() * param.grad.float()).abs()
            new_mean = self.beta1 * mean + (1 - self.beta1) * s
            new_unc = self.beta2 * unc + (1 - self.beta2) * (s - new_mean).abs()
            if usable is not None:
                new_mean, new_unc = torch.where(usable, new_mean, mean), torch.where(usable, new_unc, unc)
            mean, unc = new_mean, new_unc
        self.mean[key], self.uncertainty[key] = mean, unc
        return mean * unc


def gradients_finite(params) -> torch.Tensor | None:
    """Whether every gradient of ``params`` is finite, as a 0-dim bool tensor on their
    device (no host sync); None when none has a gradient."""
    checks = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    return torch.stack(checks).all() if checks else None


class LoRA2(AdapterMethod):
    """LoRA2 with optional importance pruning (Algorithm 1, eq. 9).

    After each optimizer step (gradients still present) the small factors beside Λ are
    scored, ``S_i = score(λ_i) + mean_k score(u[:, i]) + mean_k score(U[i, :])``; the large
    ``v`` and ``V`` are never scored (the paper's "98.5% fewer sensitivity computations").
    On masking steps of the cubic budget the ``budget`` highest-scoring singular values
    over all modules stay active and the rest are masked.
    """

    name = "lora2"

    def __init__(self, **params):
        super().__init__(**params)
        target = params.get("target_rank")
        if target is not None and target > params["r"]:
            raise ValueError(f"lora2: target_rank ({target}) cannot exceed r ({params['r']})")
        self.total_steps: int | None = None
        self._active: int | None = None  # active ranks, updated when the mask changes
        self.sensitivity = Sensitivity(params.get("beta1", 0.85), params.get("beta2", 0.85))

    @property
    def prunes(self) -> bool:
        return self.params.get("target_rank") is not None

    def on_train_begin(self, total_steps: int, adapters=None) -> None:
        super().on_train_begin(total_steps, adapters)
        self.total_steps = total_steps

    def importance(self, path: str, adapter: "LoRA2Adapter", usable: torch.Tensor | None = None) -> torch.Tensor:
        u = self.sensitivity.update(f"{path}.u", adapter.lora2_u, usable)  # k x r
        lam = self.sensitivity.update(f"{path}.lambda", adapter.lora2_lambda, usable)  # r
        big_u = self.sensitivity.update(f"{path}.U", adapter.lora2_U, usable)  # r x k
        return lam + u.mean(dim=0) + big_u.mean(dim=1)

    def after_optimizer_step(self, step, adapters, optimizer=None):
        if not self.prunes:
            return None
        if self.total_steps is None:
            raise RuntimeError("LoRA2 pruning needs on_train_begin(total_steps) before the first step")
        items = [(path, a) for path, a in leaf_items(adapters) if isinstance(a, LoRA2Adapter)]
        modules = [a for _, a in items]
        p = self.params
        plan = cubic_budget(step, self.total_steps, p["r"] * len(modules), p["target_rank"] * len(modules),
                            p["t_init"], p["t_final"], p["mask_interval"])
        if plan.final and not plan.mask_now:  # the mask is fixed: nothing left to score
            return {"rank_budget": plan.budget, "active_ranks": self._active}
        with torch.no_grad():
            # one finiteness flag for the whole step: all modules skip an overflowed step together
            usable = gradients_finite(p for m in modules for p in (m.lora2_u, m.lora2_lambda, m.lora2_U))
            scores = [self.importance(path, m, usable) for path, m in items]
            if plan.mask_now:
                flat = torch.cat(scores)
                keep = torch.zeros_like(flat)
                keep[torch.topk(flat, plan.budget).indices] = 1.0
                check_same_across_processes(keep, "lora2 pruning", step)
                for module, mask in zip(modules, keep.split(p["r"])):
                    module.rank_mask.copy_(mask)
                self._active = plan.budget  # exactly `budget` ranks are kept
            elif self._active is None:
                self._active = int(torch.stack([m.rank_mask.sum() for m in modules]).sum().item())
        # One host sync at most when the mask changes, never per module per step.
        return {"rank_budget": plan.budget, "active_ranks": self._active}

    def state_dict(self) -> dict:
        return {"mean": dict(self.sensitivity.mean), "uncertainty": dict(self.sensitivity.uncertainty),
                "active": self._active}

    def load_state_dict(self, state: dict) -> None:
        self.sensitivity.mean = dict(state.get("mean", {}))
        self.sensitivity.uncertainty = dict(state.get("uncertainty", {}))
        self._active = state.get("active")

    def checkpoint_eligible(self, step: int) -> bool:
        return not self.prunes or step >= self.total_steps - self.params["t_final"]

    def rank_pattern(self, adapters):
        if not self.prunes:
            return None
        return {path: int(leaf.rank_mask.sum().item()) for path, leaf in leaf_items(adapters)}

    def create_adapter(self, layer: LayerInfo, w0: torch.Tensor) -> Adapter:
        p = self.params
        return LoRA2Adapter(layer, p["r"], p["k"], p["alpha"], p["dropout"], p["init_std"], p["init"], p["lambda_scale"])

    def extra_loss(self, adapters):
        coefficient, terms = self.params["orth_reg"], self.params["orth_terms"]
        if not coefficient or not terms:
            return None
        modules = [a for a in leaf_adapters(adapters) if isinstance(a, LoRA2Adapter)]
        return coefficient * torch.stack([m.orthogonality(terms) for m in modules]).mean()
