"""Reading a run directory's results back: a run's ``report.json`` and ``metrics.json``
(:func:`load_run`, every file checked against :mod:`lowrank_runner.rundir.schema`) and a
recipe root's ``summary.json`` (:func:`read_summary`, each entry's run directory found
even when the root moved). An unfinished, stopped or damaged run is a clear error or a
status with what to do; never a traceback. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lowrank_runner.errors import RunFileError, UsageError
from lowrank_runner.rundir.files import read_json_file
from lowrank_runner.rundir.layout import (ADAPTER_DIR, CHECKPOINTS_DIR, ERROR_FILE, METRICS_FILE, METRICS_LOG,
                                          RECIPE_FILE, REPORT_FILE, SUMMARY_FILE, checkpoint_dirs, checkpoint_step)
from lowrank_runner.rundir.lock import holder
from lowrank_runner.rundir.schema import METRICS_SCHEMA, REPORT_SCHEMA, SUMMARY_SCHEMA, check
from lowrank_runner.rundir.status import resumable_text


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
    return f"restore it from a copy, or train the run again (lrr run {run_dir / RECIPE_FILE} --output NEW_DIR)"


def _not_finished(run_dir: Path) -> RunFileError:
    """A run directory without report.json that holds a run in progress or stopped."""
    owner = holder(run_dir)
    if owner is not None:
        return RunFileError(f"{run_dir}: the run has not finished: {owner.describe()} is training it now; it has no "
                            f"{REPORT_FILE} until it completes")
    done = checkpoint_dirs(run_dir)
    state = "it is still training, or was interrupted before its first checkpoint"
    if done:
        state = f"it stopped at step {checkpoint_step(done[-1])} ({CHECKPOINTS_DIR}/{done[-1].name}) and can be resumed"
    return RunFileError(f"{run_dir}: the run has not finished: {state}; it has no {REPORT_FILE} until it "
                        "completes. Continue it with: lrr run RECIPE --output RUN_DIR --resume")


def _completed_without_report(run_dir: Path) -> bool:
    """The files a run writes when it ends (metrics.json, adapter/) with its checkpoints
    removed, as after report.json (train/loop.py write_artifacts): a run that completed.
    With checkpoints left it stopped while writing them, and resumes."""
    return ((run_dir / METRICS_FILE).is_file() and (run_dir / ADAPTER_DIR).is_dir()
            and not checkpoint_dirs(run_dir, finished=False))


def _report_gone(run_dir: Path) -> RunFileError:
    """A completed run (its metrics.json and adapter/ are there) whose report.json is gone."""
    return RunFileError(
        f"{run_dir / REPORT_FILE}: missing from a run that completed (its {METRICS_FILE} and "
        f"{ADAPTER_DIR}/ are there): the report is written once, when the run ends, and cannot be rebuilt from "
        f"the other files; restore it from a copy, or train the run again (lrr run {run_dir / RECIPE_FILE} "
        "--output NEW_DIR). The adapter can still be exported: lrr export RUN_DIR --merge --out DIR")


def load_run(run_dir: Path, label: str | None = None) -> RunReport:
    """One run directory's report, every file it uses checked; a clear error for
    anything else (no run, an unfinished run, a damaged file)."""
    if not run_dir.exists():
        raise UsageError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: not a directory (give a run directory written by 'lrr run')")
    path = run_dir / REPORT_FILE
    if not path.exists():  # a directory in its place is read, and named, below
        if _completed_without_report(run_dir):
            raise _report_gone(run_dir)
        if (run_dir / METRICS_LOG).is_file() or (run_dir / CHECKPOINTS_DIR).is_dir():
            raise _not_finished(run_dir)
        raise UsageError(f"{run_dir}: not a run directory: no {REPORT_FILE} (written by 'lrr run' when a run ends) "
                         f"and no {SUMMARY_FILE} (written by a recipe with several runs)")
    report = read_json_file(path, "run report", _fix(run_dir))
    check(report, REPORT_SCHEMA, path, "run report", _fix(run_dir))
    metrics_path = run_dir / METRICS_FILE
    metrics = None
    if metrics_path.exists():
        metrics = read_json_file(metrics_path, "metrics file", _fix(run_dir))
        check(metrics, METRICS_SCHEMA, metrics_path, "metrics file", _fix(run_dir))
    warnings = []
    if report["status"] == "completed" and not (run_dir / METRICS_LOG).is_file():
        warnings.append(f"{run_dir / METRICS_LOG}: missing: the run's training history is gone (the report keeps "
                        "its per-epoch rows; --render cannot redraw the plots)")
    return RunReport(label or str(run_dir), run_dir, report, metrics, warnings)


def run_dir_of(root: Path, entry: dict) -> Path:
    """A summary entry's run directory under ``root`` (the recipe's output directory, which
    may have moved since): the tail of the recorded path (``task-seedN``, or
    ``task/POINT/seedN`` for a sweep) that exists under ``root``."""
    recorded = Path(entry["dir"])
    # tails only: the whole recorded path is where the root was, which under a moved root is another copy (or gone)
    parts = recorded.relative_to(recorded.anchor).parts if recorded.anchor else recorded.parts
    for n in range(1, len(parts) + 1):
        candidate = root.joinpath(*parts[-n:])
        if (candidate / REPORT_FILE).is_file():
            return candidate
    return root.joinpath(*parts[-(3 if entry.get("label") else 1):])


def read_summary(root: Path, fix: str, instead: str = "") -> tuple[dict, list[dict]]:
    """A recipe root's ``summary.json``, checked, and its entries with ``dir`` set to each
    run's directory under ``root``; a run listed as completed whose report is gone is an
    error (``instead``: what else the user can do, after "restore the run directory")."""
    path = root / SUMMARY_FILE
    summary = read_json_file(path, "recipe summary", fix)
    check(summary, SUMMARY_SCHEMA, path, "recipe summary", fix)
    entries = []
    for entry in summary["runs"]:
        run_dir = run_dir_of(root, entry)  # the runs of a recipe live under summary.json (a sweep: task/POINT/seedN)
        if entry["status"] == "completed" and not (run_dir / REPORT_FILE).is_file():
            raise RunFileError(f"{run_dir}: {path} lists this run as completed, but its {REPORT_FILE} is gone "
                               f"(deleted or moved?); restore the run directory{instead}")
        entries.append({**entry, "dir": str(run_dir)})
    if not entries:
        raise RunFileError(f"{path}: lists no runs; {fix}")
    return summary, entries


def not_completed(run: RunReport) -> str | None:
    """What to tell about a run that did not complete (None for a completed one)."""
    if run.status == "completed":
        return None
    error = run.report.get("error")
    traceback = run.dir / ERROR_FILE
    where = f"; the traceback is in {traceback}" if traceback.is_file() else ""
    if run.status == "stopped":
        return f"{run.label}: the run stopped before the end; continue it with: lrr run RECIPE --output RUN_DIR --resume"
    if run.status == "interrupted":
        return _interrupted(run.label, error)
    return (f"{run.label}: the run {run.status}" + (f": {error}" if error else "") + where
            + "; fix the cause and train it again")


def _interrupted(label: str, error) -> str:
    """A run stopped by SIGINT/SIGTERM: where it resumes from and the command (run from
    the directory the run was started in), as recorded in its report.json."""
    found = resumable_text(error)
    if found is None:
        return (f"{label}: the run was interrupted (SIGINT/SIGTERM) before it finished; it can be resumed: "
                "lrr run RECIPE --output RUN_DIR --resume")
    return (f"{label}: the run was interrupted (SIGINT/SIGTERM) before it finished; it resumes from "
            f"{found[0]}, from the directory it was started in, with: {found[1]}")
