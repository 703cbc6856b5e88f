"""``lrr run``: every run of a recipe (task x seed), each in its own run directory
(:mod:`lowrank_runner.train.run_dirs`).

One failed run does not stop the others; the command exits non-zero if any failed.
Runs that start from another run's adapter (``training.init_from: {task: NAME}``) run
after it, and fail without training when it did not complete. Ctrl-C and SIGTERM stop
the run: its directory is marked ``interrupted`` and resumable, or removed when this
command created it and nothing in it can be resumed. With ``--parallel N`` the runs train
N at a time in child processes (:mod:`lowrank_runner.train.parallel`), with the same
run directories, summary and tables.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from lowrank_runner.errors import LrrError, UsageError
from lowrank_runner.quiet import quiet_libraries
from lowrank_runner.recipe.load import Recipe
from lowrank_runner.report.write import write_recipe_report
from lowrank_runner.tables import write_recipe_tables
from lowrank_runner.train import artifacts as art
from lowrank_runner.train.init_from import InitFromError, init_source, order_runs, source_run
from lowrank_runner.train.run_dirs import (Taken, continue_command, discard, is_main_process, mark_failed, mark_interrupted,
                                           nothing_resumable, prepare_root, resume_points, run_dirs, single_run_failed,
                                           start_run_dir)

console = Console(stderr=True, soft_wrap=True)  # long paths and commands stay one line (copyable)


# ------------------------------------------------------------------ the runs


def run_recipe(recipe: Recipe, output: Path | None, argv: list[str], resume: bool = False,
               stop_after: int | None = None, parallel=None, only_run: str | None = None) -> list[str]:
    """Train every run; returns the slugs of runs that failed. ``resume`` continues the
    runs of an existing run directory (completed runs are kept, interrupted ones continue
    from their latest checkpoint); ``stop_after`` ends each run after that optimizer step
    with a checkpoint. ``parallel`` (``--parallel N``...: a
    :class:`~lowrank_runner.train.parallel.slots.ParallelOptions`) trains the runs of a
    multi-run recipe in child processes; ``only_run`` is such a child's one run."""
    if only_run is not None:
        from lowrank_runner.train.parallel.child import run_only

        return run_only(recipe, output, only_run, argv, resume, stop_after)
    if parallel is not None and not parallel.sequential and len(recipe.runs) > 1:
        from lowrank_runner.train.parallel.driver import run_parallel

        return run_parallel(recipe, output, argv, parallel, resume, stop_after)
    quiet_libraries()
    root, created = prepare_root(recipe, output, resume)
    points = resume_points(recipe, root) if resume else {}
    _check_stop_after(recipe, points, stop_after)
    try:  # Ctrl-C, and SIGTERM, which the CLI turns into the same (cli.main)
        return _run_all(recipe, root, argv, points, stop_after)
    except KeyboardInterrupt:
        _interrupted(recipe, root, resume, created)
        raise
    except Taken:
        raise
    except LrrError:  # a single run that failed
        if len(recipe.runs) == 1 and not resume and nothing_resumable(root):
            discard(root, created)
        raise


def _check_stop_after(recipe: Recipe, points: dict, stop_after: int | None) -> None:
    """``--resume --stop-after-step N`` with a run already past step N would train it to
    the end: refused before anything trains."""
    if stop_after is None:
        return
    for run in recipe.runs:
        checkpoint = points.get(run.index)
        if checkpoint is not None and not isinstance(checkpoint, tuple) and checkpoint.step >= stop_after:
            raise UsageError(f"--stop-after-step {stop_after}: run {run.slug} resumes from step {checkpoint.step}, "
                             f"already past it; give a later step, or drop --stop-after-step")


@dataclass
class _Batch:
    """What every run of one ``lrr run`` shares: the recipe, where it writes, what it resumes."""

    recipe: Recipe
    root: Path
    argv: list[str]
    points: dict  # run index -> ("completed", metrics) | checkpoint | None (only with --resume)
    stop_after: int | None
    dirs: dict
    again: str  # the command that continues this batch
    summary: list = field(default_factory=list)

    @property
    def resume(self) -> bool:
        return bool(self.points)


