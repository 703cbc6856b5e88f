"""Sweeps: a recipe's ``sweep:`` block, expanded into points.

A point is one value for each swept key (dotted recipe keys, ``method.r_ref``); the
points are the grid over the keys, except that the keys of a ``zip:`` group move
together (equal-length lists; ``zip:`` may also be a list of such groups)::

    sweep:
      method.r_ref: [2, 4, 8]
      zip: {method.t_init: [50, 100], method.t_final: [50, 100]}

Each point is applied on top of a task's merged settings (the swept value wins over a
per-task one; a mapping replaces the key's mapping), and keeps the origin of its value
in the ``sweep`` block, so a point that does not validate is reported at the line of
the value that is wrong. ``lrr run --sweep KEY=V1,V2`` adds an axis from the command line.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import yaml

from lowrank_runner.errors import Problem
from lowrank_runner.recipe.document import Document, PathT, delete, merge, safe_load
from lowrank_runner.recipe.schema import recipe_key_paths
from lowrank_runner.recipe.hashing import canonical_form
from lowrank_runner.recipe.problems import problem, suggest

SWEEP = "sweep"
ZIP = "zip"
# Keys a sweep cannot move, and what to use instead.
FIXED = {
    "name": "a recipe has one name; write one recipe per experiment",
    "description": "it is free text, not a setting",
    "extends": "the recipe's files are composed before the sweep applies",
    "tasks": "list the tasks in tasks:, each point runs every task",
    "task.name": "list the tasks in tasks:, each point runs every task",
    "training.seed": "list the seeds in training.seed: each point runs every seed",
    "output": "every point writes into the recipe's output directory and results table",
    "sweep": "a sweep cannot sweep itself",
    "search": "a search samples its own space",
}


@dataclass(frozen=True)
class Axis:
    """One key of a point (or a zipped group of keys): its values, where each was written."""

    keys: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]  # one tuple (a value per key) per step of the axis
    at: tuple[tuple[PathT, ...], ...]  # the path of each value inside the document


@dataclass(frozen=True)
class Point:
    values: dict  # dotted key -> value
    label: str  # "r_ref=4,t_init=50": a directory name
    at: dict  # dotted key -> the path of its value in the document (in the sweep block)


def axes(doc: Document) -> list[Axis]:
    """The axes of the document's ``sweep`` block, in the order written (no checks: see
    :func:`sweep_problems`)."""
    block = doc.data.get(SWEEP) if isinstance(doc.data, dict) else None
    if not isinstance(block, dict):
        return []
    out = []
    for key, values in block.items():
        if key == ZIP:
            groups = values if isinstance(values, list) else [values]
            for g, group in enumerate(groups):
                if isinstance(group, dict) and group:
                    base = (SWEEP, ZIP, g) if isinstance(values, list) else (SWEEP, ZIP)
                    out.append(_zipped(group, base))
        elif isinstance(values, list):
            out.append(Axis((key,), tuple((v,) for v in values), tuple(((SWEEP, key, i),) for i in range(len(values)))))
    return out


def _zipped(group: dict, base: PathT) -> Axis:
    keys = tuple(group)
    lists = [v if isinstance(v, list) else [] for v in group.values()]
    n = min(len(v) for v in lists)
    return Axis(keys, tuple(tuple(v[i] for v in lists) for i in range(n)),
                tuple(tuple(base + (k, i) for k in keys) for i in range(n)))


def points(doc: Document, skip: frozenset = frozenset()) -> list[Point]:
    """Every point of the sweep (the grid over its axes, less the axes with a key in
    ``skip``); ``[]`` without a sweep."""
    found = [axis for axis in axes(doc) if not skip.intersection(axis.keys)]
    if not found:
        return []
    keys = [k for axis in found for k in axis.keys]
    short = _short_names(keys)
    labels = {k: _value_labels(axis, axis.keys.index(k)) for axis in found for k in axis.keys}
    out = []
    for steps in itertools.product(*(range(len(axis.values)) for axis in found)):
        values, at, parts = {}, {}, []
        for axis, i in zip(found, steps):
            for j, key in enumerate(axis.keys):
                values[key], at[key] = axis.values[i][j], axis.at[i][j]
                parts.append(f"{short[key]}={labels[key][i]}")
        out.append(Point(values, ",".join(parts), at))
    return out


def _short_names(keys: list[str]) -> dict[str, str]:
    """The last part of each key, or the whole key where two keys share that part."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _value_labels(axis: Axis, j: int) -> list[str]:
    """A directory-safe label per value of key ``j``, prefixed by the value's index
    where two values would read the same (letter case aside: macOS and Windows file
    systems ignore it, so ``UV`` and ``uv`` would share a directory)."""
    values = [v[j] for v in axis.values]
    labels = [value_label(v, _differing(values) if isinstance(v, dict) else None) for v in values]
    if len({label.lower() for label in labels}) < len(labels):
        return [f"{i}-{label}" for i, label in enumerate(labels)]
    return labels


