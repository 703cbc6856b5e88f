"""A results table as Markdown, CSV (long form: one line per row x column x metric) and
LaTeX (booktabs), and on the terminal (rich). Torch-free."""

from __future__ import annotations

import csv
import io

from lowrank_runner.tables.build import Row, Table, Value
from lowrank_runner.tables.significance import CI_LEVEL, MARK, Difference

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
    differences = row.differences or [None] * len(row.cells)
    out += ["/".join(_value(v, table, style) for v in cell) + _difference(d, table, style)
            for cell, d in zip(row.cells, differences)]
    if table.spec.average != "none":
        out.append(_average(row, table, style) + _difference(row.average_difference, table, style))
    return out


def _signed(value: float, table: Table) -> str:
    return f"{value:+.{table.spec.precision}f}"


def _difference(d: Difference | None, table: Table, style: str) -> str:
    """A compared row's " (+1.20 [+0.30, +2.10]†)": the difference to the baseline, its
    interval and the mark of a significant one; nothing without a baseline."""
    if d is None:
        return ""
    interval = f" [{_signed(d.low, table)}, {_signed(d.high, table)}]" if d.low is not None else ""
    if style == "latex":
        mark = r"^{\dagger}" if d.significant else ""
        interval = interval.replace(" [", r"\ [")
        return f" (${_signed(d.diff, table)}{interval}{mark}$)"
    return f" ({_signed(d.diff, table)}{interval}{MARK if d.significant else ''})"


def _average(row: Row, table: Table, style: str) -> str:
    if row.average is None:
        return "--" if style == "latex" else MISSING
    text = _number(row.average, table)
    if row.average_best and style in ("markdown", "latex"):  # LaTeX: \mathbf, as every bold value
        text = rf"$\mathbf{{{text}}}$" if style == "latex" else f"**{text}**"
    star = "" if row.average_complete else "$^*$" if style == "latex" else "*"  # over the columns with a value
    return text + star


def headers(table: Table) -> list[str]:
    return (["Method"] + (["# Params"] if table.spec.params else []) + table.headers
            + (["Avg."] if table.spec.average != "none" else []))


def single_seed(table: Table) -> bool:
    """Every value shown is one run (n = 1): no mean, no spread to speak of."""
    return table.seed_counts == [1]


def _how(table: Table) -> str:
    """How the seeds combine: "mean ± std over seeds", or "one seed (n = 1)" where every
    value is one run."""
    if single_seed(table):
        return "one seed (n = 1)"
    centre = "median" if table.spec.aggregate == "median" else "mean"
    return f"{centre} ± std over seeds" if table.spec.spread == "std" else f"{centre} over seeds"


def _how_title(table: Table) -> str:
    """The terminal title's words: :func:`_how` with the numbers of seeds (n = 3, n = 1–3)."""
    counts = table.seed_counts
    if not counts or single_seed(table):
        return _how(table)
    return _how(table) + (f" (n = {counts[0]})" if len(counts) == 1 else f" (n = {counts[0]}–{counts[-1]})")


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
    listed = "; ".join(f"{t}: {s}" for t, s in seeds.items())
    if single_seed(table):
        lines = [f"{_scale_note(table)}, n = 1: one seed per value, no spread (seeds {listed})."]
    else:
        lines = [f"{_scale_note(table)}, {_how(table)} {listed}."]
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
    return lines + settings_notes(table) + difference_notes(table)


def settings_notes(table: Table) -> list[str]:
    """Joined recipes that trained differently: one line per setting, each recipe's value."""
    if not table.settings:
        return []
    return (["The recipes trained with different settings, so rows differ by more than the method:"]
            + [f"- {d.line}" for d in table.settings])


def difference_notes(table: Table) -> list[str]:
    """With a baseline: what the parentheses hold, and per compared row the test and n of
    each column (one phrase where every column has the same)."""
    if table.baseline is None:
        return []
    level = f"{CI_LEVEL:.0%}"
    lines = [f"In parentheses: the difference to the baseline {table.baseline.title} (row - baseline, of the means "
             f"over seeds, in the table's units) [{level} CI]; {MARK}: p < {1 - CI_LEVEL:.2f}, two-sided. Paired t-test "
             "(by seed) where the row has the baseline's seeds of the task (a seed fixes the data order and the head's "
             "init), else Welch's t-test (unequal variances, Welch-Satterthwaite df); each column's first metric"
             + ("; Avg.: per seed, the mean over the columns (the seeds every column has)." if
                table.spec.average != "none" else ".")]
    return lines + [_row_note(row, table) for row in table.rows if row is not table.baseline]


