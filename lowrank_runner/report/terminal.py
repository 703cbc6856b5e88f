"""``lrr report`` on the terminal (rich): one run as its report.md, several runs side by
side (differences first, then the metric table)."""

from __future__ import annotations

import json

from rich.console import Console
from rich.markdown import Markdown
from rich.markup import escape
from rich.table import Table

from lowrank_runner.report.compare import RunReport, compare
from lowrank_runner.rundir.markdown import fmt, run_markdown
from lowrank_runner.rundir.layout import REPORT_MD


def _value(value) -> str:
    """Recipe and environment values exactly as written (JSON), so 1e-4 and 1.2e-4 differ;
    escaped, so a ``[...]`` in a path or value is shown, not read as rich markup."""
    return escape(value if isinstance(value, str) else json.dumps(value, default=str))


def show_run(console: Console, run: RunReport) -> None:
    """On a terminal, the report rendered (its plots as the PNGs' paths: a terminal shows
    no images); into a file or pipe, the report's Markdown text itself."""
    text = run_markdown(run.report, plots_at=str(run.dir))
    if console.is_terminal:
        console.print(f"[dim]{escape(str(run.dir))}[/dim]")
        console.print(Markdown(text))
    else:
        console.print(text, markup=False, highlight=False, end="")
    files = [run.dir / name for name in [REPORT_MD, *((run.report.get("files") or {}).get("plots") or {})]]
    existing = [str(p) for p in files if p.is_file()]
    if existing:
        console.print("[bold]files:[/bold] " + escape(", ".join(existing)))


def seconds(value) -> str | None:
    """``247.2 s`` (None stays None: shown as –)."""
    return None if value is None else f"{value:,.1f} s"


def _differences(console: Console, title: str, diffs: dict, labels: list[str], same: str) -> None:
    if not diffs:
        console.print(f"[bold]{title}:[/bold] [green]{same}[/green]")
        return
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("key", style="bold")
    for label in labels:
        table.add_column(label, overflow="fold")
    for key, values in diffs.items():
        table.add_row(escape(key), *[_value(v) for v in values])
    console.print(table)


def show_comparison(console: Console, runs: list[RunReport]) -> dict:
    data = compare(runs)
    labels = [f"[{i}]" for i in range(1, len(runs) + 1)]
    runs_table = Table(title=f"{len(runs)} runs", title_justify="left")
    for col in ("", "run directory", "status", "recipe hash", "config hash"):
        runs_table.add_column(col, overflow="fold")
    for label, run in zip(labels, data["runs"]):
        runs_table.add_row(label, *[escape(str(run[k] or "–")) for k in ("dir", "status", "recipe_hash", "config_hash")])
    console.print(runs_table)
    _differences(console, "Recipe differences (resolved recipe, dotted keys)", data["recipe_differences"], labels,
                 "the resolved recipes are identical")
    _differences(console, "Input differences (backbone and data identity)", data["input_differences"], labels,
                 "same backbone and data")
    _differences(console, "Environment differences (versions, hardware, lowrank-runner commit)",
                 data["environment_differences"], labels, "same environment")
    rows = data["metrics"]
    table = Table(title="Metrics (bold: differs between runs)", title_justify="left")
    table.add_column("", style="bold")
    for label in labels:
        table.add_column(label, overflow="fold")
    lines = [("status", [r["status"] for r in rows]), ("task", [r["task"] for r in rows]),
             ("seed", [r["seed"] for r in rows]), ("method", [r["method"] for r in rows]),
             ("selection metric", [r["metric"] for r in rows]), ("best step", [r["best_step"] for r in rows])]
    lines += [(f"best: {n}", [r["best_eval"].get(n) for r in rows]) for n in data["metric_names"]]
    lines += [(f"last: {n}", [r["last_eval"].get(n) for r in rows]) for n in data["metric_names"]]
    if any(r["test"] for r in rows):
        lines += [(f"test: {n}", [(r["test"] or {}).get(n) for r in rows]) for n in data["metric_names"]]
    lines += [("trainable params", [r["trainable_params"] for r in rows]), ("wall time", [seconds(r["wall_time_s"]) for r in rows])]
    for name, values in lines:
        cells = [escape(fmt(v)) for v in values]
        differs = len(set(cells)) > 1
        name = escape(name)
        table.add_row(f"[yellow]{name}[/yellow]" if differs else f"[dim]{name}[/dim]",
                      *[f"[bold]{c}[/bold]" if differs else c for c in cells])
    console.print(table)
    failed = [r for r in runs if r.status != "completed"]
    for run in failed:
        error = f" — {run.report['error']}" if run.report.get("error") else ""
        console.print(f"[yellow]{escape(run.label)}: {escape(run.status)}[/yellow]{escape(error)}")
    return data
