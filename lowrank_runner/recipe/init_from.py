"""``training.init_from`` checked across a recipe's runs: a run directory that exists
and holds an adapter, or ``{task: NAME}``, another task of the recipe with a run of the
same seed (and sweep point), no cycles, and the same method parameters (an adapter
must fit: only :data:`FREE_PARAMS` may differ)."""

from __future__ import annotations

from pathlib import Path

from lowrank_runner.errors import Problem
from lowrank_runner.methods.registry import method_specs
from lowrank_runner.recipe.document import Document
from lowrank_runner.recipe.problems import problem, suggest
from lowrank_runner.resources import expand_user
from lowrank_runner.rundir.layout import ADAPTER_CONFIG, ADAPTER_DIR

# Method parameters that may differ between an adapter and the run that starts from it
# (they change how it trains, not what its tensors mean).
FREE_PARAMS = ("dropout",)

def init_from_problems(doc: Document, runs: list) -> list[Problem]:
    """``training.init_from`` of every run (``runs``: :class:`~lowrank_runner.recipe.load.Expanded`
    from expansion): a ``{task: NAME}`` reference must name another task of this
    multi-task recipe that has a run with the same seed (and sweep point), without
    cycles; a path must be a run directory (or adapter directory) that exists."""
    multi = isinstance(doc.data.get("tasks"), dict)
    seeds: dict = {}
    for r in runs:
        seeds.setdefault(r.task, []).append(r.seed)
    out, edges = [], {}
    for task, seed, run, point in runs:
        label = point.label if point else ""
        training = run.data.get("training")
        ref = training.get("init_from") if isinstance(training, dict) else None
        at = ("training", "init_from")
        if isinstance(ref, str) and ref:
            path = expand_user(ref)
            if not path.exists():
                out.append(problem(run, at, f"no such run directory: {ref} (relative paths are resolved against the "
                                            f"working directory {Path.cwd()})"))
            elif not any((p / ADAPTER_CONFIG).is_file() for p in (path / ADAPTER_DIR, path)):
                out.append(problem(run, at, f"{ref} holds no {ADAPTER_DIR}/{ADAPTER_CONFIG}: give the directory of a "
                                            "finished 'lrr run' run (or its adapter/ folder)"))
            continue
        if not isinstance(ref, dict) or not isinstance(ref.get("task"), str):
            continue
        at, source = at + ("task",), ref["task"]
        if not multi:
            out.append(problem(run, at, "{task: ...} names another task of a multi-task recipe ('tasks:'), and this "
                                        "recipe has none; give a run directory instead"))
        elif source == task:
            out.append(problem(run, at, f"task '{task}' cannot start from its own adapter; name another task of "
                                        f"the recipe ({', '.join(t for t in seeds if t != task)}) or a run directory"))
        elif source not in seeds:
            out.append(problem(run, at, f"task '{source}' is not in this recipe{suggest(source, seeds)}; its tasks: "
                                        f"{', '.join(seeds)}"))
        elif seed not in seeds[source]:
            out.append(problem(run, at, f"task '{source}' has no run with seed {seed} (its seeds: "
                                        f"{', '.join(map(str, seeds[source]))}); each run starts from the source "
                                        "task's run of the same seed"))
        else:
            edges[(task, label, seed)] = (source, label, seed, run)
    for start in edges:
        node, seen = start, [start]
        while node in edges:
            node = edges[node][:3]
            if node == start:
                cycle = " -> ".join(t for t, _, _ in seen + [start])
                out.append(problem(edges[start][3], ("training", "init_from", "task"),
                                   f"tasks start from each other in a cycle: {cycle}"))
                break
            if node in seen:
                break
            seen.append(node)
    docs = {(r.task, r.point.label if r.point else "", r.seed): r.doc for r in runs}
    for (task, label, seed), (source, _, _, run) in edges.items():
        differ = _method_misfit(run.data.get("method"), docs[(source, label, seed)].data.get("method"))
        if differ:
            out.append(problem(run, ("training", "init_from", "task"),
                               f"task '{task}' starts from the adapter of task '{source}', whose method differs "
                               f"({differ}): the adapter would not fit; give both tasks the same method parameters, "
                               "or remove training.init_from"))
    return out


def _method_misfit(mine, theirs) -> str | None:
    """How two tasks' methods differ in what an adapter's tensors mean (defaults filled;
    dropout may differ), or None (the same, or not comparable: other checks report it)."""
    specs = method_specs()
    if not (isinstance(mine, dict) and isinstance(theirs, dict)) or not all(
            isinstance(m.get("name"), str) and m["name"] in specs for m in (mine, theirs)):
        return None
    if mine["name"] != theirs["name"]:
        return f"'{mine['name']}' here, '{theirs['name']}' there"
    defaults = specs[mine["name"]].defaults()
    mine, theirs = {**defaults, **mine}, {**defaults, **theirs}
    keys = sorted(k for k in set(mine) | set(theirs) if k not in FREE_PARAMS and mine.get(k) != theirs.get(k))
    return "; ".join(f"{k}: {mine.get(k)!r} here, {theirs.get(k)!r} there" for k in keys) or None
