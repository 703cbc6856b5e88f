"""The figures of a run directory as PNG (matplotlib, headless Agg backend): the
training curves, drawn from ``metrics.jsonl`` with the report, and the rank heatmap of
dynamic-rank methods, drawn when the run ends."""

from __future__ import annotations

import re
from pathlib import Path

from lowrank_runner.rundir.history import History

LOSS_PLOT = "loss_curve.png"
METRIC_PLOT = "metric_curve.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _epoch_lines(ax, steps_per_epoch: int | None, last_step: int) -> None:
    if steps_per_epoch:
        for s in range(steps_per_epoch, last_step, steps_per_epoch):
            ax.axvline(s, color="0.85", linewidth=0.8, zorder=0)


def loss_plot(history: History, path: Path, title: str, steps_per_epoch: int | None = None) -> Path | None:
    """Training loss (and the method's extra loss) per logged step, evaluation loss per
    evaluation, and the learning rate below; None when nothing was logged."""
    if not history.train and not history.evals:
        return None
    plt = _pyplot()
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    steps = [r["step"] for r in history.train]
    if history.train:
        ax.plot(steps, [r["loss"] for r in history.train], label="train loss", color="tab:blue", linewidth=1.4)
        extra = [(r["step"], r["extra_loss"]) for r in history.train if "extra_loss" in r]
        if extra:
            ax.plot(*zip(*extra), label="extra loss (method)", color="tab:purple", linewidth=1, linestyle="--")
    evals = [(r["step"], r["eval"]["loss"]) for r in history.evals if "loss" in r["eval"]]
    if evals:
        ax.plot(*zip(*evals), label="eval loss", color="tab:orange", marker="o", markersize=4, linewidth=1.4)
    last = max([*steps, *(r["step"] for r in history.evals)])
    _epoch_lines(ax, steps_per_epoch, last)
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    lrs = [(r["step"], r["lr"]) for r in history.train if "lr" in r]
    if lrs:
        ax_lr.plot(*zip(*lrs), color="tab:green", linewidth=1.2)
    _epoch_lines(ax_lr, steps_per_epoch, last)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step" + (" (grey lines: epochs)" if steps_per_epoch else ""))
    ax_lr.grid(alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metric_plot(history: History, path: Path, title: str, metric: str | None, best_step: int | None,
                steps_per_epoch: int | None = None) -> Path | None:
    """Every evaluation metric (loss aside) per evaluation; the selection metric bold and
    the selected (best) checkpoint starred. None without evaluations."""
    if not history.evals:
        return None
    names = list(dict.fromkeys(k for r in history.evals for k, v in r["eval"].items()
                               if k != "loss" and isinstance(v, (int, float))))
    if not names:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        points = [(r["step"], r["eval"][name]) for r in history.evals if name in r["eval"]]
        main = name == metric
        ax.plot(*zip(*points), label=name + (" (selection)" if main else ""), marker="o", markersize=4 if main else 3,
                linewidth=2.2 if main else 1, alpha=1 if main else 0.75, zorder=3 if main else 2)
        if main and best_step is not None:
            best = [v for s, v in points if s == best_step]
            if best:
                ax.plot([best_step], best, marker="*", markersize=14, color="gold", markeredgecolor="black",
                        linestyle="none", label=f"best checkpoint (step {best_step})", zorder=4)
    _epoch_lines(ax, steps_per_epoch, max(r["step"] for r in history.evals))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("metric")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

def rank_grid(pattern: dict[str, int], symbols: dict[str, list[str]]) -> tuple[list[int], list[str], list[list[float]]]:
    """Arrange a rank pattern as layers x target symbols (``nan`` where nothing is adapted).

    ``pattern`` maps module paths (``...layer.3.attention.self.query`` or a fused group
    ``...h.3.attn.c_attn[q]``) to active ranks; ``symbols`` maps module paths to the target
    symbols that selected them (from the adapter config).
    """
    cells: dict[tuple[int, str], int] = {}
    for path, rank in pattern.items():
        base, _, group = path.partition("[")
        found = re.search(r"\.(\d+)\.", base)
        layer = int(found.group(1)) if found else 0
        names = symbols.get(base, [base.rsplit(".", 1)[-1]])
        if group:
            names = [{"q": "Wq", "k": "Wk", "v": "Wv"}[group.rstrip("]")]]
        for name in names:
            cells[(layer, name)] = cells.get((layer, name), 0) + rank
    layers = sorted({layer for layer, _ in cells})
    columns = sorted({name for _, name in cells}, key=lambda s: ("Wq", "Wk", "Wv", "Wa", "Wm", "Wo", "Wf").index(s)
                     if s in ("Wq", "Wk", "Wv", "Wa", "Wm", "Wo", "Wf") else 99)
    grid = [[float(cells.get((layer, c), float("nan"))) for c in columns] for layer in layers]
    return layers, columns, grid


def rank_heatmap(pattern: dict[str, int], symbols: dict[str, list[str]], path: Path, title: str) -> Path:
    """One run's final ranks as a layers x target-symbols heatmap (``rank_heatmap.png``)."""
    return rank_heatmaps([(title, pattern, symbols)], path)


def rank_heatmaps(panels: list[tuple[str, dict[str, int], dict[str, list[str]]]], path: Path,
                  title: str = "") -> Path:
    """Several runs' final ranks side by side (the papers' rank heatmaps, TriAdaptLoRA
    Figure 2): one panel per ``(title, pattern, symbols)`` (:func:`rank_grid`), one
    colour scale for all, each cell's rank written in it."""
    import numpy as np

    plt = _pyplot()
    grids = [(name, *rank_grid(pattern, symbols)) for name, pattern, symbols in panels]
    data = [np.array(grid, dtype=float) for _, _, _, grid in grids]
    top = max((np.nanmax(d) for d in data if np.isfinite(d).any()), default=0.0)
    rows = max(len(layers) for _, layers, _, _ in grids)
    width = sum(1.0 + 0.9 * len(columns) for _, _, columns, _ in grids) + 1.2
    fig, axes = plt.subplots(1, len(grids), figsize=(width, 1.4 + 0.4 * rows), squeeze=False, layout="constrained")
    for ax, (name, layers, columns, _), cells in zip(axes[0], grids, data):
        image = ax.imshow(cells, cmap="viridis", aspect="auto", vmin=0, vmax=top or None)
        ax.set_xticks(range(len(columns)), columns)
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("target")
        ax.set_title(name, fontsize=9)
        _write_ranks(ax, cells, top)
    axes[0][0].set_ylabel("layer")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.colorbar(image, ax=list(axes[0]), label="active rank")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _write_ranks(ax, cells, top: float) -> None:
    import numpy as np

    for i in range(cells.shape[0]):
        for j in range(cells.shape[1]):
            if not np.isnan(cells[i, j]):
                color = "black" if top and cells[i, j] > 0.6 * top else "white"
                ax.text(j, i, f"{int(cells[i, j])}", ha="center", va="center", color=color, fontsize=8)
