"""The run-directory format: what a run directory of ``lrr run`` holds, by name.
Written by :mod:`lowrank_runner.train`, read by export, ``lrr report``, the tables and
searches; every name of a file or folder in it is defined here, once.

::

    RUN_DIR/
      recipe.yaml           the resolved recipe of this run (defaults filled), written
                            when the run starts; its header names the recipe file, the
                            recipe and config hashes and the --set overrides (--resume)
      metrics.jsonl         one JSON object per logged training step or evaluation
      metrics.json          final and best evaluation metrics
      report.json           reproducibility report (recipe + hash, seeds, environment,
                            backbone/data fingerprints, counts, timings, metrics);
                            written last: "status": "completed" marks a finished run
                            ("failed" / "interrupted" with the reason while unfinished)
      report.md             the same for people, with the plots (rundir/markdown.py)
      loss_curve.png        training/evaluation loss and learning rate per step
      metric_curve.png      evaluation metrics per evaluation, best checkpoint starred
      outputs_SPLIT.jsonl   the selected checkpoint's outputs on SPLIT: generation tasks
                            (source, output, references per distinct source), squad_v2
                            (id, prediction, best_span, null_score_diff per question);
                            outputs_test_SPLIT.jsonl with task.holdout_fraction
                            or task.test_split (outputs_test_test.jsonl)
      rank_pattern.json     final active rank per module (dynamic-rank methods only)
      rank_heatmap.png      the same as a layers x target-symbols heatmap
      checkpoints/step-N/   resumable training state while the run is unfinished
                            (train/checkpoint.py); removed when the run completes
      error.txt             why the run failed (the traceback of a crash)
      .lrr-lock, .lrr-owner.json  the run's owner while it trains (rundir/lock.py)
      adapter/
        adapter_config.json method, parameters, target module paths, backbone, task head
        adapter.safetensors adapter weights (best checkpoint)
        head.safetensors    task head weights (best checkpoint), when trained

A recipe with several runs writes them below one root (``TASK-seedN``, a sweep's
``TASK/POINT/seedN``) with ``summary.json``, ``results.md/.csv/.tex`` (``sweep.png``),
``report.md`` and, with ``--parallel``, ``logs/``; a search's root is laid out in
:mod:`lowrank_runner.rundir.search`.
"""

from __future__ import annotations

from pathlib import Path

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
HEAD_WEIGHTS = "head.safetensors"
RECIPE_FILE = "recipe.yaml"
METRICS_LOG = "metrics.jsonl"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.json"
REPORT_MD = "report.md"
ERROR_FILE = "error.txt"
RANK_PATTERN_FILE = "rank_pattern.json"
RANK_HEATMAP_FILE = "rank_heatmap.png"
OUTPUTS_FILE = "outputs_{split}.jsonl"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
# a recipe's root (several runs)
SUMMARY_FILE = "summary.json"
RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"
RESULTS_TEX = "results.tex"
SWEEP_FIGURE = "sweep.png"
LOGS_DIR = "logs"  # --parallel: each child's log, summary entry and progress


def checkpoint_name(step: int) -> str:
    """The directory of the checkpoint after optimizer step ``step`` (``step-000030``)."""
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def checkpoint_dirs(run_dir: Path, finished: bool = True) -> list[Path]:
    """The run's checkpoint directories, oldest first: those completely written (renamed
    from ``step-N.tmp``), or with ``finished=False`` those being written too."""
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p.suffix != ".tmp" or not finished))


def checkpoint_step(path: Path) -> int:
    """The optimizer step of a finished checkpoint directory."""
    return int(path.name[len(CHECKPOINT_PREFIX):])


def resumable_from(run_dir: Path) -> str:
    """Where an unfinished run continues: ``its checkpoint at step N``, or ``the start
    (no checkpoint yet)``."""
    done = checkpoint_dirs(run_dir)
    return f"its checkpoint at step {checkpoint_step(done[-1])}" if done else "the start (no checkpoint yet)"
