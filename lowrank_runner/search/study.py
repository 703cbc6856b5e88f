"""A search: one Optuna study per task, each trial a run directory, then the best point
of each task with every seed (started by :func:`lowrank_runner.search.command.run_search`).

::

    RUN_DIR/
      search.db                      Optuna's RDB storage (SQLite): one study per task, named by the task
      search.json, search.md         the search's record: per task its trials (parameters, value, state)
                                     and the best point
      search/TASK/trial-0003/        a trial: a run directory like any (recipe.yaml, metrics.json, report.json)
      best/                          the recipe at each task's best point with the recipe's seeds, written as
                                     lrr run writes any recipe: TASK-seedN/, summary.json, results.md

A trial is the recipe with the sampled values set on its task (``--set`` overrides,
recorded in the trial's ``recipe.yaml``), run by :func:`~lowrank_runner.train.runner.run_recipe`
with the recipe's first seed (the recorded overrides pin that seed and, in a multi-task
recipe, remove the other tasks, so they rerun the trial alone). A trial that fails keeps
its directory (``error.txt``, ``report.json`` failed). Its value is the run's ``best`` (the task's selection
metric on the selection split, never a test split), maximised or minimised as the
training loop selects checkpoints. ``--resume`` continues the studies: finished trials
are kept, a trial that was running continues from its checkpoint (or starts again with
the same parameters), the study goes on to ``n_trials``, then the best runs resume.
Trial N samples with the sampler seeded ``search.seed + N``, so a resumed search
samples what an uninterrupted one would (in parallel, TPE past its random start-up trials
also depends on which trials had finished when N was asked).
"""

from __future__ import annotations

import json
import shlex
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from rich.markup import escape

from lowrank_runner.errors import LrrError, UsageError
from lowrank_runner.recipe.load import Recipe, load_recipe
from lowrank_runner.recipe.search import SearchSpec, trial_overrides
from lowrank_runner.rundir.files import write_recipe
from lowrank_runner.rundir.layout import METRICS_FILE, RECIPE_FILE, REPORT_FILE
from lowrank_runner.rundir.search import BEST_DIR, DB_FILE, TRIALS_DIR
from lowrank_runner.search.record import task_info, write_record
from lowrank_runner.train import run_dirs
from lowrank_runner.train.invocation import console
from lowrank_runner.train.run_dirs import continue_command, recorded_runs
from lowrank_runner.train.runner import run_recipe

STOPPED = "stopped"  # --stop-after-step ended a trial: the search waits for --resume
LOCK_WAIT = 300.0  # seconds a write to search.db waits while another process writes


