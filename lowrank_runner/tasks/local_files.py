"""Your own data: classification and regression from CSV, TSV, JSON Lines or Parquet.

Files are checked line by line first (:mod:`lowrank_runner.tasks.data_check`: every
problem named with its file, line and column), then read with ``datasets`` (so
tokenisation is cached by fingerprint), the named file exactly: never as a glob pattern
(:func:`literal_pattern`). Columns are mapped by ``text_column`` /
``text_pair_column`` / ``label_column``, and class names become indices in the order of
``labels`` (default: the sorted distinct labels of the whole training file).
"""

from __future__ import annotations

import contextlib
import csv
import glob
import os
from functools import cached_property
from pathlib import Path

import numpy as np

from lowrank_runner.errors import DataError, warn
from lowrank_runner.tasks.base import Task, tokenizing_map
from lowrank_runner.tasks.data_check import (DELIMITERS, Rows, check_labels, check_scores, check_text, data_file,
                                             read_rows)
from lowrank_runner.tasks.metrics import classification_metrics, regression_metrics

def load_files(data: dict, splits: tuple[str, ...] = ("train", "validation"), wanted: dict[str, str] | None = None,
               strings: tuple[str, ...] | None = ()):
    """Check the files of ``splits`` (keys of ``task.data``; :mod:`data_check`), then load
    each with ``datasets`` (each split may have its own format): a ``datasets.DatasetDict`` and, per split, the checked
    :class:`~lowrank_runner.tasks.data_check.Rows` of the ``wanted`` columns (column ->
    the recipe key naming it). CSV/TSV cells are read as written (``NA`` stays text);
    ``strings``: the columns read as text even when every cell is a number (None: all)."""
    import datasets

    fmt_declared, delimiter = data.get("format") or "auto", data.get("delimiter")
    rows = {split: read_rows(data[split], split, fmt_declared, wanted, delimiter) for split in splits}
    if delimiter is not None and not any(r.fmt in DELIMITERS for r in rows.values()):
        raise DataError(f"task.data.delimiter applies to CSV/TSV files, and {', '.join(splits)} are "
                        f"{'/'.join(sorted({r.fmt for r in rows.values()}))}; remove it")
    out = {}
    for split, checked in rows.items():
        fmt = checked.fmt
        builder, kwargs = _builder(fmt, delimiter, checked, strings)
        path = literal_pattern(data_file(data[split], split), checked.shown)
        try:
            with _datasets_silenced():
                out[split] = datasets.load_dataset(builder, data_files={split: path}, split=split, **kwargs)
        except Exception as exc:  # checked above: what datasets still refuses
            if isinstance(exc, datasets.exceptions.DatasetGenerationError) and exc.__cause__ is not None:
                exc = exc.__cause__  # "An error occurred while generating the dataset": the reader's own error
            first = str(exc).strip().splitlines()
            raise DataError(f"{checked.shown}: cannot read as {fmt} ({type(exc).__name__}"
                            f"{': ' + first[0] if first else ''})") from None
        if len(out[split]) != len(checked.lines):  # the checker and datasets disagree: name rows, not lines
            checked.fmt, checked.lines = "parquet", list(range(1, len(out[split]) + 1))
    return datasets.DatasetDict(out), rows


def literal_pattern(path: Path, shown: str) -> str:
    """``path`` as a ``data_files`` entry that names exactly that file: ``datasets``
    resolves every entry as an fsspec glob, so a ``*``, ``?`` or ``[`` in a directory or
    file name would match other files (or none); :func:`glob.escape` makes each a literal
    (``[*]``, ``[?]``, ``[[]``), which fsspec's glob honours (no brace expansion there:
    ``{}`` are literal already). ``::`` chains URLs there and cannot be escaped."""
    absolute = os.path.abspath(path)
    if "::" in absolute:
        raise DataError(f"{shown}: datasets cannot read a file whose path holds '::' ({absolute}; '::' chains URLs "
                        "there); rename the directory or the file")
    return glob.escape(absolute)


@contextlib.contextmanager
def _datasets_silenced():
    """``datasets`` logs a file it cannot read ("Failed to load JSON ...") before raising;
    the raised error becomes one :class:`DataError` line, so keep its log quiet meanwhile."""
    from datasets.utils import logging as ds_logging

    before = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(before)


def _builder(fmt: str, delimiter: str | None, rows: Rows, strings: tuple[str, ...] | None) -> tuple[str, dict]:
    """The ``datasets`` builder of a format and its arguments."""
    if fmt not in DELIMITERS:
        return fmt, {}
    columns = rows.columns if strings is None else [c for c in strings if c in rows.columns]
    kwargs = {"delimiter": delimiter or DELIMITERS[fmt], "na_filter": False, "converters": {c: str for c in columns}}
    if fmt == "tsv":
        kwargs["quoting"] = csv.QUOTE_NONE
    return "csv", kwargs


