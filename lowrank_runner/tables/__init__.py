"""Results tables in the papers' layout, and the figure of a sweep.

- ``spec.py``: what the table shows (``output.table`` of the recipe, schema defaults)
- ``build.py``: rows (methods, sweep points) x columns (tasks, metrics) from summaries
- ``formats.py``: Markdown, CSV (long form), LaTeX (booktabs), the terminal
- ``significance.py``: differences to a baseline row (``output.table.baseline``,
  ``--baseline``): 95% intervals, paired or Welch t-tests over seeds
- ``figure.py``: the sweep's PNG (metric vs the swept value, ± std over seeds where a
  point has several)
- ``sources.py``: the runs of a recipe just run, or of recipes' output directories

``lrr run`` writes ``results.md``, ``results.csv``, ``results.tex`` (and ``sweep.png`` for
a sweep) into the recipe's output directory (a single run: its run directory);
``lrr report --table DIR ...`` builds one table from several recipes. Torch-free.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lowrank_runner.tables.build import Source, Table, build_table
from lowrank_runner.tables.figure import SWEEP_FIGURE, sweep_figure
from lowrank_runner.tables.formats import FORMATS, csv_text, latex, markdown, print_table
from lowrank_runner.tables.spec import table_spec

RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"
RESULTS_TEX = "results.tex"

__all__ = ["RESULTS_CSV", "RESULTS_MD", "RESULTS_TEX", "SWEEP_FIGURE", "FORMATS", "Source", "Table", "build_table",
           "csv_text", "latex", "markdown", "print_table", "sweep_figure", "table_spec", "write_tables",
           "write_recipe_tables"]


def write_tables(root: Path, table: Table, title: str) -> list[Path]:
    """results.md, results.csv, results.tex and (a sweep) sweep.png in ``root``."""
    written = []
    for name, render in ((RESULTS_MD, markdown), (RESULTS_CSV, csv_text), (RESULTS_TEX, latex)):
        (root / name).write_text(render(table), encoding="utf-8")
        written.append(root / name)
    figure = sweep_figure(table, root / SWEEP_FIGURE, title)
    return written + ([figure] if figure else [])


def write_recipe_tables(root: Path, recipe, summary: list[dict], console=None) -> Table:
    """The end of ``lrr run``: the recipe's table from its summary entries, written into
    ``root`` and printed on ``console``."""
    from lowrank_runner.tables.sources import recipe_source

    table = _recipe_table([recipe_source(recipe, summary)], table_spec(recipe.resolved.get("output")))
    write_tables(root, table, recipe.name)
    if console is not None:
        print_table(console, table, recipe.name)
    return table


def _recipe_table(sources: list[Source], spec) -> Table:
    """The table at the end of ``lrr run``; an ``output.table.baseline`` that names no row
    of this recipe's (it may name another recipe's, for ``lrr report --table``) is warned
    about, and the table written without differences: the runs are done."""
    from lowrank_runner.errors import warn
    from lowrank_runner.tables.significance import BaselineError

    try:
        return build_table(sources, spec)
    except BaselineError as exc:
        warn(f"output.table.baseline: {exc}; the results table is written without differences (lrr report --table "
             f"DIR ... --baseline NAME compares with another recipe's row)")
        return build_table(sources, replace(spec, baseline=None))


def _table_with_baseline(sources: list[Source], spec, baseline: str | None, first: Path) -> Table:
    """``--baseline NAME`` over the first recipe's ``output.table.baseline``; a name that
    is no row's (or several rows') is a usage error naming where it came from."""
    from lowrank_runner.errors import UsageError
    from lowrank_runner.tables.significance import BaselineError

    spec = replace(spec, baseline=baseline) if baseline is not None else spec
    try:
        return build_table(sources, spec)
    except BaselineError as exc:
        where = "--baseline" if baseline is not None else f"output.table.baseline of {first}'s recipe"
        raise UsageError(f"{where}: {exc}") from None


SUFFIXES = {".md": "md", ".csv": "csv", ".tex": "latex"}


def _format_of(out: Path | None, fmt: str | None) -> str:
    """The format asked for: ``--format``, else ``--out``'s suffix (they must agree)."""
    from lowrank_runner.errors import UsageError

    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: choose md, csv or latex")
    fmt = {"markdown": "md", "tex": "latex"}.get(fmt, fmt)
    if out is None:
        return fmt or "md"
    suffix = SUFFIXES.get(out.suffix.lower())
    if suffix is None:
        raise UsageError(f"--out {out}: give a file ending in .md, .csv or .tex (the format follows the suffix)")
    if fmt is not None and fmt != suffix:
        raise UsageError(f"--out {out} is a .{out.suffix.lstrip('.').lower()} file but --format says {fmt}: give "
                         f"--out a name ending in .{ {v: k for k, v in SUFFIXES.items()}[fmt].lstrip('.') }, or "
                         "drop --format")
    return suffix


