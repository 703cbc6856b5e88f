"""``lrr report --ranks``: the final rank patterns of several runs side by side, as the
papers draw them (TriAdaptLoRA Figure 2: TriAdaptLoRA, AdaLoRA and IncreLoRA on MNLI).
Reads each run's ``rank_pattern.json`` and the module symbols of its
``adapter/adapter_config.json``. Torch-free."""

from __future__ import annotations

from pathlib import Path

from lowrank_runner.errors import UsageError
from lowrank_runner.report.compare import expand
from lowrank_runner.rundir.adapter import read_adapter_config
from lowrank_runner.rundir.files import read_json_file
from lowrank_runner.rundir.layout import ADAPTER_CONFIG, ADAPTER_DIR, RANK_PATTERN_FILE
from lowrank_runner.rundir.plots import rank_grid, rank_heatmaps
from lowrank_runner.rundir.reports import RunReport, not_completed

FIX = "restore it from a copy, or train the run again"


def _pattern(run: RunReport) -> dict[str, int]:
    path = run.dir / RANK_PATTERN_FILE
    if not path.is_file():
        method = _method(run) or "its method"
        raise UsageError(f"{run.label}: no {RANK_PATTERN_FILE}: {method} keeps its ranks fixed (a rank heatmap "
                         "draws the ranks a dynamic-rank method chose: triadaptlora, lora2 with target_rank, adalora, "
                         "...); leave this run out")
    pattern = read_json_file(path, "rank pattern", FIX)
    if not isinstance(pattern, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in pattern.values()):
        raise UsageError(f"{path}: not a mapping of module paths to ranks; the rank pattern is damaged: {FIX}")
    return pattern


def _symbols(run: RunReport) -> dict[str, list[str]]:
    config = read_adapter_config(run.dir / ADAPTER_DIR / ADAPTER_CONFIG, run.dir)
    return {m["path"]: list(m.get("symbols") or []) for m in config["modules"]}


def _method(run: RunReport) -> str | None:
    method = run.report.get("method")
    return method.get("name") if isinstance(method, dict) else None


def _panel_title(run: RunReport, runs: list[RunReport]) -> str:
    """The method, and the run's label where two panels would read the same."""
    method = _method(run) or "?"
    same = [r for r in runs if _method(r) == method]
    return method if len(same) == 1 else f"{method}\n{run.label}"


def rank_panels(paths: list[Path]) -> list[tuple[str, dict[str, int], dict[str, list[str]]]]:
    """(title, pattern, symbols) per run of ``paths`` (a multi-run directory stands for its
    runs), for :func:`rank_heatmaps`."""
    runs = expand(paths)
    for run in runs:
        unfinished = not_completed(run)
        if unfinished:
            raise UsageError(f"{unfinished}; its final ranks are not known yet")
    return [(_panel_title(run, runs), _pattern(run), _symbols(run)) for run in runs]


def rank_figure(paths: list[Path], figure: Path) -> list[dict]:
    """Draw the runs' rank heatmaps side by side into ``figure`` (PNG); returns each
    panel as data (title, layers, targets, ranks; ``--json``)."""
    panels = rank_panels(paths)
    rank_heatmaps(panels, figure, "final ranks per layer and target")
    out = []
    for title, pattern, symbols in panels:
        layers, columns, grid = rank_grid(pattern, symbols)
        out.append({"title": title, "layers": layers, "targets": columns, "total_rank": sum(pattern.values()),
                    "ranks": [[None if cell != cell else int(cell) for cell in row] for row in grid]})
    return out
