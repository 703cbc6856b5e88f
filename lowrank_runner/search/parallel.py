"""``lrr run RECIPE --parallel N [--executor ray]`` of a recipe with a ``search:`` block:
each task's trials N at a time, each trial a child process on this machine or a Ray task.

The driver (this process) owns the run directory and the studies' storage, asks each
trial (``study.ask``, so trial numbers and their seeded samplers are as in a sequential
search), starts its child and tells the study the result the child wrote. A child is
``lrr run RECIPE --set <the trial's overrides> --output TRIAL_DIR --trial-of FILE``: it
trains the trial's run as a sequential search would (:func:`~lowrank_runner.search.study.run_trial`)
and reports each evaluation to the study in ``search.db``, whose pruner may stop it. SQLite
locks the file for each write, so the driver and its children share it safely.

A trial whose process ends without a result (killed: SIGKILL, the machine's out-of-memory
killer; Ctrl-C) stays *running* in its study, never told failed and never replaced: the
search finishes its other trials, says which did not finish, and ``--resume`` continues
them from their checkpoints with the parameters they were asked with, so the study ends
with exactly ``n_trials`` trials, none lost and none twice. A child whose driver was
killed stops itself (:func:`~lowrank_runner.train.parallel.child.stop_with_the_driver`).
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from lowrank_runner.errors import UsageError
from lowrank_runner.quiet import quiet_libraries
from lowrank_runner.recipe.load import Recipe
from lowrank_runner.rundir.files import read_json_file, write_json
from lowrank_runner.rundir.search import DB_FILE
from lowrank_runner.search.study import (STOPPED, Pruning, Search, import_optuna, run_trial, study_pruner,
                                         study_storage)
from lowrank_runner.train.invocation import console
from lowrank_runner.train.parallel.child import job_files, stop_with_the_driver
from lowrank_runner.train.parallel.display import Active, Display
from lowrank_runner.train.parallel.driver import child_env, least_loaded, make_executor, signals_ignored
from lowrank_runner.train.parallel.jobs import INTERRUPTED, Job
from lowrank_runner.train.parallel.slots import ParallelOptions, Slots, plan_slots

TRIAL_FILE_SUFFIX = ".trial.json"  # logs/SLUG.trial.json: which trial of which study a child trains


@dataclass(frozen=True)
class TrialView:
    """A trial as the parallel display shows a run: its task, seed and parameters."""

    task: str
    seed: int
    label: str


@dataclass
class _Running:
    task: str
    trial: object  # the trial's handle in the driver's study
    job: Job
    group: tuple[str, ...]


class ParallelTrials:
    """The trials of each task, up to ``--parallel N`` at once, in child processes."""

    def __init__(self, search: Search, options: ParallelOptions, slots: Slots):
        self.search, self.options, self.slots = search, options, slots  # slots: check_options(options)
        self.running: dict[str, _Running] = {}
        self.stopped = False

    def __enter__(self):
        self.executor = make_executor(self.options, self.slots)
        return self

    def __exit__(self, *exc):
        self.executor.close()
        return False

    # ------------------------------------------------------------------ a task's trials

    def run_trials(self, task: str) -> str | None:
        """The trials an earlier command left running first, then new ones, while fewer
        than ``n_trials`` have finished or are running; STOPPED after --stop-after-step."""
        search = self.search
        waiting = search.left_running(task)
        total = search.spec.n_trials
        self.display = Display(console, f"{search.recipe.name} · {task}", total)
        self.display.line(f"[bold]search[/bold] · {escape(task)}: {total} trials, {self.executor.capacity} at a time "
                          f"· run directory: {escape(str(search.root))}")
        with self.display:
            try:
                while True:
                    while not self.stopped and len(self.running) < self.executor.capacity and (
                            waiting or search.finished(task, running=True) < total):
                        self.start(task, waiting.pop(0) if waiting else search.ask(task))
                    self.count(task)
                    if not self.running:
                        break
                    for job, code in self.executor.wait_any(timeout=0.5):
                        self.finished(job, code)
            except (KeyboardInterrupt, UsageError):
                self.stop()
                raise
        return STOPPED if self.stopped else None

    def start(self, task: str, trial) -> None:
        """Start a child for ``trial`` (its recipe first: a sampled value the recipe cannot
        take fails the trial here, without a child)."""
        search = self.search
        values = search.decode(trial.params)
        outcome = search.attempt(task, trial, values)
        if outcome["state"] != "ready":
            search.settle(task, trial, outcome)
            return
        group = least_loaded(self.slots, [r.group for r in self.running.values()])
        job = self.job(task, trial, outcome["recipe"], group)
        for earlier in job_files(search.root, job.slug)[1:]:  # an earlier attempt's result and progress
            earlier.unlink(missing_ok=True)
        self.executor.submit(job)
        self.running[job.slug] = _Running(task, trial, job, group)
        where = self.slots.where(group) if self.options.executor == "local" else "ray"
        view = TrialView(task, search.info[task].seed, f"trial {trial.number}: {search.shown(values)}")
        self.display.active[job.slug] = Active(view, where.partition(" (")[0], job.log, job_files(search.root, job.slug)[2])
        self.display.line(f"started trial {trial.number} ({escape(search.shown(values))}) on {escape(where)} · "
                          f"log: {escape(str(job.log))}")

    def job(self, task: str, trial, rec: Recipe, group: tuple[str, ...]) -> Job:
        """The child command that trains ``trial`` (its overrides, its directory) and the
        file telling it which trial of which study it reports to."""
        search = self.search
        run_dir = search.trial_dir(task, trial.number)
        slug = f"{task.replace('/', '-')}-trial-{trial.number:04d}"
        log, entry, progress = job_files(search.root, slug)
        ticket = log.with_name(slug + TRIAL_FILE_SUFFIX)
        ticket.parent.mkdir(parents=True, exist_ok=True)
        write_json(ticket, {"storage": str((search.root / DB_FILE).resolve()), "study": task,
                            "trial_id": trial._trial_id, "number": trial.number, "pruner": search.spec.pruner,
                            "pruner_settings": dict(search.spec.pruner_settings),
                            "metric": search.info[task].metric, "entry": str(entry.resolve())})
        words = ["-m", "lowrank_runner", "run", rec.source, *[w for o in rec.overrides for w in ("--set", o)],
                 "--output", str(run_dir), "--trial-of", str(ticket)]
        words += ["--stop-after-step", str(search.stop_after)] if search.stop_after else []
        return Job(slug=slug, argv=[sys.executable, *words], env=child_env(progress, self.slots, group, self.options),
                   run_dir=run_dir, log=log, gpus=self.slots.gpus, cpus=self.slots.cpus)

    # ------------------------------------------------------------------ results

    def finished(self, job: Job, code: int) -> None:
        """Tell the study what the child wrote; a child that wrote nothing leaves its
        trial running (killed or interrupted: ``--resume`` continues it), or fails it
        (it exited with an error before its run started)."""
        done = self.running.pop(job.slug)
        self.display.active.pop(job.slug, None)
        number, log = done.trial.number, escape(str(job.log))
        outcome = _outcome(job_files(self.search.root, job.slug)[1])
        if outcome is None and (code < 0 or code == INTERRUPTED):
            how = f"was killed by {_signal_name(-code)}" if code < 0 else "was interrupted"
            self.display.line(f"[yellow]trial {number}'s process {how}[/yellow]: the trial stays running in its study "
                              f"and continues from its last checkpoint with: {escape(self.search.again)} · its log: {log}")
            return
        if outcome is None:
            outcome = {"state": "failed", "error": f"the process training this trial exited with code {code} "
                                                   f"without a result; its log: {job.log}"}
        if outcome["state"] == "usage":  # the child refused what it was given (its directory held...)
            raise UsageError(outcome["error"])
        if self.search.settle(done.task, done.trial, outcome) == STOPPED:
            self.stopped = True
            self.display.line(f"[yellow]stopped[/yellow] trial {number} (--stop-after-step) · its log: {log}")
        elif outcome["state"] == "complete":
            self.display.line(f"[bold green]done[/bold green] trial {number}: {self.search.info[done.task].metric} "
                              f"{outcome['value']:.4f}")
        elif outcome["state"] == "pruned":
            self.display.line(f"pruned trial {number} at step {outcome['step']}")
        else:
            self.display.line(f"its log: {log}")

    def count(self, task: str) -> None:
        states = [t.state.name for t in self.search.studies[task].get_trials(deepcopy=False)]
        done = states.count("COMPLETE") + states.count("PRUNED")
        left = sum(s == "RUNNING" for s in states) - len(self.running)  # killed, interrupted, stopped
        self.display.counts = {"done": done, "running": len(self.running), "failed": states.count("FAIL"),
                               "waiting": max(0, self.search.spec.n_trials - len(states)), "interrupted": left}

    def stop(self) -> None:
        """Ctrl-C / SIGTERM: every child is asked to stop (each marks its trial's run
        interrupted, resumable) and waited for; their trials stay running."""
        self.display.line(f"[yellow]stopping[/yellow] {len(self.running)} running trial(s)…")
        with signals_ignored():
            self.executor.stop_all()
            for job, code in self.executor.wait_any(timeout=0):
                self.finished(job, code)


def check_options(options: ParallelOptions):
    """The options checked (before anything is written) and the slots they give: a
    trial trains in one process."""
    if options.gpus_per_run and options.gpus_per_run > 1:
        raise UsageError(f"--gpus-per-run {options.gpus_per_run}: a search's trial trains in one process (its "
                         "pruner decides at each evaluation); give --gpus-per-run 1, or drop it")
    return plan_slots(options)


# ------------------------------------------------------------------ the child


def run_trial_child(rec: Recipe, trial_dir: Path | None, ticket: Path, argv: list[str],
                    stop_after: int | None = None) -> list[str]:
    """A child of a parallel search (``--trial-of FILE``): train the trial's run into
    ``trial_dir`` with its evaluations reported to its study, and write the outcome for
    the driver. Returns [the trial] when it failed."""
    if trial_dir is None:
        raise UsageError(f"--trial-of {ticket}: give the trial's directory with --output")
    fix = "it is written by the driver of lrr run --parallel for its children; start the search with lrr run"
    found = read_json_file(ticket, "parallel search trial", fix)
    stop_with_the_driver()
    quiet_libraries()
    optuna = import_optuna()
    study = optuna.load_study(study_name=found["study"], storage=study_storage(optuna, Path(found["storage"])),
                              pruner=study_pruner(optuna, found["pruner"], found.get("pruner_settings", {}).items()))
    trial = optuna.trial.Trial(study, found["trial_id"])
    entry = Path(found["entry"])
    try:
        outcome = run_trial(rec, trial_dir, argv, stop_after, Pruning(trial, found["pruner"], found["metric"]))
    except UsageError as exc:
        write_json(entry, {"state": "usage", "error": str(exc)})
        raise
    write_json(entry, outcome)
    return [f"trial {found['number']}"] if outcome["state"] == "failed" else []


def _outcome(entry: Path) -> dict | None:
    try:
        found = json.loads(entry.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and "state" in found else None


def _signal_name(number: int) -> str:
    return signal.Signals(number).name if number in signal.valid_signals() else f"signal {number}"
