"""Read run directories for ``lrr report`` and tell how runs differ: recipe keys,
inputs (backbone and data fingerprints), environment, and metrics. Torch-free."""

from __future__ import annotations

import json
from pathlib import Path

from lowrank_runner.errors import UsageError
from lowrank_runner.recipe.document import load_yaml
from lowrank_runner.rundir.layout import RECIPE_FILE, REPORT_FILE, SUMMARY_FILE
from lowrank_runner.rundir.reports import RunReport, load_run, read_summary
from lowrank_runner.rundir.search import runs_of

ABSENT = "(absent)"
SUMMARY_FIX = "restore it from a copy, or give the run directories themselves"


def _summary_runs(root: Path) -> list[RunReport]:
    """The runs a recipe root's summary.json lists: their reports, or (a run that failed
    or stopped before writing its report) what the summary knows."""
    _, entries = read_summary(root, SUMMARY_FIX, ", or compare the others by naming their directories")
    out = []
    for entry in entries:
        run_dir = Path(entry["dir"])
        label = f"{root}/{run_dir.relative_to(root).as_posix()}"
        if (run_dir / REPORT_FILE).is_file():
            out.append(load_run(run_dir, label))
        else:
            out.append(RunReport(label, run_dir, {"status": entry["status"], "error": entry.get("error"),
                                                  "run": {"task": entry.get("task"), "seed": entry.get("seed")}}))
    return out


def expand(paths: list[Path]) -> list[RunReport]:
    """Run directories; a multi-run directory (with summary.json) stands for its runs, a
    search's directory for its final runs (RUN_DIR/best)."""
    if not paths:
        raise UsageError("give at least one run directory: lrr report RUN_DIR [RUN_DIR ...]")
    runs: list[RunReport] = []
    for path in map(runs_of, paths):
        if path.is_dir() and (path / SUMMARY_FILE).exists() and not (path / REPORT_FILE).exists():
            runs += _summary_runs(path)
        else:
            runs.append(load_run(path))
    return runs


# ------------------------------------------------------------------ differences


def flatten(data, prefix: str = "") -> dict:
    """Nested mappings as dotted keys (lists stay values): {"a": {"b": 1}} → {"a.b": 1}."""
    if not isinstance(data, dict):
        return {prefix: data} if prefix else {}
    out = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def differences(flat: list[dict]) -> dict[str, list]:
    """The keys whose values are not the same in every run (``ABSENT`` where missing)."""
    keys = list(dict.fromkeys(k for f in flat for k in f))
    out = {}
    for key in keys:
        values = [f.get(key, ABSENT) for f in flat]
        if any(json.dumps(v, sort_keys=True, default=str) != json.dumps(values[0], sort_keys=True, default=str)
               for v in values[1:]):
            out[key] = values
    return out


def recipe_config(run: RunReport) -> dict:
    """The run's resolved recipe: from report.json, else its recipe.yaml."""
    config = (run.report.get("recipe") or {}).get("config")
    if isinstance(config, dict):
        return config
    path = run.dir / RECIPE_FILE
    if path.is_file():
        data = load_yaml(path).data  # a damaged file: an error with its line and column
        return data if isinstance(data, dict) else {}
    return {}


def inputs(report: dict) -> dict:
    """What identifies a run's inputs: the backbone's and the data's identity."""
    b, d = report.get("backbone"), report.get("data")
    out = {}
    if isinstance(b, dict):
        out["backbone"] = {k: b.get(k) for k in ("location", "source", "revision", "commit", "fingerprint")}
    elif b is not None:
        out["backbone"] = {"location": b}
    if isinstance(d, dict):
        out["data"] = {"source": d.get("source"), "dataset": d.get("dataset"), "revision": d.get("revision"),
                       "fingerprint": d.get("fingerprint"),
                       "files": {f["role"]: f["sha256"] for f in d.get("files") or []} or None,
                       "rows": {n: s.get("rows") for n, s in (d.get("splits") or {}).items()} or None}
    return out


def metric_rows(runs: list[RunReport]) -> tuple[list[str], list[dict]]:
    """Per run: status, selection metric, best (value, step) and every metric of the best
    checkpoint, the last evaluation and the test set; returns (metric names, rows)."""
    names: list[str] = []
    rows = []
    for run in runs:
        r = run.report
        best = (run.metrics or {}).get("best") or r.get("best") or {}
        last = ((run.metrics or {}).get("last") or {}).get("eval") or r.get("final_eval") or {}
        test = (run.metrics or {}).get("test") or r.get("test") or {}
        for group in (best.get("eval") or {}, last, test):
            names += [k for k in group if k not in names]
        rows.append({
            "run": run.label, "status": run.status, "task": (r.get("run") or {}).get("task"),
            "seed": (r.get("run") or {}).get("seed"), "method": (r.get("method") or {}).get("name"),
            "metric": best.get("metric"), "best": best.get("value"), "best_step": best.get("step"),
            "best_eval": best.get("eval") or {}, "last_eval": last, "test": test or None,
            "trainable_params": r.get("trainable_params"), "wall_time_s": r.get("wall_time_s"),
        })
    return names, rows


def compare(runs: list[RunReport]) -> dict:
    """Everything ``lrr report`` shows for several runs, as plain data (``--json``)."""
    names, rows = metric_rows(runs)
    return {
        "runs": [{"label": r.label, "dir": str(r.dir), "status": r.status,
                  "recipe_hash": (r.report.get("recipe") or {}).get("hash"),
                  "config_hash": (r.report.get("recipe") or {}).get("config_hash")} for r in runs],
        "recipe_differences": differences([flatten(recipe_config(r)) for r in runs]),
        "input_differences": differences([flatten(inputs(r.report)) for r in runs]),
        "environment_differences": differences([flatten(r.report.get("environment") or {}) for r in runs]),
        "metric_names": names,
        "metrics": rows,
    }
