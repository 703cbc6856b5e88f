"""A run's plan checked: the batch divides over the processes (:func:`run_batch`), the
warmup is shorter than training (:func:`check_schedule`), the method's step schedule
and the learning rate fit the planned steps (:func:`check_method_schedule`). What
``lrr inspect`` and the training loop both call, so both say the same. Torch-free."""

from __future__ import annotations

from lowrank_runner.errors import LrrError
from lowrank_runner.plan.guidance import lr_guidance
from lowrank_runner.plan.schedule import BatchPlan, BatchSizeError, StepPlan, batch_plan, plan_steps


class PlanError(LrrError):
    pass


def check_schedule(plan, where: str) -> None:
    if plan.warmup_steps >= plan.total_steps:
        raise PlanError(
            f"{where}: warmup ({plan.warmup_steps} steps) is not shorter than training ({plan.total_steps} steps); "
            "lower training.warmup_steps / warmup_ratio or train longer"
        )


def run_batch(run, processes: int, source: str) -> BatchPlan:
    """The run's per-device batch and accumulation on ``processes`` processes
    (plan/schedule.py: :func:`batch_plan`); a batch that cannot be divided names the
    recipe line that sets it (or the recipe file)."""
    try:
        return batch_plan(run.config["training"], processes)
    except BatchSizeError as exc:
        raise BatchSizeError(f"{run.location_of(exc.key) or source}: {exc}", exc.key) from None


def plan_run(run, n_train: int, processes: int, source: str) -> StepPlan:
    """The run's step plan on ``processes`` processes, its batch checked first (:func:`run_batch`)."""
    run_batch(run, processes, source)
    return plan_steps(n_train, run.config["training"], processes)


def check_method_schedule(method, plan: StepPlan, where: str, method_config: dict, training: dict) -> list[str]:
    """The method's schedule against the planned steps (``method.schedule_problems``):
    raises :class:`PlanError` for one that cannot work, returns the warnings
    (``WHERE: method.KEY: message``) for one that can act only partly, then those for a
    learning rate far below what the method needs at these steps
    (``WHERE: training.learning_rate: message``, plan/guidance.py)."""
    problems = method.schedule_problems(plan.total_steps)
    errors = [f"{where}: {p}" for p in problems if p.severity == "error"]
    if errors:
        raise PlanError("\n".join(errors))
    notes = [f"{where}: {p}" for p in problems if p.severity != "error"]
    try:
        guidance = lr_guidance(method_config, training, plan)
    except ValueError as exc:  # a plugin's malformed x-lr-guidance: say so, train anyway
        guidance = [f"{exc}; no learning-rate guidance"]
    return notes + [f"{where}: {line}" for line in guidance]
