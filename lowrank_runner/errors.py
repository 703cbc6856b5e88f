"""Errors meant for people: where the problem is, what is wrong, and how to fix it.

Every error a user can cause (a recipe, a path, a CLI argument, a data file) is raised
as an :class:`LrrError` subclass; the CLI prints it without a traceback and exits
non-zero. Anything else is a bug in lowrank-runner and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

_SAID: set[str] = set()


@dataclass(frozen=True)
class Location:
    """Where a value came from: a file position, or a command-line ``--set``."""

    source: str  # file path, or "--set key=value"
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based

    def __str__(self) -> str:
        if self.line is None:
            return self.source
        return f"{self.source}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe."""

    location: Location | None
    path: str  # dotted recipe path, "" for the whole recipe
    message: str
    severity: str = "error"  # or "warning"

    def __str__(self) -> str:
        where = f"{self.location}: " if self.location else ""
        path = self.path or "(recipe)"
        return f"{where}{path}: {self.message}"

    def as_dict(self) -> dict:
        loc = self.location
        return {
            "file": loc.source if loc else None,
            "line": loc.line if loc else None,
            "column": loc.column if loc else None,
            "path": self.path,
            "message": self.message,
            "severity": self.severity,
        }


class LrrError(Exception):
    """A user-facing error: printed without traceback, exit code ``exit_code``.
    ``shared_by``: what the error depends on when it stops a run before training, so
    every run of a recipe that names the same would fail alike (``"backbone"``: the
    recipe's ``backbone``; ``"data"``: its ``task``; ``"hub"``: data from the Hugging
    Face hub); None: this run alone (train/invocation.py)."""

    exit_code = 1
    shared_by: str | None = None


class UsageError(LrrError):
    """Wrong command-line usage (exit code 2, like argparse/click)."""

    exit_code = 2


@dataclass
class RecipeError(LrrError):
    """One or more problems in a recipe, all reported at once."""

    problems: list[Problem] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class BackboneError(LrrError):
    """The backbone cannot be found or loaded."""

    shared_by = "backbone"


class BackboneUnavailable(BackboneError):
    """The backbone is a hub id, not in the local cache, and the hub cannot be used now
    (offline, unreachable): nothing of it (not even its config.json) can be read."""


class DataError(LrrError):
    """A dataset file is missing or malformed."""

    shared_by = "data"


class ExportError(LrrError):
    """An export failed its checks; nothing was written."""


class CheckpointError(LrrError, ValueError):
    """A checkpoint is missing, damaged or of an older format and cannot be resumed."""


class RunFileError(LrrError):
    """A file of a run directory (report.json, metrics.json, metrics.jsonl, summary.json,
    adapter files) is missing or damaged."""


class TrainingError(LrrError):
    """Training cannot go on meaningfully (e.g. the loss is no longer a finite number)."""


class DivergenceError(TrainingError):
    """The training loss became non-finite or exploded (``training.divergence``): the run
    stops as failed and keeps its directory (metrics.jsonl up to the stop, checkpoints).
    ``checkpoint``: the last good one, if any; ``resume_hint``, set by whoever knows the
    command that continues the run, is said after the message."""

    def __init__(self, message: str, checkpoint=None):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.resume_hint = ""

    def __str__(self) -> str:
        return super().__str__() + self.resume_hint


class RecipeKeyError(LrrError):
    """A recipe value that only the model at hand shows to be wrong (a target that
    matches no linear layer, a rank above a layer's size): ``key`` is its dotted recipe
    path, so the caller can name the recipe line (:func:`lowrank_runner.recipe.load.at_recipe_lines`)."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


def warn(message: str, once: bool = False) -> None:
    """``warning: MESSAGE`` on standard error, from the main process only (rank 0 of an
    ``accelerate launch``); ``once``: a message already said in this process is not
    said again. What lrr goes on after but the user should know."""
    if os.environ.get("RANK", "0") != "0" or (once and message in _SAID):
        return
    _SAID.add(message)
    print(f"warning: {message}", file=sys.stderr, flush=True)
