"""The adapter of a finished run (``RUN_DIR/adapter/``, or an adapter bundle): its
``adapter_config.json`` (format, writer and checked reader) and its safetensors files.

Written when a run ends (:func:`adapter_config`, :func:`save_adapter`); read by the
exports and by ``training.init_from``. A damaged or missing file is a
:class:`~lowrank_runner.errors.RunFileError` naming the file and the repair, never a
traceback."""

from __future__ import annotations

from pathlib import Path

from lowrank_runner.errors import RunFileError
from lowrank_runner.rundir.files import read_json_file, write_json
from lowrank_runner.rundir.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEAD_WEIGHTS, RECIPE_FILE
from lowrank_runner.version import __version__

ADAPTER_FORMAT = "lowrank-runner-adapter"
ADAPTER_FORMAT_VERSION = 1
# What lowrank-runner reads of adapter_config.json (written by :func:`adapter_config`).
ADAPTER_CONFIG_SCHEMA = {
    "type": "object",
    "required": ["format", "format_version", "method", "targets", "modules", "backbone", "task", "head"],
    "properties": {
        "format": {"const": ADAPTER_FORMAT},
        "format_version": {"type": "integer"},
        "method": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "minLength": 1}}},
        "targets": {"type": "array"},  # [] for a method without adapters (full, bitfit)
        "modules": {"type": "array", "items": {
            "type": "object", "required": ["path"],
            "properties": {"path": {"type": "string", "minLength": 1},
                           "symbols": {"type": "array", "items": {"type": "string"}},
                           "groups": {"type": ["array", "null"], "items": {"type": "string"}}}}},
        "backbone": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "minLength": 1}, "resolved": {"type": ["string", "null"]}}},
        "task": {"type": "object", "required": ["name", "model_class"], "properties": {
            "name": {"type": "string"},
            "model_class": {"type": "string", "pattern": "^[A-Z][A-Za-z0-9]*$"},
            "num_labels": {"type": "integer", "minimum": 1},
            "id2label": {"type": "object", "propertyNames": {"pattern": "^[0-9]+$"}},
            "label2id": {"type": "object", "additionalProperties": {"type": "integer"}}}},
        "head": {"type": "array", "items": {"type": "string", "minLength": 1}, "uniqueItems": True},
        # backbone parameters the method trained itself (full fine-tuning, BitFit), in adapter.safetensors
        "base": {"type": "array", "items": {"type": "string", "minLength": 1}, "uniqueItems": True},
        # whether the method has parameters of its own beside the modules' (lrr_shared.*: CondLoRA's shared
        # factors, a prefix acting on the whole model); absent in files written before it was recorded
        "shared": {"type": "boolean"},
        "recipe_hash": {"type": ["string", "null"]},
        "config_hash": {"type": ["string", "null"]},
    },
}



def adapter_config(*, method: dict, targets: list, modules: list[dict], backbone: dict, task: dict, head: list[str],
                   base: list[str], recipe_hash: str, config_hash: str, shared: bool = False) -> dict:
    """The ``adapter_config.json`` of a run: the method and its parameters, the recipe's
    targets and the module paths they matched (``modules``: path, symbols, q/k/v groups),
    the backbone (the recipe's entry with where it was loaded from), the task head
    (``task``: name, model class and head config; ``head``: its parameter names), the
    backbone tensors the method trained itself (``base``: full, bitfit), whether it has
    parameters of its own beside the modules' (``shared``: CondLoRA, a prefix) and the hashes."""
    return {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "lowrank_runner_version": __version__,
        "method": method,
        "targets": targets,
        "modules": modules,
        "backbone": backbone,
        "task": task,
        "head": head,
        "base": base,
        "shared": shared,
        "recipe_hash": recipe_hash,
        "config_hash": config_hash,
    }


def save_adapter(directory: Path, adapter_state: dict, head_state: dict, config: dict) -> None:
    """The adapter (and head) tensors as safetensors, and ``adapter_config.json``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter_state.items()}, str(directory / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    if head_state:
        save_file({k: v.contiguous() for k, v in head_state.items()}, str(directory / HEAD_WEIGHTS),
                  metadata={"format": "pt"})
    write_json(directory / ADAPTER_CONFIG, config)


def repair_hint(source: Path, kind: str) -> str:
    """How to repair a damaged file of ``source`` (a run directory or a bundle)."""
    if kind == "bundle":
        return "restore it from a copy, or export the bundle again from its run (lrr export RUN_DIR --adapter --out DIR)"
    return f"restore it from a copy, or train the run again (lrr run {source / RECIPE_FILE} --output NEW_DIR)"



def read_adapter_json(path: Path, source: Path, kind: str):
    """``adapter_config.json`` of ``source`` as JSON (unchecked; :func:`read_adapter_config` checks it)."""
    return read_json_file(path, "adapter config", repair_hint(source, kind))


def read_adapter_config(path: Path, source: Path, kind: str = "run", methods=None) -> dict:
    """``adapter_config.json``, checked against :data:`ADAPTER_CONFIG_SCHEMA` and its
    format version; with ``methods`` (the registered method names), its method must be
    one of them."""
    import jsonschema

    data = read_adapter_json(path, source, kind)
    version = data.get("format_version") if isinstance(data, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > ADAPTER_FORMAT_VERSION:
        raise RunFileError(f"{path}: format_version {version} was written by a newer lowrank-runner (this one, "
                           f"{__version__}, reads format_version {ADAPTER_FORMAT_VERSION}); upgrade: "
                           "pip install -U lowrank-runner")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(ADAPTER_CONFIG_SCHEMA).iter_errors(data))
    if error is None and version != ADAPTER_FORMAT_VERSION:
        error = jsonschema.ValidationError(f"{version} is not a format_version this lowrank-runner reads "
                                           f"({ADAPTER_FORMAT_VERSION})", path=["format_version"])
    if error is not None:
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise RunFileError(f"{path}: {key}: {error.message}; the file is damaged: {repair_hint(source, kind)}")
    if not data["modules"] and not data.get("base") and not data.get("shared"):
        raise RunFileError(f"{path}: modules: [], no trained backbone parameters ('base') and no parameters of the "
                           "method's own ('shared'): the run adapted nothing; "
                           f"the file is damaged: {repair_hint(source, kind)}")
    task = data["task"]
    if "num_labels" in task and "id2label" in task and task["num_labels"] != len(task["id2label"]):
        raise RunFileError(f"{path}: task.num_labels is {task['num_labels']} but task.id2label names "
                           f"{len(task['id2label'])} labels; the file is damaged: {repair_hint(source, kind)}")
    name = data["method"]["name"]
    if methods is not None and name not in methods:
        raise RunFileError(f"{path}: method.name: '{name}' is not a registered method (registered: "
                           f"{', '.join(sorted(methods))}); install the package that provides it, or the file is "
                           f"damaged: {repair_hint(source, kind)}")
    return data


def read_tensors(path: Path, source: Path, kind: str = "run") -> dict:
    """A safetensors file of ``source``; a missing or damaged one is a :class:`RunFileError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise RunFileError(f"{path}: missing; {repair_hint(source, kind)}") from None
    except (SafetensorError, OSError, ValueError):
        raise RunFileError(f"{path}: not a readable safetensors file (truncated or corrupted); {repair_hint(source, kind)}") from None

