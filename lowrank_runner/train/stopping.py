"""What the training loop does after each evaluation besides selecting the checkpoint:
observers that may end the run there (early stopping, a search's pruner).

The loop calls every observer's :meth:`EvaluationObserver.after_evaluation` with the step
and the task's selection metric after it has scored the selection splits and kept the best
checkpoint; the first that returns a reason ends training at that step. The run then
finishes as a completed run (the selected checkpoint restored, test sets scored, the
adapter and report written), and ``report.json`` says where and why it stopped
(``stopped_early: {step, reason, by}``).
"""

from __future__ import annotations

from typing import Protocol


class EvaluationObserver(Protocol):
    """Told every evaluation's selection metric; returns a reason to stop training now, or None."""

    name: str

    def after_evaluation(self, step: int, value: float) -> str | None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class EarlyStopping:
    """``training.early_stopping: {patience, min_delta}`` with the semantics of HF's
    ``EarlyStoppingCallback``: an evaluation improves when its value is better than the best
    of the earlier evaluations by more than ``min_delta``; after ``patience`` evaluations in
    a row without improvement, training stops. Its state travels in checkpoints, so a
    resumed run stops where the uninterrupted one would."""

    name = "early_stopping"

    def __init__(self, patience: int, min_delta: float, greater_is_better: bool, metric: str):
        self.patience, self.min_delta, self.greater, self.metric = patience, min_delta, greater_is_better, metric
        self.best: float | None = None
        self.bad = 0

    def after_evaluation(self, step: int, value: float) -> str | None:
        better = self.best is None or (value > self.best if self.greater else value < self.best)
        if better and (self.best is None or abs(value - self.best) > self.min_delta):
            self.bad = 0
        else:
            self.bad += 1
        if better:
            self.best = value
        if self.bad < self.patience:
            return None
        return (f"early stopping: {self.metric} did not improve by more than {self.min_delta:g} on its best "
                f"({self.best:.4f}) for {self.patience} evaluation(s) (training.early_stopping)")

    def state_dict(self) -> dict:
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad = state["best"], state["bad"]


def early_stopping(training: dict, greater_is_better: bool, metric: str) -> EarlyStopping | None:
    """The run's early stopping (None unless the recipe sets ``training.early_stopping``; the
    resolved config has its schema defaults filled)."""
    cfg = training.get("early_stopping")
    if not cfg:
        return None
    return EarlyStopping(cfg["patience"], cfg["min_delta"], greater_is_better, metric)
