"""Rank-budget schedules for dynamic-rank methods (torch-free, hand-checkable).

``cubic_budget`` is AdaLoRA's schedule, which LoRA2 adopts (LoRA2 §3.3, Algorithm 1): the
total number of active ranks stays at ``initial`` for the first ``t_init`` steps, then
decays cubically to ``target`` at step ``T - t_final``, and stays there (with the mask
fixed) for the last ``t_final`` steps. Masking happens every ``interval`` steps during the
decay, once more at the first step of the final phase (at the target budget), and then
the mask stays fixed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BudgetStep:
    budget: int  # active ranks allowed, summed over all modules
    mask_now: bool  # recompute the mask at this step
    final: bool  # in the final, fixed-mask phase


def cubic_budget(step: int, total_steps: int, initial: int, target: int, t_init: int, t_final: int, interval: int) -> BudgetStep:
    """The budget after optimizer step ``step`` (1-based) of ``total_steps``."""
    decay_end = total_steps - t_final
    if step <= t_init:
        return BudgetStep(initial, False, False)
    if step > decay_end:
        return BudgetStep(target, step == decay_end + 1, True)
    span = max(decay_end - t_init, 1)
    remaining = 1 - (step - t_init) / span
    budget = int((initial - target) * remaining**3 + target)
    return BudgetStep(budget, step % interval == 0 or step == decay_end, False)
