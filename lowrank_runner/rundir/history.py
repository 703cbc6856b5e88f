"""A run's training history from ``metrics.jsonl``: the logged training steps, the
evaluations, and a per-epoch summary (torch-free)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from lowrank_runner.errors import RunFileError


@dataclass
class History:
    train: list[dict] = field(default_factory=list)  # {"step", "epoch", "loss", "lr", ...}
    evals: list[dict] = field(default_factory=list)  # {"step", "epoch", "eval": {metric: value}}


def read_history(path: Path) -> History:
    """Parse ``metrics.jsonl``; a missing file is an empty history."""
    history = History()
    if not path.is_file():
        return history
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RunFileError(f"{path}: cannot read the training history: {exc}") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunFileError(f"{path}:{n}:{exc.colno}: not a JSON line ({exc.msg}); the file is damaged: "
                               "restore it from a copy, or delete the line") from None
        except RecursionError:
            raise RunFileError(f"{path}:{n}: not a JSON line (nested too deeply); the file is damaged: restore it "
                               "from a copy, or delete the line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise RunFileError(f"{path}:{n}: not a logged step (a JSON object with an integer 'step'); the file "
                               "is damaged: restore it from a copy, or delete the line")
        if "eval" in record:
            if not isinstance(record["eval"], dict):
                raise RunFileError(f"{path}:{n}: 'eval' is not an object of metrics; the file is damaged")
            history.evals.append(record)
        elif "loss" in record:
            history.train.append(record)
    return history


def per_epoch(history: History, steps_per_epoch: int, total_steps: int) -> list[dict]:
    """One row per (possibly partial) epoch: its last step, the mean of the training losses
    logged in it, and the last evaluation in it (with its step)."""
    if steps_per_epoch <= 0 or total_steps <= 0:
        return []
    rows = []
    for e in range(1, math.ceil(total_steps / steps_per_epoch) + 1):
        lo, hi = (e - 1) * steps_per_epoch, min(e * steps_per_epoch, total_steps)
        losses = [r["loss"] for r in history.train if lo < r["step"] <= hi]
        evals = [r for r in history.evals if lo < r["step"] <= hi]
        rows.append({
            "epoch": e,
            "last_step": hi,
            "train_loss": statistics.fmean(losses) if losses else None,
            "eval_step": evals[-1]["step"] if evals else None,
            "eval": evals[-1]["eval"] if evals else None,
        })
    return rows
