"""A composed recipe document as runs: one document per task x sweep point x seed,
each value still at the line it was written (a task's ``tasks.NAME`` overrides merged
over the rest of the recipe, a sweep point's values over that, one seed each)."""

from __future__ import annotations

from typing import Any, NamedTuple

from lowrank_runner.recipe.document import Document, Origin, delete, merge
from lowrank_runner.recipe.sweep import Point, apply_point, points, without_sweep



def _subdocument(doc: Document, at: tuple) -> Document:
    data = doc.data
    for key in at:
        data = data[key]
    origins = {p[len(at):]: o for p, o in doc.origins.items() if p[: len(at)] == at}
    return Document(data, origins, doc.file)


class Expanded(NamedTuple):
    """One run of a recipe document: its task, seed, sweep point and document."""

    task: str | None
    seed: Any
    doc: Document
    point: Point | None = None


def expand_runs(doc: Document, skip: frozenset = frozenset()) -> list[Expanded]:
    """One document per task × sweep point × seed (in that order); the sweep's axes with
    a key in ``skip`` are left out (their own problems are reported instead)."""
    found = points(doc, skip)
    out = []
    for name, run in _per_task(without_sweep(doc), doc):
        for point in found or [None]:
            at_point = apply_point(run, point, doc) if point else run
            out += [Expanded(name, seed, single, point) for seed, single in _per_seed(at_point)]
    return out


def _per_task(base: Document, doc: Document) -> list[tuple[str | None, Document]]:
    """The document of each task: ``tasks.NAME`` merged over the rest of the recipe."""
    base = base.copy()
    tasks = base.data.get("tasks")
    if not isinstance(tasks, dict):
        task = base.data.get("task")
        return [(task.get("name") if isinstance(task, dict) else None, base)]
    delete(base, ("tasks",))
    per_task = []
    for name, overrides in tasks.items():
        run = base
        if isinstance(overrides, dict):
            run = merge(base, _subdocument(doc, ("tasks", name)))
        run = run.copy()
        task = run.data.get("task")
        if not isinstance(task, dict):
            run.data["task"] = task = {}
        task["name"] = name
        key_origin = doc.origins.get(("tasks", name))
        if key_origin:
            run.origins[("task", "name")] = Origin(key_origin.key, key_origin.key, ("tasks", name))
        per_task.append((name, run))
    return per_task


def _per_seed(run: Document) -> list[tuple[Any, Document]]:
    """One document per seed of ``training.seed`` (a number or a list), the seed located
    at its list item. The seeds' documents share everything but ``training`` (one deep
    copy for all of them): nothing changes an expanded run's document in place."""
    training = run.data.get("training") if isinstance(run.data.get("training"), dict) else {}
    seeds = training.get("seed", 0)
    seeds = seeds if isinstance(seeds, list) else [seeds]
    at = ("training", "seed")
    run = run.copy()
    items = {p: run.origins.pop(p) for p in [p for p in run.origins if p[:2] == at and len(p) > 2]}
    trains = isinstance(run.data.get("training"), dict) or "training" not in run.data
    out = []
    for i, seed in enumerate(seeds):
        data = dict(run.data)
        if trains:
            data["training"] = {**data.get("training", {}), "seed": seed}
        single = Document(data, dict(run.origins), run.file, run.sources)
        if at + (i,) in items:
            single.origins[at] = items[at + (i,)]
        out.append((seed, single))
    return out


def one_per_seed(runs: list[Expanded]) -> list[Expanded]:
    """The first run of each task × sweep point: its other seeds differ only in
    ``training.seed``, which no per-run check reads (the schema checks the seeds
    themselves), so checking them again would only repeat the same problems."""
    seen, out = set(), []
    for run in runs:
        key = (run.task, run.point.label if run.point else None)
        if key not in seen:
            seen.add(key)
            out.append(run)
    return out
