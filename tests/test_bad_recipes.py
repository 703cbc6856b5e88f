"""The corpus of bad recipes: each file lists, in `# expect:` lines, exactly the messages
`lrr validate` must print for it ({file}, {dir}, {cwd} and {methods} are filled in)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowrank_runner.methods.registry import method_specs
from lowrank_runner.recipe.load import check_recipe_file

CORPUS = Path(__file__).parent / "bad_recipes"
CASES = sorted(p for p in CORPUS.glob("*.yaml") if not p.name.startswith("_"))


def expected(path: Path) -> list[str]:
    lines = [ln[len("# expect: "):] for ln in path.read_text().splitlines() if ln.startswith("# expect: ")]
    methods = ", ".join(sorted(method_specs()))  # built-ins and any installed plugin
    return [ln.format(file=path, dir=path.parent, cwd=Path.cwd(), methods=methods) for ln in lines]


def test_corpus_is_not_empty():
    assert len(CASES) >= 10


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_exact_messages(path):
    want = expected(path)
    assert want, f"{path.name} has no '# expect:' line"
    assert sorted(str(p) for p in check_recipe_file(path)) == sorted(want)


def test_cli_prints_every_problem_and_exits_1():
    path = CORPUS / "unknown_task_and_enum.yaml"
    proc = subprocess.run([sys.executable, "-m", "lowrank_runner", "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == expected(path)
    assert "0 valid, 1 invalid" in proc.stderr


def test_cli_json_lists_problems_with_positions():
    path = CORPUS / "unknown_key_typo.yaml"
    proc = subprocess.run([sys.executable, "-m", "lowrank_runner", "validate", "--json", str(path)], capture_output=True, text=True)
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["valid"] is False
    (problem,) = out["files"][0]["problems"]
    assert problem == {"file": str(path), "line": 9, "column": 3, "path": "training.learnin_rate",
                       "message": "unknown key 'learnin_rate' (did you mean 'learning_rate'?)", "severity": "error"}


def test_cli_validates_a_directory_skipping_partials():
    proc = subprocess.run([sys.executable, "-m", "lowrank_runner", "validate", "--json", str(CORPUS)], capture_output=True, text=True)
    assert proc.returncode == 1
    files = {Path(f["file"]).name for f in json.loads(proc.stdout)["files"]}
    assert files == {p.name for p in CASES}
    assert os.path.basename("_bad_base.yaml") not in files
