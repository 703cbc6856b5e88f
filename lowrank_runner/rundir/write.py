"""Write a run's report files: the plots and ``report.md`` first, ``report.json`` last
(its ``"status": "completed"`` marks the run complete), and the root ``report.md`` of a
multi-run recipe. ``render`` redraws a run's ``report.md`` and plots from its
``report.json`` and ``metrics.jsonl`` (``lrr report --render``). Torch-free."""

from __future__ import annotations

from pathlib import Path

from lowrank_runner.errors import RunFileError
from lowrank_runner.rundir import plots
from lowrank_runner.rundir.files import write_json
from lowrank_runner.rundir.history import per_epoch, read_history
from lowrank_runner.rundir.layout import (METRICS_LOG, RANK_HEATMAP_FILE, REPORT_FILE, REPORT_MD, RESULTS_MD,
                                          SWEEP_FIGURE)
from lowrank_runner.rundir.markdown import recipe_markdown, run_markdown
from lowrank_runner.rundir.reports import run_dir_of


def _plots(run_dir: Path, report: dict, history) -> dict[str, str]:
    """Draw the curves; returns {file name: caption} of the plots that exist."""
    steps = report.get("steps") or {}
    rec, run, best = report.get("recipe", {}), report.get("run", {}), report.get("best") or {}
    title = f"{rec.get('name')} · {run.get('task')} · seed {run.get('seed')} · {(report.get('method') or {}).get('name')}"
    out = {}
    if plots.loss_plot(history, run_dir / plots.LOSS_PLOT, title, steps.get("per_epoch")):
        out[plots.LOSS_PLOT] = "training and evaluation loss, learning rate"
    if plots.metric_plot(history, run_dir / plots.METRIC_PLOT, title, best.get("metric"), best.get("step"),
                          steps.get("per_epoch")):
        out[plots.METRIC_PLOT] = "evaluation metrics"
    if (run_dir / RANK_HEATMAP_FILE).is_file():
        out[RANK_HEATMAP_FILE] = "final rank pattern (layers × targets)"
    return out


def _complete(run_dir: Path, report: dict) -> dict:
    """Add the per-epoch rows and the files; write plots and report.md."""
    steps = report.get("steps") or {}
    history = read_history(run_dir / METRICS_LOG)
    if steps.get("per_epoch") and steps.get("total"):
        report["per_epoch"] = per_epoch(history, steps["per_epoch"], steps["total"])
    report["files"] = {"markdown": REPORT_MD, "plots": _plots(run_dir, report, history)}
    (run_dir / REPORT_MD).write_text(run_markdown(report), encoding="utf-8")
    return report


def write_run_report(run_dir: Path, report: dict) -> dict:
    """Write plots, report.md and finally report.json of a finished run."""
    report = _complete(run_dir, report)
    write_json(run_dir / REPORT_FILE, report)
    return report


def render(run_dir: Path, report: dict) -> list[Path]:
    """Redraw report.md and the plots of a run from its report.json and metrics.jsonl
    (report.json itself is left as the run wrote it). Returns the files written."""
    _require_history(run_dir)
    report = _complete(run_dir, dict(report))
    return [run_dir / REPORT_MD, *(run_dir / name for name in report["files"]["plots"] if name != RANK_HEATMAP_FILE)]


def _require_history(run_dir: Path) -> None:
    path = run_dir / METRICS_LOG
    if not path.is_file():
        raise RunFileError(f"{path}: missing: --render redraws the plots from the run's training history, which is "
                           "gone; restore the file from a copy (the report.md and plots the run wrote are untouched)")
    read_history(path)  # a damaged line: an error before anything is redrawn


def render_runs(runs) -> list[str]:
    """``lrr report --render``: redraw every completed run (all checked first, so a
    damaged one stops the command before anything is redrawn); the lines to print."""
    done = [run for run in runs if run.status == "completed"]
    for run in done:
        _require_history(run.dir)
    lines = [f"{run.label}: not rendered: the run {run.status} (only completed runs have plots to redraw)"
             for run in runs if run.status != "completed"]
    for run in done:
        try:
            written = render(run.dir, run.report)
        except OSError as exc:
            raise RunFileError(f"{run.dir}: cannot write the redrawn report ({exc.strerror or exc}); make the "
                               "directory writable, or copy the run elsewhere and render the copy") from None
        lines.append(f"rendered {', '.join(str(p) for p in written)}")
    return lines


def write_recipe_report(root: Path, name: str, recipe_hash: str, source: str, command: list[str] | None,
                        summary: list[dict]) -> Path:
    """The root report.md of a multi-run recipe (after summary.json and results.md)."""
    runs = []
    for entry in summary:
        slug = run_dir_of(root, entry).relative_to(root).as_posix()  # task-seedN, or task/POINT/seedN (a sweep)
        runs.append({**entry, "slug": slug, "has_report": (root / slug / REPORT_MD).is_file()})
    results = root / RESULTS_MD
    table = results.read_text() if results.is_file() else None
    if table and (root / SWEEP_FIGURE).is_file():
        table += f"\n![metric against the swept value]({SWEEP_FIGURE})\n"
    text = recipe_markdown(name, recipe_hash, source, command, runs, table)
    path = root / REPORT_MD
    path.write_text(text, encoding="utf-8")
    return path
