"""Run directories of ``lrr run``: where each run of a recipe writes, set up before
anything is loaded, and what is left in them when a run fails or is interrupted.

A new run directory is created atomically (never reused: the default
``<output.dir>/<name>/<timestamp>`` gets a ``-2``, ``-3`` suffix when another run took
that name in the same second) and checked writable; ``--resume`` needs a directory holding
runs of this very recipe (same recipe hash), every checkpoint verified first. Each run's
``recipe.yaml`` is written when the run starts, with the command's ``--set`` overrides in
its header, so ``--resume`` without ``--set`` continues with them. A failed run is marked
``failed``, an interrupted one ``interrupted`` and resumable; a directory this command
created that holds nothing resumable is removed.
"""

from __future__ import annotations

import datetime as dt
import shlex
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lowrank_runner.errors import LrrError, RunFileError, UsageError
from lowrank_runner.outputs import require_free
from lowrank_runner.recipe.load import Recipe
from lowrank_runner.rundir import status as run_status
from lowrank_runner.rundir.files import read_json_file, read_recipe_header, write_recipe
from lowrank_runner.rundir.layout import (ADAPTER_CONFIG, ADAPTER_DIR, CHECKPOINTS_DIR, METRICS_FILE, METRICS_LOG,
                                          RECIPE_FILE, REPORT_FILE, checkpoint_dirs, resumable_from)
from lowrank_runner.rundir.lock import owning, refuse_if_held, wait_until_free
from lowrank_runner.rundir.schema import STATUSES
from lowrank_runner.train.devices import has_accelerator_device, is_main_process, world_size


# ------------------------------------------------------------------ creating and claiming


def _writable(path: Path, option: str = "--output") -> None:
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write there ({exc.strerror or exc}); choose a writable location") from None


def _make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; returns those created, deepest first.
    FileExistsError when ``path`` itself appeared meanwhile (another run took it)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        for p in reversed(missing[1:]):
            p.mkdir(exist_ok=True)
        path.mkdir()
    except FileExistsError:
        raise  # the caller takes another name, or checks what is there now
    except OSError as exc:
        raise UsageError(f"--output {path}: cannot create the run directory ({exc.strerror or exc}); "
                         f"choose a writable location") from None
    return missing


def _claim(output: Path) -> list[Path]:
    """A new run directory at ``output``: created, or an existing empty one; checked writable."""
    if output.is_dir():
        refuse_if_held(output, "choose another --output, or continue it with --resume")
    require_free(output, "--output")
    try:
        created = _make_dirs(output)
    except FileExistsError:  # created by someone else since the check
        require_free(output, "--output")
        created = []
    _writable(output)
    return created


def timestamp() -> str:
    """The default run directory's name: the local time to the second."""
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _timestamped(base: Path) -> tuple[Path, list[Path]]:
    """``base/<timestamp>``, created atomically; ``-2``, ``-3``… when the name is taken."""
    stamp = timestamp()
    for n in range(1, 1000):
        path = base / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            created = _make_dirs(path)
        except FileExistsError:
            continue
        _writable(path)
        return path, created
    raise UsageError(f"{base}: no free run directory name for {stamp}; give one with --output")


def _shared(value: str | None) -> str:
    """Rank 0's ``value`` on every process (the other ranks pass None)."""
    if world_size() == 1:
        return value
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    PartialState(cpu=not has_accelerator_device())  # the Accelerator of each run reuses it
    return broadcast_object_list([value])[0]


def run_dirs(recipe: Recipe, root: Path) -> dict[int, Path]:
    """Each run's directory under ``root`` (the root itself for a single run)."""
    if len(recipe.runs) == 1:
        return {recipe.runs[0].index: root}
    return {run.index: root / run.slug for run in recipe.runs}


