"""The live training display: a rich progress bar with loss, learning rate, metric, ETA."""

from __future__ import annotations

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

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)

    def start_at(self, step: int) -> None:
        """Show a resumed run's progress from where it continues."""
        self._progress.update(self._task, completed=step)

    def update_train(self, step: int, loss: float, lr: float) -> None:
        self._progress.update(self._task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    def update_eval(self, step: int, metrics: dict, metric: str, improved: bool) -> None:
        self._progress.update(self._task, completed=step, metric=f"{escape(metric)} {metrics[metric]:.4f}")
        if self.enabled:
            shown = escape(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            self._progress.console.print(f"step {step}: eval {shown}" + ("  [green](best)[/green]" if improved else ""))
