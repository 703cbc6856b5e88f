"""The ``lrr`` command line. Thin: parse arguments, call one module, render the result.

Heavy imports (torch, transformers) happen inside the commands that need them, so
``lrr validate`` and ``lrr methods`` start fast.
"""

from __future__ import annotations

import atexit
import errno
import functools
import glob
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional

import click
import typer

from lowrank_runner.errors import LrrError, UsageError

class _PlainTypes:
    """Help that shows what to type, not Python types: an option that takes a value shows
    its metavar (``--output DIR``), a flag or an argument shows nothing more."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            param.display_type_rich = functools.partial(_type_column, param)
        return params


class PlainHelpCommand(_PlainTypes, typer.core.TyperCommand):
    """A command with plain help; its usage line reads ``lrr run [OPTIONS] RECIPE``
    (click's convention)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, typer.core.TyperArgument):
                name = (param.metavar or param.name).upper() + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces


def _type_column(param, ctx=None) -> str | None:
    if isinstance(param, typer.core.TyperArgument) or getattr(param, "is_flag", False):
        return None
    return param.metavar or param.name.upper()


class PlainHelpGroup(_PlainTypes, typer.core.TyperGroup):
    """``lrr`` itself, with plain help."""


def _version(value: bool) -> None:
    if value:
        from lowrank_runner.version import __version__

        print(f"lowrank-runner {__version__}")
        raise typer.Exit(0)


app = typer.Typer(
    cls=PlainHelpGroup,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="lowrank-runner: declarative recipes for low-rank adaptation (LoRA, MTLoRA, LoRA2, TriAdaptLoRA, CondLoRA).",
)
command = functools.partial(app.command, cls=PlainHelpCommand)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version of lowrank-runner and exit."),
) -> None:
    """lowrank-runner: declarative recipes for low-rank adaptation (LoRA, MTLoRA, LoRA2, TriAdaptLoRA, CondLoRA)."""


def _complete_set(incomplete: str) -> list[str]:
    """Shell completion for ``--set``: the recipe keys of the schema (``training.learning_rate=``)."""
    from lowrank_runner.recipe.schema import recipe_key_paths

    return [f"{key}=" for key in recipe_key_paths() if key.startswith(incomplete)]


SetOption = typer.Option(
    None, "--set", metavar="PATH=VALUE", autocompletion=_complete_set,
    help="Override a recipe key (dotted path; the value is YAML), e.g. --set training.learning_rate=1e-3. Repeatable.",
)


SweepOption = typer.Option(
    None, "--sweep", metavar="KEY=V1,V2,...", autocompletion=_complete_set,
    help="Sweep a recipe key over these values (each YAML), one run per point, e.g. --sweep method.r=4,8,16; "
         "the same as --set 'sweep={KEY: [V1, V2, ...]}'. Repeatable (a grid).",
)


