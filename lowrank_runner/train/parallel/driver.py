"""The driver of ``lrr run RECIPE --parallel N``: the recipe's runs, N at a time, each in
a child process (:mod:`.child`) started by an executor (:mod:`.local`, or Ray).

The driver claims the run directory (the root of every run), starts a run as soon as a
slot is free and its ``training.init_from`` source completed (a run whose source failed
or stopped is settled as in a sequential run: :func:`~lowrank_runner.train.invocation.settle`),
records each child's outcome (a failure stays with its run: the others go on), and
writes summary.json, the results tables and report.md as the sequential path does. Ctrl-C or SIGTERM stops every child (each marks its run
interrupted), and the runs continue with ``--resume``: completed runs are skipped.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from lowrank_runner.recipe.load import Recipe
from lowrank_runner.rundir.lock import DRIVER_ENV
from lowrank_runner.train.init_from import order_runs, source_run
from lowrank_runner.train.invocation import (FAILED_STATES, Invocation, check_stop_after, console, interrupted, say,
                                             settle, summary_entry, write_results)
from lowrank_runner.train.parallel.child import job_files
from lowrank_runner.train.parallel.display import Active, Display
from lowrank_runner.train.parallel.jobs import INTERRUPTED, Executor, Job
from lowrank_runner.train.parallel.slots import ParallelOptions, Slots, plan_slots
from lowrank_runner.train.progress import PROGRESS_FILE_ENV
from lowrank_runner.train.run_dirs import continue_command, mark_failed, owned, prepare_root, resume_points, run_dirs
from lowrank_runner.train.tracking import check_recorded_ids


def make_executor(options: ParallelOptions, slots: Slots) -> Executor:
    """The local executor, or Ray's (imported only when asked for: a usage error saying
    how to install Ray when it is missing)."""
    if options.executor == "ray":
        from lowrank_runner.train.parallel.ray_executor import RayExecutor

        return RayExecutor(address=options.address, capacity=options.parallel, gpus_per_run=slots.gpus,
                           cpus_per_run=slots.cpus)
    from lowrank_runner.train.parallel.local import LocalExecutor

    return LocalExecutor(capacity=options.parallel)


def run_parallel(recipe: Recipe, output: Path | None, argv: list[str], options: ParallelOptions, resume: bool = False,
                 stop_after: int | None = None) -> list[str]:
    """Train every run of ``recipe`` in child processes; the slugs of the runs that failed."""
    slots = plan_slots(options)
    executor = make_executor(options, slots)
    try:
        root, created = prepare_root(recipe, output, resume)
        with owned(root, say):  # the driver owns the root, each child its run's directory (rundir/lock.py)
            points = resume_points(recipe, root) if resume else {}  # after the children of a killed driver stopped
            check_stop_after(recipe, points, stop_after)
            if resume:
                check_recorded_ids(recipe, run_dirs(recipe, root), points)  # trackers.json, before any child starts
            again = " ".join([continue_command(recipe.source, recipe.overrides, root),
                              *(shlex.quote(w) for w in options.words())])
            inv = Invocation(recipe, root, argv, points, stop_after, run_dirs(recipe, root), again)
            return _Schedule(inv, executor, slots, options, created).run()
    finally:
        executor.close()


@dataclass
class _Schedule:
    inv: Invocation
    executor: Executor
    slots: Slots
    options: ParallelOptions
    created: list[Path]
    entries: dict = field(default_factory=dict)  # run index -> summary entry
    active: dict = field(default_factory=dict)  # slug -> (run, group)

    def run(self) -> list[str]:
        ordered = order_runs(self.inv.recipe)
        waiting = list(ordered)
        self.display = Display(console, self.inv.recipe.name, len(ordered))
        self.display.line(f"[bold]{escape(self.inv.recipe.name)}[/bold]: {len(ordered)} runs, "
                          f"{self.executor.capacity} at a time · run directory: {escape(str(self.inv.root))}")
        with self.display:
            try:
                while waiting or self.active:
                    self._start_ready(waiting)
                    self._count(waiting)
                    for job, code in self.executor.wait_any(timeout=0.5):
                        self._finished(job, code)
                    self._count(waiting)
            except KeyboardInterrupt:
                self._stop(waiting)
                self._summarize(ordered, show=False)
                self._interrupted()
                raise
        self._summarize(ordered)
        return [run.slug for run in ordered if self.entries[run.index]["status"] in FAILED_STATES]

    # ------------------------------------------------------------------ starting

    def _start_ready(self, waiting: list) -> None:
        """Start (or settle without a child) every waiting run whose source finished,
        while slots are free; a cycle (not reachable through the loader) starts in order."""
        for run in list(waiting):
            if len(self.active) >= self.executor.capacity:
                return
            source = source_run(self.inv.recipe, run)
            if source is not None and source.index not in self.entries and (self.active or waiting[0] is not run):
                continue  # its source has not finished yet
            waiting.remove(run)
            self.inv.summary = list(self.entries.values())  # the sources settled so far
            entry = settle(self.inv, run, self.display.line)
            if entry is not None:
                self.entries[run.index] = entry
            else:
                self._submit(run)

    def _submit(self, run) -> None:
        group = least_loaded(self.slots, [group for _, group in self.active.values()])
        job = child_job(self.inv, run, self.slots, group, self.options)
        _, entry, progress = job_files(self.inv.root, run.slug)
        for earlier in (entry, progress):  # from an earlier attempt (--resume)
            earlier.unlink(missing_ok=True)
        self.executor.submit(job)
        self.active[run.slug] = (run, group)
        where = self.slots.where(group) if self.options.executor == "local" else "ray"
        self.display.active[run.slug] = Active(run, where.partition(" (")[0], job.log, progress)
        self.display.line(f"started {escape(run.slug)} on {escape(where)} · log: {escape(str(job.log))}")

    # ------------------------------------------------------------------ finishing

    def _finished(self, job: Job, code: int) -> None:
        self.active.pop(job.slug, None)  # (not there when Ctrl-C came between its start and its record)
        self.display.active.pop(job.slug, None)
        run = next(r for r in self.inv.recipe.runs if r.slug == job.slug)
        entry = self._entry_of(run, job, code)
        self.entries[run.index] = entry
        status, log = entry["status"], escape(str(job.log))
        if status == "completed":
            best = entry["best"]
            self.display.line(f"[bold green]done[/bold green] {escape(run.slug)}: best {escape(str(best['metric']))} "
                              f"{best['value']:.4f} at step {best['step']}")
        elif status in FAILED_STATES:
            last = (entry.get("error") or "").strip().splitlines()
            self.display.line(f"[red]run {escape(run.slug)} {status}:[/red] {escape(last[-1] if last else '')} · "
                              f"its log: {log}")
        elif status == "stopped":  # --stop-after-step: a checkpoint to continue from, as the sequential path says
            self.display.line(f"[yellow]stopped[/yellow] {escape(run.slug)} after step {entry.get('step')} with a "
                              f"checkpoint; continue with: {escape(self.inv.again)} · its log: {log}")
        else:
            self.display.line(f"[yellow]{status}[/yellow] {escape(run.slug)} · its log: {log}")

    def _entry_of(self, run, job: Job, code: int) -> dict:
        """The child's summary entry; when it wrote none (killed, or it failed before its
        run started), one from its exit code and log, with the run marked failed."""
        entry_file = job_files(self.inv.root, run.slug)[1]
        try:
            return json.loads(entry_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        run_dir = self.inv.dirs[run.index]
        if code == INTERRUPTED:
            return summary_entry(run, run_dir, "interrupted")
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            error = f"the process training this run was killed by {name}; its log: {job.log}"
        else:
            error = f"the process training this run exited with code {code} ({_last_line(job.log)}); its log: {job.log}"
        mark_failed(run_dir, error, create=True)
        return summary_entry(run, run_dir, "failed", error=error)

    def _count(self, waiting: list) -> None:
        states = [e["status"] for e in self.entries.values()]
        self.display.counts = {"done": states.count("completed"), "running": len(self.active),
                               "waiting": len(waiting), "failed": sum(s in FAILED_STATES for s in states),
                               "interrupted": states.count("interrupted"), "stopped": states.count("stopped")}

    # ------------------------------------------------------------------ stopping and the end

    def _stop(self, waiting: list) -> None:
        """Ctrl-C / SIGTERM: every child is asked to stop (SIGTERM) and waited for; a
        second Ctrl-C meanwhile is ignored."""
        self.display.line(f"[yellow]stopping[/yellow] {len(self.active)} running run(s)…")
        with signals_ignored():
            self.executor.stop_all()
            for job, code in self.executor.wait_any(timeout=0):
                self._finished(job, code)
        for run in waiting:
            self.entries[run.index] = summary_entry(run, self.inv.dirs[run.index], "interrupted")
        waiting.clear()
        self._count(waiting)

    def _summarize(self, ordered: list, show: bool = True) -> None:
        self.inv.summary = [self.entries[run.index] for run in ordered if run.index in self.entries]
        write_results(self.inv, show=show)
        self.display.line(self.display.progress_line())

    def _interrupted(self) -> None:
        """What is left after Ctrl-C: runs marked interrupted and the command that
        continues them, or nothing (removed) when nothing was resumable yet."""
        interrupted(self.inv, self.created, self.display.line)


def least_loaded(slots: Slots, used: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The device group with the fewest of the ``used`` (the groups of the runs training
    now) on it: several runs share a device when --parallel is above the number of groups."""
    load = {g: used.count(g) for g in slots.groups}
    return min(slots.groups, key=lambda g: load[g])