def writable_file(path: Path, option: str, suffixes: tuple[str, ...]) -> None:
    """``--out``/``--figure``: a file in an existing directory that is not a run's (a run's
    own files are never overwritten), with one of ``suffixes``."""
    from lowrank_runner.errors import UsageError

    if path.suffix.lower() not in suffixes:
        raise UsageError(f"{option} {path}: give a file ending in {' or '.join(suffixes)}")
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a directory; give a file name in it, e.g. {path / ('table' + suffixes[0])}")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: {parent} is not a directory; create it first, or write somewhere else")
    if any((parent / name).is_file() for name in ("recipe.yaml", "summary.json", "search.json")):
        raise UsageError(f"{option} {path}: {parent} is a run directory written by lrr run; write the table "
                         "somewhere else (its own results.* are written there already)")


def report_table(paths: list[Path], out: Path | None = None, fmt: str | None = None,
                 figure: Path | None = None, baseline: str | None = None) -> tuple[Table, str, list[str]]:
    """``lrr report --table``: one table from several recipes' output directories, in the
    first recipe's layout (``baseline``: ``--baseline``, over its ``output.table.baseline``). Returns the table, its text in the format asked for, and the
    lines that say what was written (``--out``, ``--figure``)."""
    from lowrank_runner.errors import UsageError
    from lowrank_runner.tables.sources import distinct_outputs, read_outputs

    kind = _format_of(out, fmt)
    if out is not None:
        writable_file(out, "--out", tuple(SUFFIXES))
    if figure is not None:
        writable_file(figure, "--figure", (".png",))
    paths, lines = distinct_outputs(paths)
    sources, resolved = read_outputs(paths)
    table = _table_with_baseline(sources, table_spec(resolved.get("output")), baseline, paths[0])
    table.settings = _warn_settings(sources)
    text = FORMATS[kind](table)
    title = " vs ".join(dict.fromkeys(s.name for s in sources))
    if figure is not None:
        if sweep_figure(table, figure, title) is None:
            raise UsageError(f"--figure {figure}: the runs have no sweep point with a result (the figure plots a "
                             "metric against a swept value: a recipe with sweep:)")
        lines.append(f"figure written to {figure}")
    if out is not None:
        try:
            out.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--out {out}: cannot be written ({exc.strerror or exc}); write somewhere else") from None
        lines.append(f"table written to {out}")
    return table, text, lines


def _warn_settings(sources: list[Source]) -> list:
    """The training settings the joined recipes differ in, each said on stderr (one line
    per key, each recipe's value); the table is still built, and its notes say the same."""
    from lowrank_runner.errors import warn
    from lowrank_runner.tables.sources import setting_differences

    found = setting_differences(sources)
    if found:
        warn("the recipes joined in this table trained with different settings, so their rows differ by more than the "
             "method:\n" + "\n".join(f"  {d.line}" for d in found))
    return found


def _differences_json(row) -> dict:
    """A compared row's differences to the baseline (per column, and Avg.); {} for others."""
    if not row.differences:
        return {}
    return {"differences": [None if d is None else d.as_dict() for d in row.differences],
            "average_difference": None if row.average_difference is None else row.average_difference.as_dict()}


def table_json(table: Table) -> dict:
    """The table as plain data (``lrr report --table --json``); with a baseline, its title,
    the interval's level and each compared row's ``differences`` (per column: diff, low,
    high, p_value, test, n, n_baseline, significant) and ``average_difference``."""
    from lowrank_runner.tables.significance import CI_LEVEL

    return {"headers": table.headers, "columns": [{"task": c.task, "metrics": list(c.metrics)} for c in table.columns],
            "aggregate": table.spec.aggregate, "spread": table.spec.spread, "average": table.spec.average,
            "baseline": None if table.baseline is None else table.baseline.title,
            "ci_level": CI_LEVEL if table.baseline is not None else None,
            "settings": [{"key": d.key, "values": dict(d.values)} for d in table.settings],
            "rows": [{"method": r.method, "recipe": r.recipe, "tags": r.tags, "label": r.label, "point": r.point,
                      "params": r.params, "average": r.average,
                      "cells": [[{"metric": v.metric, "value": v.centre, "std": v.spread, "seeds": v.seeds,
                                  "missing_seeds": v.missing} for v in cell] for cell in r.cells],
                      **_differences_json(r)}
                     for r in table.rows]}