@contextmanager
def _readable_db(path: Path):
    """A damaged ``search.db`` (not SQLite, truncated, another schema) named with the fix."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except SQLAlchemyError as exc:
        cause = (str(getattr(exc, "orig", None) or exc).splitlines() or [type(exc).__name__])[0]
        raise LrrError(f"{path}: the search's study database cannot be read ({cause}); it is damaged: restore it "
                       "from a copy, or start the search again in a new directory (lrr run RECIPE --output "
                       "NEW_DIR)") from None


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise LrrError("a search (the recipe's search: block) needs Optuna: pip install 'lowrank-runner[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclass
class Search:
    """The search of one ``lrr run``: its studies and runs, and the record of them."""

    recipe: Recipe
    spec: SearchSpec
    root: Path
    argv: list[str]
    stop_after: int | None
    optuna: object
    parallel: object = None  # --parallel N ...: ParallelOptions (trials and best runs in child processes)

    def __post_init__(self):
        self.storage = study_storage(self.optuna, self.root / DB_FILE)
        self.tasks = list(dict.fromkeys(run.task for run in self.recipe.runs))
        self.info = {task: task_info(self.recipe, task) for task in self.tasks}
        self.studies: dict = {}
        options = self.parallel.words() if self.parallel else []  # kept by the command that continues the search
        self.again = " ".join([continue_command(self.recipe.source, self.recipe.overrides, self.root),
                               *map(shlex.quote, options)])
        self.distributions = _distributions(self.optuna, self.spec)

    def run(self, parallel=None) -> list[str]:
        """Every task's study (its trials one after another here, or ``parallel``'s
        children), then the best runs; the record is written as it goes."""
        self.write("running")
        for task in self.tasks:
            self.studies[task] = self.study(task)
            if (parallel.run_trials(task) if parallel else self.run_trials(task)) == STOPPED:
                self.write(STOPPED)
                console.print(f"[yellow]search stopped[/yellow] (--stop-after-step); continue it with: "
                              f"{escape(self.again)}")
                return []
        unfinished = self.unfinished()
        if unfinished:  # a trial's process was killed: the study goes on with --resume
            self.write("interrupted")
            console.print(f"[yellow]search incomplete[/yellow]: {', '.join(unfinished)} did not finish (its process "
                          f"ended without a result); continue the search with: {escape(self.again)}")
            return unfinished
        failures = [task for task in self.tasks if self.best(task) is None]
        for task in failures:
            console.print(f"[red]no trial of {escape(task)} completed[/red]: it has no best point to train "
                          f"(the trials' errors are in {escape(str(self.root / 'search.md'))})")
        self.write("training the best points")
        failures += self.train_best()
        self.write("completed" if not failures else "failed")
        return failures

    def write(self, status: str) -> None:
        write_record(self.root, self.recipe, self.spec, self.info, self.studies, status, self.decode)

    # ------------------------------------------------------------------ studies and trials

    def study(self, task: str):
        """The task's study in ``search.db`` (created, or loaded to continue)."""
        direction = self.info[task].direction
        pruner = study_pruner(self.optuna, self.spec.pruner, self.spec.pruner_settings)
        with _readable_db(self.root / DB_FILE):
            study = self.optuna.create_study(study_name=task, storage=self.storage, direction=direction,
                                             load_if_exists=True, pruner=pruner)
        if study.direction.name.lower() != direction:
            raise UsageError(f"{self.root / DB_FILE}: study {task!r} was started to {study.direction.name.lower()} "
                             f"its objective, the recipe now asks to {direction}; resume with the recipe it started with")
        return study

    def run_trials(self, task: str) -> str | None:
        """Trials left running by an interrupted command first (with their parameters),
        then new ones until ``n_trials`` have finished."""
        study = self.studies[task]
        for trial in self.left_running(task):
            if self.trial(task, study, trial, trial.params) == STOPPED:
                return STOPPED
        while self.finished(task) < self.spec.n_trials:
            trial = self.ask(task)
            if self.trial(task, study, trial, trial.params) == STOPPED:
                return STOPPED
        return None

    def left_running(self, task: str) -> list:
        """The trials of ``task`` a command left running (killed, interrupted, stopped),
        as handles this process tells their results to."""
        study, running = self.studies[task], self.optuna.trial.TrialState.RUNNING
        return [self.optuna.trial.Trial(study, frozen._trial_id)
                for frozen in study.get_trials(deepcopy=False, states=(running,))]

    def finished(self, task: str, running: bool = False) -> int:
        """How many trials of ``task`` finished (``running``: or are running)."""
        states = self.optuna.trial.TrialState
        wanted = (states.COMPLETE, states.FAIL, states.PRUNED) + ((states.RUNNING,) if running else ())
        return len(self.studies[task].get_trials(deepcopy=False, states=wanted))

    def unfinished(self) -> list[str]:
        """The trials still running in the studies once every task's turn ended."""
        running = self.optuna.trial.TrialState.RUNNING
        return [f"trial {t.number} of {task}" for task in self.tasks
                for t in self.studies[task].get_trials(deepcopy=False, states=(running,))]

    def ask(self, task: str):
        """A new trial of ``task``, sampled with the sampler seeded ``search.seed + N``."""
        study = self.studies[task]
        study.sampler = _sampler(self.optuna, self.spec, len(study.trials))
        trial = study.ask(self.distributions)
        trial.set_user_attr("dir", str(self.trial_dir(task, trial.number).relative_to(self.root)))
        return trial

    def trial(self, task: str, study, trial, params: dict) -> str | None:
        """Run one trial (or continue it) in this process and tell the study its result."""
        values = self.decode(params)
        console.rule(f"[bold]search[/bold] · {escape(task)} · trial {trial.number} ({self.spec.n_trials} per task)")
        console.print(f"parameters: {escape(self.shown(values))}")
        outcome = self.attempt(task, trial, values)
        if outcome["state"] == "ready":
            outcome = run_trial(outcome["recipe"], self.trial_dir(task, trial.number), self.argv, self.stop_after,
                                Pruning(trial, self.spec.pruner, self.info[task].metric))
        return self.settle(task, trial, outcome)

    def attempt(self, task: str, trial, values: dict) -> dict:
        """The trial's recipe (``{"state": "ready", "recipe": ...}``), or its failure: a
        sampled value the recipe cannot take fails the trial, not the search."""
        run_dir = self.trial_dir(task, trial.number)
        try:
            return {"state": "ready", "recipe": self.trial_recipe(task, values)}
        except UsageError:
            raise
        except LrrError as exc:
            return failure(run_dir, None, str(exc).strip() or type(exc).__name__)
        except Exception as exc:
            return failure(run_dir, None, f"{type(exc).__name__}: {exc}", traceback.format_exc())

    def settle(self, task: str, trial, outcome: dict) -> str | None:
        """Tell the study a trial's result (:func:`run_trial`'s outcome): its value (the
        run's best on the selection split, never a test split's), pruned, or failed; a
        stopped trial (--stop-after-step) stays running for ``--resume``."""
        study, state = self.studies[task], self.optuna.trial.TrialState
        if outcome["state"] == STOPPED:
            return STOPPED
        if outcome["state"] == "pruned":  # the pruner ended it: a finished trial, never the best point
            trial.set_user_attr("pruned_at", outcome["step"])
            study.tell(trial.number, state=state.PRUNED)
        elif outcome["state"] == "failed":
            trial.set_user_attr("error", outcome["error"])
            study.tell(trial.number, state=state.FAIL)
            console.print(f"[red]trial {trial.number} failed[/red]: {escape(outcome['error'])}; the search goes on")
        else:
            study.tell(trial.number, outcome["value"])
        self.write("running")
        return None

    def shown(self, values: dict) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in values.items())

    def trial_dir(self, task: str, number: int) -> Path:
        return self.root / TRIALS_DIR / task.replace("/", "-") / f"trial-{number:04d}"

    def trial_recipe(self, task: str, values: dict) -> Recipe:
        """The recipe with ``values`` on ``task``, reduced by ``--set`` overrides to that
        task (``~tasks.OTHER``) and its first seed: one run, which its recorded overrides
        (``recipe.yaml``) rerun alone with ``lrr run RECIPE --set …``."""
        seed = self.info[task].seed
        others = [f"~tasks.{name}" for name in self.recipe.resolved.get("tasks") or {} if name != task]
        rec = self.at_points({task: {**values, "training.seed": seed}}, others)
        if len(rec.runs) != 1:  # the overrides must leave the trial's run alone
            raise LrrError(f"{self.recipe.source}: the overrides of a trial of {task} plan {len(rec.runs)} runs, "
                           f"not 1: {rec.overrides}")
        return rec

    def at_points(self, points: dict, extra: list[str] = ()) -> Recipe:
        """The recipe without its search, each task's values (``points``) set on it,
        then the ``extra`` overrides."""
        overrides = [*self.recipe.overrides, "~search"]
        for task, values in points.items():
            overrides += trial_overrides(self.recipe.resolved, task, values)
        return load_recipe(self.recipe.source, [*overrides, *extra])

    def decode(self, params: dict) -> dict:
        """Optuna's parameters as recipe values (choices that are lists are stored as JSON)."""
        out = {}
        for dim in self.spec.dimensions:
            value = params[dim.key]
            out[dim.key] = json.loads(value) if dim.kind == "choices" and not _scalars(dim.values) else value
        return out

    # ------------------------------------------------------------------ the best points

    def best(self, task: str):
        study = self.studies.get(task)
        complete = study.get_trials(deepcopy=False, states=(self.optuna.trial.TrialState.COMPLETE,)) if study else []
        return study.best_trial if complete else None

    def train_best(self) -> list[str]:
        """Each task's best point with every seed of the recipe, in ``RUN_DIR/best``."""
        best = {task: self.decode(t.params) for task in self.tasks if (t := self.best(task)) is not None}
        if not best:
            return []
        rec = self.at_points(best)
        rec = replace(rec, runs=tuple(run for run in rec.runs if run.task in best))
        out = self.root / BEST_DIR
        started = out.is_dir() and bool(recorded_runs(rec, out))
        console.rule(f"[bold]search[/bold] · the best point of each task, every seed · {escape(str(out))}")
        try:
            failures = run_recipe(rec, out, self.argv, resume=started, stop_after=self.stop_after, parallel=self.parallel)
        except LrrError:
            self.write("failed")
            raise
        if any((out / d / RECIPE_FILE).is_file() and _metrics(out / d) is None for d in _run_dirs(rec, out)):
            console.print(f"continue the search (its best runs) with: {escape(self.again)}")
        return failures


