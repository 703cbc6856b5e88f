"""The eight GLUE tasks with their official metrics, from the hub or from raw GLUE files.

Data comes from ``datasets.load_dataset(task.dataset, CONFIG)`` (default ``nyu-mll/glue``)
or, with ``task.data_dir``, from a directory of raw GLUE TSV files laid out as the GLUE
download gives them (``CoLA/train.tsv``, ``CoLA/dev.tsv``, ..., ``MNLI/dev_matched.tsv``,
``MNLI/dev_mismatched.tsv``). Raw files are mapped to the hub's features (column names,
label ids), so one task definition serves both. Raw files vary (with or without a header
row, columns in other orders, string or integer labels): columns are found by header
name when there is a header and by the official GLUE position otherwise.

Metrics (GLUE's official ones): CoLA Matthews correlation; SST-2, QNLI, RTE accuracy;
MRPC and QQP accuracy and F1 (of the positive class); STS-B Pearson and Spearman
(regression head); MNLI accuracy on the matched and mismatched dev sets.
"""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from lowrank_runner.errors import DataError
from lowrank_runner.tasks.base import Task, tokenizing_map
from lowrank_runner.tasks.data_check import decoded_lines, readable_file
from lowrank_runner.tasks.metrics import binary_f1, classification_metrics, regression_metrics
from lowrank_runner.tasks.rules import GLUE_DATASET


@dataclass(frozen=True)
class GlueSpec:
    folder: str  # directory name in the GLUE download
    texts: tuple[str, ...]  # hub feature names of the input text(s)
    labels: tuple[str, ...] | None  # class names in hub id order; None: regression
    headers: dict  # feature -> header names that hold it in raw files
    positions: dict  # feature -> column index in raw files without a header row
    eval_files: dict  # our split name -> raw file name


