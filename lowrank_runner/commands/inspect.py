"""``lrr inspect``: what a recipe will do, without loading any weights.

The model is built on PyTorch's meta device from the backbone's ``config.json`` alone,
the method's adapters are attached exactly as for training, and parameters are counted
on that skeleton, so the numbers are the ones training will have. A hub backbone that
cannot be read now (offline, not cached) still gets its plan (runs, sweep points, steps
from the training set's known size, the method's schedule), without the counts, and
``unavailable`` says why, once.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowrank_runner.errors import BackboneUnavailable
from lowrank_runner.methods.registry import MethodSpec, get_method_spec
from lowrank_runner.modeling import build_adapted_model, parameter_counts
from lowrank_runner.plan.checks import PlanError, check_method_schedule, check_schedule, plan_run
from lowrank_runner.plan.schedule import integrated_learning_rate
from lowrank_runner.quiet import quiet_libraries
from lowrank_runner.recipe.hashing import canonical_hash
from lowrank_runner.recipe.load import Recipe, at_recipe_lines
from lowrank_runner.tasks.base import build_task
from lowrank_runner.tasks.holdout import holdout_sizes
from lowrank_runner.train.fsdp import describe_settings as describe_fsdp
from lowrank_runner.train.init_from import source_run


def inspect_recipe(recipe: Recipe, processes: int = 1) -> dict:
    """Every run of the recipe as it will train (a sweep's points included); runs that
    differ only in their seed are built once."""
    quiet_libraries()
    built: dict[str, tuple] = {}
    unavailable: dict[str, str] = {}  # backbone mapping's hash -> why it cannot be read (said once per backbone)
    runs = []
    for run in recipe.runs:
        where = f"{recipe.source} [{run.task}{', ' + run.label if run.label else ''}, seed {run.seed}]"
        key = canonical_hash({**run.config, "training": {**run.config["training"], "seed": None}})
        if key not in built:
            built[key] = _inspect_model(run, processes, recipe.source, unavailable)
        entry, plan, method = built[key]
        check_schedule(plan, where)
        runs.append({"task": run.task, "seed": run.seed, "point": run.point, "label": run.label,
                     "config_hash": run.config_hash, **entry, "training": {**entry["training"], "seed": run.seed},
                     "init_from": _init_from(recipe, run),
                     "warnings": check_method_schedule(method, plan, where, run.config["method"], run.config["training"])})
    out = {"name": recipe.name, "source": recipe.source, "recipe_hash": recipe.hash, "recipe": recipe.resolved, "runs": runs,
           "warnings": list(recipe.warnings)}  # what lrr validate warns about (the CLI says them on stderr)
    if unavailable:  # a hub backbone out of reach: the plan without the counts, said once
        why = "; ".join(sorted(set(unavailable.values())))
        out["unavailable"] = f"parameter counts and modules could not be computed: {why}"
    if recipe.resolved["output"].get("trackers"):  # output.trackers and where each writes (train/tracking.py)
        from lowrank_runner.train.tracking import describe

        out["trackers"] = describe(recipe.resolved["output"], recipe.name)
    if recipe.resolved.get("search"):  # its space, trials, sampler and objective per task
        from lowrank_runner.search.choices import choice_problems
        from lowrank_runner.search.record import search_summary

        problems = choice_problems(recipe, _build_model)  # each choice of targets / method.* on the model
        if problems:
            raise PlanError("\n".join(problems))
        out["search"] = search_summary(recipe)
    return out


def _build_model(run) -> None:
    """Build one run's adapted model on the meta device (raises what it cannot take)."""
    task = build_task(run.config["task"])
    with at_recipe_lines(run):
        build_adapted_model(run.config, task.model_class, task.model_config_kwargs(), weights=False)


def _inspect_model(run, processes: int, source: str, unavailable: dict) -> tuple[dict, object, object]:
    """What one run's configuration builds (on the meta device) and plans: its inspect
    entry (all but the run's identity), the step plan and the method. ``unavailable``:
    the backbones found out of reach so far (not asked for again)."""
    cfg = run.config
    task = build_task(cfg["task"])
    backbone = canonical_hash(cfg["backbone"])
    try:
        if backbone in unavailable:
            raise BackboneUnavailable(unavailable[backbone])
        with at_recipe_lines(run):
            adapted = build_adapted_model(cfg, task.model_class, task.model_config_kwargs(), weights=False)
    except BackboneUnavailable as exc:  # offline, not cached: the plan alone
        unavailable[backbone] = str(exc)
        return _plan_only(run, task, processes, source, str(exc))
    model = adapted.model
    n_train = _train_size(task, cfg)
    plan = plan_run(run, n_train, processes, source)
    by_symbol: dict[str, list[str]] = {}
    for t in adapted.targets:
        for symbol in t.symbols:
            label = t.path + (f"[{','.join(t.groups)}]" if t.groups and len(t.groups) < 3 else "")
            by_symbol.setdefault(symbol, []).append(label)
    entry = {
        "backbone": adapted.backbone.describe(),
        "model_type": adapted.config.model_type,
        "method": cfg["method"],
        "task_config": cfg["task"],
        "training": {**cfg["training"], "total_steps": plan.total_steps, "warmup_steps": plan.warmup_steps,
                     "steps_per_epoch": plan.steps_per_epoch, "processes": processes},
        "batch": plan.batch.as_dict(),  # effective, per_device, accumulation, processes, batch_size_per
        # training.fsdp in words (train/fsdp.py)
        "fsdp": describe_fsdp(cfg["training"]["fsdp"], getattr(model, "_no_split_modules", None)),
        "modules": [t.path for t in adapted.targets],
        "targets": by_symbol,
        "head": adapted.head_names,
        **parameter_counts(model, adapted),
        "total_params": sum(p.numel() for p in model.parameters()),
        "train_examples": n_train,
        "steps": plan.total_steps,
        "warmup_steps": plan.warmup_steps,
        "integrated_lr": integrated_learning_rate(plan, cfg["training"]),  # the sum of the lr over the steps
    }
    return entry, plan, adapted.method


def _train_size(task, cfg: dict) -> int:
    """The examples a run trains on (less what ``task.holdout_fraction`` holds out)."""
    n_train = task.count_train_examples()
    if cfg["task"].get("holdout_fraction"):  # trains on the rest of the training set
        n_train = holdout_sizes(n_train, cfg["task"]["holdout_fraction"])[0]
    return n_train


@dataclass
class SchemaSchedule:
    """A method's ``x-schedule`` without its model: what :func:`check_method_schedule` asks of it."""

    spec: MethodSpec
    params: dict

    def schedule_problems(self, total_steps: int) -> list:
        return self.spec.schedule_problems(self.params, total_steps)


def _plan_only(run, task, processes: int, source: str, why: str) -> tuple[dict, object, SchemaSchedule]:
    """A run's inspect entry when its backbone cannot be read (``why``): the step plan
    from the training set's size (a hub dataset's known size, or local files), no counts."""
    cfg = run.config
    n_train = _train_size(task, cfg)
    plan = plan_run(run, n_train, processes, source)
    entry = {
        "backbone": cfg["backbone"]["name"], "model_type": None, "method": cfg["method"], "task_config": cfg["task"],
        "training": {**cfg["training"], "total_steps": plan.total_steps, "warmup_steps": plan.warmup_steps,
                     "steps_per_epoch": plan.steps_per_epoch, "processes": processes},
        "batch": plan.batch.as_dict(), "fsdp": describe_fsdp(cfg["training"]["fsdp"], None),
        "modules": None, "targets": None, "head": None, "adapter_params": None, "trainable_params": None,
        "total_params": None, "train_examples": n_train,
        "steps": plan.total_steps, "warmup_steps": plan.warmup_steps,
        "integrated_lr": integrated_learning_rate(plan, cfg["training"]), "unavailable": why,
    }
    return entry, plan, SchemaSchedule(get_method_spec(cfg["method"]["name"]), cfg["method"])


def _init_from(recipe: Recipe, run) -> dict | None:
    """Where the run's adapter starts from (training.init_from), None: the method's init."""
    ref = run.config["training"].get("init_from")
    if ref is None:
        return None
    if isinstance(ref, str):
        return {"path": ref, "head": "fresh"}
    source = source_run(recipe, run)
    return {"task": ref["task"], "run": source.slug if source else None, "head": "fresh"}
