"""A failure before training that every run of a recipe would meet alike (its backbone
cannot be loaded, its data cannot be read, the hub is out of reach) stops ``lrr run`` at
the first run, with one message, instead of failing each run in turn.

What a set-up error depends on is its ``shared_by`` (:class:`~lowrank_runner.errors.LrrError`):
``"backbone"`` (runs with the same ``backbone`` mapping), ``"data"`` (the same ``task``
mapping) or ``"hub"`` (runs whose task reads neither ``task.data`` nor ``task.data_dir``:
the hub's data). Errors without one, and failures once training started, stay with
their run (:func:`~lowrank_runner.train.invocation.train_one`).
"""

from __future__ import annotations

from lowrank_runner.errors import LrrError
from lowrank_runner.recipe.hashing import canonical_hash

WHAT = {"backbone": "the same backbone", "data": "the same data", "hub": "data from the Hugging Face hub"}


class SetupStopped(LrrError):
    """The invocation stopped at its first run's set-up failure; no run was started, and
    the run directory it created is removed again (train/runner.py)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def source_of(kind: str, config: dict) -> str:
    """What a run's ``config`` names for a failure of kind ``kind`` (see module doc)."""
    task = config["task"]
    if kind == "hub":
        return "hub" if task.get("data") is None and task.get("data_dir") is None else canonical_hash(task)
    return canonical_hash(config["backbone"] if kind == "backbone" else task)


def shared_by_all(exc: LrrError, run, rest: list) -> bool:
    """Whether ``exc``, raised in ``run``'s set-up, would stop every run of ``rest`` too."""
    kind = exc.shared_by
    if kind not in WHAT or not rest:
        return False
    mine = source_of(kind, run.config)
    return all(source_of(kind, other.config) == mine for other in rest)


def stopped(exc: LrrError, rest: list, root) -> SetupStopped:
    """The one-line error that ends the invocation (``exc``'s own, then what became of the
    other runs and of the run directory ``root``)."""
    others = "the other run of this recipe uses" if len(rest) == 1 else f"the {len(rest)} other runs of this recipe use"
    message = (f"{exc} [stopped before training: {others} {WHAT[exc.shared_by]} and would fail alike, so none was started; "
               f"nothing is left in {root}]")
    return SetupStopped(" ".join(message.split("\n")), exc.exit_code)
