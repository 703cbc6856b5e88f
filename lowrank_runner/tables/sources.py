"""Where a table's runs come from: the recipe ``lrr run`` just ran (its summary), or the
output directories of earlier runs (``lrr report --table DIR ...``): a multi-run
recipe's ``summary.json`` or a single run's ``report.json``. Every file is checked
(rundir/schema.py); anything else is a clear error. Torch-free."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lowrank_runner.errors import UsageError
from lowrank_runner.rundir.layout import RECIPE_FILE, REPORT_FILE, SUMMARY_FILE
from lowrank_runner.rundir.reports import load_run, read_summary, run_dir_of
from lowrank_runner.rundir.search import runs_of
from lowrank_runner.tables.build import Source


def recipe_tasks(resolved: dict) -> list[str]:
    """The recipe's tasks in its order: the keys of ``tasks:``, else ``task.name``."""
    tasks = resolved.get("tasks")
    if isinstance(tasks, dict) and tasks:
        return list(tasks)
    name = (resolved.get("task") or {}).get("name")
    return [name] if name else []


def recipe_source(recipe, summary: list[dict]) -> Source:
    """The runs of a recipe just run: its tasks and sweep points in the recipe's order."""
    tasks = list(dict.fromkeys(run.task for run in recipe.runs))
    points = {getattr(run, "label", ""): dict(getattr(run, "point", {}) or {}) for run in recipe.runs}
    resolved = getattr(recipe, "resolved", None) or {}
    return Source(recipe.name, tasks, summary, points, method=method_name(resolved), resolved=resolved)


def method_name(resolved: dict) -> str:
    """``method.name`` of a resolved recipe ("" when it has none)."""
    method = resolved.get("method") if isinstance(resolved, dict) else None
    name = method.get("name") if isinstance(method, dict) else None
    return name if isinstance(name, str) else ""


def _not_an_output(path: Path) -> UsageError:
    return UsageError(f"{path}: not a recipe's output directory: no {SUMMARY_FILE} (written by a recipe with "
                      f"several runs) and no {REPORT_FILE} (a single run); give the directories 'lrr run' wrote "
                      "(its --output), one per recipe")


def _summary_source(root: Path) -> tuple[Source, dict]:
    summary, entries = read_summary(root, "restore it from a copy, or run the recipe again with --resume")
    resolved = None
    for entry in entries:
        if entry["status"] == "completed":
            report = load_run(Path(entry["dir"])).report
            resolved = resolved or (report.get("recipe") or {}).get("resolved")
    resolved = resolved or _layout_of_a_run(root, summary["runs"])
    name = summary.get("recipe") or (resolved or {}).get("name") or root.name
    return _source(name, resolved or {}, entries), resolved or {}


def _layout_of_a_run(root: Path, entries: list[dict]) -> dict | None:
    """No run completed (stopped, interrupted): the table's layout (``output``) from a
    run's recipe.yaml, which every started run has."""
    from lowrank_runner.errors import LrrError
    from lowrank_runner.recipe.document import load_yaml

    for entry in entries:
        path = run_dir_of(root, entry) / RECIPE_FILE
        if path.is_file():
            try:
                config = load_yaml(path).data
            except LrrError:
                continue
            if isinstance(config, dict) and isinstance(config.get("output"), dict):
                return {"name": config.get("name"), "output": config["output"]}
    return None


def _single_source(run_dir: Path) -> tuple[Source, dict]:
    run = load_run(run_dir)
    report = run.report
    resolved = (report.get("recipe") or {}).get("resolved") or {}
    meta = report.get("run") or {}
    entry = {"task": meta.get("task"), "seed": meta.get("seed"), "dir": str(run_dir), "status": run.status,
             "best": report.get("best"), "test": report.get("test"),
             "point": meta.get("point") or {}, "label": meta.get("label") or ""}
    name = (report.get("recipe") or {}).get("name") or run_dir.name
    return _source(name, resolved, [entry]), resolved


def _source(name: str, resolved: dict, entries: list[dict]) -> Source:
    tasks = list(dict.fromkeys(recipe_tasks(resolved) + [e["task"] for e in entries if e.get("task")]))
    points = {e.get("label", ""): e.get("point") or {} for e in entries}
    return Source(name, tasks, entries, points, method=method_name(resolved), resolved=resolved)


def read_output(path: Path) -> tuple[Source, dict]:
    """One recipe's output directory: its runs, and its resolved recipe (for the layout)."""
    if not path.exists():
        raise UsageError(f"{path}: no such directory")
    if not path.is_dir():
        raise UsageError(f"{path}: not a directory (give the output directory of a recipe run by 'lrr run')")
    path = runs_of(path)  # a search's directory: its final runs, path/best
    if (path / SUMMARY_FILE).exists() and not (path / REPORT_FILE).exists():  # a directory in a file's place:
        return _summary_source(path)  # read, and named as damaged
    if (path / REPORT_FILE).exists():
        return _single_source(path)
    raise _not_an_output(path)


def _shared_tasks(sources: list[Source], paths: list[Path]) -> None:
    first = set(sources[0].tasks)
    for source, path in zip(sources[1:], paths[1:]):
        if not first & set(source.tasks):
            raise UsageError(f"{path}: its recipe {source.name!r} runs {', '.join(source.tasks)}, which "
                             f"{paths[0]} ({sources[0].name!r}: {', '.join(sources[0].tasks)}) does not: a table "
                             "compares methods on the same tasks; give the directories of one comparison, or "
                             "build one table per task set")


