"""``lrr run``: every run of a recipe (task x seed), each in its own run directory
(:mod:`lowrank_runner.train.run_dirs`).

One failed run does not stop the others; the command exits non-zero if any failed. A
failure before training that every run would meet alike (the same backbone or data
cannot be loaded: train/setup_failure.py) stops the command at the first run instead,
with one message, and the run directory it created is removed.
Runs that start from another run's adapter (``training.init_from: {task: NAME}``) run
after it, and fail without training when it did not complete. Ctrl-C and SIGTERM stop
the run: its directory is marked ``interrupted`` and resumable, or removed when this
command created it and nothing in it can be resumed. With ``--parallel N`` the runs train
N at a time in child processes (:mod:`lowrank_runner.train.parallel`), with the same
run directories, summary and tables.
"""

from __future__ import annotations

from pathlib import Path

from lowrank_runner.errors import LrrError
from lowrank_runner.quiet import quiet_libraries
from lowrank_runner.recipe.load import Recipe
from lowrank_runner.train.data import clear_data_cache
from lowrank_runner.train.devices import is_main_process
from lowrank_runner.train.init_from import order_runs
from lowrank_runner.train.invocation import (FAILED_STATES, Invocation, check_stop_after, console, interrupted, say,
                                             summary_entry, train_one, write_results)
from lowrank_runner.train.run_dirs import (Taken, continue_command, discard, nothing_resumable, owned, prepare_root,
                                           resume_points, run_dirs)
from lowrank_runner.train.setup_failure import SetupStopped
from lowrank_runner.train.stopping import EvaluationObserver
from lowrank_runner.train.tracking import check_endpoints, check_recorded_ids


def run_recipe(recipe: Recipe, output: Path | None, argv: list[str], resume: bool = False,
               stop_after: int | None = None, parallel=None, only_run: str | None = None,
               observer: EvaluationObserver | None = None) -> list[str]:
    """Train every run; returns the slugs of runs that failed. ``resume`` continues the
    runs of an existing run directory (completed runs are kept, interrupted ones continue
    from their latest checkpoint); ``stop_after`` ends each run after that optimizer step
    with a checkpoint. ``parallel`` (``--parallel N``...: a
    :class:`~lowrank_runner.train.parallel.slots.ParallelOptions`) trains the runs of a
    multi-run recipe in child processes; ``only_run`` is such a child's one run. The
    servers the recipe's trackers reach are checked first, once (by the driver of
    ``--parallel``): nothing is written when one does not answer. ``observer`` is told every
    evaluation of the runs trained in this process and may end one early (a search's
    pruner: train/stopping.py)."""
    check_endpoints(recipe, probe=only_run is None)
    if only_run is not None:
        from lowrank_runner.train.parallel.child import run_only

        return run_only(recipe, output, only_run, argv, resume, stop_after)
    if parallel is not None and not parallel.sequential and len(recipe.runs) > 1:
        from lowrank_runner.train.parallel.driver import run_parallel

        return run_parallel(recipe, output, argv, parallel, resume, stop_after)
    quiet_libraries()
    root, created = prepare_root(recipe, output, resume)
    with owned(root, say):  # nobody else trains or writes it meanwhile (rundir/lock.py)
        points = resume_points(recipe, root) if resume else {}
        check_stop_after(recipe, points, stop_after)
        if resume:
            check_recorded_ids(recipe, run_dirs(recipe, root), points)  # trackers.json, before anything trains
        inv = Invocation(recipe, root, argv, points, stop_after, run_dirs(recipe, root),
                         continue_command(recipe.source, recipe.overrides, root), observer=observer)
        try:  # Ctrl-C, and SIGTERM, which the CLI turns into the same (cli.main)
            return _run_all(inv)
        except KeyboardInterrupt:
            interrupted(inv, created, console.print)
            raise
        except Taken:
            raise
        except SetupStopped:  # the first run's set-up failed as every run's would: nothing was started
            discard(root, created)
            raise
        except LrrError:  # a single run that failed
            if len(recipe.runs) == 1 and not resume and nothing_resumable(root):
                discard(root, created)
            raise


def _run_all(inv: Invocation) -> list[str]:
    """Every run in order (each source run before the runs that start from it), then the
    results; after Ctrl-C, what finished is kept in summary.json and the tables."""
    clear_data_cache()
    if not is_main_process():
        console.quiet = True
    ordered = order_runs(inv.recipe)
    try:
        for index, run in enumerate(ordered):
            first = index == 0 and not inv.resume  # a set-up failure shared by every run stops them all
            inv.summary.append(train_one(inv, run, ordered[1:] if first else None))
    except KeyboardInterrupt:
        inv.summary += [summary_entry(run, inv.dirs[run.index], "interrupted") for run in ordered[len(inv.summary):]]
        write_results(inv, show=False)
        raise
    write_results(inv)
    return [run.slug for run, entry in zip(ordered, inv.summary) if entry["status"] in FAILED_STATES]