def _row_note(row: Row, table: Table) -> str:
    """"lora2 vs lora: paired t, n=3 (every column and Avg.)", or per column."""
    said = [(head, d.described if d is not None else "no value") for head, d in zip(table.headers, row.differences)]
    if table.spec.average != "none":
        d = row.average_difference
        said.append(("Avg.", d.described if d is not None else "no seed with a value in every column"))
    head = f"{row.title} vs {table.baseline.title}: "
    if len({words for _, words in said}) == 1:
        every = "every column and Avg." if table.spec.average != "none" else "every column"
        return f"{head}{said[0][1]} ({every})."
    return head + "; ".join(f"{h}: {words}" for h, words in said) + "."


def markdown(table: Table) -> str:
    head = [h.replace("|", "\\|") for h in headers(table)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells(row, table, "markdown")) + " |"
              for row in table.rows]
    return "\n".join(lines + [""] + notes(table)) + "\n"


CSV_FIELDS = ["method", "task", "metric", "value", "std", "n", "seeds", "n_missing", "missing_seeds", "point", "column",
              "params"]
BASELINE_FIELDS = ["baseline", "diff", "diff_low", "diff_high", "ci_level", "p_value", "test", "n_baseline"]


def _rounded(value: float | None) -> str | float:
    return "" if value is None else round(value, 6)


def _csv_difference(table: Table, d: Difference | None) -> list:
    """The baseline columns of a line: its difference, interval, p-value and test ("paired",
    "welch", or why there is none); empty past the first metric and on the baseline's row."""
    if table.baseline is None:
        return []
    if d is None:
        return [table.baseline.title] + [""] * (len(BASELINE_FIELDS) - 1)
    p_value = "" if d.p_value is None else f"{d.p_value:.6g}"
    return [table.baseline.title, _rounded(d.diff), _rounded(d.low), _rounded(d.high),
            CI_LEVEL if d.low is not None else "", p_value, d.test or d.described, d.n_baseline]


def csv_text(table: Table) -> str:
    """Long form, numbers unrounded (6 decimals): one line per row x column x metric,
    then the row's Avg. line; ``column`` is the printed header (pivot on it). ``n`` and
    ``n_missing`` count the seeds that finished and those that did not, ``seeds`` and
    ``missing_seeds`` list them (a missing seed 0 is a ``0`` there, so the counts say it).
    With a baseline, :data:`BASELINE_FIELDS` follow (the first metric's line of a column)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS + (BASELINE_FIELDS if table.baseline is not None else []))
    for row in table.rows:
        params = "" if row.params is None else round(row.params, 1) if row.params % 1 else int(row.params)
        differences = row.differences or [None] * len(row.cells)
        for column, head, cell, d in zip(table.columns, table.headers, row.cells, differences):
            for j, v in enumerate(cell):
                writer.writerow([row.method, column.task, v.metric, _rounded(v.centre), _rounded(v.spread),
                                 len(v.seeds), " ".join(map(str, v.seeds)), len(v.missing), " ".join(map(str, v.missing)),
                                 row.label, head, params] + _csv_difference(table, d if j == 0 else None))
        if table.spec.average != "none":
            writer.writerow([row.method, "Avg.", "", _rounded(row.average), "", "", "", "", "", row.label, "Avg.", params]
                            + _csv_difference(table, row.average_difference))
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
    lines = ["% " + line.replace("×", "x").replace("±", "+/-").replace("–", "-").replace(MARK, "\\dagger")
             for line in notes(table)]
    lines += ["% needs \\usepackage{booktabs}", f"\\begin{{tabular}}{{{align}}}", "\\toprule",
              " & ".join(latex_escape(h) for h in head) + " \\\\", "\\midrule"]
    lines += [" & ".join(cells(row, table, "latex")) + " \\\\" for row in table.rows]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


FORMATS = {"md": markdown, "markdown": markdown, "csv": csv_text, "tex": latex, "latex": latex}


def print_table(console, table: Table, title: str) -> None:
    from rich.markup import escape
    from rich.table import Table as RichTable

    caption = None
    if table.baseline is not None:
        caption = (f"(row - {table.baseline.title} [{CI_LEVEL:.0%} CI], {MARK}: p < {1 - CI_LEVEL:.2f}; tests and n in "
                   "results.md)")
    t = RichTable(title=f"{escape(title)}: {_how_title(table)}{_scale_title(table)}",
                  caption=escape(caption) if caption else None)
    for h in headers(table):
        t.add_column(escape(h))
    for row in table.rows:
        t.add_row(*(escape(c) for c in cells(row, table, "terminal")))
    console.print(t)
