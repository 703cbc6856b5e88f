"""The optimizer: AdamW with weight decay by role (biases, normalisation weights and the
adapter parameters an adapter exempts, SoRA's gates, are not decayed; adapter factors,
LoRA2's λ, TriAdaptLoRA's packed triangles and head weights are)."""

from __future__ import annotations

import functools

import torch

from lowrank_runner.methods.base import Adapter
from lowrank_runner.plan.schedule import lr_factor

# Normalisation modules, by type: torch's (batch and instance norms share _NormBase) ...
_NORM_TYPES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase,
               *([torch.nn.RMSNorm] if hasattr(torch.nn, "RMSNorm") else []))
# ... and the classes models define themselves (LlamaRMSNorm, T5LayerNorm, DebertaLayerNorm).
_NORM_CLASS_SUFFIXES = ("LayerNorm", "RMSNorm", "GroupNorm")


def is_norm_module(module: torch.nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(_NORM_CLASS_SUFFIXES)


def weight_decay_groups(model: torch.nn.Module) -> tuple[list, list]:
    """Trainable parameters split by role: (decayed, not decayed). Biases (a module's
    ``bias``), every parameter of a normalisation module and the parameters an adapter
    names in ``no_weight_decay`` (SoRA's gates) are not decayed; everything else is,
    whatever its shape (adapter factors, LoRA2's λ, TriAdaptLoRA's packed triangles, head
    weights)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        norm = is_norm_module(module)
        exempt = module.no_weight_decay if isinstance(module, Adapter) else ()
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if norm or name == "bias" or name in exempt else decay).append(param)
    return decay, no_decay


def build_optimizer(model, training: dict) -> torch.optim.Optimizer:
    """AdamW with ``training.weight_decay`` on every trainable parameter but biases and
    normalisation weights (:func:`weight_decay_groups`); a :class:`StagedAdamW` when an
    adapter gives its entries start steps (:func:`late_entries`)."""
    decay, no_decay = weight_decay_groups(model)
    groups = [{"params": decay, "weight_decay": training["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    late = late_entries(model)  # parameters whose entries start training later (IncreLoRA's new ranks)
    options = dict(lr=training["learning_rate"], betas=tuple(training["adam_betas"]), eps=training["adam_epsilon"])
    groups = [g for g in groups if g["params"]]
    return StagedAdamW(groups, late, **options) if late else torch.optim.AdamW(groups, **options)



def late_entries(model: torch.nn.Module) -> dict:
    """``{parameter: (adapter, name)}``: the trainable adapter parameters whose entries start
    training at different steps (:meth:`~lowrank_runner.methods.base.Adapter.entry_starts`)."""
    out = {}
    for module in model.modules():
        starts = module.entry_starts() if isinstance(module, Adapter) else None
        if starts:
            own = dict(module.named_parameters(recurse=False))
            out.update({own[name]: (module, name) for name in starts if own[name].requires_grad})
    return out


def schedule(name: str, warmup_steps: int, total_steps: int):
    """The factor of the learning rate at each 0-based step, a ``functools.partial`` (as
    transformers' own: ``LambdaLR`` saves none of it in a checkpoint's state)."""
    return functools.partial(lr_factor, name, warmup_steps, total_steps)


class RestartSchedule:
    """The run's learning-rate schedule (:func:`schedule`, as the loop builds
    it) restarted at a step: an entry that trains after step ``s`` gets, at the schedule's
    0-based position ``q``, the factor of the same schedule over ``total − s`` steps (the
    same warm-up) at ``q − s``. IncreLoRA's reference gives each new parameter group this
    schedule (``Multi_LambdaLR``); ``s = 0`` is the run's own."""

    def __init__(self, name: str, warmup_steps: int, total_steps: int, scheduler):
        self.name, self.warmup, self.total, self.scheduler = name, warmup_steps, total_steps, scheduler
        self.lambdas: dict[int, object] = {}

    def position(self) -> int:
        """The 0-based index of the step being taken: the scheduler's steps so far."""
        return self.scheduler.last_epoch

    def factor(self, start: int, position: int) -> float:
        if start not in self.lambdas:
            self.lambdas[start] = schedule(self.name, self.warmup, max(1, self.total - start))
        return float(self.lambdas[start](position - start))