def child_job(inv: Invocation, run, slots: Slots, group: tuple[str, ...], options: ParallelOptions) -> Job:
    """The command and environment that train ``run`` in a child process."""
    recipe = inv.recipe
    words = ["-m", "lowrank_runner", "run", recipe.source, *[w for o in recipe.overrides for w in ("--set", o)],
             "--output", str(inv.root), "--only-run", run.slug]
    words += ["--resume"] if inv.resume else []
    words += ["--stop-after-step", str(inv.stop_after)] if inv.stop_after else []
    if slots.gpus > 1:
        launch = ["-m", "accelerate.commands.launch", "--num_processes", str(slots.gpus), "--num_machines", "1",
                  "--multi_gpu", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
        words = launch + words
    log, _, progress = job_files(inv.root, run.slug)
    return Job(slug=run.slug, argv=[sys.executable, *words], env=child_env(progress, slots, group, options),
               run_dir=inv.dirs[run.index], log=log, gpus=slots.gpus, cpus=slots.cpus)


def child_env(progress: Path, slots: Slots, group: tuple[str, ...], options: ParallelOptions) -> dict[str, str]:
    """A child's environment: its threads, its progress file, this driver (the child stops
    when the driver is gone) and, on this machine, its devices."""
    threads = str(slots.cpus)
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
           PROGRESS_FILE_ENV: str(progress), "PYTHONUNBUFFERED": "1", DRIVER_ENV: f"{socket.gethostname()}:{os.getpid()}"}
    if options.executor == "local":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(group)
    return env


def _free_port() -> int:
    """A free TCP port for a multi-process child's rendezvous (each child its own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_line(log: Path) -> str:
    """The last non-empty line of a child's log (its error, usually)."""
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"


class signals_ignored:
    """SIGINT and SIGTERM ignored (main thread only) while the children are stopped."""

    def __enter__(self):
        self.saved = None
        if threading.current_thread() is threading.main_thread():
            self.saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, *exc):
        for sig, handler in (self.saved or {}).items():
            signal.signal(sig, handler)
        return False

