"""The results table as data: one row per method (recipe) and sweep point, one column
per task (its metrics), each cell the seeds' mean or median with its spread, the
average column and the parameter count. Built from ``summary.json`` entries (task,
seed, status, best, test, point, label, dir). Torch-free."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from lowrank_runner.tables.spec import Column, TableSpec, header, lower_is_better, scaled


@dataclass
class Source:
    """The runs of one recipe (one method): its name, its tasks in the recipe's order,
    the summary entries, and its sweep points in order (label -> point)."""

    name: str
    tasks: list[str]
    entries: list[dict]
    points: dict[str, dict] = field(default_factory=dict)


@dataclass
class Value:
    metric: str
    centre: float | None = None
    spread: float | None = None
    seeds: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    best: bool = False


@dataclass
class Row:
    method: str
    label: str  # the sweep point ("" without a sweep)
    point: dict
    cells: list[list[Value]]  # per column, per metric
    average: float | None
    params: float | None  # mean adapter parameters over the row's completed runs
    params_values: list[int]
    average_best: bool = False

    @property
    def average_complete(self) -> bool:
        """Every column has a value: the average is over all of them."""
        return all(cell and cell[0].centre is not None for cell in self.cells)

    @property
    def title(self) -> str:
        return f"{self.method} ({self.label})" if self.label else self.method


@dataclass
class Table:
    spec: TableSpec
    headers: list[str]
    columns: list[Column]  # with their metrics resolved
    rows: list[Row]

    @property
    def complete(self) -> bool:
        return all(v.centre is not None and not v.missing for r in self.rows for c in r.cells for v in c)


def aggregate(values: list[float], how: str, spread: str = "std") -> tuple[float, float | None]:
    """(centre, spread): the mean or median, and the sample std (None for one seed or 'none')."""
    centre = statistics.median(values) if how == "median" else statistics.fmean(values)
    return centre, (statistics.stdev(values) if spread == "std" and len(values) > 1 else None)


def run_metrics(entry: dict) -> dict:
    """The metrics of the selected checkpoint: on the test set(s) when the run has them
    (task.holdout_fraction, task.test_split), else on the selection split."""
    if entry.get("test"):
        return entry["test"]
    best = entry.get("best") or {}
    return best.get("eval") or ({best["metric"]: best["value"]} if best.get("metric") else {})


def _completed(entry: dict) -> bool:
    return entry.get("status") == "completed" and (entry.get("best") or {}).get("value") is not None


def _cell_value(entries: list[dict], metric: str, spec: TableSpec) -> Value:
    done = [e for e in entries if _completed(e) and run_metrics(e).get(metric) is not None]
    value = Value(metric, seeds=sorted(e["seed"] for e in done),
                  missing=sorted(e["seed"] for e in entries if e not in done))
    if done:
        factor = 100.0 if scaled(metric) else 1.0
        value.centre, value.spread = aggregate([factor * run_metrics(e)[metric] for e in done], spec.aggregate,
                                               spec.spread)
    return value


def _resolve_columns(spec: TableSpec, sources: list[Source]) -> list[Column]:
    """The spec's columns, or every task in order of appearance; metrics default to the
    selection metric of the task's first completed run."""
    columns = list(spec.columns or [Column(t) for t in dict.fromkeys(t for s in sources for t in s.tasks)])
    out = []
    for column in columns:
        metrics = column.metrics
        if not metrics:
            selected = next((e["best"]["metric"] for s in sources for e in s.entries
                             if e.get("task") == column.task and _completed(e)), None)
            metrics = (selected,) if selected else ()
        out.append(Column(column.task, metrics, column.header))
    return out


def _average(cells: list[list[Value]], how: str) -> float | None:
    picks = []
    for cell in cells:
        values = [v.centre for v in (cell[:1] if how == "first" else cell) if v.centre is not None]
        if values:
            picks.append(statistics.fmean(values))
    return statistics.fmean(picks) if picks and how != "none" else None


def adapter_params(entry: dict) -> int | None:
    """``adapter_params`` of the run's report.json (None when it cannot be read)."""
    path = Path(entry.get("dir", "")) / "report.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("adapter_params")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def _row(source: Source, label: str, columns: list[Column], spec: TableSpec) -> Row:
    entries = [e for e in source.entries if e.get("label", "") == label]
    cells = [[_cell_value([e for e in entries if e.get("task") == c.task], m, spec) for m in c.metrics] or
             [Value("", missing=sorted(e["seed"] for e in entries if e.get("task") == c.task))] for c in columns]
    counts = [n for n in (adapter_params(e) for e in entries if _completed(e)) if n is not None] if spec.params else []
    point = source.points.get(label) or next((e["point"] for e in entries if e.get("point")), {})
    return Row(source.name, label, point, cells, _average(cells, spec.average),
               statistics.fmean(counts) if counts else None, counts)


def _mark_best(rows: list[Row]) -> None:
    """Flag the best value of each metric of each column and the best average (only with
    several rows, and only where they differ)."""
    if len(rows) < 2:
        return
    averages = [r.average for r in rows if r.average is not None and r.average_complete]
    directions = {lower_is_better(v.metric) for cell in rows[0].cells for v in cell}
    if len(set(averages)) > 1 and len(directions) == 1:  # an average of errors is best lowest; mixed: no best
        pick = min if directions == {True} else max
        for r in rows:
            r.average_best = r.average_complete and r.average == pick(averages)
    for i, cell in enumerate(rows[0].cells):
        for j, value in enumerate(cell):
            present = [r.cells[i][j] for r in rows if r.cells[i][j].centre is not None]
            if len(present) < 2:
                continue
            pick = min if lower_is_better(value.metric) else max
            top = pick(v.centre for v in present)
            if all(v.centre == top for v in present):  # all equal: nothing stands out
                continue
            for v in present:
                v.best = v.centre == top


def build_table(sources: list[Source], spec: TableSpec) -> Table:
    """Rows: each source's sweep points in order (one row without a sweep)."""
    columns = _resolve_columns(spec, sources)
    rows = []
    for source in sources:
        labels = list(dict.fromkeys([*source.points, *(e.get("label", "") for e in source.entries)])) or [""]
        rows += [_row(source, label, columns, spec) for label in labels]
    if spec.bold_best:
        _mark_best(rows)
    return Table(spec, [header(c, c.metrics) for c in columns], columns, rows)