_CLS = ("label",)
SPECS = {
    "cola": GlueSpec("CoLA", ("sentence",), ("unacceptable", "acceptable"),
                     {"sentence": ("sentence",), "label": _CLS}, {"sentence": 3, "label": 1},
                     {"validation": "dev.tsv"}),
    "sst2": GlueSpec("SST-2", ("sentence",), ("negative", "positive"),
                     {"sentence": ("sentence", "content"), "label": _CLS}, {"sentence": 0, "label": 1},
                     {"validation": "dev.tsv"}),
    "mrpc": GlueSpec("MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
                     {"sentence1": ("#1 String", "sentence1"), "sentence2": ("#2 String", "sentence2"),
                      "label": ("Quality", "label")},
                     {"sentence1": 3, "sentence2": 4, "label": 0}, {"validation": "dev.tsv"}),
    "qqp": GlueSpec("QQP", ("question1", "question2"), ("not_duplicate", "duplicate"),
                    {"question1": ("question1",), "question2": ("question2",), "label": ("is_duplicate", "label")},
                    {"question1": 3, "question2": 4, "label": 5}, {"validation": "dev.tsv"}),
    "stsb": GlueSpec("STS-B", ("sentence1", "sentence2"), None,
                     {"sentence1": ("sentence1",), "sentence2": ("sentence2",), "label": ("score", "label")},
                     {"sentence1": 7, "sentence2": 8, "label": 9}, {"validation": "dev.tsv"}),
    "mnli": GlueSpec("MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
                     {"premise": ("sentence1", "premise"), "hypothesis": ("sentence2", "hypothesis"),
                      "label": ("gold_label", "label")},
                     {"premise": 8, "hypothesis": 9, "label": -1},
                     {"validation": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv"}),
    "qnli": GlueSpec("QNLI", ("question", "sentence"), ("entailment", "not_entailment"),
                     {"question": ("question",), "sentence": ("sentence",), "label": _CLS},
                     {"question": 1, "sentence": 2, "label": 3}, {"validation": "dev.tsv"}),
    "rte": GlueSpec("RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment"),
                    {"sentence1": ("sentence1",), "sentence2": ("sentence2",), "label": _CLS},
                    {"sentence1": 1, "sentence2": 2, "label": 3}, {"validation": "dev.tsv"}),
}
# Official training-set sizes (GLUE; the hub's nyu-mll/glue), so that `lrr inspect` can
# plan steps without downloading anything.
HUB_SPLITS = {"mnli": {"validation": "validation_matched", "validation_mismatched": "validation_mismatched"}}


def _label_id(value: str, spec: GlueSpec, where: str):
    if spec.labels is None:
        try:
            score = float(value)
        except ValueError:
            raise DataError(f"{where}: score {value!r} is not a number") from None
        if not math.isfinite(score):
            raise DataError(f"{where}: score {value!r} is not a finite number")
        return score
    if value in spec.labels:
        return spec.labels.index(value)
    if value.strip().lstrip("-").isdigit() and 0 <= int(value) < len(spec.labels):
        return int(value)
    raise DataError(f"{where}: label {value!r} is not one of {', '.join(spec.labels)} (or 0-{len(spec.labels) - 1})")


def read_raw_tsv(path: Path, spec: GlueSpec) -> dict[str, list]:
    """One raw GLUE file as columns named like the hub's features."""
    key = f"task.data_dir ({spec.folder}/{path.name})"
    if not path.exists():
        raise DataError(f"{path}: GLUE file not found (task.data_dir should hold {spec.folder}/{path.name})")
    readable_file(path, str(path), key)
    csv.field_size_limit(sys.maxsize)
    try:
        with path.open("rb") as f:
            numbered = [(n, r) for n, r in enumerate(csv.reader(decoded_lines(f, str(path)), delimiter="\t",
                                                                quoting=csv.QUOTE_NONE), start=1) if r]
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a valid TSV file ({exc})") from None
    if not numbered:
        raise DataError(f"{path}: empty file")
    first = [c.strip() for c in numbered[0][1]]
    known = {name for names in spec.headers.values() for name in names}
    has_header = any(name in first for name in known)
    if has_header:
        columns = {}
        for feature, names in spec.headers.items():
            found = next((first.index(n) for n in names if n in first), None)
            if found is None:
                unlabeled = (" (a GLUE test file? it has no labels: use train and dev files)"
                             if feature == "label" else "")
                raise DataError(f"{path}:{numbered[0][0]}: header has no column for {feature} (looked for "
                                f"{', '.join(names)}; header: {', '.join(first)}){unlabeled}")
            columns[feature] = found
        numbered = numbered[1:]
    else:
        columns = spec.positions
    if not numbered:
        raise DataError(f"{path}: no rows of data (only a header)")
    out: dict[str, list] = {feature: [] for feature in spec.headers}
    for n, row in numbered:
        try:
            values = {feature: row[i] for feature, i in columns.items()}
        except IndexError:
            raise DataError(f"{path}:{n}: {len(row)} columns, expected at least {max(columns.values()) + 1}") from None
        for feature, value in values.items():
            out[feature].append(_label_id(value, spec, f"{path}:{n}") if feature == "label" else value)
    return out


class Glue(Task):
    """One GLUE task; ``self.spec.name`` is its lower-case name (``cola`` ... ``rte``)."""

    @property
    def glue(self) -> GlueSpec:
        return SPECS[self.spec.name]

    @property
    def dataset(self) -> str:
        return self.config.get("dataset") or GLUE_DATASET

    @property
    def is_regression(self) -> bool:
        return self.glue.labels is None

    def data_files(self) -> dict:
        """With ``task.data_dir``: the raw GLUE files of this task's folder."""
        if not self.config.get("data_dir"):
            return {}
        root = Path(self.config["data_dir"]) / self.glue.folder
        return {split: root / name for split, name in {"train": "train.tsv", **self.glue.eval_files}.items()}

    @cached_property
    def raw(self):
        import datasets

        c, g = self.config, self.glue
        if c.get("data_dir"):
            root = Path(c["data_dir"]) / g.folder
            if not root.is_dir():
                raise DataError(f"task.data_dir: {root} does not exist (expected the GLUE download's {g.folder}/ folder)")
            splits = {s: datasets.Dataset.from_dict(read_raw_tsv(f, g)) for s, f in self.data_files().items()}
            splits = datasets.DatasetDict(splits)
        else:
            hub = self.load_hub(self.dataset, self.spec.name, f"GLUE '{self.spec.name}'",
                                "without the hub, point task.data_dir at a directory of raw GLUE files")
            names = HUB_SPLITS.get(self.spec.name, {"validation": "validation"})
            splits = datasets.DatasetDict({"train": hub["train"], **{ours: hub[theirs] for ours, theirs in names.items()}})
            splits = splits.select_columns([*g.texts, "label"])
        return self.limit_samples(splits, g.eval_files)

    def load_splits(self):
        return self.raw

    def count_train_examples(self) -> int:
        """Rows of the local files; from the hub, the official size (no download)."""
        known = self.spec.rules.hub_train_size(self.spec.name, self.config)
        return len(self.raw["train"]) if known is None else known

    def eval_splits(self) -> dict[str, str]:
        return {"validation": "", **{s: "_mm" for s in self.glue.eval_files if s != "validation"}}

    def tokenize(self, splits, tokenizer):
        import datasets

        texts, max_len = self.glue.texts, self.config["max_length"]

        def encode(batch):
            out = tokenizer(*(batch[t] for t in texts), truncation=True, max_length=max_len)
            out["labels"] = [float(v) for v in batch["label"]] if self.is_regression else batch["label"]
            return out

        return datasets.DatasetDict({
            split: tokenizing_map(ds, encode, tokenizer, self.config, batched=True, remove_columns=ds.column_names,
                                  desc=f"tokenising {split}")
            for split, ds in splits.items()
        })

    def model_config_kwargs(self):
        if self.is_regression:
            return {"num_labels": 1, "problem_type": "regression"}
        names = list(self.glue.labels)
        return {"num_labels": len(names), "id2label": dict(enumerate(names)),
                "label2id": {n: i for i, n in enumerate(names)}, "problem_type": "single_label_classification"}

    def predictions(self, logits):
        logits = np.asarray(logits)
        return logits.reshape(-1) if self.is_regression else logits.argmax(axis=-1)

    def compute_metrics(self, predictions, labels):
        if self.is_regression:
            m = regression_metrics(predictions, labels)
            return {"pearson": m["pearson"], "spearman": m["spearman"]}
        m = classification_metrics(predictions, labels)
        name = self.spec.name
        if name == "cola":
            return {"matthews_correlation": m["matthews_correlation"], "accuracy": m["accuracy"]}
        if name in ("mrpc", "qqp"):
            return {"accuracy": m["accuracy"], "f1": binary_f1(predictions, labels)}
        return {"accuracy": m["accuracy"]}