def run_trial(rec: Recipe, run_dir: Path, argv: list[str], stop_after: int | None, observer) -> dict:
    """Train a trial's one run into ``run_dir`` (continuing it when it has started) and
    say how it ended: ``{"state": "complete", "value": best}``, ``{"state": "pruned",
    "step": N}``, ``{"state": "failed", "error": last line}`` (its directory kept with the
    error) or ``{"state": "stopped"}`` (--stop-after-step, or Ctrl-C's checkpoint). Run
    by a search in its own process and by each child of a parallel one."""
    try:
        run_recipe(rec, run_dir, argv, resume=(run_dir / RECIPE_FILE).is_file(), stop_after=stop_after,
                   observer=observer)
        done = _metrics(run_dir)
        if done is None:
            return {"state": STOPPED}
        pruned = _pruned_at(run_dir)
        if pruned is not None:
            return {"state": "pruned", "step": pruned}
        value = done["best"]["value"]
        if not isinstance(value, (int, float)) or value != value:
            raise LrrError(f"{run_dir}: no checkpoint was selected (best value {value!r})")
        return {"state": "complete", "value": value}
    except UsageError:
        raise
    except LrrError as exc:
        return failure(run_dir, rec, str(exc).strip() or type(exc).__name__)
    except Exception as exc:  # a crash (out of memory at a sampled batch size): the search goes on
        return failure(run_dir, rec, f"{type(exc).__name__}: {exc}", traceback.format_exc())


