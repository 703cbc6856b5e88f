"""A recipe's ``search:`` block: its space, and the checks ``lrr validate`` runs on it.

::

    search:
      n_trials: 20                    # trials per task (completed and failed ones count)
      sampler: tpe                    # tpe (default) | random
      seed: 0                         # the sampler's seed (default 0)
      space:                          # dotted recipe keys, one distribution each
        training.learning_rate: {log_uniform: [1.0e-5, 1.0e-2]}
        training.warmup_ratio: {uniform: [0.0, 0.1]}
        training.epochs: {int: [2, 6]}
        method.r: {choices: [4, 8, 16]}

A sampled value is set on top of each task's merged settings (it wins over a per-task
value), like a sweep's. Every value a trial can take is checked against the schema like
any recipe value, at the line of the bound or choice that is wrong: both ends of a range
and a point inside it (an integer key takes ``int``, not ``uniform``), every choice.
Torch- and Optuna-free (``lrr validate``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from lowrank_runner.errors import Location, Problem
from lowrank_runner.recipe.document import Document, Origin, PathT, delete, merge
from lowrank_runner.recipe.problems import schema_problems, suggest
from lowrank_runner.recipe.schema import document_validator, recipe_key_paths
from lowrank_runner.recipe.validate import run_problems

SEARCH = "search"
SPACE = "space"
KINDS = ("log_uniform", "uniform", "int", "choices")
# The parts of a recipe that `tasks.NAME` may override: a sampled value goes there for its task.
PER_TASK = ("task", "method", "targets", "training")
# Keys a search cannot sample, and why.
FIXED = {
    "name": "a recipe has one name",
    "description": "it is free text, not a setting",
    "extends": "the recipe's files are composed before the search samples",
    "tasks": "each task of tasks: gets a study of its own",
    "task.name": "each task of tasks: gets a study of its own",
    "task.metric": "it is the search's objective",
    "training.seed": "trials train with the recipe's first seed, the best point with every seed of training.seed",
    "training.init_from": "a trial's adapter starts where the recipe says",
    "output": "the search writes into the recipe's output directory",
    "sweep": "a recipe has a sweep or a search, not both",
    "search": "a search cannot search itself",
}
_INSIDE = 0.381966  # where in a range the inner check value lies (a non-integral point of most ranges)


@dataclass(frozen=True)
class Dimension:
    """One searched key: its distribution (``kind``) and bounds or choices."""

    key: str
    kind: str  # log_uniform | uniform | int | choices
    values: tuple  # (low, high), or the choices

    def describe(self) -> str:
        shown = ", ".join(json.dumps(v) for v in self.values)
        return f"{self.kind} [{shown}]"

    def well_formed(self) -> bool:
        """What the schema asks of the distribution (its problems are reported there)."""
        if self.kind == "choices":
            return bool(self.values)
        numbers = len(self.values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in self.values)
        if not numbers or not self.values[0] < self.values[1]:
            return False
        if self.kind == "int":
            return all(isinstance(v, int) for v in self.values)
        return self.kind != "log_uniform" or self.values[0] > 0

    def samples(self) -> list[tuple[Any, int | None]]:
        """The values a check covers, each with its item index in the block (None: a
        point inside the range): every choice; the ends of a range and a point inside."""
        if self.kind in ("choices", "int"):
            return [(v, i) for i, v in enumerate(self.values)]
        low, high = self.values
        if self.kind == "log_uniform":
            inside = math.exp(math.log(low) + _INSIDE * (math.log(high) - math.log(low)))
        else:
            inside = low + _INSIDE * (high - low)
        return [(low, 0), (high, 1), (inside, None)]


@dataclass(frozen=True)
class SearchSpec:
    """The ``search`` block of a resolved recipe (defaults filled)."""

    n_trials: int
    sampler: str
    seed: int
    dimensions: tuple[Dimension, ...]
    pruner: str = "none"  # median | hyperband | none
    pruner_settings: tuple[tuple[str, int], ...] = ()  # (key, value) of search.pruner's mapping, as written


def search_spec(resolved: dict) -> SearchSpec | None:
    """The search of a resolved (checked) recipe; None without a ``search`` block."""
    block = resolved.get(SEARCH)
    if not isinstance(block, dict):
        return None
    pruner = block.get("pruner", "none")
    name, settings = (pruner, ()) if isinstance(pruner, str) else (
        pruner["name"], tuple((k, v) for k, v in pruner.items() if k != "name"))
    return SearchSpec(block["n_trials"], block.get("sampler", "tpe"), block.get("seed", 0), tuple(dimensions(block)),
                      name, settings)


def dimensions(block: dict) -> list[Dimension]:
    """The well-formed entries of a ``space`` (the schema reports the others)."""
    space = block.get(SPACE) if isinstance(block, dict) else None
    out = []
    for key, entry in (space or {}).items() if isinstance(space, dict) else ():
        kinds = [k for k in KINDS if isinstance(entry, dict) and isinstance(entry.get(k), list)]
        if len(kinds) == 1:
            out.append(Dimension(key, kinds[0], tuple(entry[kinds[0]])))
    return out


# ------------------------------------------------------------------ trials


def value_text(value: Any) -> str:
    """A value as ``--set`` YAML (JSON is YAML: floats round-trip exactly)."""
    return json.dumps(value)


def trial_overrides(resolved: dict, task: str, values: dict) -> list[str]:
    """The ``--set`` overrides that put ``values`` (dotted key -> value) on ``task``: a
    key a task may override goes under ``tasks.TASK`` in a multi-task recipe, so it wins
    over the task's own value."""
    multi = isinstance(resolved.get("tasks"), dict)
    out = []
    for key, value in values.items():
        at = f"tasks.{task}.{key}" if multi and key.split(".")[0] in PER_TASK else key
        out.append(f"{at}={value_text(value)}")
    return out


