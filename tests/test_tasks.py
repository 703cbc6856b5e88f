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
    with pytest.raises(DataError, match=r"dev.csv:2: column 'label': 'maybe' is not a class of task.labels "
                                        r"\('pos', 'neg'\); fix the row, or list every class in task.labels"):
        task.labels  # noqa: B018 (the files are checked when first used)
    write_csv(tmp_path / "dev.csv", ["d,neg"])
    task = build_task(task_config(tmp_path, labels=["pos", "neg"]))
    assert task._encode_labels(["neg"], "train") == [1]


def test_missing_column_names_the_file_and_the_setting(tmp_path):
    write_csv(tmp_path / "train.csv", ["a,pos"], header="sentence,label")
    write_csv(tmp_path / "dev.csv", ["a,pos"], header="sentence,label")
    with pytest.raises(DataError, match=r"train.csv:1: no column 'text' \(columns: 'sentence', 'label'\); "
                                        r"set task.text_column to one of them$"):
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


# ---------------------------------------------------------------- files checked before datasets reads them


def data_cfg(tmp_path, train, validation, name="classification", **over):
    """A task config reading ``train`` / ``validation`` (file names in ``tmp_path``)."""
    return task_config(tmp_path, name=name, **over,
                       data={"train": str(tmp_path / train), "validation": str(tmp_path / validation), "format": "auto"})


def test_blank_lines_and_a_byte_order_mark_are_accepted(tmp_path):
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}]
    (tmp_path / "t.jsonl").write_text("\ufeff" + json.dumps(rows[0]) + "\n\n  \n" + json.dumps(rows[1]) + "\n")
    (tmp_path / "d.csv").write_text("\ufefftext,label\n\nc,neg\n")
    task = build_task(data_cfg(tmp_path, "t.jsonl", "d.csv"))
    assert task.labels == ["neg", "pos"] and task.raw["train"]["text"] == ["a", "b"]
    assert task.rows["train"].lines == [1, 4] and task.rows["validation"].lines == [3]
    assert task.raw["validation"][0] == {"text": "c", "label": "neg"}  # train JSON Lines, validation CSV


def test_csv_cells_are_read_as_written(tmp_path):
    """'NA' and numbers in a text column stay text (no missing values, no int column);
    numeric labels stay numbers, in numeric order."""
    write_csv(tmp_path / "train.csv", ["NA,2", "12,10", "null,1"])
    write_csv(tmp_path / "dev.csv", ["x,10"])
    task = build_task(task_config(tmp_path))
    assert task.raw["train"]["text"] == ["NA", "12", "null"] and task.labels == [1, 2, 10]
    assert task._encode_labels(task.raw["validation"]["label"], "validation") == [2]


def test_a_delimiter_reads_semicolon_separated_files(tmp_path):
    (tmp_path / "train.csv").write_text('text;label\n"a; b";pos\nc;neg\n')
    (tmp_path / "dev.csv").write_text("text;label\nd;neg\n")
    cfg = task_config(tmp_path)
    cfg["data"]["delimiter"] = ";"
    task = build_task(cfg)
    assert task.raw["train"]["text"] == ["a; b", "c"] and task.labels == ["neg", "pos"]


def test_a_json_array_names_the_line_of_each_element(tmp_path):
    (tmp_path / "t.json").write_text('[\n {"text": "a", "label": "pos"},\n\n {"text": "b", "label": null}\n]')
    with pytest.raises(DataError, match=r"t.json:4: column 'label': null"):
        build_task(data_cfg(tmp_path, "t.json", "t.json")).labels


def test_labels_come_from_the_whole_training_file(tmp_path):
    """task.max_train_samples cuts the training rows, not the classes."""
    write_csv(tmp_path / "train.csv", ["a,pos", "b,pos", "c,neg"])
    write_csv(tmp_path / "dev.csv", ["d,neg"])
    task = build_task(task_config(tmp_path, max_train_samples=2))
    assert task.labels == ["neg", "pos"] and task.count_train_examples() == 2


