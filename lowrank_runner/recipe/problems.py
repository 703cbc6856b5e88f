"""Problems at recipe lines: a :class:`~lowrank_runner.errors.Problem` names the file,
line and column of the key or value, the recipe path and a fix. This module turns
anything found wrong in a :class:`~lowrank_runner.recipe.document.Document` into one:
JSON Schema errors (translated into plain words), numbers no setting can use, and the
checks' own findings (:func:`problem`); :func:`suggest` offers the key or value the
user probably meant. The bottom of the recipe stage: every check imports it.

Torch-free by design: ``lrr validate`` must stay fast enough for CI and pre-commit.
"""

from __future__ import annotations

import json

import difflib
import math

import jsonschema

from lowrank_runner.errors import Location, Problem
from lowrank_runner.recipe.document import Document, PathT, dotted

_JSON_TYPES = {
    dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
    int: "an integer", float: "a number", type(None): "null",
}
_TYPE_WORDS = {
    "object": "a mapping", "array": "a list", "string": "a string", "boolean": "a boolean",
    "integer": "an integer", "number": "a number", "null": "null",
}


# Names users of HF PEFT / Trainer, torchtune and Axolotl type for our keys.
ALIASES = {
    "rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "use_rslora": "rslora", "lr": "learning_rate", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "micro_batch_size": "per_device_batch_size", "per_device_train_batch_size": "per_device_batch_size",
    "per_device_eval_batch_size": "eval_batch_size", "gradient_accumulation": "gradient_accumulation_steps",
    "target_modules": "targets", "lora_target_modules": "targets", "base_model": "backbone", "model": "backbone",
    "output_dir": "output", "scheduler": "lr_scheduler", "warmup": "warmup_steps", "seeds": "seed",
    "dataset": "task", "max_seq_length": "max_length", "sequence_len": "max_length", "clip_grad_norm": "max_grad_norm",
}


def suggest(word: str, choices) -> str:
    choices = [str(c) for c in choices]
    alias = ALIASES.get(str(word))
    if alias in choices:
        return f" (did you mean '{alias}'?)"
    match = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def where(doc: Document, path: PathT, key: bool = False) -> tuple[Location | None, str]:
    origin = doc.origin(path)
    if origin is None:
        return None, dotted(path)
    exact = doc.origins.get(tuple(path))
    shown = dotted(exact.source_path) if exact else dotted(path)
    return (origin.key if key else origin.value), shown


def problem(doc: Document, path: PathT, message: str, key: bool = False, severity="error") -> Problem:
    loc, shown = where(doc, tuple(path), key)
    return Problem(loc, shown, message, severity)


# ----------------------------------------------------------------- schema errors


def schema_problems(doc: Document, data, validator, prefix: PathT = (), skip: tuple[str, ...] = ()) -> list[Problem]:
    """Translated schema errors; errors under a top-level key in ``skip`` are left to a
    more precise check (the method's own schema, applied per run)."""
    out: list[Problem] = []
    for error in _errors(validator, data):
        if error.absolute_path and error.absolute_path[0] in skip and not _about_the_key_itself(error):
            continue
        out.extend(_translate(doc, error, prefix))
    return out


_SEEN: dict[tuple, tuple] = {}  # (validator id, data as JSON) -> (validator, its errors); a few thousand at most


def _errors(validator, data) -> list:
    """``validator``'s errors for ``data``, computed once per validator and value: the runs of
    a recipe (seeds, tasks, sweep points) repeat the same method mapping and sections. The
    validator is kept with its errors, so its id cannot be reused while the entry lives."""
    try:
        key = (id(validator), json.dumps(data, sort_keys=True, allow_nan=True))
    except (TypeError, ValueError):  # not JSON (a date, a set): not cached
        return list(validator.iter_errors(data))
    found = _SEEN.get(key)
    if found is None:
        if len(_SEEN) > 4096:
            _SEEN.clear()
        found = _SEEN[key] = (validator, list(validator.iter_errors(data)))
    return found[1]


def _about_the_key_itself(error) -> bool:
    """An error on a skipped key's own value (``method: lora``, a scalar where a mapping
    goes, or no ``name``) that the more precise check would not see."""
    return len(error.absolute_path) == 1 and error.validator in ("type", "required")


NON_FINITE = "must be a finite number"