def prepare_root(recipe: Recipe, output: Path | None, resume: bool) -> tuple[Path, list[Path]]:
    """The root run directory, ready to write into (rank 0 creates it), and the
    directories this call created (removed again if nothing resumable is left in them)."""
    if resume:
        if output is None:
            raise UsageError("--resume continues the runs in an existing run directory: give it with --output RUN_DIR")
        if not output.is_dir():
            raise UsageError(f"--output {output}: no such run directory to resume")
        check_resumable(recipe, output)
        if is_main_process():
            _writable(output)
        return output, []
    created: list[Path] = []
    if output is None:
        base = Path(recipe.resolved["output"]["dir"]) / recipe.name
        path = None
        if is_main_process():
            path, created = _timestamped(base)
        return Path(_shared(str(path) if path else None)), created
    if is_main_process():  # the other ranks would race with rank 0 creating the directory
        created = _claim(output)
    return output, created


@contextmanager
def owned(directory: Path, say):
    """This process owns ``directory`` for the block (rank 0 of a multi-process run; the
    lock and owner file: rundir/lock.py); ``say`` prints a takeover note."""
    if not is_main_process():
        yield
        return
    with owning(directory, say):
        yield


# ------------------------------------------------------------------ resuming


def recorded_runs(recipe: Recipe, root: Path) -> dict[Path, dict]:
    """The ``recipe.yaml`` headers (read_recipe_header) of the runs in ``root``:
    those this recipe expects, else any run found in it or its subdirectories."""
    dirs = run_dirs(recipe, root)
    found = {d: read_recipe_header(d / RECIPE_FILE) for d in dirs.values()}
    found = {d: h for d, h in found.items() if h is not None}
    if not found:
        found = {d: h for d in candidate_run_dirs(root) if (h := read_recipe_header(d / RECIPE_FILE)) is not None}
    return found


def recorded_overrides(output: Path | None) -> list[str]:
    """The ``--set`` overrides the runs in ``output`` were started with (``--resume``
    without ``--set`` continues with them)."""
    if output is None or not output.is_dir():
        return []
    for d in candidate_run_dirs(output):
        header = read_recipe_header(d / RECIPE_FILE)
        if header is not None:
            return header["overrides"]
    return []


def continue_command(source: str, overrides, root: Path) -> str:
    """The shell command that resumes ``root`` (quoted so it works as printed)."""
    words = ["lrr", "run", source, *[w for o in overrides for w in ("--set", o)], "--output", str(root), "--resume"]
    text = shlex.join(words)
    if world_size() > 1:
        text += f"  (launched as before, with {world_size()} processes)"
    return text


def _headless_recipe(root: Path) -> UsageError | None:
    """The error for a run in ``root`` (it has checkpoints, a log or a report) whose
    ``recipe.yaml`` lost the header ``--resume`` reads: damaged, or a directory in its place.
    A UsageError, as a recipe that did not start the run: a search stops (its trial is not failed)."""
    for d in candidate_run_dirs(root):
        path = d / RECIPE_FILE
        if path.exists() and any((d / name).exists() for name in (CHECKPOINTS_DIR, METRICS_LOG, REPORT_FILE)):
            return UsageError(
                f"{path}: {'a directory' if path.is_dir() else 'no run header'}, not the resolved recipe 'lrr run' "
                "writes (its first lines name the recipe and its hashes, which --resume checks before it continues "
                "a run); the file is damaged: restore it from a copy, or start the run again in a new directory "
                "(lrr run RECIPE --output NEW_DIR)")
    return None