def failure(run_dir: Path, rec: Recipe | None, error: str, details: str | None = None) -> dict:
    """A failed trial's outcome, its directory kept as a failed run of a sweep is:
    ``error.txt`` and ``report.json`` (status failed) and, when its recipe loaded, its
    ``recipe.yaml`` (the overrides that rerun it). ``run_recipe`` removes a single run's
    directory that failed before training; a trial is listed in ``search.json``, so it stays."""
    run_dirs.mark_failed(run_dir, details or error, create=True)
    if rec is not None and not (run_dir / RECIPE_FILE).is_file():
        run = rec.runs[0]
        write_recipe(run_dir / RECIPE_FILE, run.config, rec.hash, run.config_hash, rec.source, rec.overrides)
    return {"state": "failed", "error": error.splitlines()[-1]}


def study_storage(optuna, path: Path):
    """The studies' storage, ``search.db``: Optuna's RDB storage on SQLite. SQLite locks the
    file for each write, so the driver of a parallel search and its children (which
    report their evaluations to the pruner) write to it at once safely; a writer waits up
    to ``LOCK_WAIT`` seconds for the lock instead of failing with "database is locked"."""
    url = f"sqlite:///{path.resolve()}"
    with _readable_db(path):
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": LOCK_WAIT}})


def _run_dirs(recipe: Recipe, root: Path) -> list[Path]:
    return list(run_dirs.run_dirs(recipe, root).values())