# ------------------------------------------------------------------ checks


def search_problems(doc: Document) -> list[Problem]:
    """What is wrong with the ``search`` block of one run's document (one task, one
    seed) beyond its schema: keys (did-you-mean), distributions, and every value a trial
    can take, checked like a recipe value at the line it is written."""
    block = doc.data.get(SEARCH) if isinstance(doc.data, dict) else None
    if not isinstance(block, dict):
        return []
    out = _combination_problems(doc)
    space = block.get(SPACE) if isinstance(block.get(SPACE), dict) else {}
    keys = list(space)
    for key, entry in space.items():
        found = _key_problems(doc, key, keys) or _entry_problems(doc, key, entry)
        out += found
    base = {(p.path, p.message) for p in _problems(_without_search(doc))}
    for dim in dimensions(block):
        if dim.well_formed() and not any(p.path.startswith(_dotted_key(dim.key)) for p in out):
            out += _value_problems(doc, dim, base)
    return out


def _dotted_key(key: str, *rest) -> str:
    return ".".join((SEARCH, SPACE, key, *map(str, rest)))


def _at(doc: Document, path: PathT, key: bool = False) -> Location | None:
    origin = doc.origins.get(path)
    return None if origin is None else (origin.key if key else origin.value)


def _combination_problems(doc: Document) -> list[Problem]:
    """A search with a sweep, or with a task starting from another task's adapter."""
    out = []
    swept = any(o.source_path[:1] == ("sweep",) for o in doc.origins.values())  # a run's values from a sweep point
    if "sweep" in doc.data or swept:
        out.append(Problem(_at(doc, (SEARCH,), key=True), SEARCH, "a recipe has a sweep or a search, not both: a search "
                           "samples its own points; remove the sweep (or search in a recipe of its own)"))
    training = doc.data.get("training")
    ref = training.get("init_from") if isinstance(training, dict) else None
    if isinstance(ref, dict) and "task" in ref:
        out.append(Problem(_at(doc, ("training", "init_from")), "training.init_from",
                           "a search trains each task's trials on their own, so a task cannot start from another "
                           "task's run ({task: ...}) in a search; give that run's directory (training.init_from: PATH)"))
    return out


def _key_problems(doc: Document, key: str, keys: list[str]) -> list[Problem]:
    loc, path = _at(doc, (SEARCH, SPACE, key), key=True), _dotted_key(key)
    fixed = next((why for k, why in FIXED.items() if key == k or key.startswith(k + ".")), None)
    if fixed:
        return [Problem(loc, path, f"'{key}' cannot be searched: {fixed}")]
    settable = recipe_key_paths()
    if key not in settable:
        return [Problem(loc, path, f"unknown recipe key '{key}'{suggest(key, settable)}; a search space names dotted "
                                   "recipe keys, e.g. training.learning_rate or method.r")]
    inside = [k for k in keys if k != key and key.startswith(k + ".")]
    if inside:
        return [Problem(loc, path, f"'{key}' is inside '{inside[0]}', which is searched too: search one of them")]
    return []


