"""``lrr inspect`` of a search: the model at every choice that changes it.

``lrr validate`` checks every value a trial can take against the schema
(:mod:`~lowrank_runner.recipe.search`); whether a ``targets`` pattern matches a module,
or a method's ranks fit the model, only the model shows. So inspect builds each task's
model (on the meta device, as for its runs) at every choice of ``targets`` and of the
method's keys (``method.*``), and names the choice a trial could not train with at its
line in the search block, as a sweep's value is named at its own.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from lowrank_runner.errors import LrrError
from lowrank_runner.recipe.search import SEARCH, SPACE, search_spec


def shapes_model(key: str) -> bool:
    """A searched key whose value changes the adapted model (its modules or shapes)."""
    return key == "targets" or key.startswith("targets.") or key.startswith("method.")


def choice_problems(recipe, build) -> list[str]:
    """``FILE:LINE:COL: search.space.KEY.choices.I: …`` for every choice of a key that
    shapes the model and that ``build`` (one run's model on the meta device) refuses,
    for the first run of each task."""
    spec = search_spec(recipe.resolved)
    dims = [d for d in spec.dimensions if d.kind == "choices" and shapes_model(d.key)] if spec else []
    firsts: dict = {}
    for run in recipe.runs:
        firsts.setdefault(run.task, run)
    out = []
    for dim in dims:
        for i, value in enumerate(dim.values):
            at = f"{SEARCH}.{SPACE}.{dim.key}.choices.{i}"
            for run in firsts.values():
                problem = _build_problem(build, run, dim.key, value)
                if problem:
                    where = run.locations.get(at) or recipe.source
                    out.append(f"{where}: {at}: choices: a trial would set {dim.key} to {value!r}, which the model "
                               f"of {run.task} cannot take: {problem}")
                    break  # one line per choice
    return out


def _build_problem(build, run, key: str, value) -> str | None:
    """What ``build`` raises for ``run`` with ``key`` set to ``value`` (None: it builds).
    The run's locations are dropped, so the error names the value, not the recipe's line."""
    config = copy.deepcopy(run.config)
    node = config
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    try:
        build(replace(run, config=config, locations={}))
    except LrrError as exc:
        return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return None
