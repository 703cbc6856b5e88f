"""``training.early_stopping``: HF EarlyStoppingCallback's decisions, a run that stops and
finishes as completed (saying where and why), and a resumed run that stops where the
uninterrupted one does."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.train.stopping import EarlyStopping
from tests.conftest import tiny_recipe_text


def hf_stop_step(values, patience, threshold, greater):
    """Where transformers' own EarlyStoppingCallback stops, fed as the Trainer feeds it
    (state.best_metric updated after the callback saw the evaluation)."""
    from transformers import EarlyStoppingCallback, TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir="unused", metric_for_best_model="m", greater_is_better=greater,
                             load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps", report_to=[])
    callback, state, control = EarlyStoppingCallback(patience, threshold), TrainerState(), TrainerControl()
    for i, value in enumerate(values):
        callback.on_evaluate(args, state, control, metrics={"eval_m": value})
        if state.best_metric is None or (value > state.best_metric if greater else value < state.best_metric):
            state.best_metric = value
        if control.should_training_stop:
            return i
    return None


def our_stop_step(values, patience, threshold, greater):
    stopping = EarlyStopping(patience, threshold, greater, "m")
    for i, value in enumerate(values):
        if stopping.after_evaluation(i, value) is not None:
            return i
    return None


@pytest.mark.parametrize("values, patience, threshold, greater", [
    ([0.5, 0.6, 0.6, 0.6, 0.7], 2, 0.0, True),
    ([0.5, 0.6, 0.605, 0.61, 0.612, 0.613], 2, 0.01, True),   # small gains do not reset the count
    ([0.5, 0.6, 0.59, 0.62, 0.61, 0.60], 2, 0.0, True),
    ([1.0, 0.9, 0.95, 0.85, 0.86, 0.87, 0.84], 2, 0.0, False),  # a loss: lower is better
    ([0.5, 0.5, 0.5], 1, 0.0, True),
    ([0.5, 0.4, 0.3, 0.2], 3, 0.0, True),
    ([0.5, 0.7, 0.9], 1, 0.05, True),
])
def test_it_stops_where_hfs_early_stopping_callback_stops(values, patience, threshold, greater):
    assert our_stop_step(values, patience, threshold, greater) == hf_stop_step(values, patience, threshold, greater)


def lrr(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


COMMON = ["--set", "training.epochs=4", "--set", "training.eval_every=2", "--set", "training.checkpoint_every=1",
          "--set", "training.log_every=1"]


@pytest.fixture
def stopping_recipe(tmp_path, tiny_bert, sentiment_data):
    path = tmp_path / "stop.yaml"
    # min_delta 2: no accuracy can improve by that much, so the second evaluation stops the run (patience 1)
    path.write_text(tiny_recipe_text(tiny_bert, sentiment_data) + "\n")
    return path


def test_a_run_stops_early_and_finishes_as_completed(stopping_recipe, tmp_path):
    out = tmp_path / "run"
    code, output = lrr("run", stopping_recipe, "--output", out, *COMMON,
                       "--set", "training.early_stopping={patience: 1, min_delta: 2}")
    assert code == 0, output
    assert "stopped at step 4" in output and "early stopping" in output
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "completed"
    assert report["stopped_early"]["step"] == 4 and report["stopped_early"]["by"] == "early_stopping"
    assert "training.early_stopping" in report["stopped_early"]["reason"]
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4 and (out / "adapter" / "adapter.safetensors").is_file()
    assert "stopped early at step 4" in (out / "report.md").read_text()
    assert not (out / "checkpoints").exists()


def test_a_resumed_run_stops_where_the_uninterrupted_one_does(stopping_recipe, tmp_path):
    setting = ["--set", "training.early_stopping={patience: 2, min_delta: 2}"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    code, output = lrr("run", stopping_recipe, "--output", whole, *COMMON, *setting)
    assert code == 0, output
    code, output = lrr("run", stopping_recipe, "--output", parts, *COMMON, *setting, "--stop-after-step", 3)
    assert code == 0 and "stopped" in output, output
    code, output = lrr("run", stopping_recipe, "--output", parts, *COMMON, *setting, "--resume")
    assert code == 0, output
    assert json.loads((whole / "report.json").read_text())["stopped_early"]["step"] == 6
    assert json.loads((parts / "report.json").read_text())["stopped_early"]["step"] == 6
    assert (parts / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
