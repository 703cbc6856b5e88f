"""The results table as data: one row per method (recipe) and sweep point, one column
per task (its metrics), each cell the seeds' mean or median with its spread, the
average column and the parameter count. Built from ``summary.json`` entries (task,
seed, status, best, test, point, label, dir). Torch-free."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from lowrank_runner.tables.significance import Difference, baseline_index, difference
from lowrank_runner.tables.spec import Column, TableSpec, header, lower_is_better, scaled


@dataclass
class Source:
    """The runs of one recipe (one method): its name, its tasks in the recipe's order,
    the summary entries, and its sweep points in order (label -> point); ``method``: the
    method its runs trained (``method.name`` of the resolved recipe, after ``--set``;
    "" when unknown), ``tags``: what tells it apart from another source of the same
    recipe (``epochs=4``), ``resolved``: its resolved recipe ({} when unknown)."""

    name: str
    tasks: list[str]
    entries: list[dict]
    points: dict[str, dict] = field(default_factory=dict)
    method: str = ""
    tags: list[str] = field(default_factory=list)
    resolved: dict = field(default_factory=dict)


def names_method(recipe: str, method: str) -> bool:
    """Whether a recipe's name says its method: the method's name is one of the name's
    words (split at anything but letters and digits; case ignored): ``lora2-glue`` says
    lora2, ``quickstart`` says no method, ``lora2_deberta`` says lora2, not lora."""
    return method.lower() in re.split(r"[^a-z0-9]+", recipe.lower())


def row_tags(source: Source, point: dict) -> list[str]:
    """The words in a row's parentheses before its sweep label: the method where the
    recipe's name does not say it (and no swept ``method.name`` does), then the source's
    own tags."""
    said = not source.method or "method.name" in point or names_method(source.name, source.method)
    return ([] if said else [source.method]) + list(source.tags)


@dataclass
class Value:
    metric: str
    centre: float | None = None
    spread: float | None = None
    seeds: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    best: bool = False
    samples: list = field(default_factory=list)  # per seed, in the order of ``seeds``

    @property
    def by_seed(self) -> dict:
        return dict(zip(self.seeds, self.samples))


@dataclass
class Row:
    recipe: str  # the recipe's name
    label: str  # the sweep point ("" without a sweep)
    point: dict
    cells: list[list[Value]]  # per column, per metric
    average: float | None
    params: float | None  # mean adapter parameters over the row's completed runs
    params_values: list[int]
    average_best: bool = False
    differences: list[Difference | None] = field(default_factory=list)  # per column (first metric), to the baseline
    average_difference: Difference | None = None
    tags: list[str] = field(default_factory=list)  # row_tags: the method, the keys a same-named recipe changed

    @property
    def method(self) -> str:
        """The Method column without the sweep label: ``lora2``, ``quickstart (triadaptlora)``."""
        return f"{self.recipe} ({', '.join(self.tags)})" if self.tags else self.recipe

    @property
    def average_complete(self) -> bool:
        """Every column has a value: the average is over all of them."""
        return all(cell and cell[0].centre is not None for cell in self.cells)

    @property
    def title(self) -> str:
        """The Method column: the recipe, then its tags and sweep label in one parenthesis."""
        words = self.tags + ([self.label] if self.label else [])
        return f"{self.recipe} ({', '.join(words)})" if words else self.recipe


@dataclass
class Table:
    spec: TableSpec
    headers: list[str]
    columns: list[Column]  # with their metrics resolved
    rows: list[Row]
    baseline: Row | None = None

    settings: list = field(default_factory=list)  # sources.SettingDifference: what the joined recipes trained differently

    @property
    def complete(self) -> bool:
        return all(v.centre is not None and not v.missing for r in self.rows for c in r.cells for v in c)

    @property
    def seed_counts(self) -> list[int]:
        """The numbers of seeds behind the values shown, sorted ([1]: every value is one run)."""
        return sorted({len(v.seeds) for r in self.rows for c in r.cells for v in c if v.centre is not None})


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
    done = sorted((e for e in entries if _completed(e) and run_metrics(e).get(metric) is not None),
                  key=lambda e: e["seed"])
    factor = 100.0 if scaled(metric) else 1.0
    value = Value(metric, seeds=[e["seed"] for e in done],
                  missing=sorted(e["seed"] for e in entries if e not in done),
                  samples=[factor * run_metrics(e)[metric] for e in done])
    if done:
        value.centre, value.spread = aggregate(value.samples, spec.aggregate, spec.spread)
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
               statistics.fmean(counts) if counts else None, counts, tags=row_tags(source, point))


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


def seed_averages(row: Row, how: str) -> dict:
    """seed -> the row's Avg. from that seed's runs alone (the column's first metric, or
    the mean of its metrics), over the seeds every column has; {} where a column has no
    value or there is no Avg."""
    if how == "none" or not row.average_complete:
        return {}
    per_column = []
    for cell in row.cells:
        values = [v.by_seed for v in (cell[:1] if how == "first" else cell)]
        seeds = set.intersection(*(set(v) for v in values))
        per_column.append({s: statistics.fmean(v[s] for v in values) for s in seeds})
    seeds = sorted(set.intersection(*(set(c) for c in per_column)))
    return {s: statistics.fmean(c[s] for c in per_column) for s in seeds}


def _compare(rows: list[Row], baseline: Row, how: str) -> None:
    """Each other row's differences to the baseline: per column (its first metric) and Avg."""
    base_average = seed_averages(baseline, how)
    for row in rows:
        if row is baseline:
            continue
        row.differences = [difference(cell[0].by_seed, base[0].by_seed) for cell, base in
                           zip(row.cells, baseline.cells)]
        row.average_difference = difference(seed_averages(row, how), base_average)


def build_table(sources: list[Source], spec: TableSpec) -> Table:
    """Rows: each source's sweep points in order (one row without a sweep); with a
    baseline (``spec.baseline``), each other row's differences to it (a name that is
    no row's: :class:`~lowrank_runner.tables.significance.BaselineError`)."""
    columns = _resolve_columns(spec, sources)
    rows = []
    for source in sources:
        labels = list(dict.fromkeys([*source.points, *(e.get("label", "") for e in source.entries)])) or [""]
        rows += [_row(source, label, columns, spec) for label in labels]
    if spec.bold_best:
        _mark_best(rows)
    baseline = None
    if spec.baseline is not None:
        baseline = rows[baseline_index([(r.title, r.method, r.label, r.recipe) for r in rows], spec.baseline)]
        _compare(rows, baseline, spec.average)
    return Table(spec, [header(c, c.metrics) for c in columns], columns, rows, baseline)
