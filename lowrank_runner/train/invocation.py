"""One ``lrr run`` invocation: what every run of it shares (:class:`Invocation`), and
what becomes of one run of it (:func:`train_one`, :func:`settle`).

The sequential runner (:mod:`.runner`), a ``--parallel`` child and the parallel driver
(:mod:`.parallel`) all go through these functions, so a run that was already completed,
that waits for a stopped source, whose source failed, that trains, fails or is
interrupted is said and recorded the same way whoever runs it; the results
(``summary.json``, the tables, the recipe's ``report.md``) are written by
:func:`write_results` for all of them.
"""

from __future__ import annotations

import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.markup import escape

from lowrank_runner.errors import DivergenceError, LrrError, UsageError
from lowrank_runner.recipe.load import Recipe, RunSpec
from lowrank_runner.rundir.files import write_json
from lowrank_runner.rundir.layout import ERROR_FILE, SUMMARY_FILE
from lowrank_runner.rundir.write import write_recipe_report
from lowrank_runner.tables import write_recipe_tables
from lowrank_runner.train.devices import is_main_process
from lowrank_runner.train.init_from import InitFromError, init_source, source_run
from lowrank_runner.train.run_dirs import (Taken, continue_command, discard, mark_failed, mark_interrupted,
                                           nothing_resumable, owned, single_run_failed, start_run_dir)
from lowrank_runner.train.setup_failure import shared_by_all, stopped

console = Console(stderr=True, soft_wrap=True)  # long paths and commands stay one line (copyable)
FAILED_STATES = ("failed", "crashed")


def say(text: str) -> None:
    """A plain line (no markup) on the invocation's console."""
    console.print(text, markup=False, highlight=False)


@dataclass
class Invocation:
    """What every run of one ``lrr run`` shares: the recipe, where it writes, what it resumes."""

    recipe: Recipe
    root: Path
    argv: list[str]
    points: dict  # run index -> ("completed", metrics) | checkpoint | None (only with --resume)
    stop_after: int | None
    dirs: dict  # run index -> its run directory
    again: str  # the command that continues this invocation
    summary: list = field(default_factory=list)  # the summary entries of the runs settled so far
    observer: object = None  # told each evaluation, may end a run early (a search's pruner: train/stopping.py)

    @property
    def resume(self) -> bool:
        return bool(self.points)


def summary_entry(run: RunSpec, run_dir: Path, status: str, **more) -> dict:
    """What summary.json says of a run: which run it is, where, and how it ended."""
    return {"task": run.task, "seed": run.seed, "point": run.point, "label": run.label, "dir": str(run_dir),
            "status": status, **more}


def check_stop_after(recipe: Recipe, points: dict, stop_after: int | None) -> None:
    """``--resume --stop-after-step N`` with a run already past step N would train it to
    the end: refused before anything trains."""
    if stop_after is None:
        return
    for run in recipe.runs:
        checkpoint = points.get(run.index)
        if checkpoint is not None and not isinstance(checkpoint, tuple) and checkpoint.step >= stop_after:
            raise UsageError(f"--stop-after-step {stop_after}: run {run.slug} resumes from step {checkpoint.step}, "
                             f"already past it; give a later step, or drop --stop-after-step")


# ------------------------------------------------------------------ one run


def settle(inv: Invocation, run: RunSpec, say: Callable[[str], None]) -> dict | None:
    """The summary entry of a run that ends without training (already completed under
    ``--resume``; its source run stopped, so it waits for ``--resume``; its source failed,
    so it fails), said with ``say``; None for a run that trains."""
    run_dir = inv.dirs[run.index]
    point = inv.points.get(run.index)
    if isinstance(point, tuple):
        say(f"already completed: {escape(run.slug)} · {escape(str(run_dir))}")
        done = point[1]
        return summary_entry(run, run_dir, "completed", best=done["best"], **({"test": done["test"]} if "test" in done else {}))
    try:
        waits_for = source_pending(inv, run)
    except InitFromError as exc:
        say(f"[red]run {escape(run.slug)} failed:[/red] {escape(str(exc))}")
        mark_failed(run_dir, str(exc), create=True)
        return summary_entry(run, run_dir, "failed", error=str(exc))
    if waits_for is None:
        return None
    say(f"[yellow]not started[/yellow] {escape(run.slug)}: it starts from {escape(waits_for)}, which was stopped; "
        f"continue with: {escape(inv.again)}")
    return summary_entry(run, run_dir, "stopped", step=0, waits_for=waits_for)