def distinct_outputs(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """The directories given, each once: a directory named twice (``D D``, ``D ./D``, a
    search's ``D`` and ``D/best``) would add its rows twice and bold the copies. Returns
    the paths in first-given order and a note per repeat."""
    kept: dict[Path, Path] = {}
    notes = []
    for path in paths:
        key = runs_of(path).resolve() if path.is_dir() else path
        if key in kept:
            notes.append(f"{path}: the same output directory as {kept[key]}, read once")
        else:
            kept[key] = path
    return list(kept.values()), notes


def read_outputs(paths: list[Path]) -> tuple[list[Source], dict]:
    """Several recipes' output directories: their sources (rows named by recipe, made
    unique by the directory name), and the first one's resolved recipe (the layout)."""
    if not paths:
        raise UsageError("give at least one output directory: lrr report --table DIR [DIR ...]")
    read = [read_output(p) for p in paths]
    sources = [s for s, _ in read]
    _shared_tasks(sources, paths)
    for name in dict.fromkeys(s.name for s in sources):
        group = [(s, p) for s, p in zip(sources, paths) if s.name == name]
        if len(group) > 1:
            _tell_apart(group)
    return sources, read[0][1]


# ------------------------------------------------------------- what the joined recipes trained differently

ABSENT = "(absent)"
# Keys of a resolved recipe that change what a run learns, besides every training.* key
# that is not bookkeeping (TRAINING_BOOKKEEPING): the backbone and the data a run sees.
SETTING_KEYS = ("backbone.name", "backbone.revision", "backbone.dtype", "backbone.quantization", "task.max_length",
                "task.max_train_samples", "task.holdout_fraction", "task.label_smoothing")
TRAINING_BOOKKEEPING = ("seed", "eval_every", "log_every", "log_update_norm", "checkpoint_every", "checkpoints_kept",
                        "dataloader_workers", "eval_batch_size", "divergence", "fsdp", "gradient_checkpointing",
                        "per_device_batch_size", "gradient_accumulation_steps")
NOT_DISTINGUISHING = ("name", "description", "output", "sweep")


@dataclass(frozen=True)
class SettingDifference:
    """One setting the joined recipes trained with differently: its dotted key and each
    source's value as text (``(absent)`` where its recipe has none)."""

    key: str
    values: tuple[tuple[str, str], ...]  # (source, value)

    @property
    def line(self) -> str:
        return f"{self.key}: " + "; ".join(f"{name} {value}" for name, value in self.values)


def flat(data: dict, prefix: str = "") -> dict:
    """A nested mapping as dotted keys (``training.learning_rate``); lists stay values."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def shown(value) -> str:
    """A recipe value as text: a string as it is, anything else as compact JSON."""
    if value is ABSENT or isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), default=str)


def is_setting(key: str) -> bool:
    parts = key.split(".")
    if parts[0] == "training":
        return len(parts) > 1 and parts[1] not in TRAINING_BOOKKEEPING
    return any(key == k or key.startswith(k + ".") for k in SETTING_KEYS)


def _swept(sources: list[Source]) -> set[str]:
    return {key for s in sources for point in s.points.values() for key in point}


def source_title(source: Source) -> str:
    return f"{source.name} ({', '.join(source.tags)})" if source.tags else source.name


def setting_differences(sources: list[Source]) -> list[SettingDifference]:
    """The training settings (:func:`is_setting`) the sources' resolved recipes give
    different values, one per key; a key some source sweeps is its rows' label, not a
    difference. Sources whose recipe is unknown are left out."""
    known = [s for s in sources if s.resolved]
    if len(known) < 2:
        return []
    settings = [{k: v for k, v in flat(s.resolved).items() if is_setting(k)} for s in known]
    swept = _swept(known)
    out = []
    for key in sorted(set().union(*settings) - swept):
        values = [shown(each.get(key, ABSENT)) for each in settings]
        if len(set(values)) > 1:
            out.append(SettingDifference(key, tuple(zip((source_title(s) for s in known), values))))
    return out


def _distinguishing(sources: list[Source]) -> list[str]:
    """The dotted keys whose values differ between sources of one recipe, training
    settings first; ``method.*`` left to the row's method where the methods differ."""
    flats = [{k: v for k, v in flat(s.resolved).items() if k.split(".")[0] not in NOT_DISTINGUISHING}
             for s in sources]
    skip = "method." if len({s.method for s in sources}) > 1 else None
    keys = [k for k in sorted(set().union(*flats)) if not (skip and k.startswith(skip))
            and len({shown(f.get(k, ABSENT)) for f in flats}) > 1]
    return sorted(keys, key=lambda k: not is_setting(k))


def _tell_apart(group: list[tuple[Source, Path]]) -> None:
    """Sources of recipes with one name: tagged with the keys a ``--set`` changed
    (``epochs=4``, at most 3); where that still leaves two with the same rows (tags and
    sweep labels alike), those are tagged with their directory's name."""
    keys = _distinguishing([s for s, _ in group])[:3]
    for source, _ in group:
        flat_recipe = flat(source.resolved)
        source.tags = [f"{k.rsplit('.', 1)[-1]}={shown(flat_recipe.get(k, ABSENT))}" for k in keys]
    rows = [(tuple(s.tags), label) for s, _ in group for label in s.points or [""]]
    for source, path in group:
        if any(rows.count((tuple(source.tags), label)) > 1 for label in source.points or [""]):
            source.tags = [*source.tags, path.name]
