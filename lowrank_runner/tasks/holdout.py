"""Checkpoint selection on a held-out part of the training set (CondLoRA §3.1): train on
the rest, select the best checkpoint on the held-out part, and score the selected model
once on the task's own evaluation set(s), which become the test set(s).

The held-out part is drawn with a fixed seed (0), so every seed of a recipe selects on
the same examples."""

from __future__ import annotations

import math

from lowrank_runner.errors import DataError

TEST_PREFIX = "test__"
HOLDOUT_SEED = 0


def holdout_sizes(n: int, fraction: float) -> tuple[int, int]:
    """(train, held-out) sizes, as ``datasets.Dataset.train_test_split`` makes them; a
    :class:`DataError` when nothing would be left to train on."""
    held = math.ceil(fraction * n)
    if n - held < 1:
        raise DataError(f"task.holdout_fraction: holding out {fraction:g} of {n} training example"
                        f"{'s' if n != 1 else ''} leaves none to train on; lower holdout_fraction, or train on "
                        "more examples (more rows, or a larger or no task.max_train_samples)")
    return n - held, held


def apply_holdout(splits, fraction: float, eval_splits: dict[str, str]):
    """``train`` → (``train``, ``validation``); each evaluation split → ``test__<name>``
    (``splits``: a ``datasets.DatasetDict``; the same kind of mapping is returned)."""
    holdout_sizes(len(splits["train"]), fraction)
    parts = splits["train"].train_test_split(test_size=fraction, seed=HOLDOUT_SEED, shuffle=True)
    out = {"train": parts["train"], "validation": parts["test"]}
    out.update({TEST_PREFIX + name: splits[name] for name in eval_splits})
    out.update({k: v for k, v in splits.items() if k.startswith(TEST_PREFIX)})  # the task's own (Task.test_splits)
    return type(splits)(out)
