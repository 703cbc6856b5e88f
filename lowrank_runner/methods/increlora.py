"""IncreLoRA (Zhang et al., 2023, arXiv 2308.12043): rank allocated incrementally during
training, by importance. Where the paper is vague the authors' code is the spec
(github.com/FeiyuZhang98/IncreLoRA: ``loralib/loralib/increlora.py``, ``SVDLinear`` and
``RankAllocator``; ``NLU/src/transformers/trainer.py``, ``compute_svd_orth_regu``;
``NLU/src/transformers/optimization.py``, ``Multi_LambdaLR``); docs/methods.md, "IncreLoRA",
lists every choice and deviation.

Update (``loraW``): ``ΔW = α/(ranknum + 1e-5) · [B | b…] · diag(E; e…) · [A; a…]``, a sum of
rank-1 blocks ``b_i e_i a_i`` (``a_i`` a row of ``A``, ``b_i`` a column of ``B``, ``e_i`` a
scalar), ``ranknum`` the module's ranks. The ``r`` initial blocks start with ``E = 0``,
``A, B ~ N(0, 0.02²)``. After the first optimizer step every module gets ``incre_rank_num``
*reserve* blocks, trained ahead ("advance learning": ``a, b`` train, ``e = 1e-5`` frozen,
not counted in ``ranknum``); when a module grows, its reserves become ranks (``e`` trains
from there) and new reserves are appended. Once the total rank reaches
``target_rank × modules`` the reserves' ``e`` are set to 0.

Storage: ``capacity`` blocks per module, pre-allocated (shapes never change: DDP, optimizer
state, checkpoints); a ``slot_state`` buffer marks each block unused, a rank, a reserve or a
retired reserve, and used blocks are a prefix (ranks, then reserves). ``start_ab`` and
``start_e`` hold the step after which each block's ``a, b`` and ``e`` train (``-1``:
frozen): :meth:`IncreLoRAAdapter.entry_starts`, which the training optimizer reads to give
new blocks a fresh Adam state and the run's schedule restarted at their start (the
reference's new parameter group with its own warm-up, ``Multi_LambdaLR``). Frozen entries
are detached in the forward, so they get exactly zero gradient.

Importance (``backward_hook``, ``update_ipt``, ``calculate_score``): per module and step
``s = Σ|ΔW ⊙ ∂L/∂ΔW| / √(out·in)``, ``Ī ← β₁ Ī + (1 − β₁) s``, ``Ū ← β₂ Ū + (1 − β₂)|s − Ī|``,
score ``Ī·Ū``; ``ΔW`` is formed in the forward while the budget grows (as the reference's
``loraW``), its gradient read by a tensor hook.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_runner.methods.base import (Adapter, AdapterMethod, LayerInfo, adapter_input, check_same_across_processes,
                                         gaussian_parameter, leaf_items)
from lowrank_runner.methods.rank_budget import increlora_events_needed, increlora_incre_rank_num, increlora_schedule

EPS = 1e-5  # loraW: scaling / (ranknum + 1e-5)
RESERVE_E = 1e-5  # add_reserve_param: the frozen e of a reserve block trained ahead
INIT_STD = 0.02  # reset_parameters and add_reserve_param: A, B ~ N(0, 0.02²)
FROZEN = -1  # entry start of an entry that does not train
UNUSED, RANK, RESERVE, RETIRED = 0, 1, 2, 3  # slot_state


class IncreLoRAAdapter(Adapter):
    reads_w0 = False  # forward ignores W0 (a quantized base skips dequantizing it)

    def __init__(self, layer: LayerInfo, r: int, capacity: int, alpha: float, dropout: float):
        super().__init__()
        device = layer.device
        if capacity < r:
            raise ValueError(f"increlora: capacity {capacity} below the initial rank {r}")
        self.capacity, self.alpha, self.shape = capacity, float(alpha), (layer.out_features, layer.in_features)
        self.lora_A = gaussian_parameter((capacity, layer.in_features), INIT_STD, device)
        self.lora_E = nn.Parameter(torch.zeros(capacity, 1, device=device, dtype=torch.float32))
        self.lora_B = gaussian_parameter((layer.out_features, capacity), INIT_STD, device)
        state = torch.full((capacity,), UNUSED, device=device, dtype=torch.int8)
        start = torch.full((capacity,), FROZEN, device=device, dtype=torch.int64)
        if not state.is_meta:
            state[:r] = RANK
            start[:r] = 0
        self.register_buffer("slot_state", state)
        self.register_buffer("start_ab", start)  # the step after which each block's a and b train
        self.register_buffer("start_e", start.clone())  # ... and its e
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scoring = False  # form ΔW in the training forward and score it (while the budget grows)
        self.score: torch.Tensor | None = None  # Σ|ΔW ⊙ ∂L/∂ΔW| / √numel since the last optimizer step
        self.ranknum, self.used, self.reserves = r, r, 0  # host copies of slot_state (no device sync)
        self.register_load_state_dict_post_hook(lambda module, _: module.sync())

    def sync(self) -> None:
        """The host copies of ``slot_state``: ranks, used blocks (a prefix), reserves."""
        if self.slot_state.is_meta:
            return
        states = self.slot_state.tolist()
        self.used = sum(1 for s in states if s != UNUSED)
        if any(s != UNUSED for s in states[self.used:]):
            raise ValueError("increlora: used blocks must be a prefix of the capacity")
        self.ranknum = states.count(RANK)
        self.reserves = states.count(RESERVE)

    @property
    def scaling(self) -> float:
        return self.alpha / (self.ranknum + EPS)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``A, E, B`` of the used blocks; frozen entries detached (no gradient reaches them)."""
        n = self.used
        a, e, b = self.lora_A[:n], self.lora_E[:n], self.lora_B[:, :n]
        ab, et = self.start_ab[:n] >= 0, self.start_e[:n] >= 0
        return (torch.where(ab[:, None], a, a.detach()), torch.where(et[:, None], e, e.detach()),
                torch.where(ab[None, :], b, b.detach()))

    def forward(self, x, w0):
        a, e, b = self.factors()
        x = adapter_input(self.dropout(x), a)
        if self.scoring and torch.is_grad_enabled():
            delta = (b @ (a * e)) * self.scaling  # the reference's loraW output, whose gradient scores the module
            if delta.requires_grad:
                delta.register_hook(partial(self._add_score, delta.detach()))
            return F.linear(x, delta)
        return F.linear(F.linear(x, a * e), b) * self.scaling

    def _add_score(self, delta: torch.Tensor, grad: torch.Tensor) -> None:
        """``backward_hook``: ``Σ|ΔW ⊙ ∂L/∂ΔW| / √numel``, summed over the micro-batches of a step."""
        score = (delta.float() * grad.float()).abs().sum() / math.sqrt(delta.numel())
        self.score = score if self.score is None else self.score + score

    def delta_weight(self, w0):
        n = self.used
        a, e, b = self.lora_A[:n].float(), self.lora_E[:n].float(), self.lora_B[:, :n].float()
        return (b @ (a * e)) * self.scaling

    def lora_factors(self, w0):
        """``B' = [B | b…] diag(E; e…)``, ``A = [A; a…]`` over the ranks and the reserves whose
        ``e`` is not 0 (retired reserves and those of ``advance_learn: false`` add nothing)."""
        n = self.used
        a, e, b = self.lora_A[:n].float(), self.lora_E[:n].float(), self.lora_B[:, :n].float()
        state = self.slot_state[:n]
        keep = ((state == RANK) | ((state == RESERVE) & (e[:, 0] != 0))).nonzero().flatten()
        return b[:, keep] * e[keep, 0], a[keep], self.scaling

    def entry_starts(self):
        return {"lora_A": self.start_ab[:, None], "lora_B": self.start_ab[None, :], "lora_E": self.start_e[:, None]}

    def orthogonality(self) -> torch.Tensor:
        """``compute_svd_orth_regu``'s terms over every used block, reserves included:
        ``‖AAᵀ − I‖_F + ‖BᵀB − I‖_F`` (norms not squared)."""
        a, _, b = self.factors()
        eye = torch.eye(self.used, device=a.device, dtype=a.dtype)
        return torch.norm(a @ a.T - eye, p="fro") + torch.norm(b.T @ b - eye, p="fro")

    def active_parameters(self) -> int:
        return self.ranknum * (self.shape[0] + self.shape[1] + 1)

    @torch.no_grad()
    def add_reserves(self, count: int, step: int, advance: bool) -> None:
        """``add_reserve_param``: ``count`` reserve blocks after the used ones; their ``a, b``
        (drawn when the model was built) train from after ``step`` with advance learning,
        ``e`` frozen at 1e-5 (0 and everything frozen without)."""
        n = self.used
        if n + count > self.capacity:
            raise ValueError(f"increlora: no room for {count} reserve block(s) ({n} of {self.capacity} used)")
        self.slot_state[n: n + count] = RESERVE
        self.lora_E[n: n + count] = RESERVE_E if advance else 0.0
        self.start_ab[n: n + count] = step if advance else FROZEN
        self.start_e[n: n + count] = FROZEN
        self.used, self.reserves = n + count, self.reserves + count

    @torch.no_grad()
    def grow(self, count: int, step: int, advance: bool) -> None:
        """``increase_to_target_rank`` for one module: its first ``count`` reserves become
        ranks (``e`` trains after ``step``; without advance learning ``a, b`` too), then
        ``count`` new reserves are appended."""
        if count > self.reserves:
            raise ValueError(f"increlora: {count} rank(s) to add, {self.reserves} reserve block(s)")
        first = self.ranknum
        self.slot_state[first: first + count] = RANK
        self.start_e[first: first + count] = step
        if not advance:
            self.start_ab[first: first + count] = step
        self.ranknum, self.reserves = first + count, self.reserves - count
        self.add_reserves(count, step, advance)

    @torch.no_grad()
    def retire_reserves(self) -> None:
        """The budget is spent: the reserves' ``e`` set to 0 (their ``a, b`` train on, as the
        reference's stay in the optimizer)."""
        rows = slice(self.ranknum, self.used)
        self.lora_E[rows] = 0.0
        self.start_e[rows] = FROZEN
        self.slot_state[rows] = RETIRED  # the used blocks after the ranks are the reserves
        self.reserves = 0

    def compact_state(self):
        n = self.used
        return {"lora_A": self.lora_A[:n], "lora_E": self.lora_E[:n], "lora_B": self.lora_B[:, :n],
                "slot_state": self.slot_state[:n], "start_ab": self.start_ab[:n], "start_e": self.start_e[:n]}

    def load_compact_state(self, state):
        """The saved blocks into the first slots; the rest keep their initial draws, unused.
        Entries that trained start at 0: a loaded adapter trains from the start of a new run
        (``training.init_from``)."""
        n = state["lora_E"].shape[0]
        if n > self.capacity:
            raise ValueError(f"saved IncreLoRA adapter has {n} blocks, the module has room for {self.capacity}")
        with torch.no_grad():
            self.lora_A[:n].copy_(state["lora_A"])
            self.lora_B[:, :n].copy_(state["lora_B"])
            self.lora_E.zero_()
            self.lora_E[:n].copy_(state["lora_E"])
            self.slot_state.fill_(UNUSED)
            self.slot_state[:n].copy_(state["slot_state"])
            for name in ("start_ab", "start_e"):
                buffer = getattr(self, name)
                buffer.fill_(FROZEN)
                buffer[:n].copy_(state[name].clamp(max=0))  # -1 stays frozen, any start becomes 0
        self.sync()


