"""Fixtures of the bad-input corpus: one tiny run trained per test session, and a fresh
copy of it for each case to break."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.bad_inputs.harness import lrr
from tests.conftest import tiny_recipe_text


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_bert, sentiment_data) -> Path:
    """A completed one-epoch LoRA run of the tiny BERT (do not modify: copy it)."""
    root = tmp_path_factory.mktemp("tiny-run")
    recipe = root / "tiny.yaml"
    recipe.write_text(tiny_recipe_text(tiny_bert, sentiment_data).replace("epochs: 2", "epochs: 1"))
    result = lrr("run", recipe, "--output", root / "run")
    assert result.code == 0, result.output
    return root / "run"


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A fresh copy of the tiny run to break (``tmp_path/run``)."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))
