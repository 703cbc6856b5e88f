"""Load a recipe: YAML (+ ``extends``) → ``--set`` overrides → checks → runs.

The result is a frozen :class:`Recipe`: the resolved recipe (defaults filled, its
canonical hash) and one :class:`RunSpec` per task × sweep point × seed. Nothing downstream reads
YAML again.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from lowrank_runner.errors import Problem, RecipeError, RecipeKeyError
from lowrank_runner.methods.registry import get_method_spec
from lowrank_runner.resources import expand_user
from lowrank_runner.recipe.document import Document, Origin, apply_override, delete, dotted, load_yaml, merge
from lowrank_runner.recipe.schema import fill_defaults, recipe_schema, recipe_validator
from lowrank_runner.recipe.sweep import Point, apply_point, points, sweep_problems, without_sweep
from lowrank_runner.tables.spec import table_problems
from lowrank_runner.recipe.validate import (
    NON_FINITE, dedupe, init_from_problems, non_finite_problems, problem, run_problems, schema_problems,
)


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


def canonical_form(data: Any) -> Any:
    """The value the hash is taken of: integral floats as integers (``epochs: 3.0`` is
    ``epochs: 3``; JSON Schema counts both as integers) where a float holds them exactly
    (below 2^53), tuples as lists."""
    if isinstance(data, dict):
        return {str(k): canonical_form(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [canonical_form(v) for v in data]
    if isinstance(data, float) and data.is_integer() and abs(data) < 2 ** 53:  # 1e30 stays a float
        return int(data)
    return data


def canonical_hash(data: Any) -> str:
    """SHA-256 (first 16 hex digits) of the canonical JSON form: sorted keys, no spaces,
    numbers by value. Independent of key order and YAML spelling (``1e-3`` = ``0.001``,
    ``3.0`` = ``3``); any changed value, added or removed key changes it."""
    text = json.dumps(canonical_form(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------- composition


def load_document(path: str | Path, overrides: Iterable[str] = ()) -> Document:
    doc = _load_with_extends(Path(path), ())
    for text in overrides:
        doc = apply_override(doc, text)
    if isinstance(doc.data, dict):
        for key in [k for k in doc.data if k.startswith("x-")]:  # anchors for '<<' merges live here
            delete(doc, (key,))
    return doc


RECIPE_SUFFIXES = (".yaml", ".yml")
MAX_EXTENDS_DEPTH = 32


def _load_with_extends(path: Path, chain: tuple[Path, ...]) -> Document:
    doc = load_yaml(path)
    if not isinstance(doc.data, dict):
        raise RecipeError([Problem(doc.origins[()].value, "", "a recipe must be a mapping of keys (name, backbone, ...)")])
    parents = doc.data.get("extends")
    if parents is None:
        return doc
    names = [parents] if isinstance(parents, str) else parents
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise RecipeError([problem(doc, ("extends",), "expected a recipe path or a non-empty list of recipe paths")])
    chain = chain + (path.resolve(),)
    base: Document | None = None
    for i, name in enumerate(names):
        at = ("extends",) if isinstance(parents, str) else ("extends", i)
        parent = _load_with_extends(_extended_path(doc, at, path, name, chain), chain)
        base = parent if base is None else merge(base, parent)
    delete(doc, ("extends",))
    return merge(base, doc)


def _extended_path(doc: Document, at: tuple, path: Path, name: str, chain: tuple[Path, ...]) -> Path:
    """The file an ``extends`` entry names (relative to the recipe's directory; absolute
    paths and ``..`` are allowed): an existing .yaml/.yml file, not already in ``chain``."""
    def fail(message: str):
        raise RecipeError([problem(doc, at, message)])

    if not name.strip():
        fail("is empty: name a recipe file (relative to this recipe's directory)")
    parent = path.parent / expand_user(name)
    if parent.is_dir():
        fail(f"{parent} is a directory: name a recipe file in it")
    if parent.suffix.lower() not in RECIPE_SUFFIXES:
        fail(f"expected a recipe file (.yaml or .yml), not {name}")
    if not parent.is_file():
        fail(f"extended recipe not found: {parent} (paths in 'extends' are relative to {path.parent})")
    if parent.resolve() in chain:
        cycle = " -> ".join(str(p) for p in chain + (parent.resolve(),))
        fail("this recipe extends itself" if parent.resolve() == chain[-1] else
             f"recipes extend each other in a cycle: {cycle}")
    if len(chain) >= MAX_EXTENDS_DEPTH:
        fail(f"recipes extend each other more than {MAX_EXTENDS_DEPTH} levels deep; flatten the chain")
    return parent


# ------------------------------------------------------------------- expansion


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
    at its list item."""
    training = run.data.get("training") if isinstance(run.data.get("training"), dict) else {}
    seeds = training.get("seed", 0)
    seeds = seeds if isinstance(seeds, list) else [seeds]
    at = ("training", "seed")
    run = run.copy()  # without the list of seeds, each copy is linear in the number of seeds
    items = {p: run.origins.pop(p) for p in [p for p in run.origins if p[:2] == at and len(p) > 2]}
    if isinstance(run.data.get("training"), dict):
        run.data["training"]["seed"] = None
    out = []
    for i, seed in enumerate(seeds):
        single = run.copy()
        single.data.setdefault("training", {})
        if isinstance(single.data["training"], dict):
            single.data["training"]["seed"] = seed
        if at + (i,) in items:
            single.origins[at] = items[at + (i,)]
        out.append((seed, single))
    return out