def non_finite_problems(doc: Document, data, path: PathT = ()) -> list[Problem]:
    """Numbers no setting can use, wherever they are: NaN and infinities (``.nan``,
    ``.inf``, ``1e999``), and integers beyond 64 bits (what torch and NumPy hold)."""
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in non_finite_problems(doc, v, path + (k,))]
    if isinstance(data, list):
        return [p for i, v in enumerate(data) for p in non_finite_problems(doc, v, path + (i,))]
    if isinstance(data, float) and math.isnan(data):
        return [problem(doc, path, f"{NON_FINITE}; got nan")]
    if isinstance(data, float) and math.isinf(data):
        return [problem(doc, path, f"{NON_FINITE}; got {data} (numbers beyond ±1.8e308 read as infinite)")]
    if isinstance(data, int) and not isinstance(data, bool) and not -(2**63) <= data < 2**63:
        return [problem(doc, path, f"{data} does not fit in 64 bits; use a smaller number")]
    return []


def describe_value(value) -> str:
    return f"{_JSON_TYPES.get(type(value), type(value).__name__)} ({value!r})" if not isinstance(value, (dict, list)) else _JSON_TYPES[type(value)]


def _translate(doc: Document, error, prefix: PathT) -> list[Problem]:
    path = prefix + tuple(error.absolute_path)
    kind, expected, instance, schema = error.validator, error.validator_value, error.instance, error.schema
    if kind == "additionalProperties" and isinstance(instance, dict):
        allowed = list(schema.get("properties", {}))
        extras = [k for k in instance if k not in allowed]
        out = []
        for extra in extras:
            hint = suggest(extra, allowed) or (f" (allowed here: {', '.join(allowed)})" if allowed else "")
            out.append(problem(doc, path + (extra,), f"unknown key '{extra}'{hint}", key=True))
        return out
    if kind == "required":
        missing = [k for k in expected if k not in instance]
        return [problem(doc, path, f"missing required key '{k}'", key=True) for k in missing]
    if kind == "type":
        types = [expected] if isinstance(expected, str) else list(expected)
        want = " or ".join(_TYPE_WORDS.get(t, t) for t in types)
        return [problem(doc, path, f"expected {want}, got {describe_value(instance)}")]
    if kind == "enum":
        choices = ", ".join(repr(c) for c in expected)
        same = [c for c in expected if not isinstance(c, str) and str(c) == instance]  # bits: "4" for 4
        hint = f" (write {same[0]!r} without quotes: a number, not a string)" if same else suggest(instance, expected)
        return [problem(doc, path, f"must be one of {choices}; got {instance!r}{hint}")]
    if kind == "const":
        return [problem(doc, path, f"must be {expected!r}; got {instance!r}")]
    if kind in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[kind]
        return [problem(doc, path, f"must be {op} {expected}; got {instance!r}")]
    if kind in ("minItems", "maxItems"):
        word = "at least" if kind == "minItems" else "at most"
        return [problem(doc, path, f"must have {word} {expected} item(s); got {len(instance)}")]
    if kind == "uniqueItems":
        return [problem(doc, path, "items must be unique; some appear twice")]
    if kind == "minProperties":
        return [problem(doc, path, f"must have at least {expected} entr{'y' if expected == 1 else 'ies'}")]
    if kind == "pattern":
        return [problem(doc, path, f"{instance!r} does not match the required pattern {expected}")]
    if kind == "minLength":
        return [problem(doc, path, "must not be empty")]
    if kind == "maxLength":
        return [problem(doc, path, f"must be at most {expected} characters long; got {len(instance)}")]
    if kind in ("oneOf", "anyOf"):
        # Report the branch the value was meant for (its type matched) precisely.
        meant = [e for e in error.context if e.validator != "type" and len(e.relative_schema_path) > 1]
        if meant:
            best = jsonschema.exceptions.best_match(meant)
            return _translate(doc, best, prefix)
        desc = schema.get("description", "")
        return [problem(doc, path, f"{describe_value(instance)} is not allowed here" + (f": {desc}" if desc else ""))]
    return [problem(doc, path, error.message)]



def dedupe(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        key = (str(p.location), p.path, p.message)
        if key not in seen:
            seen.add(key)
            out.append(p)

    def order(p: Problem):
        loc = p.location
        return (loc.source if loc else "", loc.line or 0 if loc else 0, loc.column or 0 if loc else 0)

    return sorted(out, key=order)


