"""Where a recipe reads and writes: the summary ``lrr validate`` prints for a valid recipe.

Reads: the recipe files (the recipe and every file it extends), the backbone and its
tokenizer, data files or directories, hub datasets, a chat run's template file
(``task.chat_template`` when it is a path, not a shipped template's name), and the
adapters runs start from (``training.init_from``). Writes: the parent of the run directories, ``output.dir`` (a
directory outside the working directory is allowed, and flagged). Torch-free, like
``lrr validate``.
"""

from __future__ import annotations

import os
from pathlib import Path

from lowrank_runner.recipe.compose import load_document
from lowrank_runner.recipe.document import Document
from lowrank_runner.recipe.expand import expand_runs, one_per_seed
from lowrank_runner.recipe.schema import resolve
from lowrank_runner.resources import expand_user, is_pkg_path, resolve_pkg_path
from lowrank_runner.tasks.registry import TASKS

_DATA_KEYS = ("train", "validation", "test")


def recipe_file_io(path: str | Path, overrides=()) -> dict:
    """:func:`recipe_io` of a recipe file (with ``--set`` overrides) that validates."""
    return recipe_io(load_document(path, overrides))


def recipe_io(doc: Document, runs: list | None = None) -> dict:
    """The files and places a composed, valid recipe document reads and writes (``runs``:
    its expanded runs, when the caller has them)."""
    resolved = resolve(doc.data)
    reads: list[dict] = [{"key": "recipe", "value": source, "from": "file", "path": _absolute(source)}
                         for source in doc.sources]
    backbone = resolved["backbone"]
    reads.append(_place("backbone.name", backbone["name"]))
    if backbone.get("tokenizer"):
        reads.append(_place("backbone.tokenizer", backbone["tokenizer"]))
    runs = expand_runs(doc) if runs is None else runs
    for run in one_per_seed(runs):  # its seeds read the same files
        reads += [dict(entry, task=run.task) for entry in _run_reads(resolve(run.doc.data))]
    out_dir = resolved["output"]["dir"]
    where = Path(out_dir) / resolved["name"] / "<timestamp>"
    writes = {"key": "output.dir", "value": out_dir, "runs": str(where), "path": os.path.abspath(where),
              "run_count": len(runs),
              "outside_working_directory": not Path(os.path.abspath(out_dir)).is_relative_to(Path.cwd().resolve())}
    return {"reads": _merge_tasks(reads), "writes": writes}


def _run_reads(config: dict) -> list[dict]:
    task = config.get("task") or {}
    out = []
    data = task.get("data")
    if isinstance(data, dict):
        out += [_place(f"task.data.{split}", data[split]) for split in _DATA_KEYS if isinstance(data.get(split), str)]
    elif task.get("data_dir"):
        out.append(_place("task.data_dir", task["data_dir"]))
    else:
        out.append({"key": "task.dataset", "value": task.get("dataset"), "from": "hub", "path": None})
    spec = TASKS.get(task.get("name"))
    out += [_place(key, value) for key, value in (spec.rules.reads(task) if spec else [])]  # a chat template's file
    init_from = (config.get("training") or {}).get("init_from")
    if isinstance(init_from, str):
        out.append(_place("training.init_from", init_from))
    return out


def _place(key: str, value: str) -> dict:
    """Where ``value`` (a pkg: path, a local path, or a hub id) is read from."""
    if is_pkg_path(value):
        return {"key": key, "value": value, "from": "package", "path": str(resolve_pkg_path(value).resolve())}
    local = expand_user(value)
    if key.startswith("backbone.") and not local.exists():
        return {"key": key, "value": value, "from": "hub", "path": None}
    return {"key": key, "value": value, "from": "file", "path": _absolute(str(local))}


def _merge_tasks(reads: list[dict]) -> list[dict]:
    """One entry per place, with the tasks that read it (``tasks``; absent if none)."""
    out: dict[tuple, dict] = {}
    for entry in reads:
        task = entry.pop("task", None)
        item = out.setdefault((entry["key"], entry["value"]), dict(entry))
        if task is not None and task not in item.setdefault("tasks", []):
            item["tasks"].append(task)
    return list(out.values())


def _absolute(path: str) -> str:
    return os.path.abspath(expand_user(path))


def describe(io: dict) -> list[str]:
    """The summary as indented lines for the terminal."""
    lines = []
    for entry in io["reads"]:
        lines.append(f"  reads  {entry['key']}: {_shown(entry)}")
    w = io["writes"]
    notes = [f"{w['run_count']} runs, one subdirectory each"] if w["run_count"] > 1 else []
    notes += ["outside the working directory"] if w["outside_working_directory"] else []
    notes += ["or --output DIR"]
    lines.append(f"  writes output.dir: {w['runs']}/ = {w['path']}/ ({'; '.join(notes)})")
    return lines


def _shown(entry: dict) -> str:
    tasks = f" [{', '.join(entry['tasks'])}]" if entry.get("tasks") and len(entry["tasks"]) > 1 else ""
    if entry["from"] == "hub":
        what = entry["value"] or "the task's own dataset"
        return f"{what} (Hugging Face hub, or its local cache){tasks}"
    if entry["value"] == entry["path"]:
        return f"{entry['path']}{tasks}"
    return f"{entry['value']} = {entry['path']}{tasks}"
