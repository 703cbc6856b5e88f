"""``lrr run`` of a recipe with a ``search:`` block: one Optuna study per task, each
trial a run directory, then the best point of each task with every seed.

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
samples what an uninterrupted one would.
"""

from __future__ import annotations

import json
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from rich.markup import escape

from lowrank_runner.errors import LrrError, RunFileError, UsageError
from lowrank_runner.quiet import quiet_libraries
from lowrank_runner.recipe.load import Recipe, load_recipe
from lowrank_runner.recipe.search import SearchSpec, search_spec, trial_overrides
from lowrank_runner.rundir.files import read_json_file, write_recipe
from lowrank_runner.rundir.layout import METRICS_FILE, RECIPE_FILE, REPORT_FILE
from lowrank_runner.rundir.search import BEST_DIR, DB_FILE, RECORD_FILE, TRIALS_DIR
from lowrank_runner.search.record import task_info, write_record
from lowrank_runner.train import run_dirs
from lowrank_runner.train.devices import world_size
from lowrank_runner.train.invocation import console, say
from lowrank_runner.train.run_dirs import continue_command, owned, prepare_root, recorded_runs
from lowrank_runner.train.runner import run_recipe

STOPPED = "stopped"  # --stop-after-step ended a trial: the search waits for --resume


def run_search(recipe: Recipe, output: Path | None, argv: list[str], resume: bool = False,
               stop_after: int | None = None) -> list[str]:
    """Search every task, then train each task's best point with every seed; returns
    what failed (tasks without a completed trial, best runs that failed)."""
    optuna = _optuna()
    if world_size() > 1:
        raise UsageError("a search runs in one process: start it without torchrun / accelerate launch "
                         "(each trial uses the GPU it finds)")
    quiet_libraries()
    root = _search_root(recipe, output, resume)
    with owned(root, say):  # one process runs a search: its study, trials and final runs (rundir/lock.py)
        search = Search(recipe, search_spec(recipe.resolved), root, argv, stop_after, optuna)
        try:
            return search.run()
        except KeyboardInterrupt:
            search.write("interrupted")
            console.print(f"[yellow]search interrupted[/yellow]; continue it with: {escape(search.again)}")
            raise


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