def source_pending(inv: Invocation, run: RunSpec) -> str | None:
    """A run that starts from another run of this recipe needs that run completed: the
    source's slug when it was stopped (--stop-after-step: this run waits for --resume),
    an :class:`InitFromError` when it failed, None when it completed (or there is none)."""
    source = source_run(inv.recipe, run)
    if source is None:
        return None
    entry = next((e for e in inv.summary if (e["task"], e["label"], e["seed"]) == (source.task, source.label, source.seed)),
                 {"status": "not run"})
    if entry["status"] == "completed":
        return None
    if entry["status"] == "stopped":
        return source.slug
    error = (entry.get("error") or "").strip().splitlines()
    raise InitFromError(
        f"{run.init_from_at or inv.recipe.source}: {run.slug} starts from the adapter of run {source.slug}, which "
        f"{entry['status']}{': ' + error[-1] if error else ''}; nothing trained. Fix that run, then continue with: "
        f"{continue_command(inv.recipe.source, inv.recipe.overrides, inv.root)}"
    )


def train_one(inv: Invocation, run: RunSpec, rest: list[RunSpec] | None = None) -> dict:
    """Settle, or train (or continue) one run; its summary entry. A failure is recorded
    and the invocation goes on, unless the recipe has this one run (then it is raised).
    A run that diverged keeps its directory (metrics.jsonl, checkpoints) marked failed.
    ``rest``: the runs still to come when this one is the invocation's first; a set-up
    failure that would stop each of them alike raises :class:`SetupStopped` instead
    (train/setup_failure.py)."""
    run_dir = inv.dirs[run.index]
    at_point = f" · {escape(run.label)}" if run.label else ""
    console.rule(f"[bold]{escape(inv.recipe.name)}[/bold] · {escape(run.task)}{at_point} · seed {run.seed}")
    console.print(f"run directory: {escape(str(run_dir))}")  # a rule would shorten a long path
    settled = settle(inv, run, console.print)
    if settled is not None:
        return settled
    checkpoint = inv.points.get(run.index)
    _announce_start(inv, run, run_dir, checkpoint)
    single = len(inv.recipe.runs) == 1
    try:
        return _train(inv, run, run_dir, checkpoint)
    except Taken:
        raise
    except LrrError as exc:
        if rest and shared_by_all(exc, run, rest) and nothing_resumable(run_dir):
            raise stopped(exc, rest, inv.root) from None
        console.print(f"[red]run {escape(run.slug)} failed:[/red] {escape(str(exc))}")
        if single:
            single_run_failed(run_dir, str(exc), inv.resume or isinstance(exc, DivergenceError))
            raise
        mark_failed(run_dir, str(exc), create=True)
        return summary_entry(run, run_dir, "failed", error=str(exc))
    except Exception as exc:  # keep going with the other runs; the traceback is saved
        console.print(f"[red]run {escape(run.slug)} crashed:[/red] {escape(f'{type(exc).__name__}: {exc}')}")
        mark_failed(run_dir, traceback.format_exc(), create=not single)
        if single:
            raise
        return summary_entry(run, run_dir, "crashed", error=repr(exc))


