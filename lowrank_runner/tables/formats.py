"""A results table as Markdown, CSV (long form: one line per row x column x metric) and
LaTeX (booktabs), and on the terminal (rich). Torch-free."""

from __future__ import annotations

import csv
import io

from lowrank_runner.tables.build import Row, Table, Value

MISSING = "–"


def format_params(n: float | None) -> str:
    """The papers' "# Params": 512, 37.4k, 0.17M, 1.33M, 184M."""
    if n is None:
        return MISSING
    if n >= 1e8:
        return f"{n / 1e6:.0f}M"
    if n >= 1e5:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{n:.0f}"


def _number(value: float, table: Table) -> str:
    return f"{value:.{table.spec.precision}f}"


def _value(v: Value, table: Table, style: str) -> str:
    if v.centre is None:
        return "--" if style == "latex" else MISSING
    centre = _number(v.centre, table)
    star = "*" if v.missing else ""
    if style == "latex":
        centre = rf"\mathbf{{{centre}}}" if v.best else centre
        spread = rf" \pm {_number(v.spread, table)}" if v.spread is not None else ""
        return f"${centre}{spread}{'^*' if star else ''}$"
    text = centre + (f"±{_number(v.spread, table)}" if v.spread is not None else "") + star
    return f"**{text}**" if v.best and style == "markdown" else text


def cells(row: Row, table: Table, style: str) -> list[str]:
    """The printed cells of a row: title, # Params, columns, Avg. (as configured)."""
    title = latex_escape(row.title) if style == "latex" else row.title
    params = format_params(row.params)
    out = [title] + ([params.replace(MISSING, "--") if style == "latex" else params] if table.spec.params else [])
    out += ["/".join(_value(v, table, style) for v in cell) for cell in row.cells]
    if table.spec.average != "none":
        out.append(_average(row, table, style))
    return out


def _average(row: Row, table: Table, style: str) -> str:
    if row.average is None:
        return "--" if style == "latex" else MISSING
    text = _number(row.average, table)
    if row.average_best and style in ("markdown", "latex"):
        text = rf"\textbf{{{text}}}" if style == "latex" else f"**{text}**"
    star = "" if row.average_complete else "$^*$" if style == "latex" else "*"  # over the columns with a value
    return text + star


def headers(table: Table) -> list[str]:
    return (["Method"] + (["# Params"] if table.spec.params else []) + table.headers
            + (["Avg."] if table.spec.average != "none" else []))


def _how(table: Table) -> str:
    centre = "median" if table.spec.aggregate == "median" else "mean"
    return f"{centre} ± std" if table.spec.spread == "std" else centre


def _unscaled(table: Table) -> tuple[list[str], bool]:
    """The metrics of the table shown as they are (losses, perplexity, NIST, MSE), and
    whether any metric is shown x100 (:func:`lowrank_runner.tables.spec.scaled`)."""
    from lowrank_runner.tables.spec import scaled

    shown = list(dict.fromkeys(v.metric for r in table.rows for c in r.cells for v in c))
    return [m for m in shown if not scaled(m)], any(scaled(m) for m in shown) or not shown


def _scale_note(table: Table) -> str:
    """What is x100: "Metrics ×100 (NIST, MSE, perplexity as they are)", naming the table's
    losses where it shows any, or "Metrics as they are" where it shows no fraction."""
    raw, any_scaled = _unscaled(table)
    if not any_scaled:
        return "Metrics as they are (not ×100)"
    if any(m.endswith("loss") for m in raw):
        return f"Metrics ×100 ({', '.join(raw)} as they are)"
    return "Metrics ×100 (NIST, MSE, perplexity as they are)"


def _scale_title(table: Table) -> str:
    """The terminal title's scale: ", ×100", ", ×100 except loss, ..." or nothing."""
    raw, any_scaled = _unscaled(table)
    if not any_scaled:
        return ""
    return f", ×100 except {', '.join(raw)}" if raw else ", ×100"