def _distributions(optuna, spec: SearchSpec) -> dict:
    d = optuna.distributions
    out = {}
    for dim in spec.dimensions:
        if dim.kind == "choices":
            choices = list(dim.values) if _scalars(dim.values) else [json.dumps(v) for v in dim.values]
            out[dim.key] = d.CategoricalDistribution(choices)
        elif dim.kind == "int":
            out[dim.key] = d.IntDistribution(*dim.values)
        else:
            out[dim.key] = d.FloatDistribution(*map(float, dim.values), log=dim.kind == "log_uniform")
    return out


def _scalars(values) -> bool:
    """Choices Optuna stores as they are (others are stored as JSON text)."""
    return all(v is None or isinstance(v, (bool, int, float, str)) for v in values)


def _sampler(optuna, spec: SearchSpec, number: int):
    """The sampler of trial ``number``, seeded ``search.seed + number``. TPE counts the
    trials still running (in parallel) as bad ones (Optuna's constant liar), so trials
    asked while others train look elsewhere; with none running it samples as without."""
    seed = (spec.seed + number) % 2**32
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    return optuna.samplers.RandomSampler(seed=seed)


# search.pruner's settings by Optuna's names for them
OPTUNA_SETTINGS = {"startup_trials": "n_startup_trials", "warmup_steps": "n_warmup_steps",
                   "min_resource": "min_resource", "reduction_factor": "reduction_factor"}


def study_pruner(optuna, pruner: str, settings=()):
    """``search.pruner``: Optuna's MedianPruner or HyperbandPruner with the recipe's
    ``settings`` (Optuna's defaults for the others), or none."""
    given = {OPTUNA_SETTINGS[key]: value for key, value in settings}
    if pruner == "median":
        return optuna.pruners.MedianPruner(**given)
    if pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(**given)
    return optuna.pruners.NopPruner()


class Pruning:
    """A trial's evaluations reported to its study (``trial.report``); the study's pruner
    may end the trial there (:class:`~lowrank_runner.train.stopping.EvaluationObserver`)."""

    name = "pruner"

    def __init__(self, trial, pruner: str, metric: str):
        self.trial, self.pruner, self.metric = trial, pruner, metric

    def after_evaluation(self, step: int, value: float) -> str | None:
        self.trial.report(value, step)  # a resumed trial reports its earlier steps again: Optuna keeps the first
        if self.pruner == "none" or not self.trial.should_prune():
            return None
        return f"pruned by the search's {self.pruner} pruner (search.pruner) at step {step}: {self.metric} {value:.4f}"

    def state_dict(self) -> dict:
        return {}  # what the pruner decides on lives in the study (search.db)

    def load_state_dict(self, state: dict) -> None:
        pass


def _pruned_at(run_dir: Path) -> int | None:
    """The step a completed trial's run was pruned at (report.json ``stopped_early`` by the pruner)."""
    try:
        early = json.loads((run_dir / REPORT_FILE).read_text(encoding="utf-8")).get("stopped_early") or {}
    except (OSError, ValueError):
        return None
    return early.get("step") if early.get("by") == Pruning.name else None


def _metrics(run_dir: Path) -> dict | None:
    """A completed run's metrics.json (None: the run stopped before completing)."""
    report, metrics = run_dir / REPORT_FILE, run_dir / METRICS_FILE
    try:
        if json.loads(report.read_text(encoding="utf-8")).get("status") != "completed":
            return None
        return json.loads(metrics.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