def _optuna():
    try:
        import optuna
    except ImportError:
        raise LrrError("a search (the recipe's search: block) needs Optuna: pip install 'lowrank-runner[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _search_root(recipe: Recipe, output: Path | None, resume: bool) -> Path:
    """The output directory: claimed new, or (``--resume``) one holding this search."""
    if not resume:
        root, _ = prepare_root(recipe, output, resume=False)
        return root
    if output is None:
        raise UsageError("--resume continues the search in an existing run directory: give it with --output RUN_DIR")
    record = output / RECORD_FILE
    if not record.exists() or not (output / DB_FILE).is_file():
        raise UsageError(f"--output {output}: holds no search of lowrank-runner (no {RECORD_FILE} and {DB_FILE}), "
                         "nothing to resume; give a directory written by lrr run of a recipe with a search: block")
    found = _read_record(record)
    recorded, command = found["hash"], continue_command(found["source"], found["overrides"], output)
    if recorded != recipe.hash:
        raise UsageError(f"--output {output}: its search was started by a different recipe or --set overrides "
                         f"(recipe hash {recorded}; {recipe.source} with these overrides: {recipe.hash}); resume with "
                         f"the recipe and overrides it started with: {command}")
    return output


def recorded_overrides(output: Path | None) -> list[str]:
    """The ``--set`` overrides the runs in ``output`` were started with: a search's own
    (its trials and best runs record more), else those of its runs."""
    record = output / RECORD_FILE if output is not None else None
    if record is not None and record.exists():  # a damaged one: an error, not its trials' overrides
        return _read_record(record)["overrides"]
    return run_dirs.recorded_overrides(output)


def _read_record(record: Path) -> dict:
    """What ``--resume`` reads of ``search.json``: the recipe ``hash``, its ``source`` and
    the ``--set`` ``overrides``, checked; a damaged file is an error naming it and the fix."""
    fix = "restore it from a copy, or start the search again in a new directory (lrr run RECIPE --output NEW_DIR)"
    found = read_json_file(record, "search record", fix)
    if not (isinstance(found, dict) and isinstance(found.get("hash"), str) and isinstance(found.get("source"), str)
            and isinstance(found.get("overrides"), list) and all(isinstance(o, str) for o in found["overrides"])):
        raise RunFileError(f"{record}: not the search record lrr writes (its recipe 'hash', 'source' and "
                           f"'overrides'); the file is damaged: {fix}")
    return found


@dataclass
class Search:
    """The search of one ``lrr run``: its studies and runs, and the record of them."""

    recipe: Recipe
    spec: SearchSpec
    root: Path
    argv: list[str]
    stop_after: int | None
    optuna: object

    def __post_init__(self):
        with _readable_db(self.root / DB_FILE):
            self.storage = self.optuna.storages.RDBStorage(f"sqlite:///{(self.root / DB_FILE).resolve()}")
        self.tasks = list(dict.fromkeys(run.task for run in self.recipe.runs))
        self.info = {task: task_info(self.recipe, task) for task in self.tasks}
        self.studies: dict = {}
        self.again = continue_command(self.recipe.source, self.recipe.overrides, self.root)
        self.distributions = _distributions(self.optuna, self.spec)

    def run(self) -> list[str]:
        """Every task's study, then the best runs; the record is written as it goes."""
        self.write("running")
        for task in self.tasks:
            self.studies[task] = self.study(task)
            if self.run_trials(task) == STOPPED:
                self.write(STOPPED)
                console.print(f"[yellow]search stopped[/yellow] (--stop-after-step); continue it with: "
                              f"{escape(self.again)}")
                return []
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
        with _readable_db(self.root / DB_FILE):
            study = self.optuna.create_study(study_name=task, storage=self.storage, direction=direction,
                                             load_if_exists=True, pruner=study_pruner(self.optuna, self.spec))
        if study.direction.name.lower() != direction:
            raise UsageError(f"{self.root / DB_FILE}: study {task!r} was started to {study.direction.name.lower()} "
                             f"its objective, the recipe now asks to {direction}; resume with the recipe it started with")
        return study

    def run_trials(self, task: str) -> str | None:
        """Trials left running by an interrupted command first (with their parameters),
        then new ones until ``n_trials`` have finished."""
        study, running = self.studies[task], self.optuna.trial.TrialState.RUNNING
        for frozen in study.get_trials(deepcopy=False, states=(running,)):
            trial = self.optuna.trial.Trial(study, frozen._trial_id)  # the handle of a trial of another command
            if self.trial(task, study, trial, frozen.params) == STOPPED:
                return STOPPED
        while _finished(study, self.optuna) < self.spec.n_trials:
            study.sampler = _sampler(self.optuna, self.spec, len(study.trials))
            trial = study.ask(self.distributions)
            trial.set_user_attr("dir", str(self.trial_dir(task, trial.number).relative_to(self.root)))
            if self.trial(task, study, trial, trial.params) == STOPPED:
                return STOPPED
        return None

    def trial(self, task: str, study, trial, params: dict) -> str | None:
        """Run one trial (or continue it) and tell the study its value: the run's best
        on the selection split, never a test split's. A trial that fails is told failed."""
        values = self.decode(params)
        run_dir = self.trial_dir(task, trial.number)
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        console.rule(f"[bold]search[/bold] · {escape(task)} · trial {trial.number} ({self.spec.n_trials} per task)")
        console.print(f"parameters: {escape(shown)}")
        rec = None
        try:
            rec = self.trial_recipe(task, values)  # a sampled value the recipe cannot take fails this trial
            run_recipe(rec, run_dir, self.argv, resume=(run_dir / RECIPE_FILE).is_file(), stop_after=self.stop_after,
                       observer=Pruning(trial, self.spec.pruner, self.info[task].metric))
            done = _metrics(run_dir)
            if done is None:
                return STOPPED
            pruned = _pruned_at(run_dir)
            if pruned is not None:  # the pruner ended it: a finished trial, never the best point
                trial.set_user_attr("pruned_at", pruned)
                study.tell(trial.number, state=self.optuna.trial.TrialState.PRUNED)
                self.write("running")
                return None
            value = done["best"]["value"]
            if not isinstance(value, (int, float)) or value != value:
                raise LrrError(f"{run_dir}: no checkpoint was selected (best value {value!r})")
        except UsageError:
            raise
        except LrrError as exc:
            self.failed(study, trial, run_dir, rec, str(exc).strip() or type(exc).__name__)
        except Exception as exc:  # a crash (out of memory at a sampled batch size): the search goes on
            self.failed(study, trial, run_dir, rec, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        else:
            study.tell(trial.number, value)
        self.write("running")
        return None

    def failed(self, study, trial, run_dir: Path, rec: Recipe | None, error: str, details: str | None = None) -> None:
        """Record a failed trial (its directory kept, with the error) and tell the study."""
        _keep_failed(run_dir, rec, details or error)
        last = error.splitlines()[-1]
        trial.set_user_attr("error", last)
        study.tell(trial.number, state=self.optuna.trial.TrialState.FAIL)
        console.print(f"[red]trial {trial.number} failed[/red]: {escape(last)}; the search goes on")

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
            failures = run_recipe(rec, out, self.argv, resume=started, stop_after=self.stop_after)
        except LrrError:
            self.write("failed")
            raise
        if any((out / d / RECIPE_FILE).is_file() and _metrics(out / d) is None for d in _run_dirs(rec, out)):
            console.print(f"continue the search (its best runs) with: {escape(self.again)}")
        return failures


def _keep_failed(run_dir: Path, rec: Recipe | None, error: str) -> None:
    """A failed trial keeps its directory, as a failed run of a sweep does: ``error.txt``
    and ``report.json`` (status failed) and, when its recipe loaded, its ``recipe.yaml``
    (the overrides that rerun it). ``run_recipe`` removes a single run's directory that
    failed before training; a trial is listed in ``search.json``, so it stays."""
    run_dirs.mark_failed(run_dir, error, create=True)
    if rec is not None and not (run_dir / RECIPE_FILE).is_file():
        run = rec.runs[0]
        write_recipe(run_dir / RECIPE_FILE, run.config, rec.hash, run.config_hash, rec.source, rec.overrides)


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
    """The sampler of trial ``number``, seeded ``search.seed + number``."""
    kind = optuna.samplers.TPESampler if spec.sampler == "tpe" else optuna.samplers.RandomSampler
    return kind(seed=(spec.seed + number) % 2**32)


def study_pruner(optuna, spec: SearchSpec):
    """``search.pruner``: Optuna's MedianPruner or HyperbandPruner (their defaults), or none."""
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner()
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
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


def _finished(study, optuna) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def _metrics(run_dir: Path) -> dict | None:
    """A completed run's metrics.json (None: the run stopped before completing)."""
    report, metrics = run_dir / REPORT_FILE, run_dir / METRICS_FILE
    try:
        if json.loads(report.read_text(encoding="utf-8")).get("status") != "completed":
            return None
        return json.loads(metrics.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
