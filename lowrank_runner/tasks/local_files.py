"""Your own data: classification and regression from CSV, TSV, JSON Lines or Parquet.

Files are read with ``datasets`` (so tokenisation is cached by fingerprint), columns are
mapped by ``text_column`` / ``text_pair_column`` / ``label_column``, and class names
become indices in the order of ``labels`` (default: sorted distinct training labels).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from lowrank_runner.errors import DataError
from lowrank_runner.resources import resolve_local_path
from lowrank_runner.tasks.base import Task
from lowrank_runner.tasks.metrics import classification_metrics, regression_metrics

_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _format_of(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise DataError(f"{path}: cannot tell the format from '{suffix}'; set task.data.format (csv, tsv, json, parquet)")
    return _FORMATS[suffix]


def load_files(data: dict, splits: tuple[str, ...] = ("train", "validation")):
    """Load the files of ``splits`` (keys of ``task.data``) into a ``datasets.DatasetDict``."""
    import datasets

    files = {}
    for split in splits:
        path = resolve_local_path(data[split])
        if not path.is_file():
            raise DataError(f"task.data.{split}: file not found: {data[split]}")
        files[split] = path
    formats = {_format_of(p, data.get("format", "auto")) for p in files.values()}
    if len(formats) != 1:
        raise DataError(f"task.data: {', '.join(splits)} must have the same format (got {', '.join(sorted(formats))})")
    fmt = formats.pop()
    builder, kwargs = ("csv", {"delimiter": "\t", "quoting": 3}) if fmt == "tsv" else (fmt, {})
    try:
        return datasets.load_dataset(builder, data_files={k: str(v) for k, v in files.items()}, **kwargs)
    except Exception as exc:  # datasets raises many types for malformed files
        raise DataError(f"cannot read task data ({', '.join(str(p) for p in files.values())}) as {fmt}: {exc}") from None


class _LocalTask(Task):
    @cached_property
    def raw(self):
        splits = load_files(self.config["data"])
        c = self.config
        for split, ds in splits.items():
            for key in ("text_column", "text_pair_column", "label_column"):
                col = c.get(key)
                if col and col not in ds.column_names:
                    raise DataError(
                        f"{self.config['data'][split]}: no column '{col}' (columns: {', '.join(ds.column_names)}); set task.{key}"
                    )
        return self.limit_samples(splits)

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
            out[split] = ds.map(
                encode, batched=True, remove_columns=ds.column_names, fn_kwargs={"split": split},
                desc=f"tokenising {split}",
            )
        import datasets

        return datasets.DatasetDict(out)


class Classification(_LocalTask):
    @cached_property
    def labels(self) -> list:
        declared = self.config.get("labels")
        if declared:
            return list(declared)
        values = self.raw["train"][self.config["label_column"]]
        return sorted(set(values), key=lambda v: (isinstance(v, str), v))

    def model_config_kwargs(self):
        names = [str(x) for x in self.labels]
        return {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
            "problem_type": "single_label_classification",
        }

    def _encode_labels(self, values, split):
        index = {v: i for i, v in enumerate(self.labels)}
        index.update({str(v): i for i, v in enumerate(self.labels)})
        out = []
        for v in values:
            if v not in index:
                raise DataError(
                    f"{self._source(split)}: label {v!r} is not one of the task's labels {self.labels}; "
                    "fix the data or list every class in task.labels"
                )
            out.append(index[v])
        return out

    def predictions(self, logits):
        return np.asarray(logits).argmax(axis=-1)

    def compute_metrics(self, predictions, labels):
        return classification_metrics(predictions, labels)


class Regression(_LocalTask):
    def model_config_kwargs(self):
        return {"num_labels": 1, "problem_type": "regression"}

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
