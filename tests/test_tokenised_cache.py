"""Tokenise once: the tokenised splits are datasets' cache files, keyed by the data, the
tokenizer and the task's settings, so another process (a parallel child, a later command,
a search's next trial) reads them instead of tokenising again, and lrr says so; within one
command the next run of the same task reuses the previous run's splits."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from tests.conftest import tiny_recipe_text

REPO = Path(__file__).resolve().parent.parent


def run(recipe: Path, out: Path, *sets: str) -> str:
    cmd = [sys.executable, "-m", "lowrank_runner", "run", str(recipe), "--output", str(out), "--set", "training.epochs=1"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def data_line(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("loading and tokenising the data:"))


def test_a_second_process_reads_the_tokenised_splits_and_says_so(tmp_path, tiny_bert, sentiment_data):
    train, validation = sentiment_data
    fresh = tmp_path / "train.jsonl"  # data no earlier test tokenised: the first command must tokenise it
    fresh.write_text(train.read_text() + f'{{"text": "{uuid.uuid4().hex}", "label": "positive"}}\n')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe_text(tiny_bert, (fresh, validation)))
    first = data_line(run(recipe, tmp_path / "first"))
    assert "datasets cache" not in first, first
    second = data_line(run(recipe, tmp_path / "second", "task.max_length=12"))  # other settings: tokenised again
    assert "datasets cache" not in second, second
    third = data_line(run(recipe, tmp_path / "third"))
    assert "(tokenised splits from the datasets cache, " in third, third


def test_the_runs_of_one_command_share_the_tokenised_splits(tmp_path, tiny_bert, sentiment_data):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe_text(tiny_bert, sentiment_data).replace("seed: 0", "seed: [0, 1]"))
    lines = [ln for ln in run(recipe, tmp_path / "out").splitlines() if ln.startswith("loading and tokenising the data:")]
    assert len(lines) == 2 and "(the tokenised splits of the previous run)" in lines[1], lines