class IncreLoRA(AdapterMethod):
    """IncreLoRA's ``RankAllocator.update_and_increase``, after every optimizer step ``s``
    (the reference's ``global_step`` is ``g = s − 1``): reserves added after step 1;
    importance updated while the budget grows; at ``g > init_warmup``,
    ``g % incre_interval == 0`` the ``top_h`` most important modules grow by
    ``incre_rank_num``, until ``target_rank × modules`` ranks."""

    name = "increlora"

    def __init__(self, **params):
        super().__init__(**params)
        p = self.params
        if p["target_rank"] < p["r"]:
            raise ValueError(f"increlora: target_rank ({p['target_rank']}) below r ({p['r']}): ranks only grow")
        self.incre = increlora_incre_rank_num(p)
        self.grows = p["target_rank"] > p["r"]
        self.modules: int | None = None  # M, from before_adapters
        self.capacity: int | None = None
        self.total_steps: int | None = None
        self.total = 0  # ranks allocated, all modules
        self.reserved = False  # the reserves were added (after step 1)
        self.done = not self.grows  # target_rank × modules reached
        self.exp_avg_ipt: torch.Tensor | None = None  # Ī per module (host, float32)
        self.exp_avg_unc: torch.Tensor | None = None  # Ū per module
        self.leaves: list[tuple[str, IncreLoRAAdapter]] = []

    def before_adapters(self, layers: list[LayerInfo]) -> None:
        """Each module's capacity: ``max_rank`` ranks (default: the most the schedule can
        give one module, grown at every growth step) plus ``incre_rank_num`` reserves."""
        p = self.params
        self.modules = len(layers)
        if not self.grows:
            self.capacity = p["r"]
            return
        most = p.get("max_rank")
        if most is None:
            events = increlora_events_needed(self.modules, p["r"], p["target_rank"], p["top_h"], self.incre)
            most = p["r"] + min(events * self.incre, self.modules * (p["target_rank"] - p["r"]))
        self.capacity = most + self.incre

    def create_adapter(self, layer: LayerInfo, w0: torch.Tensor) -> Adapter:
        if self.capacity is None:
            raise RuntimeError("increlora sizes its modules in before_adapters (methods.inject.inject calls it)")
        p = self.params
        return IncreLoRAAdapter(layer, p["r"], self.capacity, p["alpha"], p["dropout"])

    def _modules(self, adapters) -> list[tuple[str, IncreLoRAAdapter]]:
        return [(path, a) for path, a in leaf_items(adapters) if isinstance(a, IncreLoRAAdapter)]

    def schedule_problems(self, total_steps: int):
        return increlora_schedule(self.params, total_steps, self.modules)

    def on_train_begin(self, total_steps: int, adapters=None) -> None:
        super().on_train_begin(total_steps, adapters)  # schedule errors, with the module count
        self.total_steps = total_steps
        if adapters is None:
            return
        self.leaves = self._modules(adapters)
        self.total = sum(a.ranknum for _, a in self.leaves)
        self.reserved = any(a.reserves for _, a in self.leaves)
        self.done = not self.grows or self.total >= self.budget
        zeros = torch.zeros(len(self.leaves), dtype=torch.float32, device="cpu")  # host-side statistics
        self.exp_avg_ipt, self.exp_avg_unc = zeros, zeros.clone()
        self._score_while_growing()

    @property
    def budget(self) -> int:
        return self.params["target_rank"] * len(self.leaves)

    def _score_while_growing(self) -> None:
        for _, adapter in self.leaves:
            adapter.scoring, adapter.score = not self.done, None

    def after_optimizer_step(self, step, adapters, optimizer=None):
        if self.total_steps is None:
            raise RuntimeError("increlora needs on_train_begin(total_steps, adapters) before the first step")
        p, leaves = self.params, self.leaves
        if self.done:
            return {"rank_budget": self.budget, "active_ranks": self.total}
        if not self.reserved:  # update_and_increase at global_step 0: every module's first reserves
            for _, adapter in leaves:
                adapter.add_reserves(self.incre, step, p["advance_learn"])
            self.reserved = True
        scores = self._step_scores()
        if scores is not None:  # update_ipt
            b1, b2 = p["beta1"], p["beta2"]
            self.exp_avg_ipt = b1 * self.exp_avg_ipt + (1 - b1) * scores
            self.exp_avg_unc = b2 * self.exp_avg_unc + (1 - b2) * (scores - self.exp_avg_ipt).abs()
        logs = {"rank_budget": self.budget}
        g = step - 1
        if g > p["init_warmup"] and g % p["incre_interval"] == 0:
            increments = self.increments()
            device = leaves[0][1].slot_state.device  # NCCL all-reduces GPU tensors only
            check_same_across_processes(torch.tensor(increments, device=device), "increlora growth", step)
            for (_, adapter), count in zip(leaves, increments):
                if count:
                    adapter.grow(count, step, p["advance_learn"])
            self.total += sum(increments)
            logs["grown_modules"] = sum(1 for c in increments if c)
            if self.total >= self.budget:
                self.done = True
                for _, adapter in leaves:
                    adapter.retire_reserves()
                self._score_while_growing()
        logs["active_ranks"] = self.total
        return logs

    def _step_scores(self) -> torch.Tensor | None:
        """This step's score per module (averaged over processes), reset for the next; None
        on a step without gradients (skipped by the fp16 loss scaler: no evidence)."""
        leaves = self.leaves
        raw = [a.score for _, a in leaves]
        for _, adapter in leaves:
            adapter.score = None
        if all(s is None for s in raw) or any(a.lora_A.grad is None for _, a in leaves):
            return None
        device = leaves[0][1].lora_A.device
        scores = torch.stack([s.float() if s is not None else torch.zeros((), device=device) for s in raw])
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(scores, op=dist.ReduceOp.SUM)
            scores = scores / dist.get_world_size()
        scores = scores.cpu()
        return scores if bool(torch.isfinite(scores).all()) else None

    def increments(self) -> list[int]:
        """Ranks each module gains now: ``k = min(top_h, ⌈remaining / incre_rank_num⌉)``
        modules of highest ``Ī·Ū`` (ties: module order; a module without room is passed
        over) gain ``incre_rank_num``, the last what is left of the budget."""
        left = self.budget - self.total
        k = min(self.params["top_h"], -(-left // self.incre))
        score = (self.exp_avg_ipt * self.exp_avg_unc).tolist()
        out = [0] * len(self.leaves)
        for i in sorted(range(len(score)), key=lambda i: (-score[i], i)):
            if k == 0 or left <= 0:
                break
            adapter, add = self.leaves[i][1], min(self.incre, left)
            if adapter.used + add > adapter.capacity or adapter.reserves < add:
                continue
            out[i], left, k = add, left - add, k - 1
        return out

    def checkpoint_eligible(self, step: int) -> bool:
        """Only models with the whole budget allocated may be selected as the best."""
        return self.done

    def rank_pattern(self, adapters):
        return {path: a.ranknum for path, a in self._modules(adapters)}

    def active_parameter_count(self, adapters) -> int:
        """``Σ ranknum · (in + out + 1)``: ``r`` per module in ``lrr inspect``, the final
        budget after training (the reserve blocks trained ahead are not counted)."""
        return sum(a.active_parameters() for _, a in self._modules(adapters))

    def extra_loss(self, adapters):
        """``reg_orth_coef ·`` the mean over modules of ``‖AAᵀ − I‖_F`` and ``‖BᵀB − I‖_F``
        (``compute_svd_orth_regu``: the sum over modules divided by 2 per module)."""
        weight = self.params["orth_reg"]
        modules = [a for _, a in self._modules(adapters)]
        if not weight or not modules:
            return None
        return weight * torch.stack([a.orthogonality() for a in modules]).sum() / (2 * len(modules))

    def state_dict(self) -> dict:
        if self.exp_avg_ipt is None:
            return {}
        return {"exp_avg_ipt": self.exp_avg_ipt, "exp_avg_unc": self.exp_avg_unc, "total": self.total,
                "reserved": self.reserved, "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.exp_avg_ipt = state["exp_avg_ipt"].float().cpu()
        self.exp_avg_unc = state["exp_avg_unc"].float().cpu()
        self.total, self.reserved, self.done = int(state["total"]), bool(state["reserved"]), bool(state["done"])
        self._score_while_growing()
