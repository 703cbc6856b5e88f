"""A child of ``lrr run --parallel``: ``lrr run RECIPE --output ROOT --only-run SLUG``
trains exactly that run of the recipe into its directory under ROOT (as the sequential
path would), writes its summary entry for the driver, and exits 0 (completed or
stopped), 1 (failed) or 130 (interrupted). It never writes summary.json or the tables,
and never removes ROOT: the driver does what concerns every run of the recipe.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

from lowrank_runner.errors import UsageError
from lowrank_runner.quiet import quiet_libraries
from lowrank_runner.recipe.load import Recipe
from lowrank_runner.rundir import status as run_status
from lowrank_runner.rundir.files import write_json
from lowrank_runner.rundir.layout import LOGS_DIR
from lowrank_runner.rundir.lock import DRIVER_ENV, pid_alive
from lowrank_runner.train.data import clear_data_cache
from lowrank_runner.train.devices import is_main_process
from lowrank_runner.train.init_from import source_run
from lowrank_runner.train.invocation import FAILED_STATES, Invocation, console, summary_entry, train_one
from lowrank_runner.train.run_dirs import completed_metrics, continue_command, resume_point, run_dirs


def job_files(root: Path, slug: str) -> tuple[Path, Path, Path]:
    """A run's log, summary entry and progress file in the root (``logs/SLUG.*``)."""
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
    """Train the one run ``slug`` into its directory under ``output`` (which the driver
    created); returns [slug] if it failed, else []."""
    if output is None or not output.is_dir():
        raise UsageError(f"--only-run {slug}: give the batch's existing run directory with --output ROOT")
    run = find_run(recipe, slug)
    stop_with_the_driver()
    quiet_libraries()
    clear_data_cache()
    if not is_main_process():  # a K-process child (accelerate launch): rank 0 speaks and writes
        console.quiet = True
    dirs = run_dirs(recipe, output)
    run_dir = dirs[run.index]
    points = {}
    if resume:
        points[run.index] = resume_point(run, run_dir)
    inv = Invocation(recipe, output, argv, points, stop_after, dirs,
                     continue_command(recipe.source, recipe.overrides, output))
    source = source_run(recipe, run)
    if source is not None:  # the driver starts a dependent only once its source completed
        inv.summary.append(summary_entry(source, dirs[source.index], "completed"))
    try:
        entry = train_one(inv, run)
    except KeyboardInterrupt:
        if run_dir.is_dir() and is_main_process() and completed_metrics(run_dir) is None:
            run_status.mark_interrupted(run_dir, inv.again)  # this run only: its siblings are still training
        _write_entry(output, slug, summary_entry(run, run_dir, "interrupted"))
        raise
    _write_entry(output, slug, entry)
    return [slug] if entry["status"] in FAILED_STATES else []


def stop_with_the_driver() -> None:
    """Stop this child (as SIGTERM does: the run is marked interrupted, resumable) once
    the driver that started it is gone (killed: it could not stop its children itself),
    so that a resumed driver never finds a run with a trainer already on it. Watched from
    a thread: the driver's process, and this process's parent (re-parented when it dies)."""
    host, _, pid = os.environ.get(DRIVER_ENV, "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():  # a Ray task on another node: Ray stops it
        return
    parent = os.getppid()

    def watch() -> None:
        while pid_alive(int(pid)) and os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="lrr-driver-watch", daemon=True).start()


def _write_entry(root: Path, slug: str, entry: dict) -> None:
    """The run's summary entry, for the driver (rank 0 writes it)."""
    if is_main_process():
        write_json(job_files(root, slug)[1], entry)