def _with_sweeps(overrides: Optional[List[str]], sweeps: Optional[List[str]]) -> list[str]:
    """The ``--set`` overrides with each ``--sweep`` as the override it stands for."""
    from lowrank_runner.recipe.sweep import sweep_override

    keys = [s.partition("=")[0].strip() for s in sweeps or ()]
    twice = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if twice:
        raise UsageError(f"--sweep {twice} is given twice: give its values once, e.g. --sweep {twice}=4,8,16 "
                         "(repeat --sweep for other keys: a grid)")
    return [*(overrides or ()), *(sweep_override(s) for s in sweeps or ())]


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def friendly(fn):
    """Print user errors without a traceback and exit with their code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LrrError as exc:
            _err(f"error: {exc}" if not hasattr(exc, "problems") else str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            if _AS_PROGRAM:  # a second Ctrl-C must not break the clean exit (torch's atexit hooks)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _err("interrupted")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, click.ClickException):  # typer's own exits and usage errors
            raise
        except BrokenPipeError:  # `lrr methods | head`: the reader left; nothing to say
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stderr at exit
            raise typer.Exit(0) from None
        except OSError as exc:
            if exc.errno not in _MACHINE_ERRNOS:
                raise typer.Exit(_internal_error(exc)) from None
            _err(f"error: {_machine_error(exc)}")
            raise typer.Exit(1) from None
        except Exception as exc:  # a bug in lowrank-runner, not the user's input
            raise typer.Exit(_internal_error(exc)) from None

    return wrapper


# The machine, not lowrank-runner, refused a file operation: a full disk, a read-only or
# unreadable place, a directory where lrr writes one of its files. Said plainly (anywhere
# it happens: a checkpoint, an export, a report).
_MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EISDIR}


def _machine_error(exc: OSError) -> str:
    path = exc.filename2 if exc.errno == errno.EISDIR and exc.filename2 else exc.filename  # os.replace: the target
    where = f" ({path})" if path else ""
    fix = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (disk quota)",
           errno.EROFS: "write somewhere writable (e.g. --output/--out elsewhere)",
           errno.EIO: "check the disk",
           errno.EISDIR: "a directory stands where lrr keeps one of its files: move it away (restore the file from "
                         "a copy if it held one)"}.get(exc.errno, "check the permissions, or use another path")
    return f"{exc.strerror or exc}{where}: {fix}, then run the command again (a run continues with --resume)"


def _internal_error(exc: BaseException) -> int:
    """Report a bug without burying the user's terminal in a traceback: one line, and the
    traceback in a file to attach to a bug report (``LRR_DEBUG=1`` prints it instead)."""
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if os.environ.get("LRR_DEBUG"):
        _err(text)
        return 70
    fd, path = tempfile.mkstemp(prefix="lrr-traceback-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(f"lrr {' '.join(sys.argv[1:])}\n\n{text}")
    _err(f"error: internal error in lowrank-runner ({type(exc).__name__}: {exc}); this is a bug, not your input's fault. "
         f"The traceback is in {path}: please report it (LRR_DEBUG=1 prints it)")
    return 70  # EX_SOFTWARE


def expand_recipe_paths(paths: list[str]) -> list[Path]:
    """Files, directories (recursive; files starting with '_' are partials) and globs."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(q for ext in ("*.yaml", "*.yml") for q in p.rglob(ext) if not q.name.startswith("_"))
            if not found:
                raise UsageError(f"{raw}: directory holds no .yaml/.yml recipes")
            out += found
        elif p.is_file():
            out.append(p)
        elif p.exists():
            raise UsageError(f"{raw}: not a regular file (a device, pipe or socket?); give recipe files or directories")
        elif any(ch in raw for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(raw, recursive=True) if Path(m).is_file())
            if not matches:
                raise UsageError(f"{raw}: the pattern matches no file")
            out += matches
        else:
            raise UsageError(f"{raw}: no such file or directory")
    return list(dict.fromkeys(out))


