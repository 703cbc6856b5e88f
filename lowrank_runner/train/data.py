"""A run's data: the task's splits (after any hold-out), tokenised once per ``lrr run``
for the seeds of a task (:func:`prepared_data`), and the DataLoaders of the training
and evaluation splits (:func:`build_dataloaders`)."""

from __future__ import annotations

import json
import os
import time

import torch

from lowrank_runner.errors import DataError
from lowrank_runner.plan.schedule import BatchPlan, batch_plan
from lowrank_runner.tasks.base import Task, build_task
from lowrank_runner.tasks.holdout import apply_holdout


def build_dataloaders(tokenized, tokenizer, task: Task, training: dict, seed: int, mixed_precision: str, eval_splits,
                      batch: BatchPlan | None = None):
    """Training and evaluation DataLoaders with ``batch.per_device`` training examples per
    batch (default: :func:`batch_plan` on one process) and ``training.eval_batch_size``
    (per device; default: twice the per-device training batch) evaluation examples.

    The training order is a shuffle drawn from the returned generator, or with
    ``training.group_by_length`` transformers' length-grouped order drawn from the same
    generator (train/batching.py: the loop replays an interrupted epoch either way). Each
    evaluation split runs longest first (tasks/evaluation.py, ``LengthSortedOrder``; the
    tasks score their outputs in dataset order)."""
    from torch.utils.data import DataLoader

    from lowrank_runner.tasks.evaluation import LengthSortedOrder
    from lowrank_runner.train.batching import LengthGroupedSampler, example_lengths

    batch = batch or batch_plan(training)
    collator = task.collator(tokenizer, pad_to_multiple_of=8 if mixed_precision != "no" else None)
    generator = torch.Generator().manual_seed(seed)
    workers = training["dataloader_workers"]
    order = {"shuffle": True}
    if training.get("group_by_length", False):
        lengths = example_lengths(tokenized["train"])
        if lengths is None:
            raise DataError("training.group_by_length: the task's training examples have no input_ids to group by")
        # grouped per process by one optimizer step's micro-batches, as transformers' Trainer does
        order = {"sampler": LengthGroupedSampler(lengths, batch.per_device * batch.accumulation, generator)}
    train = DataLoader(tokenized["train"], batch_size=batch.per_device, collate_fn=collator, generator=generator,
                       num_workers=workers, **order)
    evaluation = {}
    for split in eval_splits:
        lengths = example_lengths(tokenized[split])
        evaluation[split] = DataLoader(tokenized[split], batch_size=training["eval_batch_size"] or 2 * batch.per_device,
                                       sampler=None if lengths is None else LengthSortedOrder(lengths),
                                       shuffle=False, collate_fn=collator, num_workers=workers)
    return train, evaluation, generator


_DATA_CACHE: dict[str, tuple[Task, object, object]] = {}


def clear_data_cache() -> None:
    """Forget tokenized data (called at the start of every ``lrr run``: files may change)."""
    _DATA_CACHE.clear()


def prepared_data(cfg: dict, tokenizer) -> tuple[Task, object, object]:
    """The task, its raw splits (after any hold-out) and its tokenized splits. Runs of a
    recipe are task-major, so the seeds of a task reuse the last tokenized data of this
    invocation; datasets' fingerprint cache (keyed by the data files, the tokenizer and the
    task's settings; written atomically, under a file lock when two processes build the
    same entry) serves file-backed data across processes and invocations too:
    :func:`tokenized_reuse` says which."""
    key = json.dumps({"task": cfg["task"], "backbone": cfg["backbone"], "tokenizer": tokenizer.name_or_path},
                     sort_keys=True, default=str)
    global _LAST_REUSE
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()  # one entry: tokenized data can be large
        task = build_task(cfg["task"])
        splits = task.load_splits()
        holdout = cfg["task"].get("holdout_fraction")
        if holdout:
            splits = apply_holdout(splits, holdout, task.eval_splits())
        started = time.time()
        tokenized = task.tokenize(splits, tokenizer)
        _DATA_CACHE[key] = (task, splits, tokenized)
        _LAST_REUSE = tokenized_reuse(tokenized, started)
    else:
        _LAST_REUSE = "the tokenised splits of the previous run"
    return _DATA_CACHE[key]


_LAST_REUSE = ""


def last_reuse() -> str:
    """What the last :func:`prepared_data` reused instead of tokenising ("" for nothing)."""
    return _LAST_REUSE


def tokenized_reuse(tokenized: dict, since: float) -> str:
    """"tokenised splits from the datasets cache (DIR)" when every split was read from cache
    files written before ``since`` (datasets found its fingerprint), else ""."""
    files = [f["filename"] for split in tokenized.values() for f in getattr(split, "cache_files", None) or []]
    if not files or len(files) < len(tokenized):
        return ""
    try:
        if any(os.path.getmtime(f) >= since for f in files):
            return ""
    except OSError:
        return ""
    return f"tokenised splits from the datasets cache, {os.path.dirname(files[0])}"

