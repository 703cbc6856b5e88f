"""Load a recipe: compose it (:mod:`.compose`: YAML, ``extends``, ``--set``), check it
(every problem at once, each at its line), and resolve it into runs.

The result is a frozen :class:`Recipe`: the resolved recipe (defaults filled, its
canonical hash: :mod:`.hashing`) and one :class:`RunSpec` per task × sweep point × seed
(:mod:`.expand`). Nothing downstream reads YAML again.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from lowrank_runner.errors import Problem, RecipeError, RecipeKeyError
from lowrank_runner.recipe.compose import load_document
from lowrank_runner.recipe.document import Document, dotted
from lowrank_runner.recipe.expand import Expanded, expand_runs, one_per_seed
from lowrank_runner.recipe.hashing import canonical_form, canonical_hash
from lowrank_runner.recipe.init_from import init_from_problems
from lowrank_runner.recipe.output_checks import table_problems
from lowrank_runner.recipe.problems import NON_FINITE, dedupe, non_finite_problems, problem, schema_problems
from lowrank_runner.recipe.schema import document_validator, resolve, sections_validator
from lowrank_runner.recipe.search import search_problems
from lowrank_runner.recipe.sweep import sweep_problems
from lowrank_runner.recipe.validate import run_problems


@dataclass(frozen=True)
class RunSpec:
    """One training run: a task and a seed, with the fully resolved configuration."""

    index: int
    task: str
    seed: int
    config: dict  # the recipe for this run: defaults filled, one task, one seed, no `tasks`
    config_hash: str
    init_from_at: str | None = None  # where training.init_from is set: "FILE:LINE:COL recipe.path"
    locations: dict = field(default_factory=dict, compare=False, hash=False)  # dotted key -> "FILE:LINE:COL"
    point: dict = field(default_factory=dict, compare=False, hash=False)  # the sweep point: dotted key -> value
    label: str = ""  # the sweep point as a directory name ("r_ref=4,t_init=50"); "" without a sweep

    def location_of(self, key: str) -> str | None:
        """Where the recipe sets ``key`` (or its nearest enclosing key), "FILE:LINE:COL"."""
        parts = key.split(".")
        while parts:
            if ".".join(parts) in self.locations:
                return self.locations[".".join(parts)]
            parts.pop()
        return None

    @property
    def slug(self) -> str:
        """The run's directory under the recipe's: ``task-seedN``, or ``task/POINT/seedN``
        for a point of a sweep."""
        task = self.task.replace('/', '-')
        return f"{task}/{self.label}/seed{self.seed}" if self.label else f"{task}-seed{self.seed}"


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str
    resolved: dict  # the whole recipe after extends/overrides, defaults filled
    hash: str
    runs: tuple[RunSpec, ...]
    overrides: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # what lrr validate warns about (FILE:LINE:COL: path: message); run and inspect say it


def check_document(doc: Document) -> list[Problem]:
    """Every problem in a composed recipe document (schema, methods, semantics); each
    sweep point is checked like a recipe of its own, at the lines of its values."""
    return checked_runs(doc)[0]


def checked_runs(doc: Document) -> tuple[list[Problem], list[Expanded]]:
    """:func:`check_document`'s problems and the document's runs (every task × sweep point
    × seed), for callers that go on with the runs of a valid document (``lrr validate``)
    instead of expanding it again."""
    problems = schema_problems(doc, doc.data, document_validator(), skip=("method",))
    sweep = sweep_problems(doc)
    problems += [p for found in sweep.values() for p in found]
    runs = expand_runs(doc, skip=frozenset(sweep))
    for run in one_per_seed(runs):  # defensive about types the schema already flagged
        if run.point is not None:  # the document was checked whole: the sections its values change
            sections = frozenset(key.split(".")[0] for key in run.point.values)
            problems += schema_problems(run.doc, run.doc.data, sections_validator(sections), skip=("method",))
        problems += run_problems(run.doc) + search_problems(run.doc)
    problems += init_from_problems(doc, runs)
    problems += table_problems(doc, [run.task for run in runs])
    if not any(p.severity == "error" for p in problems):
        problems += _same_points(doc, runs)
    problems = dedupe(_one_per_number(problems, non_finite_problems(doc, doc.data)))
    if sweep and not any(p.severity == "error" for p in problems):  # an axis with warnings only was left out above
        runs = expand_runs(doc)
    return problems, runs


def _same_points(doc: Document, runs: list[Expanded]) -> list[Problem]:
    """Two points of a sweep that make the same run once defaults are filled
    (``{name: lora, r: 2}`` and ``{name: lora, r: 2, alpha: 16}``): it would train twice.
    Each point's first seed stands for its others (they differ in ``training.seed`` alone)."""
    seen, out = {}, []
    for run in one_per_seed(runs):
        if run.point is None:
            continue
        key = (run.task, json.dumps(run.seed), canonical_hash(canonical_form(resolve(run.doc.data))))
        if key in seen and seen[key] != run.point.label:
            out.append(problem(doc, ("sweep",), f"points {seen[key]} and {run.point.label} are the same run once "
                                                "defaults are filled: remove one", key=True))
        seen.setdefault(key, run.point.label)
    return dedupe(out)


def _one_per_number(problems: list[Problem], numbers: list[Problem]) -> list[Problem]:
    """Say each unusable number once: a NaN or infinity is the problem with its key
    (``must be < 1; got inf`` goes), an integer beyond 64 bits only where nothing else
    is said (``must be <= 4294967295`` for a seed stays)."""
    non_finite = {p.path for p in numbers if p.message.startswith(NON_FINITE)}
    others = [p for p in problems if p.path not in non_finite]
    said = {p.path for p in others}
    return others + [p for p in numbers if p.path in non_finite or p.path not in said]


def check_recipe_file(path: str | Path, overrides: Iterable[str] = ()) -> list[Problem]:
    try:
        doc = load_document(path, overrides)
    except RecipeError as exc:
        return exc.problems
    return check_document(doc)


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    overrides = tuple(overrides)
    doc = load_document(path, overrides)
    problems = check_document(doc)
    if any(p.severity == "error" for p in problems):
        raise RecipeError([p for p in problems if p.severity == "error"])
    resolved = canonical_form(resolve(doc.data))  # what runs see is what the hash is of
    runs = []
    for i, (task, seed, run_doc, point) in enumerate(expand_runs(doc)):
        config = canonical_form(resolve(run_doc.data))
        locations = {dotted(p): str(o.value) for p, o in run_doc.origins.items() if p}
        runs.append(RunSpec(i, task, seed, config, canonical_hash(config), _setting_at(run_doc, ("training", "init_from")),
                            locations, canonical_form(point.values) if point else {}, point.label if point else ""))
    return Recipe(
        name=resolved["name"],
        source=str(path),
        resolved=resolved,
        hash=canonical_hash(resolved),
        runs=tuple(runs),
        overrides=overrides,
        warnings=tuple(str(p) for p in problems),
    )


def _setting_at(doc: Document, path: tuple) -> str | None:
    origin = doc.origins.get(path)
    if origin is None:
        return None
    return f"{origin.value}: {dotted(origin.source_path)}"


@contextmanager
def at_recipe_lines(run: RunSpec):
    """Name the recipe line of a problem that only the model at hand shows (a
    :class:`RecipeKeyError`: targets, ranks, max_length), as validation names its own."""
    try:
        yield
    except RecipeKeyError as exc:
        where = run.location_of(exc.key)
        if where is None:
            raise
        raise type(exc)(f"{where}: {exc}", exc.key) from None
