"""Checkpoint selection on a held-out part of the training set (CondLoRA §3.1): train on
the rest, select the best checkpoint on the held-out part, and score the selected model
once on the task's own evaluation set(s), which become the test set(s).

The held-out part is drawn with a fixed seed (0), so every seed of a recipe selects on
the same examples."""

from __future__ import annotations

import math

TEST_PREFIX = "test__"
HOLDOUT_SEED = 0


def holdout_sizes(n: int, fraction: float) -> tuple[int, int]:
    """(train, held-out) sizes, as ``datasets.Dataset.train_test_split`` makes them."""
    held = math.ceil(fraction * n)
    return n - held, held


def apply_holdout(splits, fraction: float, eval_splits: dict[str, str]):
    """``train`` → (``train``, ``validation``); each evaluation split → ``test__<name>``."""
    import datasets

    parts = splits["train"].train_test_split(test_size=fraction, seed=HOLDOUT_SEED, shuffle=True)
    out = {"train": parts["train"], "validation": parts["test"]}
    out.update({TEST_PREFIX + name: splits[name] for name in eval_splits})
    out.update({k: v for k, v in splits.items() if k.startswith(TEST_PREFIX)})  # the task's own (Task.test_splits)
    return datasets.DatasetDict(out)