def test_data_warnings_where_training_is_still_meaningful(tmp_path, capsys):
    """Declared classes with one seen in training, empty text, and constant evaluation
    scores train, with a warning naming the file and line."""
    write_csv(tmp_path / "train.csv", ["a,pos", ",pos"])
    write_csv(tmp_path / "dev.csv", ["d,neg"])
    build_task(task_config(tmp_path, labels=["pos", "neg"])).labels
    err = capsys.readouterr().err
    assert "warning: " + str(tmp_path / "train.csv") + ":3: column 'text': empty text (1 row of 2)" in err
    assert "train.csv: every training label is 'pos'; the classifier never sees the other classes" in err
    write_csv(tmp_path / "train.csv", ["a,1.0", "b,2.5"])
    write_csv(tmp_path / "dev.csv", ["d,3", "e,3"])
    assert build_task(task_config(tmp_path, name="regression")).count_train_examples() == 2
    assert "dev.csv: every validation score is 3; pearson and spearman are undefined there" in capsys.readouterr().err


def test_zero_training_examples_after_the_holdout(tmp_path):
    from lowrank_runner.tasks.holdout import holdout_sizes

    assert holdout_sizes(10, 0.1) == (9, 1)
    with pytest.raises(DataError, match=r"holding out 0.1 of 1 training example leaves none to train on"):
        holdout_sizes(1, 0.1)


def test_validate_peeks_at_headers_and_first_rows_only(tmp_path):
    """lrr validate's bounded check: the head of each file, its format and the columns
    the settings name (a bad row further down is left to lrr run)."""
    from lowrank_runner.tasks.data_check import PEEK_BYTES, peek_problems

    write_csv(tmp_path / "train.csv", ["a,pos"], header="sentence;label")
    (tmp_path / "dev.jsonl").write_text(json.dumps({"text": "a"}) + "\n" + "x" * (2 * PEEK_BYTES) + "\n")
    problems = peek_problems(task_config(tmp_path, data={"train": str(tmp_path / "train.csv"),
                                                         "validation": str(tmp_path / "dev.jsonl")}))
    assert [(p, m.split(": ", 1)[1]) for p, m in problems] == [
        (("task", "data", "train"), "no column 'text' (columns: 'sentence;label'); set task.text_column to one of "
                                    "them, or, if the file is ';'-separated, set task.data.delimiter: \";\""),
        (("task", "data", "validation"), "no column 'label' (columns: 'text'); set task.label_column to one of them"),
    ]
    write_csv(tmp_path / "train.csv", ["a,pos"])
    (tmp_path / "dev.jsonl").write_text(json.dumps({"text": "a", "label": "pos"}) + "\n" + "{broken\n")
    assert peek_problems(task_config(tmp_path, data={"train": str(tmp_path / "train.csv"),
                                                     "validation": str(tmp_path / "dev.jsonl")})) == []
    as_written = {"name": "classification", "data": {"train": str(tmp_path / "train.csv"),
                                                     "validation": str(tmp_path / "dev.jsonl")}}
    assert peek_problems(as_written) == []  # the defaults text_column: text, label_column: label hold
    assert peek_problems({**as_written, "name": "regression", "label_column": "score"}) == [
        (("task", "data", "train"), f"{tmp_path / 'train.csv'}:1: no column 'score' (columns: 'text', 'label'); "
                                    "set task.label_column to one of them"),
        (("task", "data", "validation"), f"{tmp_path / 'dev.jsonl'}: no column 'score' (columns: 'text', 'label'); "
                                         "set task.label_column to one of them")]
    assert peek_problems({**as_written, "name": "e2e"}) == []  # the data-to-text tasks find their columns by name
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a"], "score": [1.0]}), tmp_path / "t.parquet")
    assert peek_problems({"name": "classification", "data": {"train": str(tmp_path / "t.parquet")}}) == [
        (("task", "data", "train"), f"{tmp_path / 't.parquet'}: no column 'label' (columns: 'text', 'score'); "
                                    "set task.label_column to one of them")]
    (tmp_path / "train.csv").write_bytes(b"PAR1....")
    assert peek_problems(task_config(tmp_path))[0][1].endswith("a Parquet file, read as csv; rename the file to its "
                                                               "format's extension or set task.data.format: parquet")


