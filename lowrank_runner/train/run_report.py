"""Assemble a finished run's report (the content of ``report.json``) from what the
training loop holds at the end: recipe, run, model, task, data, results, timings.
The fields are described in docs/report.md."""

from __future__ import annotations

import datetime as dt
import os
import time

from lowrank_runner.train.environment import environment, peak_memory
from lowrank_runner.train.fingerprint import backbone_fingerprint, data_fingerprint
from lowrank_runner.rundir.layout import ADAPTER_DIR, RANK_HEATMAP_FILE, RANK_PATTERN_FILE

FORMAT = "lowrank-runner-report"
FORMAT_VERSION = 1


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds")


def _seeds(recipe, run, holdout_seed: int | None) -> dict:
    recipe_seeds = recipe.resolved.get("training", {}).get("seed", run.seed)
    return {
        "run": run.seed,  # accelerate.set_seed: Python, NumPy and torch (all devices)
        "data_order": run.seed,  # the training DataLoader's shuffling generator
        "holdout_split": holdout_seed,  # task.holdout_fraction's split of train (None: no holdout)
        "recipe": recipe_seeds if isinstance(recipe_seeds, list) else [recipe_seeds],
    }


def build_run_report(*, recipe, run, argv: list[str], adapted, model, task, splits, tokenized, plan, best: dict,
                     last_eval: dict | None, test: dict | None, started: float, accelerator,
                     rank_pattern: dict | None, holdout: dict | None, resumed_from: int | None = None,
                     test_examples: dict | None = None, init_from: dict | None = None, optimizer=None) -> dict:
    """``model``: the unwrapped trained model; ``splits``: the raw ``datasets`` splits the
    run loaded (after any holdout); ``holdout``: ``{"fraction", "seed", "test_examples"}``
    or None; ``test_examples``: examples per test split the selected checkpoint was scored
    on (holdout or ``task.test_split``), or None; ``init_from``: the record of the adapter
    the run started from (``training.init_from``), or None; ``optimizer``: the training
    optimizer (its state's dtype is reported under ``precision``)."""
    from lowrank_runner.modeling import parameter_counts
    from lowrank_runner.train.memory import precision_record

    cfg = run.config
    counts = parameter_counts(model, adapted)
    total = sum(p.numel() for p in model.parameters())
    ref = adapted.backbone
    backbone = backbone_fingerprint(ref.name, ref.location, ref.local, ref.revision, cfg["backbone"].get("tokenizer"))
    steps_per_epoch = plan.steps_per_epoch
    finished = time.time()
    report = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "status": "completed",
        "started_at": _iso(started),
        "finished_at": _iso(finished),
        "recipe": {"name": recipe.name, "source": recipe.source, "hash": recipe.hash, "config_hash": run.config_hash,
                   "overrides": list(recipe.overrides), "config": cfg, "resolved": recipe.resolved},
        "command": argv,
        "cwd": os.getcwd(),
        "run": {"task": run.task, "seed": run.seed, "index": run.index, "runs_in_recipe": len(recipe.runs),
                "point": run.point, "label": run.label, "resumed_from_step": resumed_from},
        "seeds": _seeds(recipe, run, holdout["seed"] if holdout else None),
        "backbone": {**backbone, "trust_remote_code": ref.trust_remote_code},  # true: the model files' own code ran
        "data": data_fingerprint(task, splits),
        "method": cfg["method"],
        "targets": cfg.get("targets", []),
        "modules": len(adapted.targets),
        **counts,
        "total_params": total,
        "trainable_percent": round(100 * counts["trainable_params"] / total, 4) if total else None,
        "precision": precision_record(model, cfg, adapted.trainable_names, adapted.base_names, optimizer),
        "train_examples": len(tokenized["train"]),
        "eval_examples": len(tokenized["validation"]),
        "holdout": holdout,
        "steps": {"total": plan.total_steps, "warmup": plan.warmup_steps, "per_epoch": steps_per_epoch,
                  "epochs": plan.epochs},
        "batch": plan.batch.as_dict(),  # effective, per_device, accumulation, processes, batch_size_per
        "best": {**best, "epoch": round(best["step"] / steps_per_epoch, 4) if best.get("step") else None,
                 "checkpoint": ADAPTER_DIR + "/"},
        "final_eval": last_eval,
        "test": test,
        "test_examples": test_examples,
        "rank_pattern": None,
        "wall_time_s": round(finished - started, 2),
        "peak_memory": peak_memory(),
        "environment": environment(accelerator),
    }
    if init_from is not None:
        report["init_from"] = init_from
    if rank_pattern is not None:
        report["rank_pattern"] = {"total_rank": sum(rank_pattern.values()), "modules": len(rank_pattern),
                                  "file": RANK_PATTERN_FILE, "heatmap": RANK_HEATMAP_FILE, "pattern": rank_pattern}
    return report