@command()
@friendly
def validate(
    paths: Optional[List[str]] = typer.Argument(None, help="Recipe files, directories or globs (default: recipes/)."),
    overrides: Optional[List[str]] = SetOption,
    sweeps: Optional[List[str]] = SweepOption,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Check recipes against the schema and the methods' parameters; report every problem at once,
    and for each valid recipe the files and places it reads and where its runs are written."""
    from lowrank_runner.commands.validate import validate_file
    from lowrank_runner.recipe.paths import describe
    from lowrank_runner.recipe.search import search_lines

    overrides = _with_sweeps(overrides, sweeps)
    files = expand_recipe_paths(paths or ["recipes"])
    results = []
    for path in files:
        checked = validate_file(path, overrides or ())
        results.append((path, checked.problems, checked.io))
    errors = sum(1 for _, _, io in results if io is None)
    if as_json:
        print(json.dumps({
            "valid": errors == 0,
            "files": [
                {"file": str(path), "valid": io is not None, "problems": [p.as_dict() for p in ps], "io": io}
                for path, ps, io in results
            ],
        }, indent=2))
    else:
        for path, problems, io in results:
            for p in problems:
                print(f"warning: {p}" if p.severity == "warning" else p)
            if io is not None:
                print("\n".join([f"{path}: valid"] + describe(io) + search_lines(io.get("search"))))
        sys.stdout.flush()
        print(f"{len(files)} recipe(s) checked: {len(files) - errors} valid, {errors} invalid", file=sys.stderr)
    raise typer.Exit(1 if errors else 0)


@command()
@friendly
def methods(
    name: Optional[str] = typer.Argument(None, metavar="NAME", help="One method to show in full: its parameters (type, default, description), paper and learning-rate guidance."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """List the registered adapter methods, one line each; with NAME, one method in full (from its schema)."""
    from lowrank_runner.methods.registry import method_specs, registry_problems

    specs = method_specs()
    if name is not None:
        specs = {name: _known_method(specs, name)}
    if as_json:
        print(json.dumps([method_json(s) for s in specs.values()], indent=2))
    else:
        from lowrank_runner.commands.render import print_method, print_method_overview

        if name is None:
            print_method_overview(specs)
        else:
            print_method(specs[name])
    for line in registry_problems():
        _err(f"warning: {line}")


def _known_method(specs: dict, name: str):
    if name not in specs:
        raise UsageError(f"no method named {name!r}; the registered methods: {', '.join(specs)}")
    return specs[name]


def method_json(spec) -> dict:
    return {"name": spec.name, "description": spec.schema.get("description", ""), "paper": spec.paper,
            "source": spec.source, "implementation": spec.implementation,
            "params": {k: {"type": v.get("type", v.get("enum")), "default": v.get("default"),
                           "description": v.get("description", "")} for k, v in spec.params.items()}}


@command()
@friendly
def tasks(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """List the registered tasks and their metrics."""
    from lowrank_runner.tasks.registry import TASKS

    rows = [{"name": t.name, "description": t.description, "metrics": list(t.metrics), "primary_metric": t.primary_metric} for t in TASKS.values()]
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        from lowrank_runner.commands.render import print_tasks

        print_tasks(rows)


@command()
@friendly
def report(
    run_dirs: List[Path] = typer.Argument(..., help="Run directories written by 'lrr run' (a multi-run directory stands for its runs); with --table, recipes' output directories."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output: one run's report.json, or the comparison."),
    render: bool = typer.Option(False, "--render", help="Redraw each run's report.md and plots from its report.json and metrics.jsonl."),
    table: bool = typer.Option(False, "--table", help="One results table from several recipes' output directories (one row per recipe and sweep point), in the first recipe's layout (output.table)."),
    out: Optional[Path] = typer.Option(None, "--out", metavar="FILE", help="--table: write it to FILE (.md, .csv or .tex) instead of printing it."),
    table_format: Optional[str] = typer.Option(None, "--format", metavar="md|csv|latex", help="--table: the format printed or written (default: md, or --out's suffix)."),
    figure: Optional[Path] = typer.Option(None, "--figure", metavar="FILE", help="--table: also draw the sweep figure (PNG): each column's metric against the swept value, ± std over seeds. --ranks: the PNG to draw."),
    ranks: bool = typer.Option(False, "--ranks", help="Draw the runs' final rank patterns side by side (--figure FILE, PNG; one colour scale): layers x targets per run, as TriAdaptLoRA's Figure 2."),
    baseline: Optional[str] = typer.Option(None, "--baseline", metavar="NAME", help="--table: compare every other row with row NAME (as the table prints it, or a sweep point's label): the difference per column and Avg. with a 95% CI, † where p < 0.05 (paired t-test over shared seeds, else Welch's). Overrides output.table.baseline."),
):
    """Show a run's reproducibility report, or compare runs: recipe, input and environment differences, metrics.
    With --table: the results table of several recipes (methods, sweep points) in the paper's layout."""
    from lowrank_runner.console import make_console
    from lowrank_runner.errors import LrrError
    from lowrank_runner.report.compare import compare, expand
    from lowrank_runner.rundir.reports import not_completed
    from lowrank_runner.report.terminal import show_comparison, show_run

    if table and ranks:
        raise UsageError("--table and --ranks draw different things: give one of them")
    if baseline is not None and not table:
        raise UsageError("--baseline goes with --table (lrr report --table DIR [DIR ...] --baseline NAME)")
    if table:
        return _report_table(run_dirs, render, as_json, out, table_format, figure, baseline)
    if ranks:
        return _report_ranks(run_dirs, render, as_json, out, table_format, figure)
    if out is not None or table_format is not None or figure is not None:
        raise UsageError("--out, --format and --figure go with --table (lrr report --table DIR [DIR ...] --out FILE), "
                         "--figure also with --ranks (lrr report --ranks RUN [RUN ...] --figure FILE.png)")
    runs = expand(run_dirs)
    for line in (w for run in runs for w in run.warnings):
        _err(f"warning: {line}")
    if render:
        from lowrank_runner.rundir.write import render_runs

        for line in render_runs(runs):
            _err(line)
    if as_json:
        print(json.dumps(runs[0].report if len(runs) == 1 else compare(runs), indent=2, default=str))
    elif len(runs) == 1:
        show_run(make_console(), runs[0])
    else:
        show_comparison(make_console(), runs)
    if len(runs) == 1 and not_completed(runs[0]):  # a comparison marks them; one run's report is its failure
        raise LrrError(not_completed(runs[0]))


def _report_ranks(run_dirs: list[Path], render: bool, as_json: bool, out: Optional[Path], table_format: Optional[str],
                  figure: Optional[Path]) -> None:
    """``lrr report --ranks``: the runs' rank heatmaps side by side into --figure."""
    from lowrank_runner.report.ranks import rank_figure
    from lowrank_runner.tables import writable_file

    if render or out is not None or table_format is not None:
        raise UsageError("--ranks draws a figure: give --figure FILE.png (--render, --out and --format go elsewhere)")
    if figure is None:
        raise UsageError("--ranks needs --figure FILE.png: where to draw the heatmaps")
    writable_file(figure, "--figure", (".png",))
    panels = rank_figure(run_dirs, figure)
    if as_json:
        print(json.dumps(panels, indent=2))
    _err(f"figure written to {figure} ({len(panels)} run(s))")


def _report_table(run_dirs: list[Path], render: bool, as_json: bool, out: Optional[Path], table_format: Optional[str],
                  figure: Optional[Path], baseline: Optional[str] = None) -> None:
    """``lrr report --table``: build the table, print or write it (and the figure)."""
    from lowrank_runner.tables import report_table, table_json

    if render:
        raise UsageError("--render redraws run reports; it does not go with --table")
    if as_json and (out is not None or table_format is not None):
        raise UsageError("--json prints the table as JSON; it does not go with --out or --format")
    built, text, lines = report_table(run_dirs, out, table_format, figure, baseline)
    if as_json:
        print(json.dumps(table_json(built), indent=2))
    elif out is None:
        sys.stdout.write(text)
    for line in lines:
        _err(line)


@command()
@friendly
def inspect(
    recipe: Path = typer.Argument(..., help="Recipe file."),
    overrides: Optional[List[str]] = SetOption,
    sweeps: Optional[List[str]] = SweepOption,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    processes: Optional[int] = typer.Option(None, "--processes", min=1, metavar="N", help="Training processes to plan the per-device batch, accumulation and steps for (default: WORLD_SIZE, as `accelerate launch` sets it, else 1)."),
):
    """Resolve a recipe without loading weights: modules matched, parameter counts, planned steps (per sweep point)."""
    from lowrank_runner.commands.inspect import inspect_recipe
    from lowrank_runner.recipe.load import load_recipe

    rec = load_recipe(_existing(recipe), _with_sweeps(overrides, sweeps))
    _say_warnings(rec)
    if processes is None:
        from lowrank_runner.train.devices import world_size

        processes = world_size()  # under `accelerate launch` / torchrun: the processes a run would have
    result = inspect_recipe(rec, processes=processes)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        from lowrank_runner.commands.render import print_inspection
        from lowrank_runner.recipe.search import search_lines

        print_inspection(result)
        for line in search_lines(result.get("search")):
            print(line)


@command()
@friendly
def run(
    recipe: Path = typer.Argument(..., help="Recipe file."),
    overrides: Optional[List[str]] = SetOption,
    sweeps: Optional[List[str]] = SweepOption,
    output: Optional[Path] = typer.Option(None, "--output", "-o", metavar="RUN_DIR", help="Run directory (default: <output.dir>/<name>/<timestamp>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted runs in --output RUN_DIR from their latest checkpoints (same recipe and --set overrides)."),
    stop_after_step: Optional[int] = typer.Option(None, "--stop-after-step", min=1, metavar="STEP", help="End each run after this optimizer step with a checkpoint (e.g. before a machine's time limit); continue later with --resume."),
    parallel: int = typer.Option(1, "--parallel", min=1, metavar="N", help="Train up to N of the recipe's runs (a search: its trials) at once, each in its own process, on free devices (a CPU-only machine: N processes sharing the cores); 1: one after another in this process."),
    devices: Optional[str] = typer.Option(None, "--devices", metavar="IDS", help="--parallel: the CUDA devices to use, e.g. 0,1,2,3 (default: every visible one; none on a CPU-only machine)."),
    gpus_per_run: Optional[int] = typer.Option(None, "--gpus-per-run", min=1, metavar="K", help="--parallel: devices per run (default 1); K > 1 trains each run as K processes with accelerate launch."),
    executor: str = typer.Option("local", "--executor", metavar="local|ray", help="--parallel: where the runs train: local processes, or a Ray cluster (needs Ray: the ray extra of lowrank-runner)."),
    address: Optional[str] = typer.Option(None, "--address", metavar="ADDR", help="--executor ray: the cluster's address (default: RAY_ADDRESS, else a local Ray instance)."),
    only_run: Optional[str] = typer.Option(None, "--only-run", hidden=True, help="A child of --parallel: train only this run (its slug) into --output."),
    trial_of: Optional[Path] = typer.Option(None, "--trial-of", hidden=True, help="A child of a parallel search: the file naming the trial it trains into --output."),
):
    """Train: one run per task x sweep point x seed, each writing a run directory."""
    from lowrank_runner.recipe.load import load_recipe
    from lowrank_runner.train.parallel.slots import ParallelOptions
    from lowrank_runner.search.command import recorded_overrides, run_search  # recorded: a search's own, else its runs'
    from lowrank_runner.train.runner import run_recipe

    overrides = _with_sweeps(overrides, sweeps)
    if output is not None:
        from lowrank_runner.resources import expand_user

        output = expand_user(str(output))  # --output '~/runs/x' (quoted, so the shell did not expand it)
    if resume and not overrides:  # continue with the --set overrides the run was started with
        overrides = recorded_overrides(output)
        if overrides:
            import shlex

            _err("resuming with the run's --set overrides: " + shlex.join(w for o in overrides for w in ("--set", o)))
    rec = load_recipe(_existing(recipe), overrides or ())
    if only_run is None and trial_of is None:  # a --parallel child: its driver said them
        _say_warnings(rec)
    command = ["lrr", "run", str(recipe)] + [a for s in overrides or () for a in ("--set", s)]
    command += ["--output", str(output)] if output else []
    command += ["--resume"] if resume else []
    command += ["--stop-after-step", str(stop_after_step)] if stop_after_step else []
    options = ParallelOptions(parallel, devices, gpus_per_run, executor, address)
    if not options.sequential:
        command += options.words()
        if len(rec.runs) == 1 and not rec.resolved.get("search"):
            _parallel_alone(rec, options)
    if trial_of is not None:  # a child of a parallel search: one trial
        from lowrank_runner.search.parallel import run_trial_child

        failures = run_trial_child(rec, output, trial_of, command, stop_after=stop_after_step)
    elif rec.resolved.get("search"):  # a search: its trials (--parallel: N at a time), then the best point
        failures = run_search(rec, output=output, argv=command, resume=resume, stop_after=stop_after_step,
                              parallel=options)
    else:
        failures = run_recipe(rec, output=output, argv=command, resume=resume, stop_after=stop_after_step,
                              parallel=options, only_run=only_run)
    global _LEAVE_AT_ONCE
    _LEAVE_AT_ONCE = True  # everything is written: skip the interpreter's teardown (main)
    raise typer.Exit(1 if failures else 0)


def _say_warnings(rec) -> None:
    """What ``lrr validate`` warns about the recipe (a setting that is ignored, ...)."""
    for line in rec.warnings:
        _err(f"warning: {line}")


def _parallel_alone(rec, options) -> None:
    """--parallel with a recipe of one run: checked, then trained in this process (there
    is nothing to divide)."""
    from lowrank_runner.train.parallel.slots import plan_slots

    plan_slots(options)
    _err(f"note: {rec.source} has one run; it trains in this process (--parallel divides a recipe's runs)")


@command()
@friendly
def export(
    run_dir: Path = typer.Argument(..., help="A run directory written by 'lrr run', or an adapter bundle written by 'lrr export --adapter'."),
    merge: bool = typer.Option(False, "--merge", help="Write a merged Hugging Face checkpoint (adapters folded into the weights)."),
    adapter: bool = typer.Option(False, "--adapter", help="Write an adapter bundle (weights, head, resolved config) that lrr loads onto the backbone again."),
    peft_format: bool = typer.Option(False, "--peft", help="Write a standard PEFT LoRA adapter, for every adapter method (needs the peft package)."),
    out: Path = typer.Option(..., "--out", metavar="DIR", help="Output directory (must not exist or be empty)."),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", metavar="FLOAT", help="Largest allowed output difference to the adapter model on the probe batch (default: 1e-3 merge, 0 bundle, 1e-4 PEFT)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", metavar="DTYPE", help="--merge: dtype of the saved weights, float32 | bfloat16 | float16 (default: the backbone's own, or the recipe's backbone.dtype if half)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", metavar="SIZE", help="--merge: largest safetensors shard, e.g. 5GB or 500MB."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", metavar="SIZE", help="--merge: memory budget for the whole-model output check, e.g. 16GB (default: half the available memory). The merge always streams tensor by tensor; a model whose float32 copy is above this gets each module's output checked instead."),
    cast_tolerance: Optional[float] = typer.Option(None, "--cast-tolerance", metavar="FLOAT", help="--merge to bfloat16/float16: allowed output change from the cast, relative to the largest output (default: 8 x the dtype's epsilon)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", metavar="DIR|HUB_ID", help="Load the backbone from here (a local directory or hub id) instead of where the run found it."),
    base_model: Optional[str] = typer.Option(None, "--base-model", metavar="HUB_ID", help="The hub id to name as the base model (model card, PEFT adapter), e.g. the model a local backbone was copied from."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", metavar="REPO_ID", help="Upload the export to this Hugging Face Hub repository once it passed its checks."),
    private: bool = typer.Option(False, "--private", help="--push-to-hub: create the repository as private."),
):
    """Export a trained run: a merged checkpoint for deployment, an adapter bundle, or a PEFT adapter."""
    if merge + adapter + peft_format != 1:
        raise UsageError("choose one export: --merge (a merged Hugging Face checkpoint), --adapter (an lrr adapter bundle) "
                         "or --peft (a PEFT LoRA adapter)")
    if not merge and (dtype is not None or cast_tolerance is not None or max_shard_size != "5GB" or max_memory is not None):
        raise UsageError("--dtype, --cast-tolerance, --max-shard-size and --max-memory apply to --merge only")
    if private and push_to_hub is None:
        raise UsageError("--private applies to --push-to-hub REPO_ID only")
    from lowrank_runner.export.hub import check_push, check_repo_id

    if push_to_hub is not None:
        check_push(push_to_hub, out)  # before any export work: the id, online, a token, the endpoint
    if base_model is not None:
        check_repo_id(base_model, "--base-model")
    merge_options = dict(dtype=dtype, max_shard_size=max_shard_size, cast_tolerance=cast_tolerance, max_memory=max_memory)
    _export_one(run_dir, out, merge, adapter, tolerance, merge_options, backbone, base_model)
    if push_to_hub is not None:
        _push(out, push_to_hub, private)


@command()
@friendly
def push(
    export_dir: Path = typer.Argument(..., help="A directory written by 'lrr export' (merged checkpoint, PEFT adapter or bundle)."),
    repo_id: str = typer.Argument(..., help="The Hugging Face Hub repository, e.g. me/my-model."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
):
    """Upload an export to the Hugging Face Hub (again, e.g. after an upload failed)."""
    from lowrank_runner.export.hub import check_repo_id

    check_repo_id(repo_id, "REPO_ID")
    _push(export_dir, repo_id, private)


def _push(directory: Path, repo_id: str, private: bool) -> None:
    from lowrank_runner.export.hub import push_export

    url = push_export(directory, repo_id, private=private)
    print(f"uploaded {directory} to {url}")


def _export_one(run_dir, out, merge, adapter, tolerance, merge_options: dict, backbone, base_model):
    """The export itself (one of the three), with its one-line result."""
    if merge:
        from lowrank_runner.export.merge import export_merged, merge_summary

        info = export_merged(run_dir, out, tolerance=1e-3 if tolerance is None else tolerance, backbone=backbone,
                             base_model=base_model, **merge_options)
        print(merge_summary(info, out))
    elif adapter:
        from lowrank_runner.export.bundle import export_bundle

        info = export_bundle(run_dir, out, tolerance=0.0 if tolerance is None else tolerance, backbone=backbone,
                             base_model=base_model)
        print(f"adapter bundle written to {out} (loaded back: max |output diff| {info['max_abs_logit_diff']:.3g}); "
              f"load with lowrank_runner.load_adapted({str(out)!r}) or merge with: lrr export {out} --merge --out DIR")
    else:
        from lowrank_runner.export.peft import export_peft

        info = export_peft(run_dir, out, tolerance=1e-4 if tolerance is None else tolerance, backbone=backbone,
                           base_model=base_model)
        from lowrank_runner.export.card import AUTO_PEFT

        loader = f"{AUTO_PEFT[info['task_type']]}.from_pretrained({str(out)!r})" if info.get("task_type") in AUTO_PEFT \
            else f"PeftModel.from_pretrained(base, {str(out)!r})"
        print(f"PEFT adapter written to {out} (max |logit diff| to our model: {info['max_abs_logit_diff']:.3g}; base "
              f"model {info['base_model']}); load with {loader}")


def _existing(path: Path) -> Path:
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a device, pipe or socket?)"
        raise UsageError(f"{path}: {kind}; give a recipe file (.yaml)")
    if not path.is_file():
        raise UsageError(f"{path}: no such recipe file")
    return path


_AS_PROGRAM = False  # set by main(): the process is `lrr` itself (not a test runner or a notebook calling app)


_LEAVE_AT_ONCE = False  # set by `lrr run` once it has written everything


def main() -> None:
    global _AS_PROGRAM
    _AS_PROGRAM = True
    # SIGTERM (a scheduler's or `kill`'s stop) ends every command like Ctrl-C: staged
    # exports are removed, runs are marked interrupted, the exit code is 130.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        app()
    except SystemExit as exc:
        if _LEAVE_AT_ONCE:
            _leave(exc.code)
        raise


def _leave(code) -> None:
    """End the process as Python's exit does (other threads joined, ``atexit`` handlers
    run, output flushed) without tearing down its modules and objects: after torch,
    transformers and datasets that teardown takes about 1.5 s, paid by every run and
    every parallel child (docs/benchmarks.md, "A child's start")."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe, a closed stream
            pass
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


if __name__ == "__main__":
    main()