def _differing(values: list) -> list[str]:
    """The keys a mapping's label shows beside its name (``lora-r=4``): none where the
    names tell the mappings apart, else those whose value is not the same in all."""
    names = [v.get("name") if isinstance(v, dict) else None for v in values]
    if None not in names and len(set(map(str, names))) == len(names):
        return []
    keys = dict.fromkeys(k for v in values if isinstance(v, dict) for k in v)
    return [k for k in keys if k != "name" and len({_canonical(v.get(k)) if isinstance(v, dict) else "" for v in values}) > 1]


def value_label(value, keys: list[str] | None = None) -> str:
    """A value as a directory-safe name (``keys``: the keys of a mapping to show)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, float):
        text = repr(value)
    elif isinstance(value, list):
        text = "+".join(value_label(v) for v in value) or "none"
    elif isinstance(value, dict):
        keys = list(value) if keys is None else [k for k in keys if k in value]
        parts = [str(value["name"])] if "name" in value else []
        text = "-".join(parts + [f"{k}={value_label(value[k])}" for k in keys if k != "name"]) or "default"
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", text)[:64] or "_"


def apply_point(run: Document, point: Point, source: Document) -> Document:
    """``run`` (one task's settings) with the point's values set at their keys, each
    keeping the origin of its value in ``source``'s sweep block."""
    out = run.copy()
    for key, value in point.values.items():
        path, src = tuple(key.split(".")), point.at[key]
        origins = {p[len(src):]: o for p, o in source.origins.items() if p[: len(src)] == src}
        delete(out, path)  # a mapping value replaces, it does not merge
        out = merge(out, Document(value, origins, source.file), path)
        for i in range(1, len(path)):  # mappings the value created point at it
            if path[:i] not in out.origins and () in origins:
                out.origins[path[:i]] = origins[()]
    return out


def without_sweep(doc: Document) -> Document:
    out = doc.copy()
    if isinstance(out.data, dict) and SWEEP in out.data:
        delete(out, (SWEEP,))
    return out


# ------------------------------------------------------------------ checks


MAX_POINTS = 1000  # a paper's ablation or figure has tens; more is a typo (and slow to check)


def sweep_problems(doc: Document) -> dict[str, list[Problem]]:
    """What is wrong with the ``sweep`` block beyond its schema, per swept key: unknown
    or fixed keys (did-you-mean), a key swept twice or inside another swept key, zipped
    lists of different lengths, values listed twice, more than :data:`MAX_POINTS`
    points."""
    settable = recipe_key_paths()
    out: dict[str, list[Problem]] = {}
    found = axes(doc)
    keys = [k for axis in found for k in axis.keys]
    where: dict[str, PathT] = {}
    for axis in found:
        for j, key in enumerate(axis.keys):
            at = axis.at[0][j][:-1] if axis.at else (SWEEP, key)
            found_here = out.setdefault(key, [])
            if key in where:
                first = doc.origin(where[key])
                found_here.append(problem(doc, at, f"'{key}' is swept twice (also at {first.key if first else 'sweep'}): "
                                                   "give its values once", key=True))
                continue
            where[key] = at
            found_here.extend(_key_problems(doc, key, at, keys, settable))
            if len(axis.keys) == 1:
                found_here.extend(_repeated_values(doc, axis, key))
    for group, found_problem in _zip_problems(doc):
        for key in group:
            out.setdefault(key, []).append(found_problem)
    _too_many_points(doc, found, out)
    _too_long_labels(doc, found, out)
    return {k: v for k, v in out.items() if v}


def _repeated_values(doc: Document, axis: Axis, key: str) -> list[Problem]:
    """A value listed twice (as a recipe reads it: 2 and 2.0, 1e-3 and 0.001 are one)."""
    seen, out = {}, []
    for i, (value,) in enumerate(axis.values):
        text = _canonical(value)
        if text in seen:
            out.append(problem(doc, axis.at[i][0], f"{value!r} is listed twice for {key} (also item {seen[text]}): "
                                                   "each point runs once"))
        seen.setdefault(text, i)
    return out


NAME_MAX = 255  # bytes of one file name (ext4, XFS, APFS, NTFS): a point's label is a directory name


def _too_long_labels(doc: Document, found: list[Axis], out: dict) -> None:
    """A point whose label (its directory name, ``r_ref=4,t_init=50``) would be longer
    than a file name may be: said at the sweep, before any directory is made."""
    found = [axis for axis in found if axis.values]  # an empty list of values: the schema says so
    short = _short_names([k for axis in found for k in axis.keys])
    longest = [max((f"{short[k]}={label}" for label in _value_labels(axis, axis.keys.index(k))),
                   key=lambda part: len(part.encode())) for axis in found for k in axis.keys]
    label = ",".join(longest)
    if len(label.encode()) > NAME_MAX:
        message = (f"a point's directory name would be {len(label.encode())} bytes ({label[:60]}...), more than the "
                   f"{NAME_MAX} a file name may have; sweep fewer keys together, or shorter values")
        for axis in found:
            out.setdefault(axis.keys[0], []).append(problem(doc, (SWEEP,), message, key=True))


def _too_many_points(doc: Document, found: list[Axis], out: dict) -> None:
    sizes = [len(axis.values) for axis in found]
    total = math.prod(sizes)
    if total > MAX_POINTS:
        shown = " x ".join(map(str, sizes))
        message = (f"{total:,} points ({shown}); a recipe sweeps at most {MAX_POINTS:,}: split the sweep into "
                   "several recipes, or sweep fewer values")
        for axis in found:  # under one key of each axis, so that no axis expands
            out.setdefault(axis.keys[0], []).append(problem(doc, (SWEEP,), message, key=True))


def _key_problems(doc: Document, key: str, at: PathT, keys: list[str], settable: list[str]) -> list[Problem]:
    fixed = next((why for k, why in FIXED.items() if key == k or key.startswith(k + ".")), None)
    if fixed:
        return [problem(doc, at, f"'{key}' cannot be swept: {fixed}", key=True)]
    holds = next((k for k in FIXED if k.startswith(key + ".")), None)
    if holds:
        return [problem(doc, at, f"'{key}' cannot be swept as a whole: it holds {holds}, which a sweep cannot move "
                                 f"({FIXED[holds]}); sweep the keys inside it, e.g. {key}.{_example(key)}", key=True)]
    if key not in settable:
        return [problem(doc, at, f"unknown recipe key '{key}'{suggest(key, settable)}; a sweep names dotted "
                                 "recipe keys, e.g. method.r or training.learning_rate", key=True)]
    inside = [k for k in keys if k != key and key.startswith(k + ".")]
    if inside:
        return [problem(doc, at, f"'{key}' is inside '{inside[0]}', which is swept too: sweep one of them", key=True)]
    return []


def _example(key: str) -> str:
    return {"training": "learning_rate", "task": "max_length"}.get(key, "KEY")


def _zip_problems(doc: Document) -> list[tuple[list[str], Problem]]:
    block = doc.data.get(SWEEP) if isinstance(doc.data, dict) else None
    value = block.get(ZIP) if isinstance(block, dict) else None
    groups = value if isinstance(value, list) else [value]
    out = []
    for g, group in enumerate(groups):
        if not isinstance(group, dict):
            continue
        at = (SWEEP, ZIP, g) if isinstance(value, list) else (SWEEP, ZIP)
        lengths = {k: len(v) for k, v in group.items() if isinstance(v, list)}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{k}: {n}" for k, n in lengths.items())
            out.append((list(group), problem(doc, at, "zipped keys move together, so their lists need the same "
                                                      f"length ({shown})")))
    return out


def _canonical(value) -> str:
    """The value as a recipe's hash reads it (2.0 is 2; key order does not matter)."""
    return json.dumps(canonical_form(value), sort_keys=True)


# ------------------------------------------------------------------ the command line


def sweep_override(text: str) -> str:
    """``--sweep KEY=V1,V2,...`` as the ``--set`` override it stands for
    (``sweep={KEY: [V1, V2, ...]}``); each value is YAML (``[Wq,Wv]`` is a list)."""
    from lowrank_runner.errors import UsageError

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip() or any(not p.strip() for p in key.split(".")):
        raise UsageError(f"--sweep {text!r}: expected dotted.key=VALUE,VALUE,..., e.g. --sweep method.r=4,8,16")
    try:
        values = safe_load(f"[{raw}]")
    except yaml.YAMLError:
        raise UsageError(f"--sweep {text!r}: the values are not a comma-separated YAML list; quote text values, "
                         "e.g. --sweep 'targets=[Wq,Wv],[Wq,Wk,Wv]'") from None
    return f"{SWEEP}=" + yaml.safe_dump({key: values}, default_flow_style=True, width=10**6).strip()
