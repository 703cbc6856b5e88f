"""The display of ``lrr run --parallel``: one live table on stderr (rich Live) with each
active run (task, seed, sweep point, step/total, latest loss and metric, ETA, devices,
log) and the recipe's progress (done, running, waiting, failed); plain lines when stderr
is not a terminal. Each run's numbers come from the progress file its child keeps
(:class:`lowrank_runner.train.progress.ProgressFile`)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table


@dataclass
class Active:
    """A run being trained by a child."""

    run: object  # RunSpec
    where: str  # "cuda 0,1", "cpu" or "ray"
    log: Path
    progress: Path
    started: float = field(default_factory=time.time)


def read_progress(path: Path) -> dict:
    """The child's latest progress ({} before it wrote any)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def eta(progress: dict, now: float | None = None) -> str:
    """The time left, from the steps done since the child started training."""
    step, start, total = progress.get("step", 0), progress.get("start_step", 0), progress.get("total")
    if not total or step <= start:
        return "-"
    seconds = (now or time.time()) - progress.get("started", 0)
    left = seconds / (step - start) * (total - step)
    minutes, sec = divmod(int(left), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}" if hours else f"{minutes}:{sec:02d}"


def _metric(progress: dict) -> str:
    parts = []
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if progress.get("value") is not None:
        parts.append(f"{progress.get('metric')} {progress['value']:.4f}")
    return " · ".join(parts) or "-"


class Display:
    """The driver's view of the batch; :meth:`line` prints a line above the live
    table (each run's start names its log file, each failure its log again)."""

    def __init__(self, console: Console, name: str, total: int):
        self.console, self.name, self.total = console, name, total
        self.active: dict[str, Active] = {}
        self.counts = {"done": 0, "running": 0, "waiting": total, "failed": 0}
        self._live = Live(console=console, get_renderable=self._render, refresh_per_second=2, transient=True,
                          redirect_stdout=False, redirect_stderr=False) if console.is_terminal else None

    def __enter__(self):
        if self._live:
            self._live.start()
        return self

    def __exit__(self, *exc):
        if self._live:
            self._live.stop()
        return False

    def line(self, text: str) -> None:
        self.console.print(text)

    def progress_line(self) -> str:
        c = self.counts
        stopped = "".join(f" · {c[k]} {k}" for k in ("stopped", "interrupted") if c.get(k))
        return (f"{escape(self.name)}: {c['done']}/{self.total} done · {c['running']} running · "
                f"{c['waiting']} waiting · {c['failed']} failed{stopped}")

    def _render(self):
        active = list(self.active.values())
        sweep = any(a.run.label for a in active)
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("task", "seed", *(("point",) if sweep else ()), "step", "latest", "ETA", "on"):
            table.add_column(column, no_wrap=True, overflow="ellipsis")
        for a in active:
            progress = read_progress(a.progress)
            step = f"{progress['step']}/{progress['total']}" if progress.get("total") else "starting"
            point = (escape(a.run.label or "-"),) if sweep else ()
            table.add_row(escape(a.run.task), str(a.run.seed), *point, step, escape(_metric(progress)), eta(progress),
                          escape(a.where))
        return Group(table, self.progress_line())