def test_a_pandas_csv_with_its_index_column_is_read(tmp_path):
    import pandas as pd

    pd.DataFrame({"text": ["a", "b"], "label": ["pos", "neg"]}).to_csv(tmp_path / "train.csv")  # header ",text,label"
    pd.DataFrame({"text": ["c"], "label": ["neg"]}).to_csv(tmp_path / "dev.csv")
    task = build_task(task_config(tmp_path))
    assert task.labels == ["neg", "pos"] and task.raw["train"]["text"] == ["a", "b"]


def test_the_label_column_cannot_be_a_text_column(tmp_path):
    write_csv(tmp_path / "train.csv", ["a,pos"])
    write_csv(tmp_path / "dev.csv", ["a,pos"])
    with pytest.raises(DataError, match=r"^task.text_pair_column and task.label_column both name column 'label'"):
        build_task(task_config(tmp_path, text_pair_column="label")).labels


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_every_format_reads_the_named_file_not_a_glob(tmp_path, fmt):
    """``datasets`` resolves data_files as glob patterns: a path with ``[``, ``*`` is read
    as the one file it names (a file beside it that the pattern matches is not read), also
    through a symbolic link."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(path, texts, labels):
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "parquet":
            pq.write_table(pa.table({"text": texts, "label": labels}), path)
        elif fmt == "jsonl":
            path.write_text("".join(json.dumps({"text": t, "label": lb}) + "\n" for t, lb in zip(texts, labels)))
        else:
            sep = "," if fmt == "csv" else "\t"
            path.write_text(f"text{sep}label\n" + "".join(f"{t}{sep}{lb}\n" for t, lb in zip(texts, labels)))

    train, dev = tmp_path / f"d[1]/tr*.{fmt}", tmp_path / f"d[1]/dev?.{fmt}"
    write(train, ["a", "b", "c"], ["pos", "neg", "pos"])
    write(dev, ["d", "e"], ["neg", "pos"])
    write(tmp_path / f"d[1]/train.{fmt}", ["x"] * 5, ["neutral"] * 5)  # what the patterns would also match
    write(tmp_path / f"d1/tr*.{fmt}", ["x"] * 5, ["neutral"] * 5)
    write(tmp_path / f"d1/devs.{fmt}", ["x"] * 5, ["neutral"] * 5)
    (tmp_path / "l[x]").mkdir()
    (tmp_path / f"l[x]/train.{fmt}").symlink_to(train)
    for path in (train, tmp_path / f"l[x]/train.{fmt}"):
        task = build_task(task_config(tmp_path, data={"train": str(path), "validation": str(dev), "format": "auto"}))
        splits = task.load_splits()
        assert list(splits["train"]["text"]) == ["a", "b", "c"] and list(splits["validation"]["text"]) == ["d", "e"]
        assert task.labels == ["neg", "pos"]


def test_an_unreachable_hub_fails_in_seconds_with_the_offline_fix(monkeypatch):
    """Not in offline mode and no network: one quick check instead of datasets' minutes of
    retries, and the message says how to go without the hub."""
    import time

    import datasets
    from huggingface_hub import constants

    from lowrank_runner.errors import DataError

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")  # nothing listens on the discard port
    called = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: called.append(a))
    task = build_task({"name": "rte", "dataset": "nyu-mll/glue", "max_length": 64})
    started = time.monotonic()
    with pytest.raises(DataError, match=r"cannot load GLUE 'rte' from the hub 'nyu-mll/glue' \(127\.0\.0\.1 unreachable: "
                                        r".*\); without the hub, point task\.data_dir at a directory of raw GLUE files "
                                        r"\(or, with a copy in the datasets cache, set HF_DATASETS_OFFLINE=1\)"):
        task.load_splits()
    assert time.monotonic() - started < 10 and not called


@pytest.mark.parametrize("name,metric,greater", [
    ("regression", None, True), ("regression", "pearson", True), ("regression", "mse", False),
    ("classification", "accuracy", True), ("e2e", "bleu", True), ("e2e", "perplexity", False), ("e2e", "ter", False),
    ("stsb", "spearman", True),
])
def test_errors_and_losses_select_the_lowest(tmp_path, name, metric, greater):
    """The checkpoint selection (and a search's direction) follows the metric: a regression
    selected on mse keeps its lowest, not its worst, checkpoint."""
    cfg = task_config(tmp_path, name=name, metric=metric) if name in ("regression", "classification") else \
        {"name": name, "metric": metric}
    assert build_task(cfg).greater_is_better is greater
