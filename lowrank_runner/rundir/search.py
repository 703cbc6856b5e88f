"""Where a search writes in its run directory, for the search itself and for the tools
that read run directories (``lrr report``, ``lrr report --table``, ``lrr export``):
given a search's root, they read its final runs, ``RUN_DIR/best``. Torch- and Optuna-free.

::

    RUN_DIR/
      search.db, search.json, search.md   the studies and their record
      search/TASK/trial-0003/             a trial (a run directory)
      best/                               each task's best point with every seed (lrr run's layout)
"""

from __future__ import annotations

import sys
from pathlib import Path

from lowrank_runner.errors import UsageError

DB_FILE = "search.db"
RECORD_FILE = "search.json"
RECORD_MD = "search.md"
TRIALS_DIR = "search"
BEST_DIR = "best"


def is_search_root(path: Path) -> bool:
    """``path`` is the run directory of a search (it holds ``search.json``)."""
    return (path / RECORD_FILE).is_file() and (path / DB_FILE).is_file()


def final_runs(path: Path) -> Path | None:
    """A search root's final runs, ``path/best`` (None: ``path`` is no search root, or
    it has no best runs: no trial completed, or the search has not got there yet)."""
    best = path / BEST_DIR
    return best if is_search_root(path) and best.is_dir() else None


def no_final_runs(path: Path) -> str:
    """Why a search root has no ``best/`` to read, and where its trials are."""
    return (f"{path}: a search (lrr run of a recipe with a search: block) without final runs: no {BEST_DIR}/ (no "
            f"trial completed, or the search has not trained its best points yet; {path / RECORD_MD} says which); "
            f"its trials are run directories: {path / TRIALS_DIR}/TASK/trial-NNNN")


def runs_of(path: Path) -> Path:
    """The directory to read for ``path``: a search root stands for its final runs
    (``path/best``, said on stderr); anything else is itself. A search root without
    ``best/`` is an error naming where its trials are."""
    if not path.is_dir() or not is_search_root(path):
        return path
    best = final_runs(path)
    if best is None:
        raise UsageError(no_final_runs(path))
    print(f"{path}: a search; reading its final runs, {best} (each task's best point with every seed; "
          f"its trials are in {path / TRIALS_DIR})", file=sys.stderr)
    return best
