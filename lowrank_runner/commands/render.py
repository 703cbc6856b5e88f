"""Human-readable rendering of command results with rich (JSON goes through the CLI)."""

from __future__ import annotations

import json
import sys

from rich.markup import escape
from rich.table import Table

from lowrank_runner.console import make_console

console = make_console()  # the terminal's width, unlimited into a file or pipe (lowrank_runner/console.py)

INTEGRATED_LR = "integrated learning rate: the sum of the scheduler's learning rate over the planned optimizer steps"


def print_method_overview(specs) -> None:
    """``lrr methods``: one line per method (name, paper; cut at a terminal's edge) and
    where to read more."""
    console.print(f"{len(specs)} methods; [bold]lrr methods NAME[/bold] shows one in full (parameters, paper, "
                  "learning-rate guidance), [bold]--json[/bold] all of them:", highlight=False)
    width = max(map(len, specs), default=0)
    for spec in specs.values():
        origin = "" if spec.source == "built-in" else f"  (from {spec.source})"
        about = spec.paper or first_sentence(spec.schema.get("description", ""))
        console.print(f"  [bold]{escape(spec.name.ljust(width))}[/bold]  {escape(about + origin)}", no_wrap=True,
                      overflow="ellipsis", highlight=False)


def first_sentence(text: str) -> str:
    return text.split(". ")[0].rstrip(".")


def print_method(spec) -> None:
    """``lrr methods NAME``: the method's paper and description, its parameters (type,
    default, description), its learning-rate guidance explained."""
    console.print(f"[bold]{escape(spec.name)}[/bold]  {escape(spec.paper)}" if spec.paper else f"[bold]{escape(spec.name)}[/bold]")
    if spec.source != "built-in":
        console.print(f"registered by {spec.source}", markup=False)
    if spec.schema.get("description"):
        console.print(spec.schema["description"], markup=False, highlight=False)
    console.print()
    if spec.params:
        console.print(params_table(spec.params))
    else:
        console.print("parameters: none (the method has nothing to set besides its name)", markup=False)
    guidance = _guidance_lines(spec.name)
    for line in guidance:
        console.print(line, markup=False, highlight=False)
    if guidance:
        console.print(f"  ({INTEGRATED_LR})", markup=False, highlight=False)


def params_table(params: dict) -> Table:
    table = Table(show_edge=False)
    for column in ("parameter", "type", "default"):
        table.add_column(column, no_wrap=True)
    table.add_column("description")
    for name, p in params.items():
        default = json.dumps(p["default"]) if "default" in p else "(required)"
        table.add_row(*(escape(cell) for cell in (name, param_type(p), default, p.get("description", ""))))
    return table


def param_type(p: dict) -> str:
    """``integer``, ``integer or null``, ``one of a/b``."""
    if "enum" in p:
        return "one of " + "/".join(map(str, p["enum"]))
    kind = p.get("type", "")
    return " or ".join(kind) if isinstance(kind, list) else str(kind)


def _guidance_lines(name: str) -> list[str]:
    """A method's ``x-lr-guidance`` rules, one line each (plan/guidance.py)."""
    from lowrank_runner.plan.guidance import DOCS, describe_rule, guidance_rules

    try:
        rules = guidance_rules(name)
    except ValueError as exc:  # a plugin's malformed rules
        return [f"learning-rate guidance: {exc}"]
    return [f"learning-rate guidance: {describe_rule(rule)} ({DOCS})" for rule in rules]


def print_tasks(rows: list[dict]) -> None:
    """``lrr tasks``: one row per task (name, metrics with the primary first, description)."""
    table = Table(show_edge=False)
    table.add_column("task", style="bold", no_wrap=True)
    table.add_column("metrics (first: primary)")
    table.add_column("description")
    for row in rows:
        metrics = [row["primary_metric"], *(m for m in row["metrics"] if m != row["primary_metric"])]
        table.add_row(escape(row["name"]), escape(", ".join(metrics)), escape(row["description"]))
    console.print(table)


