"""Registered tasks (torch-free, read by ``lrr validate``).

A task spec says what data a task needs, which model head it trains and which metrics
score it; its implementation (data loading, metrics) is imported only when running.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    implementation: str  # "module:Class"
    metrics: tuple[str, ...]
    primary_metric: str
    needs_local_data: bool = True

    def load(self):
        module_name, _, attr = self.implementation.partition(":")
        return getattr(importlib.import_module(module_name), attr)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="classification",
            description="Single-sentence or sentence-pair classification from your own CSV/TSV/JSON Lines/Parquet files.",
            implementation="lowrank_runner.tasks.local_files:Classification",
            metrics=("accuracy", "f1_macro", "matthews_correlation"),
            primary_metric="accuracy",
        ),
        TaskSpec(
            name="regression",
            description="Single-sentence or sentence-pair regression (one score per example) from your own files.",
            implementation="lowrank_runner.tasks.local_files:Regression",
            metrics=("pearson", "spearman", "mse"),
            primary_metric="pearson",
        ),
    )
}


def get_task_spec(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task '{name}' (registered: {', '.join(sorted(TASKS))})") from None
