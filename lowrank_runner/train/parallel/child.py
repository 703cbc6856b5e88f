"""A child of ``lrr run --parallel``: ``lrr run RECIPE --output ROOT --only-run SLUG``
trains exactly that run of the recipe into its directory of the batch (as the sequential
path would), writes its summary entry for the driver, and exits 0 (completed or
stopped), 1 (failed) or 130 (interrupted). It never writes summary.json or the tables,
and never removes the batch directory: the driver does what concerns the whole batch.
"""

from __future__ import annotations

from pathlib import Path

from lowrank_runner.errors import UsageError
from lowrank_runner.quiet import quiet_libraries
from lowrank_runner.recipe.load import Recipe
from lowrank_runner.train import artifacts as art
from lowrank_runner.train.init_from import source_run
from lowrank_runner.train.run_dirs import (completed_metrics, continue_command, is_main_process, mark_status,
                                           resume_point, run_dirs)

LOGS_DIR = "logs"  # in the batch's root: each child's log, summary entry and progress


def job_files(root: Path, slug: str) -> tuple[Path, Path, Path]:
    """A run's log, summary entry and progress file in the batch root (``logs/SLUG.*``)."""
    base = root / LOGS_DIR / slug
    return base.with_name(base.name + ".log"), base.with_name(base.name + ".entry.json"), \
        base.with_name(base.name + ".progress.json")


def find_run(recipe: Recipe, slug: str):
    """The run named ``slug`` (``--only-run``); a usage error listing the slugs otherwise."""
    for run in recipe.runs:
        if run.slug == slug:
            return run
    raise UsageError(f"--only-run {slug}: no run of {recipe.source} has this name; its runs: "
                     f"{', '.join(r.slug for r in recipe.runs)}")


def run_only(recipe: Recipe, output: Path | None, slug: str, argv: list[str], resume: bool = False,
             stop_after: int | None = None) -> list[str]:
    """Train the one run ``slug`` into the batch directory ``output`` (which the driver
    created); returns [slug] if it failed, else []."""
    from lowrank_runner.train.loop import clear_data_cache
    from lowrank_runner.train.runner import _Batch, _entry, _one_run
    from lowrank_runner.train.runner import console as runner_console

    if output is None or not output.is_dir():
        raise UsageError(f"--only-run {slug}: give the batch's existing run directory with --output ROOT")
    run = find_run(recipe, slug)
    quiet_libraries()
    clear_data_cache()
    if not is_main_process():  # a K-process child (accelerate launch): rank 0 speaks and writes
        runner_console.quiet = True
    dirs = run_dirs(recipe, output)
    run_dir = dirs[run.index]
    points = {}
    if resume:
        points[run.index] = resume_point(run, run_dir)
    batch = _Batch(recipe, output, argv, points, stop_after, dirs,
                   continue_command(recipe.source, recipe.overrides, output))
    source = source_run(recipe, run)
    if source is not None:  # the driver starts a dependent only once its source completed
        batch.summary.append({**_entry(source, dirs[source.index]), "status": "completed"})
    try:
        entry = _one_run(batch, run)
    except KeyboardInterrupt:
        if run_dir.is_dir() and is_main_process():
            _mark_interrupted(run_dir, batch.again)
        _write_entry(output, slug, {**_entry(run, run_dir), "status": "interrupted"})
        raise
    _write_entry(output, slug, entry)
    return [slug] if entry["status"] in ("failed", "crashed") else []


def _write_entry(root: Path, slug: str, entry: dict) -> None:
    """The run's summary entry, for the driver (rank 0 writes it)."""
    if is_main_process():
        art.write_json(job_files(root, slug)[1], entry)


def _mark_interrupted(run_dir: Path, again: str) -> None:
    """This run (only: its siblings are still training) marked ``interrupted``."""
    if completed_metrics(run_dir) is not None:
        return
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*[0-9]"))
    where = f"its checkpoint at step {int(checkpoints[-1].name[5:])}" if checkpoints else "the start (no checkpoint yet)"
    mark_status(run_dir, "interrupted", f"interrupted; resumable from {where} with: {again}")
