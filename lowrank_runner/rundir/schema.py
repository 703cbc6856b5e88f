"""What ``lrr report`` reads of a run directory, as JSON Schemas: ``report.json`` (the
fields the terminal view, report.md and the comparison use, with their types),
``metrics.json`` and a multi-run recipe's ``summary.json``. A file that does not fit is
damaged (edited, truncated, half-deleted): :func:`check` says which field and how to fix
it, instead of an empty report or a traceback. Torch-free."""

from __future__ import annotations

from pathlib import Path

import jsonschema

from lowrank_runner.errors import RunFileError

_OBJECT = {"type": "object"}
_OBJECT_OR_NULL = {"type": ["object", "null"]}
_STRING_OR_NULL = {"type": ["string", "null"]}
_COUNT = {"type": ["integer", "null"]}
_NUMBER = {"type": ["number", "null"]}
_METRICS = {"type": ["object", "null"], "additionalProperties": _NUMBER}

# Every status a run's report.json can hold: completed (train/run_report.py), failed and
# interrupted (SIGINT/SIGTERM; train/run_dirs.py mark_status), with the reason in "error".
STATUSES = ["completed", "failed", "interrupted"]

# Every field a completed run's report.json has (train/run_report.py, rundir/write.py).
COMPLETED_FIELDS = ("format", "format_version", "recipe", "command", "run", "seeds", "backbone", "data", "method",
                    "targets", "modules", "trainable_params", "total_params", "steps", "best", "final_eval",
                    "environment", "files")

REPORT_SCHEMA = {
    "type": "object",
    "required": ["status"],
    "properties": {
        "format": {"const": "lowrank-runner-report"},
        "format_version": {"const": 1},
        "status": {"enum": STATUSES},
        "error": _STRING_OR_NULL,
        "started_at": _STRING_OR_NULL,
        "finished_at": _STRING_OR_NULL,
        "command": {"type": ["array", "null"], "items": {"type": "string"}},
        "cwd": _STRING_OR_NULL,
        "recipe": {"type": "object", "required": ["name", "hash", "config"], "properties": {
            "name": {"type": "string"}, "source": _STRING_OR_NULL, "hash": {"type": "string"},
            "config_hash": _STRING_OR_NULL, "config": _OBJECT, "resolved": _OBJECT_OR_NULL,
            "overrides": {"type": ["array", "null"], "items": {"type": "string"}}}},
        "run": {"type": "object", "properties": {"task": _STRING_OR_NULL, "seed": _COUNT, "resumed_from_step": _COUNT}},
        "seeds": {"type": ["object", "null"], "required": ["run", "data_order", "holdout_split", "recipe"],
                  "properties": {"recipe": {"type": "array"}}},
        "backbone": {"type": "object", "properties": {
            "name": _STRING_OR_NULL, "location": _STRING_OR_NULL, "source": _STRING_OR_NULL,
            "files": {"type": ["object", "null"], "additionalProperties": {
                "type": "object", "properties": {"bytes": {"type": "integer"}, "method": {"type": "string"}},
                "dependentRequired": {"bytes": ["method"]}}},
            "tokenizer": {"type": ["object", "null"], "required": ["name"]}}},
        "data": {"type": "object", "properties": {
            "files": {"type": ["array", "null"], "items": {
                "type": "object", "required": ["role", "path", "sha256", "bytes"]}},
            "splits": {"type": ["object", "null"], "additionalProperties": {
                "type": "object", "required": ["rows", "fingerprint"]}}}},
        "method": {"type": "object", "required": ["name"]},
        "targets": {"type": "array"},
        "modules": _COUNT,
        "adapter_params": _COUNT,
        "adapter_params_allocated": _COUNT,
        "trainable_params": _COUNT,
        "total_params": _COUNT,
        "trainable_percent": _NUMBER,
        "train_examples": _COUNT,
        "eval_examples": _COUNT,
        "holdout": {"type": ["object", "null"], "required": ["fraction", "seed", "test_examples"]},
        "steps": {"type": "object", "properties": {"total": _COUNT, "warmup": _COUNT, "per_epoch": _COUNT,
                                                   "epochs": _NUMBER}},
        "best": {"type": ["object", "null"], "properties": {
            "metric": _STRING_OR_NULL, "value": _NUMBER, "step": _COUNT, "epoch": _NUMBER, "eval": _METRICS,
            "checkpoint": _STRING_OR_NULL}},
        "final_eval": _METRICS,
        "test": {"type": ["object", "null"]},
        "test_examples": _OBJECT_OR_NULL,
        "per_epoch": {"type": ["array", "null"], "items": {
            "type": "object", "required": ["epoch", "last_step", "train_loss", "eval_step", "eval"],
            "properties": {"eval": _METRICS}}},
        "rank_pattern": {"type": ["object", "null"], "required": ["total_rank", "modules", "file", "heatmap"],
                         "properties": {"pattern": _OBJECT_OR_NULL}},
        "init_from": {"type": ["object", "null"], "required": ["path"]},
        "wall_time_s": _NUMBER,
        "peak_memory": {"type": ["object", "null"], "additionalProperties": _NUMBER},
        "environment": {"type": "object", "properties": {
            "hardware": {"type": "object", "properties": {"gpus": {"type": ["array", "null"], "items": {"type": "string"}}}},
            "lowrank_runner": _OBJECT,
            "packages": {"type": ["object", "null"], "additionalProperties": _STRING_OR_NULL}}},
        "files": {"type": "object", "properties": {"plots": {"type": "object", "additionalProperties": {"type": "string"}}}},
    },
    "if": {"properties": {"status": {"const": "completed"}}},
    "then": {"required": list(COMPLETED_FIELDS)},
}

METRICS_SCHEMA = {
    "type": "object",
    "properties": {
        "best": {"type": ["object", "null"], "properties": {"eval": _METRICS}},
        "last": {"type": ["object", "null"], "properties": {"eval": _METRICS}},
        "test": {"type": ["object", "null"]},
    },
}

SUMMARY_SCHEMA = {
    "type": "object",
    "required": ["runs"],
    "properties": {
        "runs": {"type": "array", "items": {
            "type": "object", "required": ["dir", "status"],
            "properties": {"dir": {"type": "string", "minLength": 1}, "status": {"type": "string"},
                           "task": _STRING_OR_NULL, "seed": _COUNT, "error": _STRING_OR_NULL}}},
    },
}


def check(data, schema: dict, path: Path, what: str, fix: str) -> None:
    """Raise :class:`RunFileError` naming ``path``, the field and ``fix`` when ``data``
    does not fit ``schema``. Missing fields are listed together (most of a report gone
    reads as such, not as its first missing key)."""
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(data))
    if not errors:
        return
    top = [e for e in errors if e.validator == "required" and not e.absolute_path]
    if top:
        missing = list(dict.fromkeys(name for e in top for name in e.validator_value if name not in data))
        count = f"{len(missing)} field{'s' if len(missing) > 1 else ''}"
        raise RunFileError(f"{path}: an incomplete {what}: missing {', '.join(missing)} ({count}); the file is "
                           f"damaged: {fix}")
    error = jsonschema.exceptions.best_match(errors)
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    raise RunFileError(f"{path}: {key}: {error.message}; the {what} is damaged: {fix}")
