"""What a recipe says about its output: ``output.dir`` (anywhere, but not a file),
``output.trackers`` (each once, its package installed: the tracker catalogue is here,
torch-free, and train/tracking.py reads it) and ``output.table.columns`` (tasks the
recipe runs, metrics they report)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lowrank_runner.errors import Problem
from lowrank_runner.recipe.document import Document
from lowrank_runner.recipe.problems import problem, suggest
from lowrank_runner.resources import expand_user
from lowrank_runner.tasks.registry import TASKS

TRACKER_INSTALL = "pip install 'lowrank-runner[tracking]'"
# The Python package each tracker needs (what Accelerate's is_*_available looks for).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}


def missing_tracker_package(name: str) -> str | None:
    """The package a tracker needs when it is not installed, else None."""
    package = TRACKER_PACKAGES[name]
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken or half-removed installation
        found = False
    return None if found else package


def output_problems(doc: Document, output: dict) -> list[Problem]:
    """``output.dir`` may be anywhere (``lrr validate`` shows where); it must not be a file.
    The trackers: :func:`_tracker_problems`."""
    out = _tracker_problems(doc, output)
    return out + _output_dir_problems(doc, output)


def _tracker_problems(doc: Document, output: dict) -> list[Problem]:
    """``output.trackers``: each tracker once, and its package installed (the names and
    options are the schema's)."""
    trackers = output.get("trackers")
    out, seen = [], set()
    for i, item in enumerate(trackers if isinstance(trackers, list) else []):
        name = item.get("name") if isinstance(item, dict) else item
        if not isinstance(name, str) or name not in TRACKER_PACKAGES:
            continue  # the schema says what is wrong
        if name in seen:
            out.append(problem(doc, ("output", "trackers", i), f"{name} is listed twice; give each tracker once"))
        seen.add(name)
        package = missing_tracker_package(name)
        if package is not None:
            out.append(problem(doc, ("output", "trackers", i), f"{name} is not installed; {TRACKER_INSTALL} "
                                                               f"(or pip install {package})"))
    return out


def _output_dir_problems(doc: Document, output: dict) -> list[Problem]:
    where = output.get("dir")
    if not isinstance(where, str) or not where:
        return []
    if where.startswith("~"):
        full = expand_user(where)
        example = f" (e.g. {full})" if str(full) != where else ""
        return [problem(doc, ("output", "dir"), f"'~' is not expanded in output.dir; write the full path{example}")]
    if Path(where).exists() and not Path(where).is_dir():
        return [problem(doc, ("output", "dir"), f"{where} is a file; output.dir is the directory runs are written in")]
    return []


def table_problems(doc: Document, tasks: list[str]) -> list[Problem]:
    """Problems (at their lines) of ``output.table.columns`` entries that name a task the
    recipe does not run, or a metric its task does not report. ``doc``: the composed
    recipe document; ``tasks``: the task names its runs have (``lrr validate``)."""
    output = doc.data.get("output") if isinstance(doc.data, dict) else None
    table = output.get("table") if isinstance(output, dict) else None
    columns = table.get("columns") if isinstance(table, dict) else None
    out, tasks, seen = [], list(dict.fromkeys(t for t in tasks if t)), {}
    for i, raw in enumerate(columns if isinstance(columns, list) else []):
        at = ("output", "table", "columns", i)
        task = raw if isinstance(raw, str) else raw.get("task") if isinstance(raw, dict) else None
        if not isinstance(task, str):
            continue  # the schema says what is wrong
        if task not in tasks:
            where = at if isinstance(raw, str) else at + ("task",)
            out.append(problem(doc, where, f"the recipe runs no task {task!r}{suggest(task, tasks)}; "
                                           f"its tasks: {', '.join(tasks)}"))
            continue
        metrics = raw.get("metrics") if isinstance(raw, dict) else None
        shown = (task, tuple(metrics) if isinstance(metrics, list) else None)
        if shown in seen:
            out.append(problem(doc, at, f"this column is listed twice (also item {seen[shown]}): the average would "
                                        "count it twice; give each column once"))
        seen.setdefault(shown, i)
        if isinstance(metrics, list) and len(set(map(str, metrics))) < len(metrics):
            out.append(problem(doc, at + ("metrics",), "a metric is listed twice: give each once"))
        known = [*TASKS[task].metrics, "loss"] if task in TASKS else None
        for j, metric in enumerate(metrics if isinstance(metrics, list) and known else []):
            if isinstance(metric, str) and metric not in known:
                out.append(problem(doc, at + ("metrics", j), f"task {task!r} reports no metric {metric!r}"
                                   f"{suggest(metric, known)}; it reports {', '.join(known)}"))
    return out
