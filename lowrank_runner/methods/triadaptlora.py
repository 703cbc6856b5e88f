"""TriAdaptLoRA (seed 002): low-rank adaptation through a triangular transform, with
adaptive rank growth.

Eqs. (4)-(5): ``h = W0 x + α/(r + ε) · B (L + U) A x`` with ``A ∈ R^{r×in}``,
``B ∈ R^{out×r}``, ``L`` lower- and ``U`` upper-triangular ``r × r``. Both triangles hold
the diagonal (the paper initialises 1×1 ``L`` and ``U`` at ``r = 1`` and gives each
augmented block its own diagonal), so ``D = L + U`` is dense and ``D_ii = L_ii + U_ii``.

Representation (design.md: shapes must survive DDP, checkpoints and export): every
module pre-allocates ``capacity`` ranks; the active rank ``r`` selects the prefix
``A[:r]``, ``B[:, :r]`` and the first ``r(r+1)/2`` entries of ``L`` and ``Uᵀ`` stored
packed row by row, which are exactly the triangles of the ``r × r`` leading blocks. So
the triangular structure is exact at every step, growing by Δr (eqs. 6-9: ``A`` gains
rows, ``B`` columns, ``L`` the rows ``[L_down, L_aug]``, ``U`` the columns
``[U_up; U_aug]``) appends the next entries of each tensor, and parameters beyond the
active rank take no part in the forward (they get zero gradients). Active parameters
per module: ``r·(in + out) + r·(r + 1)``.

Initialisation (§III-B, ``init: gaussian``, the default): ``B = 0`` (ΔW = 0 at step 0);
``A``, ``L``, ``U`` Gaussian (the paper gives no standard deviation: ``init_std``, 0.02 as
AdaLoRA). Grown entries of all four are Gaussian (§III-D). ``init: fan_in`` (ours,
docs/methods.md "TriAdaptLoRA's start"): ``A ~ N(0, 1/(3·in))`` (LoRA's Kaiming-uniform
variance), ``L, U ~ N(0, 1/(r+1))`` so ``E‖row of (L+U)‖² = 1`` and ``(L+U)A`` has the
row norms of LoRA's A: Adam's first step (B ← ±lr) gives ``‖ΔW₁‖ = s·lr·√(out·r/3)``,
LoRA's at the same r and s; grown A, L, U entries the same way at the new rank, grown B
columns and ``U_up`` 0 (growth keeps ``B(L+U)A``). Scaling ``α/(r + ε)`` uses the module's current rank.

Orthogonality regulariser (eq. 10) read with the ``r × r`` Grams (the paper's ``AᵀA`` is
``in × in`` of rank ≤ r and cannot approach I; AdaLoRA, which the paper follows, uses
``AAᵀ``): ``‖AAᵀ − I_r‖²_F + ‖BᵀB − I_r‖²_F``, averaged over modules, times ``orth_reg``.

Rank growth (§III-C/D, Algorithm 1) is :class:`TriAdaptLoRA`'s ``after_optimizer_step``:
importance eq. 11, budget eq. 12, k(t) eqs. 13-14 or fixed-k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_runner.methods.base import (
    Adapter,
    AdapterMethod,
    LayerInfo,
    adapter_input,
    check_same_across_processes,
    gram_penalty,
    leaf_items,
    )
from lowrank_runner.methods.rank_budget import growth_count, growth_plan

NORMS = {"rank": lambda r: r, "sqrt_rank": math.sqrt, "none": lambda r: 1.0}


def n_triangle(r: int) -> int:
    return r * (r + 1) // 2


class TriAdaptLoRAAdapter(Adapter):
    reads_w0 = False  # forward ignores W0 (a quantized base skips dequantizing it)

    def __init__(self, layer: LayerInfo, r: int, capacity: int, alpha: float, eps: float, dropout: float,
                 init_std: float, init: str = "gaussian"):
        super().__init__()
        self.init, self.init_std = init, init_std
        device = layer.device
        self.capacity, self.alpha, self.eps = capacity, alpha, eps
        zeros = dict(device=device, dtype=torch.float32)
        self.tri_A = nn.Parameter(torch.zeros(capacity, layer.in_features, **zeros))
        self.tri_B = nn.Parameter(torch.zeros(layer.out_features, capacity, **zeros))
        self.tri_L = nn.Parameter(torch.zeros(n_triangle(capacity), **zeros))  # L, packed row by row
        self.tri_U = nn.Parameter(torch.zeros(n_triangle(capacity), **zeros))  # Uᵀ, packed row by row
        self.register_buffer("active_rank", torch.tensor(r, device=device), persistent=True)
        self.register_buffer("tril_index", torch.tril_indices(capacity, capacity, device=device), persistent=False)
        self.r = r  # host copy of active_rank (no device sync in the forward)
        if torch.device(device).type != "meta":
            a_std, tri_std, _ = self.init_stds(r)
            with torch.no_grad():
                self.tri_A[:r].normal_(0.0, a_std)
                self.tri_L[: n_triangle(r)].normal_(0.0, tri_std)
                self.tri_U[: n_triangle(r)].normal_(0.0, tri_std)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_load_state_dict_post_hook(lambda module, _: module._sync_rank())

    def init_stds(self, r: int) -> tuple[float, float, float]:
        """Standard deviations of new A, L/U and (grown) B entries at rank ``r``."""
        if self.init == "fan_in":
            return 1.0 / math.sqrt(3 * self.tri_A.shape[1]), 1.0 / math.sqrt(r + 1), 0.0
        return self.init_std, self.init_std, self.init_std

    def _sync_rank(self) -> None:
        self.r = int(self.active_rank.item())

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r + self.eps)

    def _packed(self, packed: torch.Tensor) -> torch.Tensor:
        """The ``r × r`` lower triangle whose entries are the first ``r(r+1)/2`` of ``packed``."""
        r, n = self.r, n_triangle(self.r)
        index = self.tril_index[:, :n]
        return packed.new_zeros(r, r).index_put((index[0], index[1]), packed[:n])

    def lower(self) -> torch.Tensor:
        return self._packed(self.tri_L)

    def upper(self) -> torch.Tensor:
        return self._packed(self.tri_U).T

    def transform(self) -> torch.Tensor:
        return self.lower() + self.upper()

    def forward(self, x, w0):
        r = self.r
        x = adapter_input(self.dropout(x), self.tri_A)
        return F.linear(F.linear(F.linear(x, self.tri_A[:r]), self.transform()), self.tri_B[:, :r]) * self.scaling

    def delta_weight(self, w0):
        r = self.r
        return (self.tri_B[:, :r].float() @ self.transform().float() @ self.tri_A[:r].float()) * self.scaling

    def lora_factors(self, w0):
        """``B (L + U) A`` at the module's own active rank: ``B' = B (L + U)``."""
        r = self.r
        return self.tri_B[:, :r].float() @ self.transform().float(), self.tri_A[:r].float(), self.scaling

    def orthogonality(self) -> torch.Tensor:
        a, b = self.tri_A[: self.r], self.tri_B[:, : self.r]
        return gram_penalty(a @ a.T) + gram_penalty(b.T @ b)

    def transform_norm(self) -> torch.Tensor:
        """``‖L + U‖_F`` of the active block (eq. 11's numerator), in float32."""
        return torch.linalg.matrix_norm(self.transform().detach().float())

    def active_parameters(self) -> int:
        return self.r * (self.tri_A.shape[1] + self.tri_B.shape[0]) + 2 * n_triangle(self.r)

    @torch.no_grad()
    def grow(self, by: int, generator: torch.Generator | None) -> None:
        """Eqs. 6-9: activate ``by`` more ranks, their new entries of A, B, L, U Gaussian
        (:meth:`init_stds` at the new rank). With ``init: fan_in`` B's new columns and U_up
        start at 0, so growing leaves ``B (L + U) A`` unchanged."""
        r, new = self.r, self.r + by
        if new > self.capacity:
            raise ValueError(f"cannot grow rank {r} by {by} beyond the capacity {self.capacity}")
        a_std, tri_std, b_std = self.init_stds(new)

        # drawn on the generator's device (the run's CPU generator), then moved: the same draws on any device
        drawn_on = generator.device if generator is not None else torch.device("cpu")

        def gaussian(t: torch.Tensor, std: float) -> None:  # always draws: the generator's sequence is the same
            t.copy_(torch.randn(t.shape, generator=generator, dtype=t.dtype, device=drawn_on).mul_(std).to(t.device))

        gaussian(self.tri_A[r:new], a_std)  # A_aug
        gaussian(self.tri_B[:, r:new], b_std)  # B_aug
        gaussian(self.tri_L[n_triangle(r): n_triangle(new)], tri_std)  # [L_down, L_aug]
        gaussian(self.tri_U[n_triangle(r): n_triangle(new)], tri_std)  # [U_up; U_aug], stored transposed
        if self.init == "fan_in":  # U_up (old rows, new columns) at 0 too: with B_aug = 0 the output is kept
            for row in range(r, new):  # row `row` of Uᵀ, packed: its first r entries are U_up's column
                self.tri_U[n_triangle(row): n_triangle(row) + r].zero_()
        self.active_rank.fill_(new)
        self.r = new

    def compact_state(self):
        r = self.r
        return {"tri_A": self.tri_A[:r], "tri_B": self.tri_B[:, :r], "tri_L": self.tri_L[: n_triangle(r)],
                "tri_U": self.tri_U[: n_triangle(r)], "active_rank": self.active_rank}

    def load_compact_state(self, state):
        r = state["tri_A"].shape[0]
        if r > self.capacity:
            raise ValueError(f"saved TriAdaptLoRA adapter has rank {r}, the module has room for {self.capacity}")
        with torch.no_grad():
            for name in ("tri_A", "tri_B", "tri_L", "tri_U"):
                getattr(self, name).zero_()
            self.tri_A[:r].copy_(state["tri_A"])
            self.tri_B[:, :r].copy_(state["tri_B"])
            self.tri_L[: n_triangle(r)].copy_(state["tri_L"])
            self.tri_U[: n_triangle(r)].copy_(state["tri_U"])
            self.active_rank.fill_(r)
        self.r = r


class TriAdaptLoRA(AdapterMethod):
    """TriAdaptLoRA with adaptive rank growth (Algorithm 1).

    Growth evaluations happen every ``grow_interval`` optimizer steps after ``t_init``
    warm-up steps. At each, the importance of module m is eq. 11,
    ``S_m = ‖L_m + U_m‖_F / n(r_m) − (the same at the previous evaluation)`` with
    ``n(r) = r`` (the paper's default), ``√r`` or 1 (Table III); ``k(t)`` modules grow by
    Δr (eqs. 12-14 or fixed-k) within the budget ``R⁰ = r_ref·M``; the last evaluation of
    the run spends what is left, so the run ends at exactly ``r_ref·M`` total ranks.
    A grown module's optimizer state is dropped: its new entries start with a fresh Adam
    state (see docs/methods.md).
    """

    name = "triadaptlora"

    def __init__(self, **params):
        super().__init__(**params)
        p = self.params
        self.growth = p.get("growth", "none")
        r, r_ref = p["r"], p.get("r_ref")
        if self.growth == "none":
            self.capacity = r
        else:
            if r_ref is None or r_ref < r:
                raise ValueError(f"triadaptlora growth needs r_ref >= r (got r_ref {r_ref}, r {r})")
            self.capacity = p.get("max_rank") or 4 * r_ref
            if self.capacity < r_ref:
                raise ValueError(f"triadaptlora: max_rank ({self.capacity}) must be at least r_ref ({r_ref}), "
                                 "or the budget r_ref x modules cannot be spent")
        self.total_steps: int | None = None
        self.last_evaluation: int | None = None
        self.remaining: int | None = None  # R(t), ranks still to be allocated
        self.reference: torch.Tensor | None = None  # normalised norms at the previous evaluation
        self.generator: torch.Generator | None = None

    @property
    def grows(self) -> bool:
        return self.growth != "none"

    def create_adapter(self, layer: LayerInfo, w0: torch.Tensor) -> Adapter:
        p = self.params
        return TriAdaptLoRAAdapter(layer, p["r"], self.capacity, p["alpha"], p["eps"], p["dropout"], p["init_std"],
                                   p["init"])

    def _modules(self, adapters) -> list[tuple[str, TriAdaptLoRAAdapter]]:
        return [(path, a) for path, a in leaf_items(adapters) if isinstance(a, TriAdaptLoRAAdapter)]

    def on_train_begin(self, total_steps: int, adapters=None) -> None:
        """Plan the growth steps. With ``t_init`` 0 the importance reference is the
        adapters' norms as training starts, so the first growth step is ``grow_interval``
        (as for any ``t_init``: ``t_init + grow_interval``), not twice that."""
        self.total_steps = total_steps
        if not self.grows:
            return
        p = self.params
        t0, interval = p["t_init"], p["grow_interval"]
        if p["r_ref"] == p["r"]:  # nothing to grow: the budget is spent from the start
            self.last_evaluation = -1
            return
        super().on_train_begin(total_steps, adapters)
        self.last_evaluation = t0 + (total_steps - 1 - t0) // interval * interval
        if self.generator is None:  # the run's seed, identical in every process
            self.generator = torch.Generator().manual_seed(torch.initial_seed())
        if t0 == 0 and adapters is not None and self.reference is None:  # "step 0": before the first update
            with torch.no_grad():
                self.reference = self._norms(self._modules(adapters))

    def is_evaluation(self, step: int) -> bool:
        p = self.params
        return step >= p["t_init"] and (step - p["t_init"]) % p["grow_interval"] == 0 and step <= self.last_evaluation

    def _norms(self, modules) -> torch.Tensor:
        norm = NORMS[self.params["importance_norm"]]
        return torch.stack([a.transform_norm() / norm(a.r) for _, a in modules]).float().cpu()

    def after_optimizer_step(self, step, adapters, optimizer=None):
        if not self.grows:
            return None
        if self.total_steps is None:
            raise RuntimeError("TriAdaptLoRA growth needs on_train_begin(total_steps) before the first step")
        p = self.params
        modules = self._modules(adapters)
        ranks = [a.r for _, a in modules]
        if self.remaining is None:
            self.remaining = p["r_ref"] * len(modules) - sum(ranks)  # eq. 12, R(1) = R⁰ − r·M
        logs = {"rank_budget": p["r_ref"] * len(modules), "rank_remaining": self.remaining}
        if self.is_evaluation(step):
            with torch.no_grad():
                norms = self._norms(modules)
                if self.reference is not None and self.remaining > 0:
                    scores = (norms - self.reference).tolist()  # eq. 11
                    k = growth_count(self.growth, self.remaining, step, p["t_init"], self.total_steps, p["fixed_k"])
                    increments = growth_plan(scores, ranks, self.capacity, k, p["grow_by"], self.remaining,
                                             exhaust=step == self.last_evaluation)
                    # on the adapters' device: NCCL all-reduces GPU tensors only
                    device = modules[0][1].active_rank.device
                    check_same_across_processes(torch.tensor(increments, device=device), "triadaptlora growth", step)
                    for (_, adapter), inc in zip(modules, increments):
                        if inc:
                            adapter.grow(inc, self.generator)
                            _forget_optimizer_state(optimizer, adapter)
                    self.remaining -= sum(increments)
                    logs.update(rank_remaining=self.remaining, grown_modules=sum(1 for i in increments if i))
                    ranks = [a.r for _, a in modules]
                    norms = self._norms(modules)  # the next importance is measured from here
                self.reference = norms
        logs["active_ranks"] = sum(ranks)
        return logs

    def checkpoint_eligible(self, step: int) -> bool:
        """Only models with the whole budget allocated (after the last growth step) may
        be selected as the best checkpoint, so the saved adapter has the final ranks."""
        return not self.grows or self.last_evaluation is None or step >= self.last_evaluation

    def active_parameter_count(self, adapters) -> int:
        return sum(a.active_parameters() for _, a in self._modules(adapters))

    def rank_pattern(self, adapters):
        if not self.grows:
            return None
        return {path: a.r for path, a in self._modules(adapters)}

    def state_dict(self) -> dict:
        return {"remaining": self.remaining, "reference": self.reference,
                "generator": self.generator.get_state() if self.generator is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.remaining, self.reference = state.get("remaining"), state.get("reference")
        if state.get("generator") is not None:
            self.generator = torch.Generator()
            self.generator.set_state(state["generator"])

    def extra_loss(self, adapters):
        if not self.params["orth_reg"]:
            return None
        modules = [a for _, a in self._modules(adapters)]
        return self.params["orth_reg"] * torch.stack([m.orthogonality() for m in modules]).mean()


def _forget_optimizer_state(optimizer, adapter: TriAdaptLoRAAdapter) -> None:
    """Drop the optimizer state of a grown module's tensors: Adam re-creates it at the next
    step (step count and moments from zero), so the new entries start fresh and correctly
    bias-corrected (PyTorch keeps one step count per tensor, not per entry)."""
    if optimizer is None:
        return
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    for param in (adapter.tri_A, adapter.tri_B, adapter.tri_L, adapter.tri_U):
        inner.state.pop(param, None)
