"""The record of a search: ``search.json`` (machines) and ``search.md`` (people), per
task the objective, every trial (number, state, parameters, value, run directory) and
the best point. Rewritten after every trial, read back from the studies themselves."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from lowrank_runner.recipe.load import Recipe
from lowrank_runner.rundir.search import BEST_DIR, DB_FILE, RECORD_FILE as RECORD_JSON, RECORD_MD
from lowrank_runner.recipe.search import SearchSpec, describe_search, pruner_text
from lowrank_runner.rundir.files import write_json


@dataclass(frozen=True)
class TaskInfo:
    """What a task's trials optimise."""

    task: str
    metric: str  # the task's selection metric (task.metric or its primary metric)
    split: str  # where it is measured: the validation split or the held-out part of train
    direction: str  # maximize | minimize, as the training loop selects checkpoints
    seed: int  # the seed every trial trains with (the recipe's first)


def task_info(recipe: Recipe, task: str) -> TaskInfo:
    """What a task's trials optimise: its selection metric, on which split, which way
    (as the training loop selects checkpoints: ``Task.greater_is_better``)."""
    from lowrank_runner.tasks.base import build_task

    run = next(run for run in recipe.runs if run.task == task)
    found = build_task(run.config["task"])
    holdout = run.config["task"].get("holdout_fraction")
    split = f"the held-out {holdout:g} of train" if holdout else "the validation split"
    return TaskInfo(task, found.metric, split, "maximize" if found.greater_is_better else "minimize", run.seed)


def search_summary(recipe: Recipe) -> dict:
    """The search of a recipe for ``lrr inspect``: its settings and each task's objective."""
    tasks = dict.fromkeys(run.task for run in recipe.runs)
    return {**describe_search(recipe.resolved), "objectives": {t: asdict(task_info(recipe, t)) for t in tasks}}


def search_record(recipe: Recipe, spec: SearchSpec, info: dict, studies: dict, status: str, decode) -> dict:
    """The record as a dict: the search's settings and, per task, its trials and best point."""
    return {
        "recipe": recipe.name, "source": recipe.source, "hash": recipe.hash, "overrides": list(recipe.overrides),
        "status": status, "storage": DB_FILE, "n_trials": spec.n_trials, "sampler": spec.sampler, "seed": spec.seed,
        "pruner": spec.pruner, "pruner_settings": dict(spec.pruner_settings),
        "space": {d.key: {d.kind: list(d.values)} for d in spec.dimensions},
        "best_runs": BEST_DIR,
        "tasks": {task: _task_record(info[task], studies.get(task), decode) for task in info},
    }


def _task_record(info: TaskInfo, study, decode) -> dict:
    trials = []
    for t in study.get_trials(deepcopy=False) if study is not None else []:
        entry = {"number": t.number, "state": t.state.name, "params": decode(t.params) if t.params else {},
                 "value": t.value, "dir": t.user_attrs.get("dir")}
        if "error" in t.user_attrs:
            entry["error"] = t.user_attrs["error"]
        if "pruned_at" in t.user_attrs:
            entry["pruned_at"] = t.user_attrs["pruned_at"]  # the optimizer step the pruner stopped it at
        trials.append(entry)
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    best = None
    if complete:
        pick = max if info.direction == "maximize" else min
        best = pick(complete, key=lambda t: t["value"])
        best = {"number": best["number"], "value": best["value"], "params": best["params"], "dir": best["dir"]}
    return {**asdict(info), "study": info.task, "trials": trials, "best": best}


def write_record(root: Path, recipe: Recipe, spec: SearchSpec, info: dict, studies: dict, status: str, decode) -> None:
    record = search_record(recipe, spec, info, studies, status, decode)
    write_json(root / RECORD_JSON, record)
    (root / RECORD_MD).write_text(record_markdown(record), encoding="utf-8")


def record_markdown(record: dict) -> str:
    """``search.md``: per task a table of the trials, the best marked."""
    space = ", ".join(f"`{k}` {kind} {json.dumps(v)}" for k, d in record["space"].items() for kind, v in d.items())
    lines = [f"# Search: {record['recipe']}", "",
             f"{record['n_trials']} trial(s) per task, sampler {record['sampler']} (seed {record['seed']}), "
             f"pruner {pruner_text(record.get('pruner', 'none'), record.get('pruner_settings'))}, "
             f"status: {record['status']}. Space: {space}. Studies: `{record['storage']}` (Optuna, SQLite); "
             f"the best point of each task trained with every seed: `{record['best_runs']}/`.", ""]
    for task, entry in record["tasks"].items():
        lines += _task_markdown(task, entry, list(record["space"]))
    return "\n".join(lines) + "\n"


def _task_markdown(task: str, entry: dict, keys: list[str]) -> list[str]:
    lines = [f"## {task}", "",
             f"Objective: {entry['metric']} on {entry['split']} ({entry['direction']}); trials train seed {entry['seed']}.",
             ""]
    best = entry["best"]
    lines += ["| trial | " + " | ".join(f"`{k}`" for k in keys) + f" | {entry['metric']} | state |",
              "|---|" + "---|" * (len(keys) + 2)]
    for t in entry["trials"]:
        mark = " ★" if best and t["number"] == best["number"] else ""
        value = "" if t["value"] is None else f"{t['value']:.4f}"
        cells = [json.dumps(t["params"].get(k)) if k in t["params"] else "" for k in keys]
        state = t["state"].lower() + (f": {t['error']}" if t.get("error") else "") + (
            f" at step {t['pruned_at']}" if t.get("pruned_at") is not None else "")
        lines.append(f"| {t['number']}{mark} | " + " | ".join(cells) + f" | {value} | {state.replace('|', '/')} |")
    if best:
        shown = ", ".join(f"`{k}` = {json.dumps(v)}" for k, v in best["params"].items())
        lines += ["", f"Best: trial {best['number']}, {entry['metric']} {best['value']:.4f}: {shown}."]
    else:
        lines += ["", _no_best(entry["trials"])]
    return lines + [""]


def _no_best(trials: list[dict]) -> str:
    """Why a task has no best point: its trials failed (the first error), or none finished yet."""
    failed = [t for t in trials if t["state"] == "FAIL"]
    if not failed:
        return "No trial completed yet."
    first = failed[0]
    error = f": {first['error']}" if first.get("error") else ""
    running = len(trials) - len(failed)
    more = f", {running} not finished" if running else ""
    where = f" (`{first['dir']}/error.txt`)" if first.get("dir") else ""
    return (f"No trial completed: {len(failed)} trial(s) failed{more}, so there is no best point to train. "
            f"The first failure, trial {first['number']}{where}{error}")