# ------------------------------------------------------------------- checking


def check_document(doc: Document) -> list[Problem]:
    """Every problem in a composed recipe document (schema, methods, semantics); each
    sweep point is checked like a recipe of its own, at the lines of its values."""
    problems = schema_problems(doc, doc.data, recipe_validator(), skip=("method",))
    sweep = sweep_problems(doc)
    problems += [p for found in sweep.values() for p in found]
    runs = expand_runs(doc, skip=frozenset(sweep))
    for run in runs:  # defensive about types the schema already flagged
        if run.point is not None:
            problems += schema_problems(run.doc, run.doc.data, recipe_validator(), skip=("method",))
        problems += run_problems(run.doc)
    problems += init_from_problems(doc, runs)
    problems += table_problems(doc, [run.task for run in runs])
    if not any(p.severity == "error" for p in problems):
        problems += _same_points(doc, runs)
    return dedupe(_one_per_number(problems, non_finite_problems(doc, doc.data)))


def _same_points(doc: Document, runs: list[Expanded]) -> list[Problem]:
    """Two points of a sweep that make the same run once defaults are filled
    (``{name: lora, r: 2}`` and ``{name: lora, r: 2, alpha: 16}``): it would train twice."""
    schema, seen, out = recipe_schema(), {}, []
    for run in runs:
        if run.point is None:
            continue
        key = (run.task, json.dumps(run.seed), canonical_hash(canonical_form(_resolve(run.doc.data, schema))))
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
    problems = [p for p in check_document(doc) if p.severity == "error"]
    if problems:
        raise RecipeError(problems)
    schema = recipe_schema()
    resolved = canonical_form(_resolve(doc.data, schema))  # what runs see is what the hash is of
    runs = []
    for i, (task, seed, run_doc, point) in enumerate(expand_runs(doc)):
        config = canonical_form(_resolve(run_doc.data, schema))
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
    )


def _setting_at(doc: Document, path: tuple) -> str | None:
    origin = doc.origins.get(path)
    if origin is None:
        return None
    return f"{origin.value}: {dotted(origin.source_path)}"


def _resolve(data: dict, schema: dict) -> dict:
    out = fill_defaults(data, schema)
    method = out.get("method")
    if isinstance(method, dict) and "name" in method:
        out["method"] = {**get_method_spec(method["name"]).defaults(), **method}
        out["method"] = {"name": method["name"], **{k: v for k, v in out["method"].items() if k != "name"}}
    if isinstance(out.get("tasks"), dict):
        out["tasks"] = {k: (v or {}) for k, v in out["tasks"].items()}
    return out


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