def notes(table: Table) -> list[str]:
    """What the numbers are: scale, aggregate, seeds per task, average, parameters."""
    seeds: dict[str, list] = {}
    for row in table.rows:
        for column, cell in zip(table.columns, row.cells):
            seeds.setdefault(column.task, [])
            seeds[column.task] = sorted(set(seeds[column.task]) | {s for v in cell for s in v.seeds})
    lines = [f"{_scale_note(table)}, {_how(table)} over seeds "
             + "; ".join(f"{t}: {s}" for t, s in seeds.items()) + "."]
    if table.spec.average == "mean":
        lines.append("Avg.: the mean over the columns of each column's mean over its metrics.")
    elif table.spec.average == "first":
        lines.append("Avg.: the mean over the columns of each column's first metric.")
    if table.spec.params:
        lines.append("The # Params column: trainable adapter parameters (report.json adapter_params; the mean over "
                     "a row's runs where they differ).")
    if not table.complete:
        lines.append("* or –: some runs of this task failed, did not finish or were not run by that recipe (see its "
                     "summary.json); an Avg. with * is over the columns that have a value.")
    return lines


def markdown(table: Table) -> str:
    head = [h.replace("|", "\\|") for h in headers(table)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells(row, table, "markdown")) + " |"
              for row in table.rows]
    return "\n".join(lines + [""] + notes(table)) + "\n"


CSV_FIELDS = ["method", "task", "metric", "value", "std", "n", "seeds", "n_missing", "missing_seeds", "point", "column",
              "params"]


def _rounded(value: float | None) -> str | float:
    return "" if value is None else round(value, 6)


def csv_text(table: Table) -> str:
    """Long form, numbers unrounded (6 decimals): one line per row x column x metric,
    then the row's Avg. line; ``column`` is the printed header (pivot on it). ``n`` and
    ``n_missing`` count the seeds that finished and those that did not, ``seeds`` and
    ``missing_seeds`` list them (a missing seed 0 is a ``0`` there, so the counts say it)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for row in table.rows:
        params = "" if row.params is None else round(row.params, 1) if row.params % 1 else int(row.params)
        for column, head, cell in zip(table.columns, table.headers, row.cells):
            for v in cell:
                writer.writerow([row.method, column.task, v.metric, _rounded(v.centre), _rounded(v.spread),
                                 len(v.seeds), " ".join(map(str, v.seeds)), len(v.missing), " ".join(map(str, v.missing)),
                                 row.label, head, params])
        if table.spec.average != "none":
            writer.writerow([row.method, "Avg.", "", _rounded(row.average), "", "", "", "", "", row.label, "Avg.", params])
    return out.getvalue()


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--",
                  "±": r"$\pm$", "×": r"$\times$", "|": r"\textbar{}", "<": r"\textless{}", ">": r"\textgreater{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def latex(table: Table) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); mean ± std as $x \\pm s$."""
    head = headers(table)
    align = "l" + "r" * (len(head) - 1)
    lines = ["% " + line.replace("×", "x").replace("±", "+/-").replace("–", "-") for line in notes(table)]
    lines += ["% needs \\usepackage{booktabs}", f"\\begin{{tabular}}{{{align}}}", "\\toprule",
              " & ".join(latex_escape(h) for h in head) + " \\\\", "\\midrule"]
    lines += [" & ".join(cells(row, table, "latex")) + " \\\\" for row in table.rows]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


FORMATS = {"md": markdown, "markdown": markdown, "csv": csv_text, "tex": latex, "latex": latex}


def print_table(console, table: Table, title: str) -> None:
    from rich.markup import escape
    from rich.table import Table as RichTable

    t = RichTable(title=f"{escape(title)}: {_how(table)} over seeds{_scale_title(table)}")
    for h in headers(table):
        t.add_column(escape(h))
    for row in table.rows:
        t.add_row(*(escape(c) for c in cells(row, table, "terminal")))
    console.print(t)
