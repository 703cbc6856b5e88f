"""AdaLoRA (Zhang et al., 2023), the adaptive-budget baseline of LoRA2 (Table 1) and
TriAdaptLoRA (Tables I, IV), through ``peft``.

``ΔW = B (A ⊙ E) · α / (r₀ + 1e-5)``, the SVD form ``P Λ Q`` with ``P = B`` (out × r₀),
``Λ = diag(E)`` (E: r₀ × 1) and ``Q = A`` (r₀ × in), ``r₀ = init_r``: exactly PEFT's
``SVDLinear`` (the same parameter names, ``lora_A``/``lora_E``/``lora_B`` under the
adapter name ``default``, its initialisation: E = 0, A and B ~ N(0, 0.02²), and its
scaling, which keeps ``r₀`` as the divisor after pruning). The orthogonal regulariser is
PEFT's ``AdaLoraModel.forward``: ``orth_reg_weight · mean over A and B of ‖AAᵀ − I‖_F``
(``‖BᵀB − I‖_F``), Frobenius norms not squared.

Budget allocation is PEFT's own ``RankAllocator`` (sensitivity ``|p ∇p|`` smoothed by
``beta1``, its uncertainty by ``beta2``, triplet scores, cubic budget from ``init_r × M``
to ``target_r × M`` between ``tinit`` and ``T − tfinal``, masking every ``deltaT``
steps by zeroing the pruned entries of E), run on a view of our adapters whose
parameter names are PEFT's; this file only drives it after each optimizer step as
``AdaLoraModel.update_and_allocate`` does (with ``T`` the planned optimizer steps and
the step number counted from 1) and keeps each module's mask in a ``rank_mask`` buffer
(rank pattern, compact state, checkpoints). Parameters per module: ``r (in + out + 1)``.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_runner.methods.base import (Adapter, AdapterMethod, LayerInfo, adapter_input, check_same_across_processes,
                                         gaussian_parameter, leaf_items)

KEY = "default"  # PEFT's adapter name: RankAllocator finds parameters by "lora_A.default"


def _factor(param: nn.Parameter) -> nn.ParameterDict:
    """PEFT's layout: one entry per adapter name (``lora_A.default``)."""
    return nn.ParameterDict({KEY: param})


class AdaLoRAAdapter(Adapter):
    reads_w0 = False  # forward ignores W0 (a quantized base skips dequantizing it)

    def __init__(self, layer: LayerInfo, r: int, alpha: float, dropout: float):
        super().__init__()
        device = layer.device
        self.r, self.ranknum, self.scaling = r, float(r), float(alpha)
        self.lora_A = _factor(gaussian_parameter((r, layer.in_features), 0.02, device))
        self.lora_E = _factor(nn.Parameter(torch.zeros(r, 1, device=device, dtype=torch.float32)))
        self.lora_B = _factor(gaussian_parameter((layer.out_features, r), 0.02, device))
        self.register_buffer("rank_mask", torch.ones(r, device=device, dtype=torch.float32))  # the allocator's pattern
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def active_rank(self) -> int:
        """Triplets kept by the allocator (all of them on the meta device: nothing pruned yet)."""
        return self.r if self.rank_mask.is_meta else int(self.rank_mask.sum().item())

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.lora_A[KEY], self.lora_E[KEY], self.lora_B[KEY]

    def forward(self, x, w0):
        a, e, b = self.factors()
        x = adapter_input(self.dropout(x), a)
        return (x @ (a * e).T @ b.T) * self.scaling / (self.ranknum + 1e-5)

    def delta_weight(self, w0):
        a, e, b = (t.float() for t in self.factors())
        return b @ (a * e) * self.scaling / (self.ranknum + 1e-5)

    def lora_factors(self, w0):
        """``P Λ Q`` over the triplets the allocator kept: ``B = P``, ``A = Λ Q``."""
        a, e, b = (t.float() for t in self.factors())
        keep = self.rank_mask.nonzero().flatten()
        return b[:, keep], (a * e)[keep], self.scaling / (self.ranknum + 1e-5)

    def orthogonality(self) -> list[torch.Tensor]:
        """PEFT's terms: ``‖AAᵀ − I‖_F`` and ``‖BᵀB − I‖_F`` (r₀ × r₀ Gram matrices)."""
        a, _, b = self.factors()
        eye = torch.eye(self.r, device=a.device, dtype=a.dtype)
        return [torch.norm(a @ a.T - eye, p="fro"), torch.norm(b.T @ b - eye, p="fro")]

    def compact_state(self):
        """Only the unpruned triplets (rows of A and E, columns of B); ``r`` is their number."""
        keep = self.rank_mask.nonzero().flatten()
        a, e, b = self.factors()
        return {f"lora_A.{KEY}": a[keep], f"lora_E.{KEY}": e[keep], f"lora_B.{KEY}": b[:, keep],
                "rank_mask": self.rank_mask[keep]}

    def load_compact_state(self, state):
        n = state[f"lora_E.{KEY}"].shape[0]
        if n > self.r:
            raise ValueError(f"saved AdaLoRA adapter has {n} triplets, the module has room for init_r = {self.r}")
        a, e, b = self.factors()
        with torch.no_grad():
            for name, target, dim in (("lora_A", a, 0), ("lora_E", e, 0), ("lora_B", b, 1)):
                target.zero_()
                target.narrow(dim, 0, n).copy_(state[f"{name}.{KEY}"])
            self.rank_mask.zero_()
            self.rank_mask[:n] = 1.0


