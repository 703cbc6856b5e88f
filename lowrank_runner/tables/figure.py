"""The figure of a sweep, like the papers' sensitivity plots (TriAdaptLoRA Figures 3-5,
MTLoRA Figure 5): each column's first metric against the swept value, the seeds' mean
(or median) with ± std as error bars (none where every point is one seed: the title then
says n = 1), one line per method and task (and per value of the other swept keys), on a
y range of at least MIN_Y_SPAN points. Numbers on the x axis are placed by value; anything else
(booleans, strings, target lists, mappings) as categories in the sweep's order.
matplotlib, headless (Agg)."""

from __future__ import annotations

import json
from pathlib import Path

from lowrank_runner.tables.build import Table

SWEEP_FIGURE = "sweep.png"
# The smallest y range drawn for metrics shown x100 (points): a spread of a few tenths
# between sweep points is not stretched over the whole height.
MIN_Y_SPAN = 5.0


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _text(value) -> str:
    """A swept value as a category: a mapping or list as its run directory label reads it."""
    from lowrank_runner.recipe.sweep import value_label

    if isinstance(value, (dict, list)):
        return value_label(value)
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def row_axis(row) -> str | None:
    """A row's x key: the first key of its sweep point (its recipe's first swept key)."""
    return next(iter(row.point), None)


def sweep_axis(table: Table) -> str | None:
    """The x axis label: the swept key, or the keys when the recipes compared sweep keys of
    different names that play the same part (TriAdaptLoRA's ``t_init`` beside IncreLoRA's
    ``init_warmup``, Figure 3): each recipe's rows are placed by their own first key."""
    keys = list(dict.fromkeys(k for k in (row_axis(r) for r in table.rows) if k))
    if len(keys) <= 1:
        return keys[0] if keys else None
    return " / ".join(dict.fromkeys(_short(k) for k in keys))


def _partners(table: Table) -> dict[str, set[str]]:
    """Per method, the keys zipped with its x key (``sweep: {zip: ...}``): one value per x
    value and as many values as x has, so they move together and are not lines of their own."""
    out: dict[str, set[str]] = {}
    for method in {r.method for r in table.rows}:
        rows = [r for r in table.rows if r.method == method and row_axis(r)]
        axis = {row_axis(r) for r in rows}
        if len(axis) != 1:
            continue
        x = axis.pop()
        keys = {k for r in rows for k in r.point if k != x}
        out[method] = set()
        for key in keys:
            pairs = {(_text(r.point[x]), _text(r.point.get(key))) for r in rows}
            if len({a for a, _ in pairs}) == len(pairs) == len({b for _, b in pairs}):
                out[method].add(key)
    return out


def figure_lines(table: Table) -> dict[str, list[tuple[object, float, float | None]]]:
    """label -> [(x, centre, spread)] for each method x column x other keys' values; x is
    each row's own first swept key (:func:`row_axis`), keys zipped with it are not lines."""
    methods = {r.method for r in table.rows}
    partners = _partners(table)
    lines: dict[str, list] = {}
    for row in table.rows:
        axis = row_axis(row)
        if axis is None:
            continue
        skip = partners.get(row.method, set()) | {axis}
        others = ",".join(f"{_short(k)}={_text(v)}" for k, v in row.point.items() if k not in skip)
        for head, cell in zip(table.headers, row.cells):
            value = cell[0]
            if value.centre is None:
                continue
            parts = ([row.method] if len(methods) > 1 else []) + [head] + ([others] if others else [])
            lines.setdefault(" · ".join(parts), []).append((row.point[axis], value.centre, value.spread))
    return lines


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def sweep_figure(table: Table, path: Path, title: str) -> Path | None:
    """Draw the sweep's figure to ``path`` (PNG); None when the table has no sweep point
    with a value."""
    axis = sweep_axis(table)
    lines = figure_lines(table) if axis else {}
    if not lines:
        return None
    import matplotlib

    matplotlib.use("Agg")
    with matplotlib.rc_context({"text.parse_math": False}):  # a header's "$" is text, not TeX
        _draw(table, axis, lines, path, title)
    return path


def _draw(table: Table, axis: str, lines: dict, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    xs = [x for points in lines.values() for x, _, _ in points]
    numeric = _numeric(xs)
    categories = list(dict.fromkeys(_text(x) for x in xs))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    bars = any(p[2] is not None for points in lines.values() for p in points)
    for label, points in lines.items():
        points = sorted(points, key=lambda p: p[0]) if numeric else points
        at = [p[0] if numeric else categories.index(_text(p[0])) for p in points]
        if bars:
            ax.errorbar(at, [p[1] for p in points], yerr=[p[2] or 0.0 for p in points], marker="o", capsize=3,
                        label=label)
        else:  # one seed per point: nothing to draw as an error bar
            ax.plot(at, [p[1] for p in points], marker="o", label=label)
    if not numeric:
        ax.set_xticks(range(len(categories)), categories, rotation=20 if len(categories) > 4 else 0)
    elif all(isinstance(x, int) for x in xs):  # ranks, steps: ticks at the swept values (log2 when they double)
        if min(xs) > 0 and max(xs) / min(xs) >= 16:
            ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(xs)), [str(x) for x in sorted(set(xs))])
    elif min(xs) > 0 and max(xs) / min(xs) >= 100:  # learning rates: decades apart
        ax.set_xscale("log")
    ax.set_xlabel(axis)
    ax.set_ylabel("metric ×100" if len({h for h in table.headers}) > 1 else table.headers[0])
    limits = y_range(lines) if _all_scaled(table) else None
    if limits is not None:
        ax.set_ylim(*limits)
    ax.set_title(f"{title}: {figure_how(table, bars)}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def figure_how(table: Table, bars: bool) -> str:
    """The figure's words for its points: "mean ± std over seeds (n = 3)", or "one seed
    per point (n = 1)" where no point has a spread to draw."""
    counts = table.seed_counts
    if counts == [1]:
        return "one seed per point (n = 1)"
    n = (f" (n = {counts[0]})" if len(counts) == 1 else f" (n = {counts[0]}–{counts[-1]})") if counts else ""
    centre = "median" if table.spec.aggregate == "median" else "mean"
    return f"{centre}{' ± std' if bars else ''} over seeds{n}"


def _all_scaled(table: Table) -> bool:
    """Every line's metric is a fraction shown x100 (its y values are points)."""
    from lowrank_runner.tables.spec import scaled

    return all(scaled(cell[0].metric) for r in table.rows for cell in r.cells if cell and cell[0].centre is not None)


def y_range(lines: dict) -> tuple[float, float] | None:
    """(low, high): :data:`MIN_Y_SPAN` points centred on the values drawn (with their
    error bars) where they span less; None where they span more (matplotlib's own range)."""
    low = min(p[1] - (p[2] or 0.0) for points in lines.values() for p in points)
    high = max(p[1] + (p[2] or 0.0) for points in lines.values() for p in points)
    if high - low >= MIN_Y_SPAN:
        return None
    middle = (low + high) / 2
    return middle - MIN_Y_SPAN / 2, middle + MIN_Y_SPAN / 2