class StagedAdamW(torch.optim.AdamW):
    """torch's AdamW, except for the parameters an adapter gives entry start steps
    (:func:`late_entries`). Their entry that trains after step ``s`` is updated only from
    the step after ``s``, with Adam moments that are zero there and bias corrections counted
    from there (as a new parameter's would be) and the learning rate of
    :class:`RestartSchedule` (the run's schedule restarted at ``s``, warm-up included);
    a frozen entry (``-1``) never changes, weight decay included. Entries starting at 0 are
    updated as torch's AdamW updates them (per-entry arithmetic in the parameter's dtype)."""

    def __init__(self, params, late: dict, **kwargs):
        super().__init__(params, **kwargs)
        self.late = late
        self.restart: RestartSchedule | None = None  # set by build_scheduler
        self.steps = 0  # the position without a schedule (an optimizer used on its own)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        held = [(p, p.grad) for p in self.late if p.grad is not None]
        for p, _ in held:
            p.grad = None  # torch's step leaves them alone
        try:
            super().step()
        finally:
            for p, grad in held:
                p.grad = grad
        if held:
            self.late_step([p for p, _ in held])
        self.steps += 1
        return loss

    def late_step(self, params: list) -> None:
        """Adam on the late parameters, entry by entry: the per-entry learning rate, moment
        mask and bias corrections are computed once over all their entries (flat), then
        applied parameter by parameter."""
        position = self.restart.position() if self.restart is not None else self.steps
        chosen = {id(p) for p in params}
        for group in self.param_groups:
            mine = [p for p in group["params"] if id(p) in chosen]
            if mine:
                self.late_group_step(group, mine, position)

    def late_group_step(self, group: dict, params: list, position: int) -> None:
        beta1, beta2 = group["betas"]
        starts = [self.late[p][0].entry_starts()[self.late[p][1]] for p in params]
        flat = torch.cat([s.reshape(-1) for s in starts])
        values, inverse = torch.unique(flat, return_inverse=True)
        factors = [0.0 if s < 0 or s > position else (self.restart.factor(s, position) if self.restart else 1.0)
                   for s in values.tolist()]  # one host sync per step
        base = group.get("initial_lr", group["lr"]) if self.restart is not None else group["lr"]
        lr = base * torch.tensor(factors, dtype=torch.float32, device=flat.device)[inverse]
        age = (position - flat + 1).clamp(min=1).float()  # each entry's Adam step count
        per_entry = {"keep": ((flat >= 0) & (flat <= position)).float(),  # not started: moments stay zero
                     "decay": 1 - lr * group["weight_decay"], "step_size": lr / (1 - beta1 ** age),
                     "bc2_sqrt": (1 - beta2 ** age).sqrt()}
        sizes = [s.numel() for s in starts]
        split = {k: [v.reshape(s.shape).to(p.dtype) for v, s, p in zip(t.split(sizes), starts, params)]
                 for k, t in per_entry.items()}
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device="cpu")  # as torch's (host-side)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        grads = [p.grad for p in params]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        for i, p in enumerate(params):
            keep = split["keep"][i]
            exp_avgs[i].mul_(keep)
            exp_avg_sqs[i].mul_(keep)
            p.mul_(split["decay"][i])
            p.sub_(exp_avgs[i] * split["step_size"][i] / (exp_avg_sqs[i].sqrt() / split["bc2_sqrt"][i] + group["eps"]))


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int):
    """``transformers.get_scheduler``'s schedule (:func:`~lowrank_runner.plan.schedule.lr_factor`
    in torch's ``LambdaLR``, as transformers builds it); a :class:`StagedAdamW` learns it, for
    its entries' restarted schedules."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(name, warmup_steps, total_steps))
    if isinstance(optimizer, StagedAdamW):
        optimizer.restart = RestartSchedule(name, warmup_steps, total_steps, scheduler)
    return scheduler