class _PeftNames:
    """What PEFT's ``RankAllocator`` reads of a model: ``named_parameters()``, here our
    adapters' factors named ``<module path>.lora_A.default`` (PEFT's naming)."""

    def __init__(self, adapters: dict[str, Adapter]):
        self.leaves = [(path, a) for path, a in leaf_items(adapters) if isinstance(a, AdaLoRAAdapter)]

    def named_parameters(self):
        for path, adapter in self.leaves:
            for name, param in adapter.named_parameters():
                yield f"{path}.{name}", param


def _peft_adalora():
    try:
        from peft import AdaLoraConfig
        from peft.tuners.adalora.layer import RankAllocator
    except ImportError:
        raise ValueError("adalora runs PEFT's AdaLoRA rank allocator: install peft "
                         "(pip install 'lowrank-runner[peft]')") from None
    return AdaLoraConfig, RankAllocator


class AdaLoRA(AdapterMethod):
    name = "adalora"

    def __init__(self, **params):
        super().__init__(**params)
        if params["target_r"] >= params["init_r"]:
            raise ValueError(f"adalora: target_r ({params['target_r']}) must be below init_r ({params['init_r']}): "
                             "AdaLoRA prunes from init_r to target_r ranks per module (equal ranks: use lora)")
        # peft is imported when training starts (on_train_begin): merging and exporting a
        # trained run need only delta_weight, so a deployment machine needs no peft.
        self.total_steps: int | None = None
        self.allocator = None
        self.view: _PeftNames | None = None
        self.pattern: dict[str, list[bool]] | None = None  # PEFT's rank_pattern: E name -> kept triplets
        self._active: int | None = None

    def create_adapter(self, layer: LayerInfo, w0: torch.Tensor) -> Adapter:
        p = self.params
        return AdaLoRAAdapter(layer, p["init_r"], p["alpha"], p["dropout"])

    def on_train_begin(self, total_steps: int, adapters=None) -> None:
        super().on_train_begin(total_steps, adapters)
        self.total_steps = total_steps
        if adapters is None:
            return
        AdaLoraConfig, RankAllocator = _peft_adalora()
        p = self.params
        config = AdaLoraConfig(init_r=p["init_r"], target_r=p["target_r"], tinit=p["tinit"], tfinal=p["tfinal"],
                               deltaT=p["deltaT"], beta1=p["beta1"], beta2=p["beta2"], orth_reg_weight=p["orth_reg_weight"],
                               lora_alpha=p["alpha"], lora_dropout=p["dropout"], total_step=total_steps)
        self.view = _PeftNames(adapters)
        self.allocator = RankAllocator(self.view, config, KEY)

    def after_optimizer_step(self, step, adapters, optimizer=None):
        """``AdaLoraModel.update_and_allocate(step)``: scores and masks while the budget
        decays, the final mask at ``T − tfinal`` (scores reset), that mask re-applied
        after every later step. A step without gradients (skipped by the fp16 scaler) is
        no evidence: the scores are left as they are, the schedule still advances."""
        if self.allocator is None:
            raise RuntimeError("adalora needs on_train_begin(total_steps, adapters) before the first step")
        alloc, view, decay_end = self.allocator, self.view, self.total_steps - self.params["tfinal"]
        usable = all(p.grad is not None for _, p in view.named_parameters())
        with torch.no_grad():
            if step <= decay_end:
                if usable and step < decay_end:
                    alloc.update_ipt(view)
                budget, mask_now = alloc.budget_schedule(step)
                if (mask_now or step == decay_end) and alloc.exp_avg_ipt:  # no scores yet: nothing to rank by
                    self._set_pattern(alloc.mask_to_budget(view, budget), step)
                if step == decay_end:
                    alloc.reset_ipt()
            else:
                budget = alloc.target_bgt
                if self.pattern is not None:
                    alloc.mask_using_rank_pattern(view, self.pattern)
        return {"rank_budget": budget, "active_ranks": self._active}

    def _set_pattern(self, pattern: dict[str, list[bool]], step: int) -> None:
        """Keep PEFT's rank pattern and mirror it in each adapter's ``rank_mask``."""
        self.pattern = pattern
        for path, adapter in self.view.leaves:
            mask = adapter.rank_mask
            mask.copy_(torch.tensor(pattern[f"{path}.lora_E.{KEY}"], dtype=mask.dtype, device=mask.device))
        masks = torch.cat([a.rank_mask for _, a in self.view.leaves])
        check_same_across_processes(masks, "adalora rank allocation", step)
        self._active = int(sum(sum(v) for v in pattern.values()))

    def extra_loss(self, adapters):
        """``orth_reg_weight ·`` the mean of every A's and B's term (PEFT's ``num_param``)."""
        weight = self.params["orth_reg_weight"]
        terms = [t for _, a in leaf_items(adapters) if isinstance(a, AdaLoRAAdapter) for t in a.orthogonality()]
        if not weight or not terms:
            return None
        return weight * (torch.stack(terms).sum() / len(terms))

    def checkpoint_eligible(self, step: int) -> bool:
        return self.total_steps is None or step >= self.total_steps - self.params["tfinal"]

    def rank_pattern(self, adapters):
        return {path: a.active_rank() for path, a in leaf_items(adapters) if isinstance(a, AdaLoRAAdapter)}

    def active_parameter_count(self, adapters):
        """Parameters of the unpruned triplets, ``Σ active_rank · (in + out + 1)``: all of
        ``init_r`` before the first mask (``lrr inspect``), the final budget after training."""
        total = 0
        for _, a in leaf_items(adapters):
            if isinstance(a, AdaLoRAAdapter):
                in_f, out_f = a.lora_A[KEY].shape[1], a.lora_B[KEY].shape[0]
                total += a.active_rank() * (in_f + out_f + 1)
        return total

    def state_dict(self) -> dict:
        alloc = self.allocator
        if alloc is None:
            return {}
        return {"ipt": dict(alloc.ipt), "exp_avg_ipt": dict(alloc.exp_avg_ipt), "exp_avg_unc": dict(alloc.exp_avg_unc),
                "pattern": self.pattern, "active": self._active}

    def load_state_dict(self, state: dict) -> None:
        if self.allocator is None or not state:
            return
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(self.allocator, key, dict(state.get(key, {})))
        self.pattern, self._active = state.get("pattern"), state.get("active")
