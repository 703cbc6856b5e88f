"""The live training display: a rich progress bar with loss, learning rate, metric, ETA.

Under ``lrr run --parallel`` the driver sets ``LRR_PROGRESS_FILE`` for each child: the
display then also keeps that small JSON file current (step, total, loss, metric, when the
run started, the child's pid), which the driver's display reads.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainingProgress:
    def __init__(self, total_steps: int, enabled: bool, metric: str):
        self.enabled = enabled
        self.metric = metric
        self.console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[metric]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
        )
        self._task = self._progress.add_task("train", total=total_steps, loss="-", lr="-", metric=f"{escape(metric)} -")
        path = os.environ.get(PROGRESS_FILE_ENV)
        self._file = ProgressFile(Path(path), total_steps, metric) if path and enabled else None

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)

    def start_at(self, step: int) -> None:
        """Show a resumed run's progress from where it continues."""
        self._progress.update(self._task, completed=step)
        if self._file:
            self._file.start(step)

    def update_train(self, step: int, loss: float, lr: float) -> None:
        self._progress.update(self._task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if self._file:
            self._file.update(step, loss=loss)

    def update_eval(self, step: int, metrics: dict, metric: str, improved: bool) -> None:
        self._progress.update(self._task, completed=step, metric=f"{escape(metric)} {metrics[metric]:.4f}")
        if self._file:
            self._file.update(step, value=metrics[metric], force=True)
        if self.enabled:
            shown = escape(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            self._progress.console.print(f"step {step}: eval {shown}" + ("  [green](best)[/green]" if improved else ""))


PROGRESS_FILE_ENV = "LRR_PROGRESS_FILE"


class ProgressFile:
    """The run's progress as a small JSON file, replaced atomically (at most twice a
    second, and at every evaluation): what ``lrr run --parallel`` shows per run."""

    def __init__(self, path: Path, total: int, metric: str):
        self.path, self.last = path, 0.0
        self.data = {"pid": os.getpid(), "step": 0, "start_step": 0, "total": total, "started": time.time(),
                     "loss": None, "metric": metric, "value": None}

    def start(self, step: int) -> None:
        self.data.update(step=step, start_step=step, started=time.time())
        self._write()

    def update(self, step: int, force: bool = False, **values) -> None:
        self.data.update(step=step, **values)
        if force or time.time() - self.last >= 0.5:
            self._write()

    def _write(self) -> None:
        self.last = time.time()
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.data), encoding="utf-8")
            tmp.replace(self.path)
        except OSError:  # the display is a convenience: never fail a run for it
            pass
