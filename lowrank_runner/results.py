"""The results table of a multi-run recipe, in the papers' layout: one row, the tasks as
columns (each task's selection metric ×100, seeds combined by mean ± std or median), and
their average (``Avg.``). Written as ``results.md`` and ``results.csv`` beside
``summary.json`` and printed at the end of ``lrr run``. Torch-free."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"


def aggregate(values: list[float], how: str) -> tuple[float, float | None]:
    """(centre, spread): mean and sample std (None for one seed), or the median."""
    if how == "median":
        return statistics.median(values), None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def score(run: dict) -> float:
    """The selection metric of the selected checkpoint: on the test set when the run
    selected on a held-out part of train (task.holdout_fraction), else on the dev set."""
    test = run.get("test")
    return test[run["best"]["metric"]] if test else run["best"]["value"]


def results_table(runs: list[dict], tasks: list[str], how: str) -> dict:
    """``runs``: summary entries (task, seed, status, best). Returns the columns with the
    combined value per task, the seeds that counted, and the average over the tasks that
    have a value."""
    columns = []
    for task in tasks:
        done = [r for r in runs if r["task"] == task and r["status"] == "completed" and r["best"]["value"] is not None]
        missing = sorted(r["seed"] for r in runs if r["task"] == task and r not in done)
        if not done:
            columns.append({"task": task, "metric": None, "value": None, "spread": None, "seeds": [], "missing": missing})
            continue
        centre, spread = aggregate([100 * score(r) for r in done], how)
        columns.append({"task": task, "metric": done[0]["best"]["metric"], "value": centre, "spread": spread,
                        "seeds": sorted(r["seed"] for r in done), "missing": missing})
    values = [c["value"] for c in columns if c["value"] is not None]
    average = statistics.fmean(values) if values else None
    return {"aggregate": how, "columns": columns, "average": average,
            "complete": all(c["value"] is not None and not c["missing"] for c in columns)}


def _cell(column: dict) -> str:
    if column["value"] is None:
        return "–"
    text = f"{column['value']:.2f}"
    if column["spread"] is not None:
        text += f"±{column['spread']:.2f}"
    return text + ("*" if column["missing"] else "")


def header(table: dict) -> list[str]:
    return [f"{c['task']} ({c['metric']})" if c["metric"] else c["task"] for c in table["columns"]] + ["Avg."]


def row(table: dict) -> list[str]:
    avg = table["average"]
    return [_cell(c) for c in table["columns"]] + ["–" if avg is None else f"{avg:.2f}"]


def write_results(root: Path, name: str, table: dict) -> None:
    head, cells = ["method", *header(table)], [name, *row(table)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(cells) + " |", ""]
    seeds = {c["task"]: c["seeds"] for c in table["columns"]}
    lines.append(f"Metrics ×100, {'median' if table['aggregate'] == 'median' else 'mean ± std'} over seeds "
                 + "; ".join(f"{t}: {s}" for t, s in seeds.items()) + ".")
    if not table["complete"]:
        lines.append("* or –: some runs of this task failed or did not finish (see summary.json).")
    (root / RESULTS_MD).write_text("\n".join(lines) + "\n")
    with (root / RESULTS_CSV).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "task", "metric", "value", "std", "seeds", "missing_seeds"])
        for c in table["columns"]:
            writer.writerow([name, c["task"], c["metric"] or "", "" if c["value"] is None else round(c["value"], 4),
                             "" if c["spread"] is None else round(c["spread"], 4),
                             " ".join(map(str, c["seeds"])), " ".join(map(str, c["missing"]))])
        writer.writerow([name, "Avg.", "", "" if table["average"] is None else round(table["average"], 4), "", "", ""])


def print_results(console, name: str, table: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"{escape(name)}: {'median' if table['aggregate'] == 'median' else 'mean ± std'} over seeds, ×100")
    for h in ["method", *header(table)]:
        t.add_column(escape(h))
    t.add_row(*(escape(cell) for cell in [name, *row(table)]))
    console.print(t)