def _run_all(recipe: Recipe, root: Path, argv: list[str], points: dict, stop_after: int | None) -> list[str]:
    from lowrank_runner.train.loop import clear_data_cache

    clear_data_cache()
    if not is_main_process():
        console.quiet = True
    batch = _Batch(recipe, root, argv, points, stop_after, run_dirs(recipe, root),
                   continue_command(recipe.source, recipe.overrides, root))
    ordered = order_runs(recipe)
    try:
        for run in ordered:
            batch.summary.append(_one_run(batch, run))
    except KeyboardInterrupt:  # what finished is kept in summary.json and the tables; the rest is interrupted
        batch.summary += [{**_entry(run, batch.dirs[run.index]), "status": "interrupted"}
                          for run in ordered[len(batch.summary):]]
        _write_results(batch, show=False)
        raise
    _write_results(batch)
    return [run.slug for run, entry in zip(ordered, batch.summary) if entry["status"] in ("failed", "crashed")]


def _one_run(batch: _Batch, run) -> dict:
    """Train (or skip, or continue) one run; its summary entry. A failure is recorded and
    the batch goes on, unless the recipe has this one run (then it is raised)."""
    run_dir = batch.dirs[run.index]
    at_point = f" · {escape(run.label)}" if run.label else ""
    console.rule(f"[bold]{escape(batch.recipe.name)}[/bold] · {escape(run.task)}{at_point} · seed {run.seed}")
    console.print(f"run directory: {escape(str(run_dir))}")  # a rule would shorten a long path
    point = batch.points.get(run.index)
    if isinstance(point, tuple):
        console.print(f"already completed: {escape(run.slug)} · {escape(str(run_dir))}")
        return {**_entry(run, run_dir), "status": "completed", "best": point[1]["best"],
                **({"test": point[1]["test"]} if "test" in point[1] else {})}
    _announce_start(batch, run, run_dir, point)
    single = len(batch.recipe.runs) == 1
    try:
        return _train(batch, run, run_dir, point)
    except Taken:
        raise
    except LrrError as exc:
        console.print(f"[red]run {escape(run.slug)} failed:[/red] {escape(str(exc))}")
        if single:
            single_run_failed(run_dir, str(exc), batch.resume)
            raise
        mark_failed(run_dir, str(exc), create=True)
        return {**_entry(run, run_dir), "status": "failed", "error": str(exc)}
    except Exception as exc:  # keep going with the other runs; the traceback is saved
        console.print(f"[red]run {escape(run.slug)} crashed:[/red] {escape(f'{type(exc).__name__}: {exc}')}")
        mark_failed(run_dir, traceback.format_exc(), create=not single)
        if single:
            raise
        return {**_entry(run, run_dir), "status": "crashed", "error": repr(exc)}


def _announce_start(batch: _Batch, run, run_dir: Path, checkpoint) -> None:
    """Where a run starts from (a checkpoint, or step 0 again), clearing an old failure."""
    if batch.resume and is_main_process():
        (run_dir / "error.txt").unlink(missing_ok=True)  # a failure from before: this try starts over
    if checkpoint is not None:
        console.print(f"resuming {escape(run.slug)} from {escape(str(checkpoint.path))} (step {checkpoint.step})")
    elif batch.resume and run_dir.is_dir() and any(run_dir.iterdir()):
        console.print(f"[yellow]no checkpoint[/yellow] in {escape(str(run_dir / 'checkpoints'))}: "
                      f"{escape(run.slug)} starts again from step 0")


