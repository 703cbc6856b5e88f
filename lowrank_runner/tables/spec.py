"""What a results table shows, read from a recipe's ``output``: the columns (task order,
metrics per task, headers), the average, the seeds' aggregate and spread, the precision,
the parameter-count column. Defaults come from the recipe schema (``output.table``).
Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from lowrank_runner.tasks.registry import LOWER_IS_BETTER, TASKS

# The papers' names of the metrics (headers; LoRA2 Table 5's "Mcc", "Acc", "F1", "Corr";
# TriAdaptLoRA Table IV's "EM"); a task's is its spec's display name ("SST-2").
METRIC_NAMES = {"accuracy": "Acc", "accuracy_mm": "Acc-mm", "f1": "F1", "f1_macro": "F1-macro",
                "matthews_correlation": "Mcc", "pearson": "Pearson", "spearman": "Spearman", "mse": "MSE",
                "exact": "EM", "best_exact": "best EM", "best_f1": "best F1", "bleu": "BLEU", "nist": "NIST",
                "rougeL": "ROUGE-L", "chrf": "chrF", "ter": "TER", "loss": "loss", "perplexity": "PPL"}
UNSCALED = ("nist", "mse", "perplexity")  # shown as they are; every other metric is a fraction, shown x100


def scaled(metric: str) -> bool:
    """Whether a metric is a fraction shown x100 (accuracy, F1, BLEU, ...), not a raw value."""
    return metric not in UNSCALED and not metric.endswith("loss")


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER or metric.endswith("loss")


@dataclass(frozen=True)
class Column:
    """One column: a task and the metrics its cell shows ("88.90/89.10"); no metrics: the
    task's selection metric (read from its runs)."""

    task: str
    metrics: tuple[str, ...] = ()
    header: str | None = None


@dataclass(frozen=True)
class TableSpec:
    columns: tuple[Column, ...] | None  # None: every task of the recipe, its selection metric
    average: str  # "first" | "mean" | "none"
    spread: str  # "std" | "none"
    precision: int
    params: bool
    bold_best: bool
    aggregate: str  # "mean" | "median" (output.aggregate)
    baseline: str | None = None  # the row the others are compared with (output.table.baseline)


def _defaults() -> dict:
    """The schema's defaults of ``output.table`` and ``output.aggregate``."""
    from lowrank_runner.recipe.schema import property_schema

    out = {key: sub["default"] for key, sub in property_schema("output", "table")["properties"].items()
           if "default" in sub}
    return {**out, "aggregate": property_schema("output", "aggregate")["default"]}


def table_spec(output: dict | None) -> TableSpec:
    """The table a recipe's resolved ``output`` asks for (schema defaults where it says nothing)."""
    output = output or {}
    defaults = _defaults()
    table = {**defaults, **(output.get("table") or {})}
    columns = table.get("columns")
    if columns is not None:
        columns = tuple(Column(c) if isinstance(c, str) else
                        Column(c["task"], tuple(c.get("metrics") or ()), c.get("header")) for c in columns)
    return TableSpec(columns, table["average"], table["spread"], table["precision"], table["params"],
                     table["bold_best"], output.get("aggregate", defaults["aggregate"]), table.get("baseline"))


def metric_label(metrics: tuple[str, ...]) -> str:
    """``(accuracy, accuracy_mm)`` -> ``Acc m/mm``; ``(accuracy, f1)`` -> ``Acc/F1``."""
    if len(metrics) == 2 and metrics[1] == metrics[0] + "_mm":
        return f"{METRIC_NAMES.get(metrics[0], metrics[0])} m/mm"
    return "/".join(METRIC_NAMES.get(m, m) for m in metrics)


def header(column: Column, metrics: tuple[str, ...]) -> str:
    if column.header:
        return column.header
    spec = TASKS.get(column.task)
    name = spec.shown_name if spec is not None else column.task
    return f"{name} ({metric_label(metrics)})" if metrics else name
