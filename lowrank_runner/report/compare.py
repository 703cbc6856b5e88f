"""Read run directories for ``lrr report`` and tell how runs differ: recipe keys,
inputs (backbone and data fingerprints), environment, and metrics. Torch-free."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lowrank_runner.errors import RunFileError, UsageError
from lowrank_runner.recipe.document import load_yaml
from lowrank_runner.report.schema import METRICS_SCHEMA, REPORT_SCHEMA, SUMMARY_SCHEMA, check
from lowrank_runner.train import artifacts as art

SUMMARY_FILE = art.SUMMARY_FILE
ABSENT = "(absent)"


@dataclass
class RunReport:
    label: str
    dir: Path
    report: dict
    metrics: dict | None = None  # metrics.json, when the run finished
    warnings: list[str] = field(default_factory=list)  # files that are gone, shown beside the report

    @property
    def status(self) -> str:
        return self.report.get("status", "unknown")


def _fix(run_dir: Path) -> str:
    return f"restore it from a copy, or train the run again (lrr run {run_dir / art.RECIPE_FILE} --output NEW_DIR)"


def _read_json(path: Path, what: str, fix: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunFileError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg}); the {what} is damaged: "
                           f"{fix}") from None
    except RecursionError:
        raise RunFileError(f"{path}: not valid JSON (nested too deeply); the {what} is damaged: {fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunFileError(f"{path}: cannot read the {what}: {getattr(exc, 'strerror', None) or exc}") from None


def _not_finished(run_dir: Path) -> RunFileError:
    """A run directory without report.json that holds a run in progress or stopped."""
    steps = sorted((int(p.name.split("-")[-1]), p.name) for p in (run_dir / "checkpoints").glob("step-*")
                   if p.name.split("-")[-1].isdigit())
    state = (f"it stopped at step {steps[-1][0]} (checkpoints/{steps[-1][1]}) and can be resumed" if steps
             else "it is still training, or was interrupted before its first checkpoint")
    return RunFileError(f"{run_dir}: the run has not finished: {state}; it has no {art.REPORT_FILE} until it "
                        "completes. Continue it with: lrr run RECIPE --output RUN_DIR --resume")


def _completed_without_report(run_dir: Path) -> bool:
    """The files a run writes when it ends (metrics.json, adapter/) with its checkpoints
    removed, as after report.json (train/loop.py write_artifacts): a run that completed.
    With checkpoints left it stopped while writing them, and resumes."""
    return ((run_dir / art.METRICS_FILE).is_file() and (run_dir / art.ADAPTER_DIR).is_dir()
            and not any((run_dir / "checkpoints").glob("step-*")))


def _report_gone(run_dir: Path) -> RunFileError:
    """A completed run (its metrics.json and adapter/ are there) whose report.json is gone."""
    return RunFileError(
        f"{run_dir / art.REPORT_FILE}: missing from a run that completed (its {art.METRICS_FILE} and "
        f"{art.ADAPTER_DIR}/ are there): the report is written once, when the run ends, and cannot be rebuilt from "
        f"the other files; restore it from a copy, or train the run again (lrr run {run_dir / art.RECIPE_FILE} "
        "--output NEW_DIR). The adapter can still be exported: lrr export RUN_DIR --merge --out DIR")


def load_run(run_dir: Path, label: str | None = None) -> RunReport:
    """One run directory's report, every file it uses checked; a clear error for
    anything else (no run, an unfinished run, a damaged file)."""
    if not run_dir.exists():
        raise UsageError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: not a directory (give a run directory written by 'lrr run')")
    path = run_dir / art.REPORT_FILE
    if not path.is_file():
        if _completed_without_report(run_dir):
            raise _report_gone(run_dir)
        if (run_dir / art.METRICS_LOG).is_file() or (run_dir / "checkpoints").is_dir():
            raise _not_finished(run_dir)
        raise UsageError(f"{run_dir}: not a run directory: no {art.REPORT_FILE} (written by 'lrr run' when a run ends) "
                         f"and no {SUMMARY_FILE} (written by a recipe with several runs)")
    report = _read_json(path, "run report", _fix(run_dir))
    check(report, REPORT_SCHEMA, path, "run report", _fix(run_dir))
    metrics_path = run_dir / art.METRICS_FILE
    metrics = None
    if metrics_path.is_file():
        metrics = _read_json(metrics_path, "metrics file", _fix(run_dir))
        check(metrics, METRICS_SCHEMA, metrics_path, "metrics file", _fix(run_dir))
    warnings = []
    if report["status"] == "completed" and not (run_dir / art.METRICS_LOG).is_file():
        warnings.append(f"{run_dir / art.METRICS_LOG}: missing: the run's training history is gone (the report keeps "
                        "its per-epoch rows; --render cannot redraw the plots)")
    return RunReport(label or str(run_dir), run_dir, report, metrics, warnings)


def _summary_runs(root: Path) -> list[RunReport]:
    from lowrank_runner.tables.sources import run_dir_of

    path = root / SUMMARY_FILE
    fix = "restore it from a copy, or give the run directories themselves"
    summary = _read_json(path, "recipe summary", fix)
    check(summary, SUMMARY_SCHEMA, path, "recipe summary", fix)
    out = []
    for entry in summary["runs"]:
        run_dir = run_dir_of(root, entry)  # the runs of a recipe live under summary.json (a sweep: task/POINT/seedN)
        label = f"{root}/{run_dir.relative_to(root).as_posix()}"
        if (run_dir / art.REPORT_FILE).is_file():
            out.append(load_run(run_dir, label))
        elif entry["status"] == "completed":
            raise RunFileError(f"{run_dir}: {path} lists this run as completed, but its {art.REPORT_FILE} is gone "
                               "(deleted or moved?); restore the run directory, or compare the others by naming "
                               "their directories")
        else:  # a run that failed or stopped before writing its report: what the summary knows
            out.append(RunReport(label, run_dir, {"status": entry["status"], "error": entry.get("error"),
                                                  "run": {"task": entry.get("task"), "seed": entry.get("seed")}}))
    if not out:
        raise RunFileError(f"{path}: lists no runs; {fix}")
    return out


def not_completed(run: RunReport) -> str | None:
    """What to tell about a run that did not complete (None for a completed one)."""
    if run.status == "completed":
        return None
    error = run.report.get("error")
    traceback = run.dir / "error.txt"
    where = f"; the traceback is in {traceback}" if traceback.is_file() else ""
    if run.status == "stopped":
        return f"{run.label}: the run stopped before the end; continue it with: lrr run RECIPE --output RUN_DIR --resume"
    if run.status == "interrupted":
        return _interrupted(run.label, error)
    return (f"{run.label}: the run {run.status}" + (f": {error}" if error else "") + where
            + "; fix the cause and train it again")


# What train/run_dirs.py mark_interrupted records: "interrupted; resumable from WHERE with: COMMAND".
_RESUMABLE = re.compile(r"resumable from (?P<where>.+?) with: (?P<command>.+)$")


def _interrupted(label: str, error) -> str:
    """A run stopped by SIGINT/SIGTERM: where it resumes from and the command (run from
    the directory the run was started in), as recorded in its report.json."""
    found = _RESUMABLE.search(error) if isinstance(error, str) else None
    if found is None:
        return (f"{label}: the run was interrupted (SIGINT/SIGTERM) before it finished; it can be resumed: "
                "lrr run RECIPE --output RUN_DIR --resume")
    return (f"{label}: the run was interrupted (SIGINT/SIGTERM) before it finished; it resumes from "
            f"{found['where']}, from the directory it was started in, with: {found['command']}")


def expand(paths: list[Path]) -> list[RunReport]:
    """Run directories; a multi-run directory (with summary.json) stands for its runs, a
    search's directory for its final runs (RUN_DIR/best)."""
    from lowrank_runner.search.layout import runs_of

    if not paths:
        raise UsageError("give at least one run directory: lrr report RUN_DIR [RUN_DIR ...]")
    runs: list[RunReport] = []
    for path in map(runs_of, paths):
        if path.is_dir() and (path / SUMMARY_FILE).is_file() and not (path / art.REPORT_FILE).is_file():
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
    path = run.dir / art.RECIPE_FILE
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
