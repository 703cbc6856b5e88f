"""Which examples share a batch, to pad less: the examples' lengths, and the training
order of ``training.group_by_length`` (transformers Trainer's ``group_by_length``).

The evaluation order (every split, longest first) lives with the tasks that read their
outputs back in dataset order (tasks/evaluation.py, :class:`LengthSortedOrder`)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler

MEGA_BATCHES = 50  # batches per length-sorted group, at most (transformers' mega_batch_mult)


def example_lengths(dataset) -> np.ndarray | None:
    """Tokens per example (the length of its ``input_ids``) in dataset order, or None when
    the examples have no ``input_ids``. A ``datasets.Dataset`` is read as one Arrow column
    (its list lengths: no row is decoded); anything else row by row."""
    try:
        import datasets

        if isinstance(dataset, datasets.Dataset):
            if "input_ids" not in dataset.column_names:
                return None
            import pyarrow.compute as pc

            column = dataset.with_format("arrow")["input_ids"]  # follows a select()'s indices
            return np.asarray(pc.list_value_length(column).to_numpy(zero_copy_only=False), dtype=np.int64)
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    try:
        return np.asarray([len(row["input_ids"]) for row in dataset], dtype=np.int64)
    except (KeyError, TypeError):
        return None


def length_grouped_order(lengths, batch_size: int, generator: torch.Generator | None = None) -> list[int]:
    """Dataset indices in transformers Trainer's ``group_by_length`` order: a random
    permutation (drawn from ``generator``) cut into mega-batches of ``m × batch_size``
    examples (m = 50, or fewer so the data makes at least 4 mega-batches, at least 1), each
    sorted by length, longest first (ties keep their drawn order); then the longest
    example of all is swapped to the front, so the first batch is the largest one (a
    memory error shows at once). Consecutive ``batch_size`` indices have similar lengths
    and the mega-batches still come in random order."""
    lengths = np.asarray(lengths)
    n = len(lengths)
    if n == 0:
        return []
    mult = max(1, min(n // (batch_size * 4), MEGA_BATCHES))
    size = mult * batch_size
    drawn = torch.randperm(n, generator=generator).numpy()
    groups = [drawn[i:i + size] for i in range(0, n, size)]
    groups = [g[np.argsort(-lengths[g], kind="stable")] for g in groups]
    longest = int(np.argmax([lengths[g[0]] for g in groups]))  # the first group with the longest example
    groups[0][0], groups[longest][0] = groups[longest][0], groups[0][0]
    return np.concatenate(groups).tolist()


class LengthGroupedSampler(Sampler[int]):
    """The training order of ``training.group_by_length`` (:func:`length_grouped_order`),
    a new one each epoch, drawn from ``generator``: the training DataLoader's generator,
    whose state the loop saves at each epoch start and restores to replay an interrupted
    epoch. It is a plain ``sampler=`` of a DataLoader with a ``batch_size``, so
    Accelerate shards it as it shards a shuffled DataLoader: the processes read the same
    order (Accelerate synchronises ``generator`` across them at each epoch, as it does a
    ``RandomSampler``'s) and take its batches in turn."""

    def __init__(self, lengths, batch_size: int, generator: torch.Generator):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.generator = generator  # Accelerate looks for this attribute to synchronise it

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(length_grouped_order(self.lengths, self.batch_size, self.generator))
