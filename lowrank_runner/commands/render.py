"""Human-readable rendering of command results with rich (JSON goes through the CLI)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()


def print_methods(specs) -> None:
    for spec in specs.values():
        table = Table(title=f"{escape(spec.name)}  [dim]{escape(str(spec.paper))}[/dim]", title_justify="left", show_edge=False)
        table.add_column("param")
        table.add_column("type")
        table.add_column("default")
        table.add_column("meaning")
        for name, p in spec.params.items():
            kind = p.get("type") or ("one of " + "/".join(map(str, p["enum"])) if "enum" in p else "")
            table.add_row(*(escape(cell) for cell in (name, str(kind), repr(p.get("default", "")), p.get("description", ""))))
        console.print(table)
        for line in _guidance_lines(spec.name):
            console.print(line, markup=False)
        console.print()


def _guidance_lines(name: str) -> list[str]:
    """A method's ``x-lr-guidance`` rules, one line each (plan/guidance.py)."""
    from lowrank_runner.plan.guidance import DOCS, condition, guidance_rules

    try:
        rules = guidance_rules(name)
    except ValueError as exc:  # a plugin's malformed rules
        return [f"learning-rate guidance: {exc}"]
    return [f"learning-rate guidance: needs an integrated learning rate of at least {rule['min_integrated_lr']:g}"
            + (f" with {condition(rule)}" if condition(rule) else "") + f" ({DOCS})" for rule in rules]


def print_inspection(result: dict) -> None:
    console.print(f"[bold]{escape(result['name'])}[/bold]  recipe hash {result['recipe_hash']}  ({len(result['runs'])} run(s))")
    for run in result["runs"]:
        m = run["method"]
        params = ", ".join(f"{k}={v}" for k, v in m.items() if k != "name")
        point = f" [cyan]{escape(run['label'])}[/cyan]" if run.get("label") else ""
        console.print(f"\n[bold]{escape(str(run['task']))}[/bold]{point} seed {run['seed']}: "
                      + escape(f"{m['name']}({params}) on {run['backbone']}"))
        table = Table(show_edge=False)
        table.add_column("target")
        table.add_column("modules")
        table.add_column("example")
        for symbol, paths in run["targets"].items():
            table.add_row(escape(symbol), str(len(paths)), escape(paths[0]) if paths else "")
        if run["targets"]:
            console.print(table)
        else:  # full fine-tuning, BitFit
            console.print("no adapted modules: the method trains backbone tensors", markup=False)
        init = run.get("init_from")
        if init:
            source = f"run {init['run']} (task {init['task']}, same seed), which runs first" if "task" in init else init["path"]
            console.print(f"adapter starts from {source}; the task head is trained fresh", markup=False)
        t = run["training"]
        console.print(
            f"adapter params {run['adapter_params']:,} · trainable {run['trainable_params']:,} "
            f"({100 * run['trainable_params'] / run['total_params']:.3f}% of {run['total_params']:,}) · "
            f"{run['train_examples']:,} train examples · {run['steps']:,} optimizer steps "
            f"(warmup {run['warmup_steps']}) · lr {t['learning_rate']} · batch {batch_line(run['batch'])}",
            markup=False,
        )
        console.print(f"learning rate: peak {t['learning_rate']:g}, integrated {run['integrated_lr']:.3g} over "
                      f"{run['steps']:,} steps ({t['lr_scheduler']}, warmup {run['warmup_steps']})", markup=False)
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
        table.add_row(escape(str(task)), escape(label), ",".join(run["seeds"]), f"{run['adapter_params']:,}",
                      f"{run['trainable_params']:,}", f"{run['steps']:,}")
    console.print(table)
