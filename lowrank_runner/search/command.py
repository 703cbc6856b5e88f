"""``lrr run`` of a recipe with a ``search:`` block: the run directory claimed (or, with
``--resume``, checked to hold this search), one process owning it, the search run
(:class:`~lowrank_runner.search.study.Search`) with its trials one after another in this
process or, with ``--parallel N`` / ``--executor ray``, N at a time in child processes
(:mod:`lowrank_runner.search.parallel`), and Ctrl-C's record and resume command."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from lowrank_runner.errors import RunFileError, UsageError
from lowrank_runner.quiet import quiet_libraries
from lowrank_runner.recipe.load import Recipe
from lowrank_runner.recipe.search import search_spec
from lowrank_runner.rundir.files import read_json_file
from lowrank_runner.rundir.search import DB_FILE, RECORD_FILE
from lowrank_runner.search.parallel import ParallelTrials, check_options
from lowrank_runner.search.study import Search, import_optuna
from lowrank_runner.train import run_dirs
from lowrank_runner.train.devices import world_size
from lowrank_runner.train.invocation import console, say
from lowrank_runner.train.run_dirs import continue_command, owned, prepare_root


def run_search(recipe: Recipe, output: Path | None, argv: list[str], resume: bool = False,
               stop_after: int | None = None, parallel=None) -> list[str]:
    """Search every task, then train each task's best point with every seed; returns
    what failed (tasks without a completed trial, best runs that failed, trials left
    unfinished). ``parallel`` (``--parallel N``, ``--executor ray``: a
    :class:`~lowrank_runner.train.parallel.slots.ParallelOptions`) trains each task's
    trials N at a time in child processes (:mod:`lowrank_runner.search.parallel`)."""
    optuna = import_optuna()
    if world_size() > 1:
        raise UsageError("a search runs in one process: start it without torchrun / accelerate launch "
                         "(each trial uses the GPU it finds)")
    quiet_libraries()
    parallel = parallel if parallel is not None and not parallel.sequential else None
    slots = check_options(parallel) if parallel is not None else None  # before anything is written
    root = _search_root(recipe, output, resume)
    with owned(root, say):  # one process runs a search: its study, trials and final runs (rundir/lock.py)
        search = Search(recipe, search_spec(recipe.resolved), root, argv, stop_after, optuna, parallel)
        try:
            if parallel is None:
                return search.run()
            with ParallelTrials(search, parallel, slots) as trials:
                return search.run(trials)
        except KeyboardInterrupt:
            search.write("interrupted")
            console.print(f"[yellow]search interrupted[/yellow]; continue it with: {escape(search.again)}")
            raise


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
