"""``lrr run``: every run of a recipe (task x seed), each in its own run directory.

One failed run does not stop the others; the command exits non-zero if any failed.
Runs that start from another run's adapter (``training.init_from: {task: NAME}``) run
after it, and fail without training when it did not complete.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import traceback
from pathlib import Path

from rich.console import Console

from lowrank_runner.errors import LrrError, UsageError
from lowrank_runner.outputs import require_free
from lowrank_runner.quiet import quiet_libraries
from lowrank_runner.recipe.load import Recipe
from lowrank_runner.report.markdown import run_markdown
from lowrank_runner.report.write import REPORT_MD, write_recipe_report
from lowrank_runner.results import print_results, results_table, write_results
from lowrank_runner.train import artifacts as art
from lowrank_runner.train.init_from import InitFromError, init_source, order_runs, source_run

console = Console(stderr=True)


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (set before any Accelerator exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def run_dirs(recipe: Recipe, output: Path | None, resume: bool = False) -> tuple[Path, dict[int, Path]]:
    if resume:
        if output is None:
            raise UsageError("--resume continues the runs in an existing run directory: give it with --output RUN_DIR")
        if not output.is_dir():
            raise UsageError(f"--output {output}: no such run directory to resume")
    else:
        if output is None:
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            output = Path(recipe.resolved["output"]["dir"]) / recipe.name / stamp
        if is_main_process():  # the other ranks would race with rank 0 creating the directory
            require_free(output, "--output")
    if len(recipe.runs) == 1:
        return output, {recipe.runs[0].index: output}
    return output, {run.index: output / run.slug for run in recipe.runs}


def _completed(run_dir: Path) -> dict | None:
    report, metrics = run_dir / art.REPORT_FILE, run_dir / art.METRICS_FILE
    if report.is_file() and metrics.is_file() and json.loads(report.read_text()).get("status") == "completed":
        return json.loads(metrics.read_text())
    return None


def run_recipe(recipe: Recipe, output: Path | None, argv: list[str], resume: bool = False,
               stop_after: int | None = None) -> list[str]:
    """Train every run; returns the slugs of runs that failed. ``resume`` continues the
    runs of an existing run directory (completed runs are kept, interrupted ones continue
    from their latest checkpoint); ``stop_after`` ends each run after that optimizer step
    with a checkpoint."""
    quiet_libraries()
    from lowrank_runner.train.checkpoint import latest_checkpoint
    from lowrank_runner.train.loop import clear_data_cache, train_run

    clear_data_cache()
    root, dirs = run_dirs(recipe, output, resume)
    failures, summary = [], []
    if not is_main_process():
        console.quiet = True
    for run in order_runs(recipe):
        run_dir = dirs[run.index]
        console.rule(f"[bold]{recipe.name}[/bold] · {run.task} · seed {run.seed} → {run_dir}")
        done = _completed(run_dir) if resume else None
        if done is not None:
            console.print(f"already completed: {run.slug} · {run_dir}")
            summary.append({"task": run.task, "seed": run.seed, "dir": str(run_dir), "status": "completed", "best": done["best"],
                            **({"test": done["test"]} if "test" in done else {})})
            continue
        checkpoint = latest_checkpoint(run_dir) if resume else None
        if resume and is_main_process():
            (run_dir / "error.txt").unlink(missing_ok=True)  # a failure from before: this try starts over
        if checkpoint is not None:
            console.print(f"resuming {run.slug} from {checkpoint.path} (step {checkpoint.step})")
        try:
            init = init_source(recipe, run, dirs)
            waits_for = _source_pending(recipe, run, summary, root)
            if waits_for is not None:
                console.print(f"[yellow]not started[/yellow] {run.slug}: it starts from {waits_for}, which was stopped; "
                              f"continue with: lrr run {recipe.source} --output {root} --resume")
                summary.append({"task": run.task, "seed": run.seed, "dir": str(run_dir), "status": "stopped", "step": 0,
                                "waits_for": waits_for})
                continue
            result = train_run(recipe, run, run_dir, argv, resume=checkpoint, stop_after=stop_after, init_from=init)
        except LrrError as exc:
            failures.append(run.slug)
            console.print(f"[red]run {run.slug} failed:[/red] {exc}")
            summary.append({"task": run.task, "seed": run.seed, "dir": str(run_dir), "status": "failed", "error": str(exc)})
            _mark_failed(run_dir, str(exc), create=len(recipe.runs) > 1)
            if len(recipe.runs) == 1:
                raise
            continue
        except Exception as exc:  # keep going with the other runs; the traceback is saved
            failures.append(run.slug)
            console.print(f"[red]run {run.slug} crashed:[/red] {type(exc).__name__}: {exc}")
            _mark_failed(run_dir, traceback.format_exc(), create=len(recipe.runs) > 1)
            summary.append({"task": run.task, "seed": run.seed, "dir": str(run_dir), "status": "crashed", "error": repr(exc)})
            if len(recipe.runs) == 1:
                raise
            continue
        best = result.best
        if result.stopped_at is not None:
            console.print(f"[yellow]stopped[/yellow] {run.slug} after step {result.stopped_at} with a checkpoint; "
                          f"continue with: lrr run {recipe.source} --output {root} --resume")
            summary.append({"task": run.task, "seed": run.seed, "dir": str(run_dir), "status": "stopped",
                            "step": result.stopped_at})
            continue
        console.print(f"[bold green]done[/bold green] {run.slug}: best {best['metric']} {best['value']:.4f} at step {best['step']} · {run_dir}")
        summary.append({"task": run.task, "seed": run.seed, "dir": str(run_dir), "status": "completed", "best": best,
                        **({"test": result.test} if result.test is not None else {})})
    if len(recipe.runs) > 1 and is_main_process():
        root.mkdir(parents=True, exist_ok=True)
        art.write_json(root / art.SUMMARY_FILE, {"recipe": recipe.name, "hash": recipe.hash, "runs": summary})
        tasks = list(dict.fromkeys(run.task for run in recipe.runs))
        table = results_table(summary, tasks, recipe.resolved.get("output", {}).get("aggregate", "mean"))
        write_results(root, recipe.name, table)
        write_recipe_report(root, recipe.name, recipe.hash, recipe.source, argv, summary)
        print_results(console, recipe.name, table)
    return failures


def _source_pending(recipe: Recipe, run, summary: list[dict], root: Path) -> str | None:
    """A run that starts from another run of this recipe needs that run completed: the
    source's slug when it was stopped (--stop-after-step: this run waits for --resume),
    an :class:`InitFromError` when it failed, None when it completed (or there is none)."""
    source = source_run(recipe, run)
    if source is None:
        return None
    entry = next((e for e in summary if (e["task"], e["seed"]) == (source.task, source.seed)), {"status": "not run"})
    if entry["status"] == "completed":
        return None
    if entry["status"] == "stopped":
        return source.slug
    error = (entry.get("error") or "").strip().splitlines()
    raise InitFromError(
        f"{run.init_from_at or recipe.source}: {run.slug} starts from the adapter of run {source.slug}, which "
        f"{entry['status']}{': ' + error[-1] if error else ''}; nothing trained. Fix that run, then continue with: "
        f"lrr run {recipe.source} --output {root} --resume"
    )


def _mark_failed(run_dir: Path, error: str, create: bool = False) -> None:
    """Record a failure in the run's directory (``error.txt``, ``report.json``/``.md`` with
    status failed). ``create``: make the directory if the run failed before writing one
    (a run of a multi-run recipe, so ``lrr report`` and ``summary.json`` point somewhere);
    a single run that failed before training leaves nothing behind."""
    if create and is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
    if run_dir.is_dir() and is_main_process():
        (run_dir / "error.txt").write_text(error)
        report = run_dir / art.REPORT_FILE
        data = json.loads(report.read_text()) if report.is_file() else {}
        data = {**data, "status": "failed", "error": error.splitlines()[-1] if error else ""}
        art.write_json(report, data)
        (run_dir / REPORT_MD).write_text(run_markdown(data), encoding="utf-8")
