"""Local-file tasks: formats, column mapping, labels, clear data errors; metrics."""

import json

import numpy as np
import pytest

from lowrank_runner.errors import DataError
from lowrank_runner.tasks.base import build_task
from lowrank_runner.tasks.metrics import classification_metrics, regression_metrics


def task_config(tmp_path, name="classification", **over):
    cfg = {"name": name, "max_length": 16, "text_column": "text", "text_pair_column": None, "label_column": "label",
           "labels": None, "metric": None, "max_train_samples": None, "max_eval_samples": None,
           "data": {"train": str(tmp_path / "train.csv"), "validation": str(tmp_path / "dev.csv"), "format": "auto"}}
    cfg.update(over)
    return cfg


def write_csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")


def test_labels_are_inferred_sorted_and_mapped(tmp_path):
    write_csv(tmp_path / "train.csv", ["a,pos", "b,neg", "c,neutral"])
    write_csv(tmp_path / "dev.csv", ["d,neg"])
    task = build_task(task_config(tmp_path))
    assert task.labels == ["neg", "neutral", "pos"]
    kwargs = task.model_config_kwargs()
    assert kwargs["num_labels"] == 3 and kwargs["id2label"] == {0: "neg", 1: "neutral", 2: "pos"}
    assert task._encode_labels(["pos", "neg"], "train") == [2, 0]


def test_declared_labels_fix_the_order_and_unknown_labels_are_named(tmp_path):
    write_csv(tmp_path / "train.csv", ["a,pos", "b,neg"])
    write_csv(tmp_path / "dev.csv", ["d,maybe"])
    task = build_task(task_config(tmp_path, labels=["pos", "neg"]))
    assert task._encode_labels(["neg"], "train") == [1]
    with pytest.raises(DataError, match=r"dev.csv: label 'maybe' is not one of the task's labels \['pos', 'neg'\]"):
        task._encode_labels(["maybe"], "validation")


def test_missing_column_names_the_file_and_the_setting(tmp_path):
    write_csv(tmp_path / "train.csv", ["a,pos"], header="sentence,label")
    write_csv(tmp_path / "dev.csv", ["a,pos"], header="sentence,label")
    with pytest.raises(DataError, match=r"train.csv: no column 'text' \(columns: sentence, label\); set task.text_column"):
        build_task(task_config(tmp_path)).count_train_examples()


def test_formats_tsv_jsonl_and_sample_limits(tmp_path):
    (tmp_path / "train.tsv").write_text("text\tlabel\nhello world\t1\nbye\t0\nok\t1\n")
    (tmp_path / "dev.tsv").write_text("text\tlabel\nhi\t1\n")
    cfg = task_config(tmp_path, max_train_samples=2, data={"train": str(tmp_path / "train.tsv"), "validation": str(tmp_path / "dev.tsv"), "format": "auto"})
    task = build_task(cfg)
    assert task.count_train_examples() == 2 and task.labels == [0, 1]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": t, "score": s}) for t, s in [("a", 1.5), ("b", 3.0)]) + "\n")
    reg = build_task(task_config(tmp_path, name="regression", label_column="score",
                                 data={"train": str(tmp_path / "t.jsonl"), "validation": str(tmp_path / "t.jsonl"), "format": "auto"}))
    assert reg.model_config_kwargs() == {"num_labels": 1, "problem_type": "regression"}
    assert reg._encode_labels(["2.5", 1], "train") == [2.5, 1.0]


def test_unknown_extension(tmp_path):
    (tmp_path / "train.txt").write_text("x")
    cfg = task_config(tmp_path, data={"train": str(tmp_path / "train.txt"), "validation": str(tmp_path / "train.txt"), "format": "auto"})
    with pytest.raises(DataError, match="set task.data.format"):
        build_task(cfg).count_train_examples()


def test_classification_metrics_by_hand():
    labels = np.array([1, 1, 0, 0, 1, 0])
    preds = np.array([1, 0, 0, 1, 1, 0])
    m = classification_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # TP=2 FP=1 FN=1 TN=2 -> MCC = (2*2-1*1)/sqrt(3*3*3*3) = 3/9
    assert m["matthews_correlation"] == pytest.approx(1 / 3)
    assert m["f1_macro"] == pytest.approx(2 / 3)


def test_regression_metrics_against_definitions():
    preds, labels = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0])
    m = regression_metrics(preds, labels)
    assert m["pearson"] == pytest.approx(np.corrcoef(preds, labels)[0, 1])
    assert m["spearman"] == pytest.approx(0.8)  # rank differences (0,1,1,0): 1 - 6*2/(4*15)
    assert m["mse"] == pytest.approx(0.5)
    assert regression_metrics(np.ones(4), labels)["pearson"] == 0.0  # constant prediction: defined, not NaN
