"""What a run prints while it sets up and trains, readable in a terminal and in a log.

Set-up: one line as each phase starts and one with its time when it ends
(:class:`SetupPhases`: data and tokenising, backbone, optimizer and devices), then
``training: first step …`` and the first step's time (warm-up, compilation, first batch).

Training, on a terminal: a rich progress bar (step/total, loss, learning rate, metric,
elapsed, ETA) advanced at every optimizer step. Off a terminal (stderr to a file or a
pipe): no bar (it would print once, at the end), but plain step lines
(:class:`StepLines`): at the first step, then at every tenth of the planned steps or
after 30 s without a line, whichever comes first, and at the last step; each with
step/total, the latest logged loss (``training.log_every``), the learning rate, elapsed
time and ETA. Evaluations print one line each in both.

Under ``lrr run --parallel`` the driver sets ``LRR_PROGRESS_FILE`` for each child: the
display then also keeps that small JSON file current (step, total, loss, metric, when the
run started, the child's pid), which the driver's display reads.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lowrank_runner.console import make_console

Clock = Callable[[], float]

LINE_FRACTION = 0.1  # off a terminal: a step line every 10% of the planned steps ...
LINE_SECONDS = 30.0  # ... or every 30 s, whichever comes first


def clock_text(seconds: float) -> str:
    """``0:01:05`` (as rich's time columns)."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def plain_print(console: Console, line: str) -> None:
    console.print(line, markup=False, highlight=False)


class SetupPhases:
    """``loading backbone …`` as a phase starts and ``loading backbone: 12.3 s`` when it
    ends (on the main process only)."""

    def __init__(self, enabled: bool, console: Console | None = None, clock: Clock = time.monotonic):
        self.enabled, self.clock = enabled, clock
        self.console = console or make_console(stderr=True)

    @contextlib.contextmanager
    def phase(self, label: str):
        """Yields a :class:`Phase` whose ``note`` (set inside) follows the time."""
        phase = Phase()
        if not self.enabled:
            yield phase
            return
        plain_print(self.console, f"{label} …")
        started = self.clock()
        yield phase
        plain_print(self.console, f"{label}: {self.clock() - started:.1f} s" + (f" ({phase.note})" if phase.note else ""))


class Phase:
    """What a set-up phase says beside its time (``(tokenised splits reused ...)``)."""

    note: str = ""


class StepLines:
    """The plain step lines written off a terminal (see the module's docstring)."""

    def __init__(self, console: Console, total: int, clock: Clock):
        self.console, self.total, self.clock = console, total, clock
        self.every = max(1, math.ceil(total * LINE_FRACTION))
        self.start_step, self.started = 0, clock()
        self.last_step, self.last_time = 0, self.started

    def start(self, step: int) -> None:
        self.start_step = self.last_step = step
        self.started = self.last_time = self.clock()

    def due(self, step: int, now: float) -> bool:
        return (step == self.start_step + 1 or step >= self.total or step // self.every > self.last_step // self.every
                or now - self.last_time >= LINE_SECONDS)

    def advance(self, step: int, loss: str, lr: str) -> None:
        now = self.clock()
        if not self.due(step, now):
            return
        self.last_step, self.last_time = step, now
        elapsed = now - self.started
        done = step - self.start_step
        eta = clock_text(elapsed / done * (self.total - step)) if done > 0 else "-:--:--"
        plain_print(self.console, f"step {step}/{self.total} ({100 * step / self.total:.0f}%)  loss {loss}  lr {lr}  "
                                  f"elapsed {clock_text(elapsed)}  ETA {eta}")


class TrainingProgress:
    """The training display of the main process (``enabled``); see the module's docstring.
    ``console`` and ``clock`` are there for tests (``force_terminal``, a fake clock)."""

    def __init__(self, total_steps: int, enabled: bool, metric: str, console: Console | None = None,
                 clock: Clock = time.monotonic):
        self.enabled, self.metric, self.total, self.clock = enabled, metric, total_steps, clock
        self.console = console or make_console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.lines = StepLines(self.console, total_steps, clock) if enabled and not self.live else None
        self.loss, self.lr = "-", "-"
        self.start_step, self.first_step_from = 0, None
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
            disable=not self.live,
        )
        self._task = self._progress.add_task("train", total=total_steps, loss="-", lr="-", metric=f"{escape(metric)} -")
        path = os.environ.get(PROGRESS_FILE_ENV)
        self._file = ProgressFile(Path(path), total_steps, metric) if path and enabled else None

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)

    @property
    def completed(self) -> int:
        """The step the bar shows."""
        return int(self._progress.tasks[0].completed)

    def start_at(self, step: int) -> None:
        """Training starts (a resumed run: continues) at ``step``: the first-step line."""
        self._progress.update(self._task, completed=step)
        self.start_step, self.first_step_from = step, self.clock()
        if self.lines:
            self.lines.start(step)
        if self._file:
            self._file.start(step)
        if self.enabled:
            where = f"resuming after step {step} of {self.total}; " if step else ""
            plain_print(self.console, f"training ({where}{self.total} optimizer steps): first step …")

    def advance(self, step: int) -> None:
        """After every optimizer step (the loss and learning rate shown are the latest
        logged): the bar, or a step line when one is due; the first step's time."""
        if self.first_step_from is not None and step > self.start_step:
            if self.enabled:
                plain_print(self.console, f"training: first step {self.clock() - self.first_step_from:.1f} s")
            self.first_step_from = None
        self._progress.update(self._task, completed=step)
        if self.lines:
            self.lines.advance(step, self.loss, self.lr)
        if self._file:
            self._file.update(step)

    def update_train(self, step: int, loss: float, lr: float) -> None:
        self.loss, self.lr = f"{loss:.4f}", f"{lr:.2e}"
        self._progress.update(self._task, completed=step, loss=self.loss, lr=self.lr)
        if self._file:
            self._file.update(step, loss=loss)

    def update_eval(self, step: int, metrics: dict, metric: str, improved: bool) -> None:
        self._progress.update(self._task, completed=step, metric=f"{escape(metric)} {metrics[metric]:.4f}")
        if self._file:
            self._file.update(step, value=metrics[metric], force=True)
        if self.enabled:
            shown = escape(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            self.console.print(f"step {step}: eval {shown}" + ("  [green](best)[/green]" if improved else ""),
                               highlight=self.live)

    def note_stop(self, step: int, reason: str) -> None:
        """An observer ended training early (early stopping, a search's pruner)."""
        if self.enabled:
            self.console.print(f"[yellow]stopped at step {step}[/yellow]: {escape(reason)}", highlight=self.live)


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