def _entry_problems(doc: Document, key: str, entry) -> list[Problem]:
    """One distribution per key; a range from low to high; choices that Optuna can
    store (no mappings) and that differ."""
    if not isinstance(entry, dict):
        return []  # the schema says what a distribution looks like
    kinds = [k for k in KINDS if k in entry]
    loc, path = _at(doc, (SEARCH, SPACE, key)), _dotted_key(key)
    if len(kinds) > 1:
        return [Problem(loc, path, f"one distribution per key; got {' and '.join(kinds)}: keep one of {', '.join(KINDS)}")]
    if not kinds or not isinstance(entry[kinds[0]], list):
        return []
    kind, values = kinds[0], entry[kinds[0]]
    at = (SEARCH, SPACE, key, kind)
    if kind != "choices":
        numbers = len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numbers and not values[0] < values[1]:
            return [Problem(_at(doc, at), _dotted_key(key, kind),
                            f"a range [LOW, HIGH] needs LOW < HIGH; got {values}")]
        return []
    out, seen = [], {}
    for i, value in enumerate(values):
        if isinstance(value, dict):
            out.append(Problem(_at(doc, at + (i,)), _dotted_key(key, kind, i), "a choice cannot be a mapping: search "
                               f"its keys one by one (e.g. {key}.KEY: {{choices: [...]}})"))
        elif value_text(value) in seen:
            out.append(Problem(_at(doc, at + (i,)), _dotted_key(key, kind, i),
                               f"{value!r} is listed twice (also item {seen[value_text(value)]}): each choice once"))
        seen.setdefault(value_text(value), i)
    return out


def _value_problems(doc: Document, dim: Dimension, base: set) -> list[Problem]:
    """The problems a value of ``dim`` would give the run that the run does not have
    already, each at the line of that value in the search block."""
    out = []
    at = (SEARCH, SPACE, dim.key, dim.kind)
    for value, index in dim.samples():
        where = at + (index,) if index is not None else at
        trial = _with_value(_without_search(doc), dim.key, value, doc.origins.get(where))
        for p in _problems(trial):
            if (p.path, p.message) in base or p.severity != "error":  # a warning (learning-rate guidance) stays one
                continue
            what = "" if p.path == dim.key or p.path.startswith(_dotted_key(dim.key)) else f" ({p.path})"
            sample = f"{value!r}" if index is not None else f"{value:.6g} (inside the range)"
            out.append(Problem(_at(doc, where), _dotted_key(dim.key, dim.kind, *([index] if index is not None else [])),
                               f"{dim.kind}: a trial would set {dim.key} to {sample}, which is not valid{what}: {p.message}"))
    return out


def _without_search(doc: Document) -> Document:
    out = doc.copy()
    delete(out, (SEARCH,))
    return out


def _with_value(doc: Document, key: str, value, origin: Origin | None) -> Document:
    """``doc`` with ``key`` set to ``value`` (replacing what is there)."""
    path = tuple(key.split("."))
    out = doc.copy()
    delete(out, path)
    return merge(out, Document(value, {(): origin} if origin else {}, doc.file), path)


def _problems(doc: Document) -> list[Problem]:
    """Every problem of one run's document (no search block): its schema, method and
    semantic checks."""
    return schema_problems(doc, doc.data, document_validator(), skip=("method",)) + run_problems(doc)


# ------------------------------------------------------------------ showing


def describe_search(resolved: dict) -> dict | None:
    """The search of a resolved recipe for ``lrr inspect`` / ``lrr validate`` (None: none)."""
    spec = search_spec(resolved)
    if spec is None:
        return None
    return {"n_trials": spec.n_trials, "sampler": spec.sampler, "seed": spec.seed, "pruner": spec.pruner,
            "pruner_settings": dict(spec.pruner_settings),
            "space": {d.key: {d.kind: list(d.values)} for d in spec.dimensions}}


def pruner_text(name: str, settings: dict | None) -> str:
    """``median (startup_trials 2, warmup_steps 10)``: a pruner and the settings a recipe gave it."""
    given = ", ".join(f"{k} {v}" for k, v in (settings or {}).items())
    return f"{name} ({given})" if given else name


def search_lines(info: dict | None) -> list[str]:
    """:func:`describe_search` (with ``objectives`` per task, from ``lrr inspect``) as text lines."""
    if not info:
        return []
    name = info.get("pruner", "none")
    pruner = "" if name == "none" else f", pruner {pruner_text(name, info.get('pruner_settings'))}"
    lines = [f"  search: {info['n_trials']} trial(s) per task, sampler {info['sampler']} (seed {info['seed']}){pruner}; "
             "each trial trains the recipe's first seed and is scored on the selection split (never a test split); "
             "the best point then trains every seed"]
    width = max(len(k) for k in info["space"])
    for key, entry in info["space"].items():
        (kind, values), = entry.items()
        lines.append(f"    {key:{width}}  {Dimension(key, kind, tuple(values)).describe()}")
    for task, goal in info.get("objectives", {}).items():
        lines.append(f"    objective [{task}]: {goal['direction']} {goal['metric']} on {goal['split']} "
                     f"(trials train seed {goal['seed']})")
    return lines
