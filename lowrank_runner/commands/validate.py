"""``lrr validate``: everything said about one recipe file, from one parse of it.

The composed document (:mod:`lowrank_runner.recipe.compose`) is checked
(:func:`~lowrank_runner.recipe.load.check_document`), its runs' learning rates are held
against their methods' guidance where the steps are known without data
(:mod:`lowrank_runner.plan.recipe_warnings`), and a valid recipe is described: the files
and places it reads and writes, and its search space.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from lowrank_runner.errors import Problem, RecipeError
from lowrank_runner.plan.recipe_warnings import planned_step_problems
from lowrank_runner.recipe.compose import load_document
from lowrank_runner.recipe.expand import one_per_seed
from lowrank_runner.recipe.load import checked_runs
from lowrank_runner.recipe.paths import recipe_io
from lowrank_runner.recipe.problems import dedupe
from lowrank_runner.recipe.search import describe_search


@dataclass
class Checked:
    path: Path
    problems: list[Problem]
    io: dict | None  # what a valid recipe reads and writes (and its search); None: invalid

    @property
    def valid(self) -> bool:
        return self.io is not None


def validate_file(path: Path, overrides: Iterable[str] = ()) -> Checked:
    """One recipe file (with ``--set`` overrides) checked and, if valid, described."""
    try:
        doc = load_document(path, overrides)
    except RecipeError as exc:
        return Checked(path, exc.problems, None)
    problems, runs = checked_runs(doc)
    if any(p.severity == "error" for p in problems):
        return Checked(path, problems, None)
    problems = dedupe(problems + planned_step_problems(one_per_seed(runs)))
    if any(p.severity == "error" for p in problems):  # a schedule that cannot act at the planned steps
        return Checked(path, problems, None)
    io = recipe_io(doc, runs)
    search = describe_search(doc.data) if isinstance(doc.data.get("search"), dict) else None
    if search:
        io["search"] = search  # its space, trials and sampler
    return Checked(path, problems, io)