class _LocalTask(Task):
    TEXT_KEYS = ("text_column", "text_pair_column")

    @cached_property
    def raw(self):
        """The checked splits (every row of both files, before any sample limit)."""
        c = self.config
        for key in self.TEXT_KEYS:
            if c.get(key) and c[key] == c["label_column"]:
                raise DataError(f"task.{key} and task.label_column both name column '{c[key]}': the model would read "
                                "its labels; set them to different columns")
        wanted = {c[k]: f"task.{k}" for k in (*self.TEXT_KEYS, "label_column") if c.get(k)}
        texts = tuple(c[k] for k in self.TEXT_KEYS if c.get(k))
        splits, self.rows = load_files(c["data"], ("train", "validation"), wanted, strings=texts)
        for split, rows in self.rows.items():
            for key in self.TEXT_KEYS:
                if c.get(key):
                    check_text(rows, c[key], f"task.{key}")
            self._check_labels(rows, split)
        self._check_splits(splits)
        return self.limit_samples(splits)

    def _check_labels(self, rows: Rows, split: str) -> None:
        """Each row's label, as written."""
        raise NotImplementedError

    def _check_splits(self, splits) -> None:
        """The labels of the splits together (as ``datasets`` typed them)."""

    def load_splits(self):
        return self.raw

    def count_train_examples(self) -> int:
        return len(self.raw["train"])

    def _encode_labels(self, values: list, split: str) -> list:
        raise NotImplementedError

    def _source(self, split: str) -> str:
        """The file a split's rows come from (held-out and test splits included)."""
        from lowrank_runner.tasks.holdout import TEST_PREFIX

        data = self.config["data"]
        if split.startswith(TEST_PREFIX):
            return data[split[len(TEST_PREFIX):]]
        return data["train"] if self.config.get("holdout_fraction") else data[split]

    def tokenize(self, splits, tokenizer):
        c = self.config
        text, pair, label, max_len = c["text_column"], c.get("text_pair_column"), c["label_column"], c["max_length"]

        def encode(batch, split):
            args = (batch[text], batch[pair]) if pair else (batch[text],)
            out = tokenizer(*args, truncation=True, max_length=max_len)
            out["labels"] = self._encode_labels(batch[label], split)
            return out

        out = {}
        for split, ds in splits.items():
            out[split] = tokenizing_map(
                ds, encode, tokenizer, self.config, batched=True, remove_columns=ds.column_names,
                fn_kwargs={"split": split}, desc=f"tokenising {split}",
            )
        import datasets

        return datasets.DatasetDict(out)


class Classification(_LocalTask):
    @cached_property
    def labels(self) -> list:
        """``task.labels``, or the sorted distinct labels of the whole training file."""
        self.raw  # checks the files and sets self._labels
        return self._labels

    def model_config_kwargs(self):
        names = [str(x) for x in self.labels]
        return {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
            "problem_type": "single_label_classification",
        }

    def _check_labels(self, rows, split):
        check_labels(rows, self.config["label_column"])

    def _check_splits(self, splits):
        """Every label is a class of ``task.labels`` (declared) or of the training split;
        a classifier needs two classes (one seen in training only warns when declared)."""
        column, declared = self.config["label_column"], self.config.get("labels")
        distinct = sorted(set(splits["train"][column]), key=lambda v: (isinstance(v, str), v))
        self._labels = list(declared) if declared else distinct
        train, index = self.rows["train"], class_index(self._labels)
        if len(distinct) == 1:
            if not declared:
                raise DataError(f"{train.shown}: every training label is {distinct[0]!r}; a classifier needs at "
                                "least two classes: add examples of the others (or list every class in task.labels)")
            warn(f"{train.shown}: every training label is {distinct[0]!r}; the classifier never sees the other "
                 "classes of task.labels")
        source = "task.labels" if declared else f"the training split ({train.shown})"
        for split in ("train", "validation") if declared else ("validation",):
            for i, v in enumerate(splits[split][column]):
                if index(v) is None:
                    raise DataError(f"{self.rows[split].where(i, column)}: {v!r} is not a class of {source} "
                                    f"({', '.join(repr(x) for x in self._labels)}); fix the row, or list every class "
                                    "in task.labels")

    def _encode_labels(self, values, split):
        out, lookup = [], class_index(self.labels)
        for v in values:
            index = lookup(v)
            if index is None:  # the files were checked: data changed since, or a bug
                raise DataError(
                    f"{self._source(split)}: label {v!r} is not one of the task's labels {self.labels}; "
                    "fix the data or list every class in task.labels"
                )
            out.append(index)
        return out

    def predictions(self, logits):
        return np.asarray(logits).argmax(axis=-1)

    def compute_metrics(self, predictions, labels):
        return classification_metrics(predictions, labels)


def class_index(labels: list):
    """A lookup: a value -> its index among ``labels`` (None if it is none of them); a
    label written as text matches one written as a number (``"1"`` is class ``1``)."""
    exact = {(isinstance(v, bool), v): i for i, v in enumerate(labels)}
    text: dict[str, int] = {}
    for i, v in enumerate(labels):
        text.setdefault(str(v), i)
    return lambda v: exact.get((isinstance(v, bool), v), text.get(str(v)))


class Regression(_LocalTask):
    def model_config_kwargs(self):
        return {"num_labels": 1, "problem_type": "regression"}

    def _check_labels(self, rows, split):
        """Finite scores; training scores that never vary are an error (nothing to learn),
        evaluation scores that never vary only warn (pearson and spearman are reported as 0)."""
        scores = check_scores(rows, self.config["label_column"])
        if len(set(scores)) > 1:
            return
        if split == "train":
            raise DataError(f"{rows.shown}: every training score is {scores[0]:g}; a regression needs scores that "
                            "vary")
        warn(f"{rows.shown}: every {split} score is {scores[0]:g}; pearson and spearman are undefined there "
             "(reported as 0): select on mse (task.metric: mse) or score a varied split")

    def _encode_labels(self, values, split):
        try:
            return [float(v) for v in values]
        except (TypeError, ValueError):
            bad = next(v for v in values if not _is_number(v))
            raise DataError(f"{self._source(split)}: regression label {bad!r} is not a number") from None

    def predictions(self, logits):
        return np.asarray(logits).reshape(-1)

    def compute_metrics(self, predictions, labels):
        return regression_metrics(predictions, labels)


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False