def print_inspection(result: dict) -> None:
    console.print(f"[bold]{escape(result['name'])}[/bold]  recipe hash {result['recipe_hash']}  ({len(result['runs'])} run(s))")
    if result.get("unavailable"):  # a hub backbone out of reach: the plan without the counts, said once
        console.print(f"note: {result['unavailable']}", markup=False, highlight=False)
    for index, run in enumerate(result["runs"]):
        m = run["method"]
        params = ", ".join(f"{k}={v}" for k, v in m.items() if k != "name")
        point = f" [cyan]{escape(run['label'])}[/cyan]" if run.get("label") else ""
        console.print(f"\n[bold]{escape(str(run['task']))}[/bold]{point} seed {run['seed']}: "
                      + escape(f"{m['name']}({params}) on {run['backbone']}"))
        table = Table(show_edge=False)
        table.add_column("target")
        table.add_column("modules")
        table.add_column("example")
        for symbol, paths in (run["targets"] or {}).items():
            table.add_row(escape(symbol), str(len(paths)), escape(paths[0]) if paths else "")
        if run["targets"]:
            console.print(table)
        elif run["targets"] is None:  # the backbone could not be read (result["unavailable"])
            pass
        else:  # full fine-tuning, BitFit
            console.print("no adapted modules: the method trains backbone tensors", markup=False)
        init = run.get("init_from")
        if init:
            source = f"run {init['run']} (task {init['task']}, same seed), which runs first" if "task" in init else init["path"]
            console.print(f"adapter starts from {source}; the task head is trained fresh", markup=False)
        t = run["training"]
        console.print(
            f"{counts_line(run)}{run['train_examples']:,} train examples · {run['steps']:,} optimizer steps "
            f"(warmup {run['warmup_steps']}) · lr {t['learning_rate']} · batch {batch_line(run['batch'])}",
            markup=False,
        )
        console.print(f"learning rate: peak {t['learning_rate']:g}, integrated {run['integrated_lr']:.3g} over "
                      f"{run['steps']:,} steps ({t['lr_scheduler']}, warmup {run['warmup_steps']})", markup=False)
        if index == 0:  # once: a sweep's runs repeat the line
            console.print(f"  ({INTEGRATED_LR})", markup=False, highlight=False)
        if t.get("fsdp", {}).get("enabled"):  # training.fsdp (train/fsdp.py)
            console.print(f"fsdp: {run['fsdp']}", markup=False)
        for line in run.get("warnings", ()):  # plain stderr text: no rich markup eats a path's [..]
            print(f"warning: {line}", file=sys.stderr)
    if any(run.get("label") for run in result["runs"]):
        _print_points(result["runs"])
    if result.get("trackers"):
        console.print("\ntrackers (RUN_DIR: each run's directory, RUN: its slug):", markup=False)
    for tracker in result.get("trackers", ()):
        console.print(f"  {tracker['name']}: {tracker['writes']}", markup=False)


def counts_line(run: dict) -> str:
    """``adapter params N · trainable N (P% of N) · `` ("" when they could not be counted)."""
    if run["adapter_params"] is None:
        return ""
    return (f"adapter params {run['adapter_params']:,} · trainable {run['trainable_params']:,} "
            f"({100 * run['trainable_params'] / run['total_params']:.3f}% of {run['total_params']:,}) · ")


def count(value) -> str:
    return "?" if value is None else f"{value:,}"


def batch_line(batch: dict) -> str:
    """``32 per optimizer step = 16 per device x 1 accumulation x 2 processes`` (plan/schedule.py)."""
    from lowrank_runner.plan.schedule import BatchPlan

    return BatchPlan(**batch).describe()


def _print_points(runs: list[dict]) -> None:
    """A sweep's points at a glance: per task and point, its seeds, parameters and steps."""
    table = Table(title="sweep points", show_edge=False)
    for column in ("task", "point", "seeds", "adapter params", "trainable", "steps"):
        table.add_column(column, overflow="fold")
    rows: dict[tuple, dict] = {}
    for run in runs:
        row = rows.setdefault((run["task"], run["label"]), {**run, "seeds": []})
        row["seeds"].append(str(run["seed"]))
    for (task, label), run in rows.items():
        table.add_row(escape(str(task)), escape(label), ",".join(run["seeds"]), count(run["adapter_params"]),
                      count(run["trainable_params"]), f"{run['steps']:,}")
    console.print(table)