def _announce_start(inv: Invocation, run: RunSpec, run_dir: Path, checkpoint) -> None:
    """Where a run starts from (a checkpoint, or step 0 again), clearing an old failure."""
    if inv.resume and is_main_process():
        (run_dir / ERROR_FILE).unlink(missing_ok=True)  # a failure from before: this try starts over
    if checkpoint is not None:
        console.print(f"resuming {escape(run.slug)} from {escape(str(checkpoint.path))} (step {checkpoint.step})")
    elif inv.resume and run_dir.is_dir() and any(run_dir.iterdir()):
        console.print(f"[yellow]no checkpoint[/yellow] in {escape(str(run_dir / 'checkpoints'))}: "
                      f"{escape(run.slug)} starts again from step 0")


def _train(inv: Invocation, run: RunSpec, run_dir: Path, checkpoint) -> dict:
    """The training of one run, from its source adapter if it has one; its summary entry."""
    from lowrank_runner.train.loop import train_run

    init = init_source(inv.recipe, run, inv.dirs)
    start_run_dir(inv.recipe, run, run_dir, inv.resume)
    with nullcontext() if run_dir == inv.root else owned(run_dir, say):  # the root is the invocation's already
        try:
            result = train_run(inv.recipe, run, run_dir, inv.argv, resume=checkpoint, stop_after=inv.stop_after,
                               init_from=init, observer=inv.observer)
        except DivergenceError as exc:  # the divergence guard (train/divergence.py)
            exc.resume_hint = resume_hint(exc, inv.again)
            raise
    if result.stopped_at is not None:
        console.print(f"[yellow]stopped[/yellow] {escape(run.slug)} after step {result.stopped_at} with a checkpoint; "
                      f"continue with: {escape(inv.again)}")
        return summary_entry(run, run_dir, "stopped", step=result.stopped_at)
    best = result.best
    console.print(f"[bold green]done[/bold green] {escape(run.slug)}: best {escape(str(best['metric']))} "
                  f"{best['value']:.4f} at step {best['step']} · {escape(str(run_dir))}")
    return summary_entry(run, run_dir, "completed", best=best, **({"test": result.test} if result.test is not None else {}))


def resume_hint(exc: DivergenceError, again: str) -> str:
    """What a diverged run's message ends with: the command that continues it from its
    last good checkpoint ("" without one)."""
    return "" if exc.checkpoint is None else f"; to continue from that checkpoint with the same settings: {again}"


# ------------------------------------------------------------------ the end, or an interruption


def write_results(inv: Invocation, show: bool = True) -> None:
    """summary.json, the results tables (printed unless ``show`` is false) and the
    recipe's report.md (a single run: its table, in its run directory, once it completed)."""
    recipe, root, summary = inv.recipe, inv.root, inv.summary
    if not is_main_process():
        return
    if len(recipe.runs) > 1:
        root.mkdir(parents=True, exist_ok=True)
        write_json(root / SUMMARY_FILE, {"recipe": recipe.name, "hash": recipe.hash, "runs": summary})
        write_recipe_tables(root, recipe, summary, console if show else None)  # results.md/.csv/.tex (+ sweep.png)
        write_recipe_report(root, recipe.name, recipe.hash, recipe.source, inv.argv, summary)
    elif summary and summary[0]["status"] == "completed":
        write_recipe_tables(root, recipe, summary, console if show else None)


def interrupted(inv: Invocation, created: list[Path], say: Callable[[str], None]) -> None:
    """Ctrl-C / SIGTERM: say what is left. Runs with something to resume are marked
    ``interrupted`` (report.json, report.md) with the command that continues them
    (``inv.again``); a directory this command created that holds nothing resumable is
    removed."""
    if not is_main_process():
        return
    if not inv.resume and nothing_resumable(inv.root):
        discard(inv.root, created)
        say(f"[yellow]interrupted[/yellow] before the first checkpoint: nothing to resume; "
            f"removed what this run wrote in {escape(str(inv.root))}")
        return
    mark_interrupted(inv.recipe, inv.root, inv.again)
    say(f"[yellow]interrupted[/yellow]; {escape(str(inv.root))} is resumable: {escape(inv.again)}")
