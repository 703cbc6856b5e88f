"""Figures written into run directories (matplotlib, headless)."""

from __future__ import annotations

import re
from pathlib import Path


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers, columns, grid = rank_grid(pattern, symbols)
    data = np.array(grid, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(columns), 1.0 + 0.4 * len(layers)))
    image = ax.imshow(data, cmap="viridis", aspect="auto", vmin=0)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("target")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    top = np.nanmax(data) if np.isfinite(data).any() else 0
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if not np.isnan(data[i, j]):
                color = "black" if top and data[i, j] > 0.6 * top else "white"
                ax.text(j, i, f"{int(data[i, j])}", ha="center", va="center", color=color, fontsize=8)
    fig.colorbar(image, ax=ax, label="active rank")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
