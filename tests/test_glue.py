"""GLUE tasks: raw GLUE files mapped to the hub's features, the official metrics, and
end-to-end runs on a tiny model (including MNLI's matched + mismatched dev sets)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.errors import DataError
from lowrank_runner.tasks.base import build_task

T = "\t"
# Raw files exactly as the GLUE download lays them out (header rows, column orders, labels).
OFFICIAL = {
    "CoLA/train.tsv": ["gj04\t1\t\tOur friends won't buy this analysis.", "gj04\t0\t*\tThey drank the pub."],
    "CoLA/dev.tsv": ["gj04\t1\t\tThe sailors rode the breeze.", "gj04\t0\t*\tThe more we study the less."],
    "SST-2/train.tsv": ["sentence\tlabel", "a gorgeous film\t1", "dull and flat\t0"],
    "SST-2/dev.tsv": ["sentence\tlabel", "it 's a charming journey\t1", "a mess\t0"],
    "MRPC/train.tsv": ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t702876\t702977\tHe said so.\tSo he said.",
                       "0\t2108705\t2108831\tIt rained.\tThe sun shone."],
    "MRPC/dev.tsv": ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t1\t2\tA cat sat.\tA cat was sitting.",
                     "0\t3\t4\tPrices rose.\tThe team lost."],
    "QQP/train.tsv": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "1\t1\t2\tHow do I cook rice?\tHow to cook rice?\t1",
                      "2\t3\t4\tWhy is the sky blue?\tWho won the match?\t0"],
    "QQP/dev.tsv": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "3\t5\t6\tWhat is AI?\tWhat's AI?\t1"],
    "STS-B/train.tsv": [T.join(["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                                "sentence2", "score"]),
                        T.join(["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A plane takes off.",
                                "An air plane takes off.", "5.000"]),
                        T.join(["1", "main-captions", "MSRvid", "2012test", "0004", "none", "none", "A man plays.",
                                "A dog runs.", "0.500"])],
    "STS-B/dev.tsv": [T.join(["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                              "sentence2", "score"]),
                      T.join(["0", "main-forums", "x", "2012", "1", "none", "none", "A cat.", "A cat sleeps.", "3.200"])],
    "MNLI/train.tsv": [T.join(["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                               "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]),
                       T.join(["0", "1", "1e", "gov", "(", "(", "(", "(", "The cat sat.", "A cat sat.", "entailment",
                               "entailment"]),
                       T.join(["1", "2", "2c", "gov", "(", "(", "(", "(", "It rained.", "It was dry.", "contradiction",
                               "contradiction"]),
                       T.join(["2", "3", "3n", "gov", "(", "(", "(", "(", "He left.", "He was sad.", "neutral", "neutral"])],
    "QNLI/train.tsv": ["index\tquestion\tsentence\tlabel", "0\tWho wrote it?\tShe wrote it.\tentailment",
                       "1\tWhen?\tThe sky is blue.\tnot_entailment"],
    "QNLI/dev.tsv": ["index\tquestion\tsentence\tlabel", "0\tWhere?\tIn Paris.\tentailment"],
    "RTE/train.tsv": ["index\tsentence1\tsentence2\tlabel", "0\tDana died at 44.\tDana is dead.\tentailment",
                      "1\tThe sun is hot.\tThe sun is cold.\tnot_entailment"],
    "RTE/dev.tsv": ["index\tsentence1\tsentence2\tlabel", "0\tA man walks.\tA person walks.\tentailment"],
}
OFFICIAL["MNLI/dev_matched.tsv"] = OFFICIAL["MNLI/train.tsv"]
OFFICIAL["MNLI/dev_mismatched.tsv"] = OFFICIAL["MNLI/train.tsv"][:2]

EXPECTED = {  # the hub's features for the first training row
    "cola": {"sentence": "Our friends won't buy this analysis.", "label": 1},
    "sst2": {"sentence": "a gorgeous film", "label": 1},
    "mrpc": {"sentence1": "He said so.", "sentence2": "So he said.", "label": 1},
    "qqp": {"question1": "How do I cook rice?", "question2": "How to cook rice?", "label": 1},
    "stsb": {"sentence1": "A plane takes off.", "sentence2": "An air plane takes off.", "label": 5.0},
    "mnli": {"premise": "The cat sat.", "hypothesis": "A cat sat.", "label": 0},
    "qnli": {"question": "Who wrote it?", "sentence": "She wrote it.", "label": 0},
    "rte": {"sentence1": "Dana died at 44.", "sentence2": "Dana is dead.", "label": 0},
}


@pytest.fixture
def glue_dir(tmp_path):
    for name, lines in OFFICIAL.items():
        path = tmp_path / "glue" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path / "glue"


def task(name, **extra):
    return build_task({"name": name, "dataset": "nyu-mll/glue", "data_dir": None, "max_length": 32, **extra})


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_raw_glue_files_map_to_the_hub_features(glue_dir, name):
    splits = task(name, data_dir=str(glue_dir)).load_splits()
    assert splits["train"][0] == EXPECTED[name]
    assert set(splits) == ({"train", "validation", "validation_mismatched"} if name == "mnli" else {"train", "validation"})


def test_the_other_raw_layouts_are_read_too(tmp_path):
    """Label-first SST-2 with a 'content' header, and header-less STS-B (10 columns)."""
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("label\tsentence\n0\thide new secretions\n")
    (tmp_path / "SST-2" / "dev.tsv").write_text("label\tcontent\n1\tone long string\n")
    splits = task("sst2", data_dir=str(tmp_path)).load_splits()
    assert splits["train"][0] == {"sentence": "hide new secretions", "label": 0}
    assert splits["validation"][0] == {"sentence": "one long string", "label": 1}
    (tmp_path / "STS-B").mkdir()
    row = T.join(["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A.", "B.", "3.800"])
    (tmp_path / "STS-B" / "train.tsv").write_text(row + "\n")
    (tmp_path / "STS-B" / "dev.tsv").write_text(row + "\n")
    assert task("stsb", data_dir=str(tmp_path)).load_splits()["train"][0] == {"sentence1": "A.", "sentence2": "B.",
                                                                               "label": 3.8}


def test_bad_raw_files_name_the_file_and_line(glue_dir):
    (glue_dir / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(DataError, match=r"RTE/dev.tsv:2: label 'maybe' is not one of entailment, not_entailment"):
        task("rte", data_dir=str(glue_dir)).load_splits()
    (glue_dir / "QNLI" / "train.tsv").unlink()
    with pytest.raises(DataError, match=r"QNLI/train.tsv: GLUE file not found"):
        task("qnli", data_dir=str(glue_dir)).load_splits()


@pytest.mark.parametrize("name,file,content,message", [
    ("rte", "RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tcafé\tb\tentailment\n".encode("latin-1"),
     r"RTE/dev.tsv:2:6: not UTF-8 \(byte 0xe9\); save the file as UTF-8$"),
    ("rte", "RTE/dev.tsv", "index\tsentence1\tsentence2\n0\ta\tb\n",
     r"RTE/dev.tsv:1: header has no column for label \(looked for label; header: index, sentence1, sentence2\) "
     r"\(a GLUE test file\? it has no labels: use train and dev files\)$"),
    ("rte", "RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n",
     r"RTE/dev.tsv: no rows of data \(only a header\)$"),
    ("rte", "RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\n",
     r"RTE/dev.tsv:2: 2 columns, expected at least 4$"),
    ("stsb", "STS-B/dev.tsv", "\t".join(["0", "g", "f", "y", "1", "s", "s", "A.", "B.", "nan"]) + "\n",
     r"STS-B/dev.tsv:1: score 'nan' is not a finite number$"),
])
def test_malformed_raw_files_name_the_file_line_and_column(glue_dir, name, file, content, message):
    path = glue_dir / file
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with pytest.raises(DataError, match=message):
        task(name, data_dir=str(glue_dir)).load_splits()


def test_a_directory_in_place_of_a_glue_file(glue_dir):
    (glue_dir / "RTE" / "dev.tsv").unlink()
    (glue_dir / "RTE" / "dev.tsv").mkdir()
    with pytest.raises(DataError, match=r"task.data_dir \(RTE/dev.tsv\): .*RTE/dev.tsv is a directory; expected a "
                                        r"data file$"):
        task("rte", data_dir=str(glue_dir)).load_splits()


def test_the_hub_unreachable_is_a_clear_error(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="point task.data_dir at a directory of raw GLUE files"):
        task("rte", dataset="nyu-mll/glue-not-cached-here").load_splits()


def test_official_metrics_on_a_hand_computable_case():
    pred, gold = np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0])
    # accuracy 3/4; F1 of class 1: P = 1/2, R = 1 -> 2/3; MCC = (1*2 - 1*0)/sqrt(2*1*3*2) = 1/sqrt(3)
    assert task("mrpc").compute_metrics(pred, gold) == pytest.approx({"accuracy": 0.75, "f1": 2 / 3})
    assert task("cola").compute_metrics(pred, gold) == pytest.approx({"matthews_correlation": 3 ** -0.5,
                                                                     "accuracy": 0.75})
    assert task("rte").compute_metrics(pred, gold) == {"accuracy": 0.75}
    stsb = task("stsb").compute_metrics(np.array([1.0, 2.0, 3.0, 5.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert stsb["spearman"] == pytest.approx(1.0) and stsb["pearson"] == pytest.approx(0.9827076, rel=1e-6)


def test_metrics_agree_with_scikit_learn_and_scipy():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    pred, gold = rng.integers(0, 2, 500), rng.integers(0, 2, 500)
    assert task("qqp").compute_metrics(pred, gold)["f1"] == pytest.approx(f1_score(gold, pred))
    assert task("cola").compute_metrics(pred, gold)["matthews_correlation"] == pytest.approx(matthews_corrcoef(gold, pred))
    x, y = rng.normal(size=300), rng.normal(size=300)
    m = task("stsb").compute_metrics(x, y)
    assert m["pearson"] == pytest.approx(pearsonr(x, y)[0]) and m["spearman"] == pytest.approx(spearmanr(x, y)[0])


@pytest.mark.parametrize("name", ["mnli", "stsb", "mrpc"])
def test_glue_tasks_run_end_to_end(tmp_path, make_recipe, tiny_bert, glue_dir, name):
    recipe = make_recipe(f"""
        name: glue-tiny
        backbone: {{name: {tiny_bert}}}
        targets: [Wq, Wv]
        method: {{name: lora, r: 2, alpha: 4}}
        task: {{name: {name}, data_dir: {glue_dir}, max_length: 16}}
        training: {{epochs: 1, batch_size: 2, learning_rate: 1e-3}}
        """)
    result = CliRunner().invoke(app, ["run", str(recipe), "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((tmp_path / "run" / "metrics.json").read_text())["last"]["eval"]
    expected = {"mnli": {"accuracy", "accuracy_mm"}, "stsb": {"pearson", "spearman"}, "mrpc": {"accuracy", "f1"}}[name]
    assert expected <= set(evaluation)


SHARED_GLUE = Path(os.environ.get("LRR_GLUE_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))


@pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason="real GLUE files not present (../shared/data/glue)")
@pytest.mark.parametrize("name,train,dev", [("sst2", 67_349, 872), ("cola", 7_250, 1_043), ("rte", 2_127, 277)])
def test_real_glue_files_load_completely(name, train, dev):
    """Row counts of the official files (CoLA dev: 1,043 rows, the last without a newline)."""
    splits = task(name, data_dir=str(SHARED_GLUE)).load_splits()
    assert len(splits["train"]) == train and len(splits["validation"]) == dev
    labels = set(splits["train"]["label"])
    assert labels == {0, 1}


def test_holdout_selects_on_part_of_train_and_scores_the_dev_set_once(tmp_path, make_recipe, tiny_bert, glue_dir):
    """CondLoRA's protocol: 90/10 split of train for selection, the dev set as test."""
    rte = glue_dir / "RTE" / "train.tsv"
    rows = ["index\tsentence1\tsentence2\tlabel"] + [
        f"{i}\tsentence number {i}\tclaim {i % 3}\t{'entailment' if i % 2 else 'not_entailment'}" for i in range(20)]
    rte.write_text("\n".join(rows) + "\n")
    recipe = make_recipe(f"""
        name: holdout
        backbone: {{name: {tiny_bert}}}
        targets: [Wq, Wv]
        method: {{name: lora, r: 2, alpha: 4}}
        task: {{name: rte, data_dir: {glue_dir}, max_length: 16, holdout_fraction: 0.1}}
        training: {{epochs: 2, batch_size: 4, learning_rate: 1e-3, seed: [0, 1]}}
        """)
    result = CliRunner().invoke(app, ["run", str(recipe), "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    one = tmp_path / "run" / "rte-seed0"
    metrics = json.loads((one / "metrics.json").read_text())
    assert set(metrics["test"]) == {"accuracy", "loss"}  # the official dev set, scored once
    report = json.loads((one / "report.json").read_text())
    assert report["train_examples"] == 18 and report["eval_examples"] == 2  # 20 rows: 90 / 10
    assert report["holdout"] == {"fraction": 0.1, "seed": 0, "test_examples": {"validation": 1}}
    assert report["steps"]["total"] == 2 * 5  # ⌈18 / 4⌉ per epoch
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert all("test" in r for r in summary["runs"])
    tests = [100 * r["test"]["accuracy"] for r in summary["runs"]]
    assert f"{sum(tests) / 2:.2f}" in (tmp_path / "run" / "results.md").read_text()  # the table reports the test score
