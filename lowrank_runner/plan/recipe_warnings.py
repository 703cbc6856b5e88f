"""What ``lrr validate`` can say about a run's planned steps where they are known without
reading any data (``training.max_steps``, or a task on its default hub dataset of known
size): the method's step schedule against them (its ``x-schedule``: errors at
``method.KEY`` for a schedule that cannot act, warnings for one that acts only partly) and
the learning-rate guidance (warnings at ``training.learning_rate`` for a run whose planned
schedule integrates to far less than its method needs, :mod:`.guidance`). A peak learning
rate above the method's measured ceiling is said whether the steps are known or not (it
needs none). ``lrr inspect``
and ``lrr run`` plan on the data itself and say the same (:mod:`.checks`). The plan is a
1-process one: more processes only shorten it, so a schedule error here is one on any."""

from __future__ import annotations

from lowrank_runner.errors import LrrError, Problem
from lowrank_runner.methods.registry import method_specs
from lowrank_runner.plan.guidance import lr_ceilings, lr_shortfalls
from lowrank_runner.plan.schedule import StepPlan, plan_steps
from lowrank_runner.recipe.document import Document
from lowrank_runner.recipe.problems import dedupe, problem
from lowrank_runner.recipe.schema import fill_defaults, property_schema, recipe_schema
from lowrank_runner.tasks.registry import TASKS


def planned_step_problems(runs: list) -> list[Problem]:
    """The problems of every run (``recipe.expand.Expanded``: one task, one seed, one
    sweep point each), once each."""
    return dedupe([p for run in runs for p in _run_problems(run.doc, run.point.label if run.point else "")])


def _run_problems(doc: Document, point: str) -> list[Problem]:
    """One run's schedule problems and learning-rate warnings; a run the recipe checks
    find broken gets none (they say what is wrong)."""
    method, training, task = (_with_defaults(doc, key) for key in ("method", "training", "task"))
    spec = method_specs().get(method.get("name"))
    if spec is None or task.get("name") not in TASKS:
        return []
    try:
        plan = _planned_steps(task, training)
        schedule = spec.schedule_problems(method, plan.total_steps) if plan else []
        messages = (lr_shortfalls(method, training, plan) if plan else []) + lr_ceilings(method, training)
    except (LrrError, ValueError, TypeError, KeyError, ArithmeticError):
        return []
    at = f"(task {task['name']}{', sweep point ' + point if point else ''})"
    return ([problem(doc, tuple(p.path.split(".")), f"{p.message} {at}", severity=p.severity) for p in schedule]
            + [problem(doc, ("training", "learning_rate"), f"task {task['name']}: {m}", severity="warning")
               for m in messages])


def _with_defaults(doc: Document, key: str) -> dict:
    """The recipe's top-level mapping ``key`` with the schema's defaults ({} if not a mapping)."""
    value = doc.data.get(key, {})
    return fill_defaults(value, property_schema(key), recipe_schema()) if isinstance(value, dict) else {}


def _planned_steps(task: dict, training: dict) -> StepPlan | None:
    """The step plan (one process) when the training set's size is known without reading
    data (the task's rules: its hub size, less ``task.max_train_samples`` and
    ``task.holdout_fraction``), or ``training.max_steps`` sets the steps; None otherwise,
    or for a warmup not shorter than training (an error of its own)."""
    n_train = TASKS[task["name"]].rules.planned_train_size(task["name"], task)
    if n_train is None and training.get("max_steps"):
        n_train = training["batch_size"]  # any size: max_steps sets the steps
    if n_train is None:
        return None
    plan = plan_steps(n_train, training)
    return plan if plan.warmup_steps < plan.total_steps else None
