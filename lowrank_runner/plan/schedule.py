"""How many optimizer steps a run takes, the batch each process trains on, and the
learning rate its steps add up to (:func:`integrated_learning_rate`; torch-free; shared
by ``lrr inspect``, ``lrr validate``, the training loop and the report).

``training.batch_size`` is the paper's batch, the examples of one optimizer step over all
processes together (``training.batch_size_per: effective``, the default): on N processes
with ``gradient_accumulation_steps`` G each process trains on ``batch_size / (N x G)``
examples per forward pass, or, with ``training.per_device_batch_size`` (a memory cap), G
is the smallest accumulation that keeps the per-device batch within the cap.
``batch_size_per: device`` keeps the older meaning: ``batch_size`` examples per process
and forward pass, so the effective batch grows with the processes. :func:`batch_plan` is
the one place this is derived.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lowrank_runner.errors import RecipeKeyError


class BatchSizeError(RecipeKeyError):
    """A batch that cannot be divided over the processes (``key``: the recipe key to change)."""


@dataclass(frozen=True)
class BatchPlan:
    effective: int  # examples per optimizer step, all processes together
    per_device: int  # examples per process per forward pass (the training DataLoader's batch)
    accumulation: int  # forward passes per optimizer step (Accelerate's gradient_accumulation_steps)
    processes: int
    batch_size_per: str  # how the recipe's batch_size was meant: "effective" or "device"

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line: ``32 per optimizer step = 8 per device x 2 accumulation x 2 processes``."""
        return (f"{self.effective} per optimizer step = {self.per_device} per device x {self.accumulation} accumulation "
                f"x {self.processes} process{'es' if self.processes != 1 else ''}"
                + (" (batch_size_per: device)" if self.batch_size_per == "device" else ""))


@dataclass(frozen=True)
class StepPlan:
    batches_per_epoch: int  # per process
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    warmup_steps: int
    epochs: float
    batch: BatchPlan