def check_resumable(recipe: Recipe, root: Path) -> None:
    """``root`` holds runs of this recipe (same recipe hash and config hashes); refuses a
    directory of something else, a different recipe, or other ``--set`` overrides."""
    found = recorded_runs(recipe, root)
    if not found:
        damaged = _headless_recipe(root)
        if damaged is not None:
            raise damaged
        raise UsageError(
            f"--output {root}: holds no run of lowrank-runner (no {RECIPE_FILE} with a run's header), "
            f"nothing to resume; give a directory written by lrr run, or drop --resume to start a new run"
        )
    dirs = run_dirs(recipe, root)
    expected = {dirs[run.index]: run for run in recipe.runs}
    for directory, header in found.items():
        run = expected.get(directory)
        if header["recipe_hash"] != recipe.hash or run is None or header["config_hash"] != run.config_hash:
            raise UsageError(
                f"--output {root}: its runs were started by a different recipe or --set overrides ({directory / RECIPE_FILE}: "
                f"recipe hash {header['recipe_hash']}; {recipe.source} with these overrides: {recipe.hash}); "
                f"resume with the recipe and overrides the run started with: "
                f"{continue_command(header['source'], header['overrides'], root)}"
            )


def completed_metrics(run_dir: Path) -> dict | None:
    """The metrics of a completed run (None when not completed). A run whose report says
    it completed but whose files cannot be read is refused, and so is a report that cannot
    be read or says no status: completed runs are never trained over."""
    report, metrics = run_dir / REPORT_FILE, run_dir / METRICS_FILE
    if not report.exists():
        if metrics.is_file() and (run_dir / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
            raise LrrError(  # the files a completed run writes, all but the report
                f"{run_dir}: this run completed ({metrics.name} and {ADAPTER_DIR}/ are there) but its "
                f"{report.name} is missing; it is not resumed, so a completed run is never trained over: restore "
                f"{report.name} from a copy, or start a new run in a new directory")
        return None
    fix = ("restore it from a copy, or start a new run in a new directory (the run is not resumed: a completed run "
           "is never trained over)")
    if checkpoint_dirs(run_dir) and not metrics.exists():  # it cannot have completed: its results are not written
        fix = f"delete it to resume from {resumable_from(run_dir)}, or restore it from a copy"
    data = read_json_file(report, "run report", fix)
    status = data.get("status") if isinstance(data, dict) else None
    if status not in STATUSES:
        raise RunFileError(f"{report}: not a run report with a status ({', '.join(STATUSES)}); the file is damaged: "
                           f"{fix}")
    if status != "completed":
        return None
    done = read_json_file(metrics, "metrics file", fix)
    if not isinstance(done, dict) or not isinstance(done.get("best"), dict):
        raise RunFileError(f"{metrics}: no best checkpoint recorded ('best'), yet {report.name} says the run "
                           f"completed; the metrics file is damaged: {fix}")
    return done


def checkpoint_of(run, run_dir: Path):
    """The checkpoint to resume ``run_dir`` from (None: start from step 0), checked."""
    from lowrank_runner.train.checkpoint import STATE_FILE, latest_checkpoint

    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return None
    if checkpoint.state.get("config_hash") != run.config_hash:
        raise UsageError(
            f"{checkpoint.path / STATE_FILE}: written by a different recipe (config hash "
            f"{checkpoint.state.get('config_hash')}, this run's {run.config_hash}); it cannot be resumed by this run: "
            f"remove {run_dir / CHECKPOINTS_DIR} to start the run over"
        )
    if checkpoint.state.get("processes") != world_size():
        raise UsageError(
            f"{checkpoint.path}: written by {checkpoint.state.get('processes')} process(es), this command runs "
            f"{world_size()}; resume with the same number of processes"
        )
    return checkpoint


def resume_points(recipe: Recipe, root: Path) -> dict[int, object]:
    """Per run to resume: its completed metrics (``("completed", metrics)``) or its
    checkpoint (None: from step 0). Every checkpoint is verified before anything trains,
    once no other process trains the run (``root`` is this process's already)."""
    dirs = run_dirs(recipe, root)
    for run_dir in dirs.values():  # rank 0 alone: the other ranks would find its lock on a run it started
        if run_dir != root and is_main_process():
            wait_until_free(run_dir, "resume it")
    return {run.index: resume_point(run, dirs[run.index]) for run in recipe.runs}


def resume_point(run, run_dir: Path):
    """One run's :func:`resume_points` entry: ``("completed", metrics)``, its checkpoint,
    or None (from step 0)."""
    done = completed_metrics(run_dir)
    return ("completed", done) if done is not None else checkpoint_of(run, run_dir)


# ------------------------------------------------------------------ starting, failing, stopping


class Taken(UsageError):
    """Another ``lrr run`` claimed the run directory first (nothing of it is ours to clean up)."""


def start_run_dir(recipe: Recipe, run, run_dir: Path, resume: bool) -> None:
    """Rank 0 writes the run's ``recipe.yaml`` (claiming a new directory: exclusive)."""
    if not is_main_process():
        return
    fresh = not (run_dir / RECIPE_FILE).is_file()
    try:
        run_dir.mkdir(parents=True, exist_ok=run_dir.is_dir() and (resume or len(recipe.runs) == 1))
        write_recipe(run_dir / RECIPE_FILE, run.config, recipe.hash, run.config_hash, recipe.source,
                         recipe.overrides, exclusive=fresh)
    except FileExistsError:
        raise Taken(f"--output {run_dir}: another lrr run started in this directory just now; "
                    f"choose a new path") from None


def _resumable(run_dir: Path) -> bool:
    """A run directory with something to keep: a checkpoint, or a report (completed or failed runs)."""
    return (run_dir / REPORT_FILE).is_file() or bool(checkpoint_dirs(run_dir))


def nothing_resumable(root: Path) -> bool:
    return is_main_process() and not any(_resumable(d) for d in candidate_run_dirs(root))


def candidate_run_dirs(root: Path) -> list[Path]:
    """``root`` and the directories below it where a recipe's runs live: ``TASK-seedN``
    one level down, a sweep's ``TASK/POINT/seedN`` three levels down."""
    if not root.is_dir():
        return [root]
    return [root, *sorted(p for pattern in ("*", "*/*/*") for p in root.glob(pattern) if p.is_dir())]


def discard(root: Path, created: list[Path]) -> None:
    """Empty and remove a run directory this command created (or found empty) that holds
    nothing to keep; an empty directory that was there before stays."""
    if not is_main_process() or not root.is_dir():
        return
    for child in root.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    for path in created:  # deepest first; only if empty
        try:
            path.rmdir()
        except OSError:
            break


def single_run_failed(run_dir: Path, error: str, keep: bool) -> None:
    """A single run that failed before training leaves nothing behind (its directory is
    removed by :func:`~lowrank_runner.train.runner.run_recipe`); one that trained keeps
    its directory (checkpoints, metrics) with the failure recorded, as does one that
    ``keep`` says to keep (under ``--resume``, or one that diverged: its metrics.jsonl)."""
    if keep or not nothing_resumable(run_dir):
        mark_failed(run_dir, error)


def mark_interrupted(recipe: Recipe, root: Path, again: str) -> None:
    """Mark every started run of ``root`` that did not complete ``interrupted``
    (report.json, report.md), with where it resumes from and the command ``again``."""
    dirs = run_dirs(recipe, root)
    started = [d for d in dirs.values() if d.is_dir()]
    for d in started:
        if _completed_quietly(d):
            continue
        run_status.mark_interrupted(d, again)


def _completed_quietly(run_dir: Path) -> bool:
    try:
        return completed_metrics(run_dir) is not None
    except LrrError:
        return True  # not ours to touch


def mark_failed(run_dir: Path, error: str, create: bool = False) -> None:
    """Record a failure in the run's directory (``error.txt``, ``report.json``/``.md`` with
    status failed; rank 0). ``create``: make the directory if the run failed before writing
    one (a run of a multi-run recipe, so ``lrr report`` and ``summary.json`` point somewhere)."""
    if create and is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
    if run_dir.is_dir() and is_main_process():
        run_status.mark_failed(run_dir, error)
