"""Load a recipe: YAML (+ ``extends``) → ``--set`` overrides → checks → runs.

The result is a frozen :class:`Recipe`: the resolved recipe (defaults filled, its
canonical hash) and one :class:`RunSpec` per task × seed. Nothing downstream reads
YAML again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from lowrank_runner.errors import Location, Problem, RecipeError
from lowrank_runner.methods.registry import get_method_spec
from lowrank_runner.recipe.document import Document, Origin, apply_override, delete, dotted, load_yaml, merge
from lowrank_runner.recipe.schema import fill_defaults, recipe_schema, recipe_validator
from lowrank_runner.recipe.validate import dedupe, init_from_problems, problem, run_problems, schema_problems


@dataclass(frozen=True)
class RunSpec:
    """One training run: a task and a seed, with the fully resolved configuration."""

    index: int
    task: str
    seed: int
    config: dict  # the recipe for this run: defaults filled, one task, one seed, no `tasks`
    config_hash: str
    init_from_at: str | None = None  # where training.init_from is set: "FILE:LINE:COL recipe.path"

    @property
    def slug(self) -> str:
        return f"{self.task.replace('/', '-')}-seed{self.seed}"


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
    ``epochs: 3``; JSON Schema counts both as integers), tuples as lists."""
    if isinstance(data, dict):
        return {str(k): canonical_form(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [canonical_form(v) for v in data]
    if isinstance(data, float) and data.is_integer():
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
    return doc


def _load_with_extends(path: Path, chain: tuple[Path, ...]) -> Document:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in chain + (resolved,))
        raise RecipeError([Problem(Location(str(path)), "extends", f"recipes extend each other in a cycle: {cycle}")])
    doc = load_yaml(path)
    if not isinstance(doc.data, dict):
        raise RecipeError([Problem(doc.origins[()].value, "", "a recipe must be a mapping of keys (name, backbone, ...)")])
    parents = doc.data.get("extends")
    if parents is None:
        return doc
    names = [parents] if isinstance(parents, str) else parents
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RecipeError([problem(doc, ("extends",), "expected a recipe path or a list of recipe paths")])
    base: Document | None = None
    for i, name in enumerate(names):
        parent_path = path.parent / name
        if not parent_path.is_file():
            at = ("extends",) if isinstance(parents, str) else ("extends", i)
            raise RecipeError([problem(doc, at, f"extended recipe not found: {parent_path} (paths in 'extends' are relative to {path.parent})")])
        parent = _load_with_extends(parent_path, chain + (resolved,))
        base = parent if base is None else merge(base, parent)
    delete(doc, ("extends",))
    return merge(base, doc)


# ------------------------------------------------------------------- expansion


def _subdocument(doc: Document, at: tuple) -> Document:
    data = doc.data
    for key in at:
        data = data[key]
    origins = {p[len(at):]: o for p, o in doc.origins.items() if p[: len(at)] == at}
    return Document(data, origins, doc.file)


def expand_runs(doc: Document) -> list[tuple[str, int, Document]]:
    """One document per task × seed (task-major order)."""
    base = doc.copy()
    tasks = base.data.get("tasks")
    per_task: list[tuple[str, Document]] = []
    if isinstance(tasks, dict):
        delete(base, ("tasks",))
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
    else:
        task = base.data.get("task")
        per_task.append((task.get("name") if isinstance(task, dict) else None, base))
    out = []
    for name, run in per_task:
        training = run.data.get("training") if isinstance(run.data.get("training"), dict) else {}
        seeds = training.get("seed", 0)
        seeds = seeds if isinstance(seeds, list) else [seeds]
        for seed in seeds:
            single = run.copy()
            single.data.setdefault("training", {})
            if isinstance(single.data["training"], dict):
                single.data["training"]["seed"] = seed
            out.append((name, seed, single))
    return out


# ------------------------------------------------------------------- checking


def check_document(doc: Document) -> list[Problem]:
    """Every problem in a composed recipe document (schema, methods, semantics)."""
    problems = schema_problems(doc, doc.data, recipe_validator(), skip=("method",))
    runs = expand_runs(doc)
    for _, _, run in runs:  # defensive about types the schema already flagged
        problems += run_problems(run)
    problems += init_from_problems(doc, runs)
    return dedupe(problems)


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
    for i, (task, seed, run_doc) in enumerate(expand_runs(doc)):
        config = canonical_form(_resolve(run_doc.data, schema))
        runs.append(RunSpec(i, task, seed, config, canonical_hash(config), _setting_at(run_doc, ("training", "init_from"))))
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
