"""Every built-in method trains on the shipped quickstart (real MiniLM-L6, real sentences)
when switched with --set method.name=... (the inserted modules and the prefix with their own
method mapping and targets: one real run each); LoRA itself runs the full recipe in
test_quickstart.py. Two epochs (100 steps) at the recipe's learning rate, each method at its
documented start (docs/methods.md, "On the quickstart"): what issue 16 asks, that every
method learns at a short budget. CPU runs are deterministic, so the thresholds do not flake.
Each method's ``lrr export --peft`` is served by plain PEFT in tests/test_peft_export.py (tiny
models of five families, exact), and the quickstart's in tests/test_quickstart.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peft_check import check_plain_peft_serves_the_run

REPO = Path(__file__).resolve().parent.parent

# The per-method settings documented in docs/methods.md ("On the quickstart").
METHODS = {
    "mtlora": [],
    "lora2": ["method.init=orthonormal"],  # the paper's Gaussian start needs ~5x the lr here (docs/methods.md)
    "triadaptlora": ["method.init=fan_in", "method.r=1", "method.r_ref=8", "method.grow_by=1", "method.t_init=10",
                     "method.grow_interval=10"],  # adaptive growth from rank 1 to 8 x 36 modules
    "condlora": [],
    "increlora": ["method.r=1", "method.target_rank=8", "method.incre_rank_num=4", "method.top_h=8",
                  "method.init_warmup=5", "method.incre_interval=10",  # rank 1 to 8 x 36 modules by step 81
                  "training.learning_rate=1e-2"],  # E starts at 0 (as AdaLoRA's): the larger step size
    "sora": [],  # the authors' GLUE settings (threshold 3e-4, L1 weight 10) zero about an eighth of the gates here
    # the other kinds replace the method mapping (and its targets)
    "houlsby": ["~method", "method={name: houlsby, bottleneck: 32}", "targets=[Wa, Wo]"],
    "pfeiffer": ["~method", "method={name: pfeiffer, bottleneck: 64}", "targets=[Wo]"],
    "prefix": ["~method", "method={name: prefix, prefix_length: 10}", "~targets", "training.epochs=4",
               "training.learning_rate=5e-4"],  # its documented ceiling with the MLP; it learns slowly (docs/methods.md)
}
BAR = {"prefix": 0.65}  # 0.715 measured at 200 steps, still rising; the others reach 0.70 (chance: 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_on_the_quickstart(method, tmp_path):
    replaced = METHODS[method][:1] == ["~method"]
    sets = [*([] if replaced else [f"method.name={method}"]), "training.epochs=2", *METHODS[method]]
    cmd = [sys.executable, "-m", "lowrank_runner", "run", "recipes/quickstart.yaml", "--output", str(tmp_path / "run")]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["best"]["value"] >= BAR.get(method, 0.70), metrics["best"]  # balanced binary: chance is 0.5
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["method"]["name"] == method and report["adapter_params"] > 0
    if method in ("triadaptlora", "increlora"):
        assert sum(json.loads((tmp_path / "run" / "rank_pattern.json").read_text()).values()) == 8 * 36
    if method == "sora":  # learns with ranks dropped, and the pruned adapter is served by plain PEFT
        assert sum(json.loads((tmp_path / "run" / "rank_pattern.json").read_text()).values()) < 8 * 36
        check_plain_peft_serves_the_run(tmp_path / "run", tmp_path)