def batch_plan(training: dict, processes: int = 1) -> BatchPlan:
    """The per-device batch and accumulation of ``training`` on ``processes`` processes;
    raises :class:`BatchSizeError` (naming the nearest valid choices) when the recipe's
    batch cannot be divided."""
    size, accumulation = training["batch_size"], training.get("gradient_accumulation_steps", 1)
    meaning, cap = training.get("batch_size_per", "effective"), training.get("per_device_batch_size")
    if meaning == "device":
        if cap is not None:
            raise BatchSizeError("training.per_device_batch_size: only with batch_size_per: effective (with "
                                 "batch_size_per: device, batch_size is the per-device batch already); remove it",
                                 "training.per_device_batch_size")
        return BatchPlan(size * accumulation * processes, size, accumulation, processes, meaning)
    if cap is not None:
        if accumulation != 1:
            raise BatchSizeError(
                f"training.per_device_batch_size: derives gradient_accumulation_steps from batch_size, so it cannot "
                f"be set together with gradient_accumulation_steps ({accumulation}); remove one of them",
                "training.per_device_batch_size")
        accumulation = _capped_accumulation(size, processes, cap)
    if size % (processes * accumulation):
        raise BatchSizeError(_indivisible(size, processes, accumulation, cap is not None), "training.batch_size")
    return BatchPlan(size, size // (processes * accumulation), accumulation, processes, meaning)


def _capped_accumulation(size: int, processes: int, cap: int) -> int:
    """The smallest accumulation that divides ``size`` over the processes with at most
    ``cap`` examples per device (1 when ``size`` does not divide by ``processes``: the
    caller reports it)."""
    for accumulation in range(math.ceil(size / (processes * cap)), size // processes + 1):
        if size % (processes * accumulation) == 0:
            return accumulation
    return 1


def _indivisible(size: int, processes: int, accumulation: int, capped: bool) -> str:
    """The error for a batch that does not divide, with the nearest batch sizes,
    accumulation values and process counts that would."""
    unit = processes * accumulation
    sizes = sorted({s for s in (size // unit * unit, -(-size // unit) * unit) if s > 0})
    fixes = [f"a batch_size divisible by {unit} ({_or(sizes)})"]
    if not capped:
        accs = _nearest([g for g in range(1, size + 1) if size % (processes * g) == 0], accumulation)
        if accs:
            fixes.append(f"gradient_accumulation_steps {_or(accs)}")
    procs = _nearest([n for n in range(1, size + 1) if size % (n * (1 if capped else accumulation)) == 0], processes)
    if procs:
        fixes.append(f"{_or(procs)} processes")
    split = f"{processes} processes" + ("" if capped else f" x {accumulation} accumulation step(s)")
    return (f"training.batch_size: the effective batch of {size} examples cannot be split evenly over {split}; "
            f"choose {', or '.join(fixes)} (or training.batch_size_per: device for a per-device batch)")


def _or(values: list[int]) -> str:
    """``[2, 3, 5]`` as ``2, 3 or 5``."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _nearest(values: list[int], target: int, count: int = 3) -> list[int]:
    """Up to ``count`` of ``values`` closest to ``target`` (ties: the smaller), ascending."""
    return sorted(sorted(values, key=lambda v: (abs(v - target), v))[:count])


def plan_steps(n_examples: int, training: dict, processes: int = 1) -> StepPlan:
    """Optimizer steps from data size, epochs and the batch plan (:func:`batch_plan`).

    Each process sees ``ceil(n / (per_device * processes))`` batches per epoch (the last
    one may be short); gradients are synchronised every ``accumulation`` batches and at
    the end of each epoch. With ``batch_size_per: effective`` this is
    ``ceil(n / batch_size)`` optimizer steps per epoch on any number of processes.
    """
    if n_examples < 1:
        raise ValueError("the training split is empty")
    batch = batch_plan(training, processes)
    batches = math.ceil(n_examples / (batch.per_device * processes))
    steps_per_epoch = math.ceil(batches / batch.accumulation)
    if training.get("max_steps"):
        total = int(training["max_steps"])
        epochs = total / steps_per_epoch
    else:
        epochs = float(training["epochs"])
        total = max(1, math.ceil(epochs * steps_per_epoch))
    warmup = training.get("warmup_steps") or math.ceil(training.get("warmup_ratio", 0.0) * total)
    return StepPlan(batches, steps_per_epoch, total, int(warmup), epochs, batch)


def lr_factor(scheduler: str, warmup: int, total: int, step: int) -> float:
    """The learning-rate factor at 0-based ``step`` of ``training.lr_scheduler``: the loop's
    schedule (``torch.optim.lr_scheduler.LambdaLR`` with this factor, train/optim.py), the
    values of ``transformers.get_scheduler`` exactly (tests/test_schedule.py), computed here
    because importing ``transformers.optimization`` imports PEFT and bitsandbytes (about
    1.5 s of every run's start). ``linear``: warmup from 0, then a linear decay to 0;
    ``cosine``: a half cosine to 0; ``constant``: 1 (transformers' takes no warmup)."""
    if scheduler == "constant":
        return 1.0
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if scheduler == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    if scheduler == "cosine":
        progress = float(step - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"training.lr_scheduler: unknown schedule {scheduler!r}")


def integrated_learning_rate(plan: StepPlan, training: dict) -> float:
    """The sum of the learning rate over the planned optimizer steps (what Adam's updates
    add up to, roughly: each moves a parameter by about the learning rate), in closed
    form. The schedule is ``transformers.get_scheduler``'s (the loop's): linear warmup
    from 0, then a linear decay (``linear``) or a half cosine (``cosine``) to 0;
    ``constant`` is transformers' constant schedule, which takes no warmup."""
    total, scheduler = plan.total_steps, training.get("lr_scheduler", "linear")
    if scheduler == "constant":
        return training["learning_rate"] * total
    warmup = min(plan.warmup_steps, total)
    ramp = warmup * (warmup - 1) / 2 / max(1, plan.warmup_steps)  # sum of k / warmup for k < warmup
    return training["learning_rate"] * (ramp + _decay_sum(scheduler, total - warmup, max(1, total - plan.warmup_steps)))


def _decay_sum(scheduler: str, n: int, span: int) -> float:
    """The sum of the decay's factors over its first ``n`` steps, ``span`` steps long."""
    if n <= 0:
        return 0.0
    if scheduler == "linear":  # sum of 1 - i / span, i < n
        return n - n * (n - 1) / 2 / span
    if scheduler == "cosine":  # sum of (1 + cos(pi i / span)) / 2, i < n
        step = math.pi / span
        cosines = math.sin(n * step / 2) * math.cos((n - 1) * step / 2) / math.sin(step / 2)
        return (n + cosines) / 2
    raise ValueError(f"training.lr_scheduler: unknown schedule {scheduler!r}")
