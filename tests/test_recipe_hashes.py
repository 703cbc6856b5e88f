"""The recipe hash and every run's config hash of each shipped recipe, as recorded in
tests/data/recipe_hashes.json before the package was restructured (0.1.0, wave 3).

``--resume`` refuses a run directory whose recorded hashes differ from the recipe's, so a
change to how recipes are composed, defaulted or hashed would strand every run started
before it. A deliberate change to a shipped recipe updates the file in the same commit
(``python tests/test_recipe_hashes.py --write``) and says so in CHANGELOG.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECORDED = Path(__file__).resolve().parent / "data" / "recipe_hashes.json"


def current_hashes() -> dict:
    from lowrank_runner.recipe.load import load_recipe

    out = {}
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        if path.name.startswith("_"):  # partials, extended by the recipes
            continue
        recipe = load_recipe(path)
        out[f"recipes/{path.name}"] = {"hash": recipe.hash, "runs": [[run.slug, run.config_hash] for run in recipe.runs]}
    return out


RECORDED_HASHES = json.loads(RECORDED.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", sorted(RECORDED_HASHES))
def test_shipped_recipes_keep_their_hashes(name, monkeypatch):
    from lowrank_runner.recipe.load import load_recipe

    monkeypatch.chdir(REPO)  # recipes name their files relative to the repository
    recipe = load_recipe(REPO / name)
    assert recipe.hash == RECORDED_HASHES[name]["hash"]
    assert [[run.slug, run.config_hash] for run in recipe.runs] == RECORDED_HASHES[name]["runs"]


def test_every_shipped_recipe_is_recorded(monkeypatch):
    monkeypatch.chdir(REPO)
    assert sorted(current_hashes()) == sorted(RECORDED_HASHES)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import os

    os.chdir(REPO)
    RECORDED.write_text(json.dumps(current_hashes(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
