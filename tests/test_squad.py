"""SQuAD 2.0: the official EM/F1 definitions on hand-computable cases, stride splitting,
post-processing with the no-answer threshold, the official JSON files, the TriAdaptLoRA
Table VI recipes, and an end-to-end run on a tiny model."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.errors import DataError
from lowrank_runner.recipe.schema import fill_defaults, recipe_schema
from lowrank_runner.tasks.base import build_task
from lowrank_runner.tasks.squad import read_squad_json
from lowrank_runner.tasks.squad_metrics import (best_threshold_scores, exact_match, normalize_answer, question_scores,
                                                squad_v2_scores, token_f1)
from lowrank_runner.tasks.squad_spans import NO_OFFSET, best_span, predict
from tests.conftest import REPO
from tests.test_inspect import DEBERTA_V3_BASE, inspect_recipe

# ---------------------------------------------------------------- metrics


def test_normalisation_follows_the_official_script():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("Theater anthem") == "theater anthem"  # articles only as whole words
    assert normalize_answer("U.S.-based") == "usbased"  # punctuation removed, not replaced by a space
    assert normalize_answer(" ... ") == ""


def test_exact_match_and_f1_by_hand():
    assert exact_match("Steam engine", "the steam engine.") == 1.0
    assert exact_match("steam engine", "steam engines") == 0.0
    # gold [cat, sat, on, mat], prediction [cat, on, mat]: P = 1, R = 3/4
    assert token_f1("the cat sat on the mat", "cat on mat") == pytest.approx(2 * 1 * 0.75 / 1.75)
    # tokens counted with multiplicity: gold [x, y, y], prediction [y, y, y]: 2 in common
    assert token_f1("x y y", "y y y") == pytest.approx(2 / 3)
    assert token_f1("denver", "broncos") == 0.0


def test_unanswerable_and_multiple_gold_answers():
    assert question_scores([], "") == (1.0, 1.0)  # no answer, none predicted
    assert question_scores([], "Denver") == (0.0, 0.0)
    assert question_scores(["Denver"], "") == (0.0, 0.0)
    assert question_scores(["Denver Broncos", "Broncos"], "the Broncos") == (1.0, 1.0)  # max over the golds
    assert question_scores(["Denver Broncos", "Broncos"], "Denver") == (0.0, pytest.approx(2 / 3))
    assert question_scores(["the"], "") == (1.0, 1.0)  # a gold that normalises to "" does not count


def test_totals_and_breakdowns_by_hand():
    references = {"a": ["Denver Broncos"], "b": ["Paris"], "c": [], "d": []}
    predictions = {"a": "Broncos", "b": "Paris", "c": "", "d": "London"}
    scores = squad_v2_scores(predictions, references)
    # exact: a 0, b 1, c 1, d 0; f1: a 2/3, b 1, c 1, d 0
    assert scores["exact"] == pytest.approx(2 / 4) and scores["f1"] == pytest.approx((2 / 3 + 2) / 4)
    assert scores["HasAns_exact"] == pytest.approx(1 / 2) and scores["HasAns_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert scores["NoAns_exact"] == scores["NoAns_f1"] == pytest.approx(1 / 2)
    # A listed gold answer that normalises to "" is scored as "no answer" but counted as
    # answerable (the official script's HasAns is "has an answers entry").
    odd = squad_v2_scores({"e": ""}, {"e": ["The"]})
    assert odd == {"exact": 1.0, "f1": 1.0, "HasAns_exact": 1.0, "HasAns_f1": 1.0}
    with pytest.raises(ValueError, match="no prediction"):
        squad_v2_scores({"a": ""}, references)


def test_no_answer_threshold_sweep_by_hand():
    references = {"q1": ["blue whale"], "q2": [], "q3": ["red fox"]}
    candidates = {"q1": "blue whale", "q2": "lion", "q3": "fox"}  # q3: F1 2/3, exact 0
    margins = {"q1": -2.0, "q3": 3.0, "q2": 5.0}  # no-answer score minus best span score
    out = best_threshold_scores(candidates, margins, references)
    # Thresholds, in margin order: below -2: "" everywhere, q2 right: 1; at -2: + q1 = 2;
    # at 3: + q3 (F1 2/3, EM 0); at 5: q2 answered "lion", − 1.
    assert out["best_exact"] == pytest.approx(2 / 3) and out["best_exact_thresh"] == -2.0
    assert out["best_f1"] == pytest.approx((2 + 2 / 3) / 3) and out["best_f1_thresh"] == 3.0
    # The same numbers by predicting with those thresholds and scoring:
    for name, threshold in (("exact", -2.0), ("f1", 3.0)):
        predictions = {q: "" if margins[q] > threshold else candidates[q] for q in references}
        assert squad_v2_scores(predictions, references)[name] == pytest.approx(out[f"best_{name}"])


# ---------------------------------------------------------------- post-processing


def _feature(n, offsets, start_at=None, end_at=None, cls=0.0, high=5.0):
    start, end = np.zeros(n), np.zeros(n)
    start[0] = end[0] = cls
    if start_at is not None:
        start[start_at], end[end_at] = high, high
    return {"start_logits": start, "end_logits": end, "offsets": offsets, "cls_index": 0}


CONTEXT = "the blue whale is the largest animal"
# [CLS] question [SEP] the blue whale is the largest animal [SEP]
OFFSETS = [NO_OFFSET, NO_OFFSET, NO_OFFSET, (0, 3), (4, 8), (9, 14), (15, 17), (18, 21), (22, 29), (30, 36), NO_OFFSET]


def test_post_processing_picks_the_gold_span():
    choice = best_span(CONTEXT, [_feature(11, OFFSETS, 4, 5)], n_best=20, max_answer_length=30)
    assert choice.text == "blue whale" and choice.score == 10.0 and choice.null_score == 0.0
    assert predict(choice, threshold=0.0) == "blue whale"


def test_post_processing_predicts_no_answer_when_null_wins():
    choice = best_span(CONTEXT, [_feature(11, OFFSETS, 4, 5, cls=6.0)], n_best=20, max_answer_length=30)
    assert choice.text == "blue whale" and choice.no_answer_margin == 2.0  # 12 vs 10
    assert predict(choice, threshold=0.0) == ""
    assert predict(choice, threshold=2.5) == "blue whale"  # a higher threshold keeps the span


def test_post_processing_skips_invalid_spans_and_uses_every_window():
    # The highest logits sit on question tokens (1, 2) and on a reversed pair: neither is a span.
    f = _feature(11, OFFSETS)
    f["start_logits"][[1, 8]] = [9.0, 4.0]
    f["end_logits"][[2, 6]] = [9.0, 4.0]
    f["start_logits"][5], f["end_logits"][5] = 1.0, 1.0
    choice = best_span(CONTEXT, [f], 20, 30)
    assert (choice.text, choice.score) == ("whale is", 5.0)  # tokens 5..6: 1 + 4, not 1..2 (18) nor 8..6 (8)
    # Too long: 3 tokens with max_answer_length 2.
    assert best_span(CONTEXT, [_feature(11, OFFSETS, 3, 5)], 20, 2).text != "the blue whale"
    # Two windows: the span comes from the second, the no-answer score is the smaller one.
    second = _feature(11, OFFSETS, 8, 9, cls=1.0, high=7.0)
    choice = best_span(CONTEXT, [_feature(11, OFFSETS, 4, 5, cls=3.0), second], 20, 30)
    assert choice.text == "largest animal" and choice.score == 14.0 and choice.null_score == 2.0
    # No valid span at all: no answer.
    none = best_span(CONTEXT, [_feature(3, OFFSETS[:3])], 20, 30)
    assert none.text == "" and predict(none, 1e9) == ""


# ---------------------------------------------------------------- data


def squad_json(articles):
    return {"version": "v2.0", "data": [
        {"title": title, "paragraphs": [{"context": context, "qas": [
            {"id": qid, "question": question, "is_impossible": answer is None,
             "answers": [] if answer is None else [{"text": answer, "answer_start": context.index(answer)}],
             **({"plausible_answers": [{"text": "x", "answer_start": 0}]} if answer is None else {})}
            for qid, question, answer in qas]} for context, qas in paragraphs]}
        for title, paragraphs in articles]}


LONG = ("the movie was good and the food was bad but the staff was friendly . " * 6
        + "the phone battery was excellent and the screen was broken .")
TRAIN = [("Films", [
    ("the movie was good but the service was slow", [
        ("t1", "what was good", "the movie"), ("t2", "what was slow", "the service"), ("t3", "who was rude", None)]),
    (LONG, [("t4", "what was excellent", "phone battery"), ("t5", "what was broken", "screen"),
            ("t6", "was the room fine", None)]),
])]
DEV = [("Phones", [
    ("the phone was great and the battery was poor", [
        ("d1", "what was great", "the phone"), ("d2", "what was poor", "battery"), ("d3", "was the food good", None)]),
    (LONG, [("d4", "what was excellent", "phone battery"), ("d5", "who was quick", None)]),
])]


@pytest.fixture
def squad_dir(tmp_path):
    root = tmp_path / "squad2"
    root.mkdir()
    (root / "train-v2.0.json").write_text(json.dumps(squad_json(TRAIN)))
    (root / "dev-v2.0.json").write_text(json.dumps(squad_json(DEV)))
    return root


def squad_task(**task):
    return build_task(fill_defaults({"task": {"name": "squad_v2", **task}}, recipe_schema())["task"])


def test_official_json_maps_to_the_hub_features(squad_dir):
    splits = squad_task(data_dir=str(squad_dir)).load_splits()
    assert len(splits["train"]) == 6 and len(splits["validation"]) == 5
    first = splits["train"][0]
    assert first == {"id": "t1", "title": "Films", "context": "the movie was good but the service was slow",
                     "question": "what was good", "answers": {"text": ["the movie"], "answer_start": [0]}}
    assert splits["train"][2]["answers"] == {"text": [], "answer_start": []}  # is_impossible
    assert squad_task(data_dir=str(squad_dir)).count_train_examples() == 6
    assert squad_task().count_train_examples() == 130_319  # the hub's train split, counted offline


def test_bad_json_names_the_file_and_the_place(tmp_path):
    path = tmp_path / "train-v2.0.json"
    path.write_text('{"data": [\n  {"title": "x",}\n]}')
    with pytest.raises(DataError, match=r"train-v2.0.json:2:\d+: not valid JSON"):
        read_squad_json(path)
    doc = squad_json(TRAIN)
    doc["data"][0]["paragraphs"][1]["qas"][0]["answers"][0]["answer_start"] = 10_000
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"data\[0\]\.paragraphs\[1\]\.qas\[0\] \(id t4\)\.answers\[0\]: answer_start"):
        read_squad_json(path)
    del doc["data"][0]["paragraphs"][0]["qas"][1]["question"]
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"qas\[1\] \(id t2\): missing 'question'"):
        read_squad_json(path)
    with pytest.raises(DataError, match="task.data_dir should hold train-v2.0.json, dev-v2.0.json"):
        read_squad_json(tmp_path / "nowhere.json")


def test_malformed_squad_files_are_named_precisely(tmp_path):
    """Wrong types, a repeated question id (answers are scored by id), non-UTF-8 bytes,
    a directory: one clear error each."""
    path = tmp_path / "train-v2.0.json"

    def fails(doc, match):
        path.write_text(json.dumps(doc))
        with pytest.raises(DataError, match=match):
            read_squad_json(path)

    fails({"version": "v2.0"}, r'expected the SQuAD 2.0 layout \{"version": ..., "data": \[articles\]\}')
    fails({"data": [5]}, r"data\[0\]: missing 'paragraphs' \(not the SQuAD 2.0 layout\)")
    doc = squad_json(TRAIN)
    doc["data"][0]["title"] = 7
    fails(doc, r"data\[0\]\.title: expected str, got int")
    doc = squad_json(TRAIN)
    doc["data"][0]["paragraphs"][0]["qas"][2]["is_impossible"] = "yes"
    fails(doc, r"qas\[2\] \(id t3\)\.is_impossible: expected bool, got str")
    doc = squad_json(TRAIN)
    doc["data"][0]["paragraphs"][1]["qas"][0]["id"] = "t1"
    fails(doc, r"data\[0\]\.paragraphs\[1\]\.qas\[0\]: question id 't1' again \(first at .*data\[0\]\.paragraphs\[0\]"
               r"\.qas\[0\]\); every question needs its own id")
    path.write_bytes(b'{"data": [\n  {"title": "caf\xe9"}]}')
    with pytest.raises(DataError, match=r"train-v2.0.json:2:17: not UTF-8 \(byte 0xe9\)"):
        read_squad_json(path)
    path.unlink()
    path.mkdir()
    with pytest.raises(DataError, match=r"train-v2.0.json is a directory; expected a data file"):
        read_squad_json(path)


def test_the_hub_unreachable_is_a_clear_error(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot load SQuAD 2.0 from 'someone/squad-not-cached-here'.*task.data_dir"):
        squad_task(dataset="someone/squad-not-cached-here").load_splits()


def test_long_contexts_split_with_stride_and_answers_map_back(squad_dir, tiny_bert):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    task = squad_task(data_dir=str(squad_dir), max_length=32, doc_stride=8)
    splits = task.load_splits()
    features = task.tokenize(splits, tokenizer)
    train, dev = features["train"], features["validation"]
    assert len(train) > len(splits["train"]) + 4  # the long context gives several windows per question
    assert set(train.column_names) == {"input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions"}
    # Every evaluation window of the long context, and each one's answer span where it has one.
    windows = [i for i, e in enumerate(dev["example_index"]) if e == 3]
    assert len(windows) >= 4 and all(len(dev[i]["input_ids"]) <= 32 for i in windows)
    labelled = 0
    for i in windows:
        row = dev[i]
        start, end = row["start_positions"], row["end_positions"]
        if start == row["cls_index"]:  # this window does not hold the whole answer
            continue
        labelled += 1
        assert LONG[row["offset_start"][start]:row["offset_end"][end]] == "phone battery"
    # The answer is near the end: the last windows (overlapping) hold it, the others point at [CLS].
    assert 1 <= labelled <= 2 and len(windows) - labelled >= 3
    # Consecutive windows share doc_stride context tokens.
    ctx = [[o for o in zip(dev[i]["offset_start"], dev[i]["offset_end"]) if o != NO_OFFSET] for i in windows[:2]]
    assert ctx[0][-8:] == ctx[1][:8]
    # Gold logits on the features give back the gold answers, and a perfect score.
    starts, ends = [], []
    for row in dev:
        s, e = np.full(len(row["input_ids"]), -5.0), np.full(len(row["input_ids"]), -5.0)
        s[row["start_positions"]] += 10.0
        e[row["end_positions"]] += 10.0
        starts.append(s)
        ends.append(e)
    scores = task.score(splits["validation"], dev, starts, ends)
    assert scores["exact"] == scores["f1"] == scores["HasAns_f1"] == scores["NoAns_f1"] == 1.0
    # Batches pad on the right whatever the tokenizer's side: span labels stay token positions.
    tokenizer.padding_side = "left"
    assert len(dev[windows[0]]["input_ids"]) == 32 > len(dev[0]["input_ids"])
    batch = task.collator(tokenizer)([dev[windows[0]], dev[0]])
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions"}
    short = len(dev[0]["input_ids"])
    assert batch["input_ids"][1, :short].tolist() == dev[0]["input_ids"] and batch["attention_mask"][1, short:].sum() == 0
    assert batch["start_positions"].tolist() == [dev[windows[0]]["start_positions"], dev[0]["start_positions"]]


def test_a_question_too_long_for_the_windows_is_a_clear_error(tiny_bert):
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    task = squad_task(max_length=16, doc_stride=8)  # [CLS] q [SEP] context [SEP]: 13 - len(q) context tokens

    def split(question):
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({
            "id": ["q"], "question": [question], "context": ["the movie was good " * 10],
            "answers": [{"text": [], "answer_start": []}]})})

    assert len(task.tokenize(split("the movie was good"), tokenizer)["train"]) > 1  # 9 context tokens: fine
    with pytest.raises(DataError, match="train question q: 5 tokens leave 8 context tokens per window"):
        task.tokenize(split("the movie was good and"), tokenizer)


# ---------------------------------------------------------------- recipes and runs


def test_validate_accepts_the_recipes_and_rejects_a_stride_too_long(make_recipe):
    result = CliRunner().invoke(app, ["validate", *(str(REPO / "recipes" / f"triadaptlora_deberta_squad2{m}.yaml")
                                                     for m in ("", "_nonlinear", "_fixed_k"))])
    assert result.exit_code == 0, result.output
    bad = make_recipe("""
        name: bad
        backbone: {name: microsoft/deberta-v3-base}
        targets: [Wq]
        method: {name: lora}
        task: {name: squad_v2, max_length: 128, doc_stride: 128}
        """)
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code != 0
    assert "recipe.yaml:5" in result.output and "doc_stride (128) must be smaller than max_length (128)" in result.output


def test_recipe_matches_table_vi(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(DEBERTA_V3_BASE))
    for mode in ("linear", "nonlinear", "fixed_k"):
        name = "triadaptlora_deberta_squad2" + ("" if mode == "linear" else f"_{mode}") + ".yaml"
        run = inspect_recipe(name, f"backbone.name={tmp_path}")["squad_v2"]
        assert run["method"]["growth"] == mode
    m, t = run["method"], run["training"]
    assert (t["batch_size"], t["epochs"], t["learning_rate"], t["warmup_steps"]) == (16, 14, 1e-3, 1000)
    assert (m["grow_by"], m["t_init"], m["grow_interval"], m["r"], m["r_ref"]) == (1, 1000, 1000, 1, 8)
    assert (m["alpha"], m["dropout"], m["orth_reg"]) == (16, 0.1, 0.1)
    assert (run["task_config"]["max_length"], run["task_config"]["doc_stride"]) == (384, 128)
    assert run["train_examples"] == 130_319 and run["steps"] == 14 * 8_145  # ⌈130,319 / 16⌉ per epoch
    assert run["head"] == ["qa_outputs.weight", "qa_outputs.bias"]  # the span head is trained
    assert run["adapter_params"] == 166_032  # rank 1 in all 72 modules at the start


@pytest.mark.slow
def test_squad_runs_end_to_end(tmp_path, make_recipe, tiny_bert, squad_dir):
    recipe = make_recipe(f"""
        name: squad-tiny
        backbone: {{name: {tiny_bert}}}
        targets: [Wq, Wv]
        method: {{name: lora, r: 2, alpha: 4}}
        task: {{name: squad_v2, data_dir: {squad_dir}, max_length: 32, doc_stride: 8}}
        training: {{epochs: 2, batch_size: 4, learning_rate: 1e-2}}
        """)
    result = CliRunner().invoke(app, ["run", str(recipe), "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    evaluation = metrics["last"]["eval"]
    assert metrics["metric"] == "f1" and 0.0 <= metrics["best"]["value"] <= 1.0  # f1 selects the checkpoint
    assert {"exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_exact", "best_f1",
            "loss"} <= set(evaluation)
    assert all(0.0 <= evaluation[k] <= 1.0 for k in ("exact", "f1", "best_f1"))
    assert evaluation["best_f1"] >= evaluation["f1"] - 1e-9  # the sweep includes the threshold used
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "completed" and report["train_examples"] > 6  # features, not questions
    assert {f["role"]: f["path"] for f in report["data"]["files"]} == {  # the files it read, fingerprinted
        "train": str((squad_dir / "train-v2.0.json").resolve()), "validation": str((squad_dir / "dev-v2.0.json").resolve())}
    from safetensors.torch import load_file

    head = load_file(str(tmp_path / "run" / "adapter" / "head.safetensors"))
    assert set(head) == {"qa_outputs.weight", "qa_outputs.bias"}
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "outputs_validation.jsonl").read_text().splitlines()]
    dev = read_squad_json(squad_dir / "dev-v2.0.json")
    assert [r["id"] for r in rows] == dev["id"]  # the selected checkpoint's answers, one per question
    rescored = squad_v2_scores({r["id"]: r["prediction"] for r in rows},
                               {q: a["text"] for q, a in zip(dev["id"], dev["answers"])})
    assert rescored["f1"] == pytest.approx(metrics["best"]["value"])
    merged = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--merge", "--out", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output  # the span head and adapter fold into a plain QA checkpoint
    info = json.loads((tmp_path / "merged" / "lrr_export.json").read_text())
    assert info["max_abs_logit_diff"] <= 1e-3