def _train(batch: _Batch, run, run_dir: Path, checkpoint) -> dict:
    """The training of one run, from its source adapter if it has one; its summary entry."""
    from lowrank_runner.train.loop import train_run

    init = init_source(batch.recipe, run, batch.dirs)
    waits_for = _source_pending(batch.recipe, run, batch.summary, batch.root)
    if waits_for is not None:
        console.print(f"[yellow]not started[/yellow] {escape(run.slug)}: it starts from {escape(waits_for)}, "
                      f"which was stopped; continue with: {escape(batch.again)}")
        return {**_entry(run, run_dir), "status": "stopped", "step": 0, "waits_for": waits_for}
    start_run_dir(batch.recipe, run, run_dir, batch.resume)
    result = train_run(batch.recipe, run, run_dir, batch.argv, resume=checkpoint, stop_after=batch.stop_after,
                       init_from=init)
    if result.stopped_at is not None:
        console.print(f"[yellow]stopped[/yellow] {escape(run.slug)} after step {result.stopped_at} with a checkpoint; "
                      f"continue with: {escape(batch.again)}")
        return {**_entry(run, run_dir), "status": "stopped", "step": result.stopped_at}
    best = result.best
    console.print(f"[bold green]done[/bold green] {escape(run.slug)}: best {escape(str(best['metric']))} "
                  f"{best['value']:.4f} at step {best['step']} · {escape(str(run_dir))}")
    return {**_entry(run, run_dir), "status": "completed", "best": best,
            **({"test": result.test} if result.test is not None else {})}


def _write_results(batch: _Batch, show: bool = True) -> None:
    """summary.json, the results tables (printed unless ``show`` is false) and the
    recipe's report.md (a single run: its table, in its run directory, once it completed)."""
    recipe, root, summary = batch.recipe, batch.root, batch.summary
    if not is_main_process():
        return
    if len(recipe.runs) > 1:
        root.mkdir(parents=True, exist_ok=True)
        art.write_json(root / art.SUMMARY_FILE, {"recipe": recipe.name, "hash": recipe.hash, "runs": summary})
        write_recipe_tables(root, recipe, summary, console if show else None)  # results.md/.csv/.tex (+ sweep.png)
        write_recipe_report(root, recipe.name, recipe.hash, recipe.source, batch.argv, summary)
    elif summary and summary[0]["status"] == "completed":
        write_recipe_tables(root, recipe, summary, console if show else None)


def _entry(run, run_dir: Path) -> dict:
    """What summary.json says of every run: which run it is and where."""
    return {"task": run.task, "seed": run.seed, "point": run.point, "label": run.label, "dir": str(run_dir)}


def _interrupted(recipe: Recipe, root: Path, resume: bool, created: list[Path]) -> None:
    """Ctrl-C / SIGTERM: say what is left. Runs with something to resume are marked
    ``interrupted`` (report.json, report.md); a directory this command created that holds
    nothing resumable is removed."""
    if not is_main_process():
        return
    if not resume and nothing_resumable(root):
        discard(root, created)
        console.print(f"[yellow]interrupted[/yellow] before the first checkpoint: nothing to resume; "
                      f"removed what this run wrote in {escape(str(root))}")
        return
    again = continue_command(recipe.source, recipe.overrides, root)
    mark_interrupted(recipe, root, again)
    console.print(f"[yellow]interrupted[/yellow]; {escape(str(root))} is resumable: {escape(again)}")


def _source_pending(recipe: Recipe, run, summary: list[dict], root: Path) -> str | None:
    """A run that starts from another run of this recipe needs that run completed: the
    source's slug when it was stopped (--stop-after-step: this run waits for --resume),
    an :class:`InitFromError` when it failed, None when it completed (or there is none)."""
    source = source_run(recipe, run)
    if source is None:
        return None
    entry = next((e for e in summary if (e["task"], e["label"], e["seed"]) == (source.task, source.label, source.seed)),
                 {"status": "not run"})
    if entry["status"] == "completed":
        return None
    if entry["status"] == "stopped":
        return source.slug
    error = (entry.get("error") or "").strip().splitlines()
    raise InitFromError(
        f"{run.init_from_at or recipe.source}: {run.slug} starts from the adapter of run {source.slug}, which "
        f"{entry['status']}{': ' + error[-1] if error else ''}; nothing trained. Fix that run, then continue with: "
        f"{continue_command(recipe.source, recipe.overrides, root)}"
    )
