"""How many optimizer steps a run takes (torch-free; shared by inspect and run)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StepPlan:
    batches_per_epoch: int  # per process
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    warmup_steps: int
    epochs: float


def plan_steps(n_examples: int, training: dict, processes: int = 1) -> StepPlan:
    """Optimizer steps from data size, epochs, batch size, accumulation and processes.

    Each process sees ``ceil(n / (batch_size * processes))`` batches per epoch (the last
    one may be short); gradients are synchronised every ``gradient_accumulation_steps``
    batches and at the end of each epoch.
    """
    if n_examples < 1:
        raise ValueError("the training split is empty")
    batches = math.ceil(n_examples / (training["batch_size"] * processes))
    steps_per_epoch = math.ceil(batches / training["gradient_accumulation_steps"])
    if training.get("max_steps"):
        total = int(training["max_steps"])
        epochs = total / steps_per_epoch
    else:
        epochs = float(training["epochs"])
        total = max(1, math.ceil(epochs * steps_per_epoch))
    warmup = training.get("warmup_steps") or math.ceil(training.get("warmup_ratio", 0.0) * total)
    return StepPlan(batches, steps_per_epoch, total, int(warmup), epochs)
