"""training.batch_size is the paper's (effective) batch on any number of processes: the
derivation of the per-device batch and accumulation (plan/schedule.py), its errors at
the recipe line, `lrr inspect`, and a real 2-process run against a 1-process one."""

import json
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.plan.schedule import BatchSizeError, batch_plan, plan_steps
from tests.conftest import save_tiny_backbone, tiny_recipe_text

BASE = {"batch_size": 32, "gradient_accumulation_steps": 1, "batch_size_per": "effective",
        "per_device_batch_size": None, "epochs": 1, "max_steps": None, "warmup_steps": 0, "warmup_ratio": 0.0}


def lrr(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.mark.parametrize("over,processes,per_device,accumulation,effective", [
    ({}, 1, 32, 1, 32),
    ({}, 2, 16, 1, 32),
    ({}, 4, 8, 1, 32),
    ({"gradient_accumulation_steps": 2}, 2, 8, 2, 32),  # 32 / (2 x 2)
    ({"per_device_batch_size": 4}, 2, 4, 4, 32),  # the cap: accumulation 32 / (2 x 4)
    ({"per_device_batch_size": 6}, 2, 4, 4, 32),  # 16 per process does not fit 6; 3 does not divide: 4 x 4
    ({"per_device_batch_size": 64}, 2, 16, 1, 32),  # a cap above the batch changes nothing
    ({"batch_size_per": "device"}, 2, 32, 1, 64),  # the per-device meaning: the effective batch grows
    ({"batch_size_per": "device", "gradient_accumulation_steps": 3}, 2, 32, 3, 192),
])
def test_derivation(over, processes, per_device, accumulation, effective):
    plan = batch_plan({**BASE, **over}, processes)
    assert (plan.per_device, plan.accumulation, plan.effective, plan.processes) == (
        per_device, accumulation, effective, processes)
    assert plan.per_device * plan.accumulation * processes == plan.effective


@pytest.mark.parametrize("processes", [1, 2, 4, 8])
def test_steps_per_epoch_do_not_depend_on_the_processes(processes):
    """The paper's schedule: ceil(2490 / 32) = 78 optimizer steps per epoch (RTE), with or
    without a per-device cap."""
    assert plan_steps(2490, BASE, processes).steps_per_epoch == 78
    assert plan_steps(2490, {**BASE, "per_device_batch_size": 2}, processes).steps_per_epoch == 78
    assert plan_steps(2490, {**BASE, "batch_size_per": "device"}, processes).steps_per_epoch == -(-2490 // (32 * processes))


@pytest.mark.parametrize("over,processes,key,says", [
    ({"batch_size": 30}, 4, "training.batch_size",
     "the effective batch of 30 examples cannot be split evenly over 4 processes x 1 accumulation step(s); choose a "
     "batch_size divisible by 4 (28 or 32), or 2, 3 or 5 processes"),
    ({"gradient_accumulation_steps": 3}, 2, "training.batch_size",
     "choose a batch_size divisible by 6 (30 or 36), or gradient_accumulation_steps 1, 2 or 4"),
    ({"batch_size": 30, "per_device_batch_size": 8}, 4, "training.batch_size",
     "cannot be split evenly over 4 processes; choose a batch_size divisible by 4 (28 or 32), or 2, 3 or 5 processes"),
    ({"per_device_batch_size": 8, "gradient_accumulation_steps": 2}, 1, "training.per_device_batch_size",
     "cannot be set together with gradient_accumulation_steps (2); remove one of them"),
    ({"per_device_batch_size": 8, "batch_size_per": "device"}, 1, "training.per_device_batch_size",
     "only with batch_size_per: effective"),
])
def test_errors_name_the_key_and_the_nearest_valid_choices(over, processes, key, says):
    with pytest.raises(BatchSizeError) as exc:
        batch_plan({**BASE, **over}, processes)
    assert exc.value.key == key and str(exc.value).startswith(key + ": ") and says in str(exc.value)


def _value_at(recipe, text: str) -> str:
    """FILE:LINE:COL of ``text`` in the recipe (1-based)."""
    for number, line in enumerate(recipe.read_text().splitlines(), 1):
        if text in line:
            return f"{recipe}:{number}:{line.index(text) + 1 + len(text)}"
    raise AssertionError(text)


def test_inspect_shows_the_batch_and_names_the_recipe_line(tiny_recipe, monkeypatch):
    recipe = tiny_recipe()  # 96 examples, batch_size 16, 2 epochs
    code, out = lrr("inspect", recipe, "--processes", "2")
    assert code == 0, out
    assert "batch 16 per optimizer step = 8 per device x 1 accumulation x 2 processes" in " ".join(out.split())
    code, out = lrr("inspect", recipe, "--processes", "2", "--json")
    run = json.loads(out)["runs"][0]
    assert run["batch"] == {"effective": 16, "per_device": 8, "accumulation": 1, "processes": 2,
                            "batch_size_per": "effective"}
    assert run["steps"] == 12 and run["training"]["processes"] == 2  # 96 / 16 x 2 epochs, as on one process
    monkeypatch.setenv("WORLD_SIZE", "3")  # what `accelerate launch --num_processes 3` sets
    code, out = lrr("inspect", recipe)
    assert code == 1
    assert out.startswith(f"error: {_value_at(recipe, 'batch_size: ')}: training.batch_size: the effective batch of 16 "
                          "examples cannot be split evenly over 3 processes"), out
    assert "divisible by 3 (15 or 18)" in out and "Traceback" not in out
    code, out = lrr("inspect", recipe, "--processes", "4", "--set", "training.per_device_batch_size=2", "--json")
    assert json.loads(out)["runs"][0]["batch"]["accumulation"] == 2 and json.loads(out)["runs"][0]["steps"] == 12


def _report(run_dir):
    return json.loads((run_dir / "report.json").read_text())


def _losses(run_dir) -> dict[int, float]:
    lines = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {ln["step"]: ln["loss"] for ln in lines if "loss" in ln}


@pytest.fixture(scope="module")
def no_dropout(tmp_path_factory, sentiment_data):
    """The tiny BERT without dropout (LoRA's default is none), so runs that train on the same
    examples per optimizer step compute the same steps, and one run of it on one process:
    batch 16, one epoch of 96 examples."""
    root = tmp_path_factory.mktemp("batch")
    backbone = save_tiny_backbone(root / "bert", "bert")
    config = json.loads((backbone / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (backbone / "config.json").write_text(json.dumps(config))
    recipe = root / "recipe.yaml"
    recipe.write_text(textwrap.dedent(tiny_recipe_text(backbone, sentiment_data)).lstrip())
    code, out = lrr("run", recipe, "--output", root / "one", *SETS)
    assert code == 0, out
    return recipe, root / "one"


SETS = ["--set", "training.epochs=1", "--set", "training.eval_every=null"]


@pytest.mark.slow
def test_two_processes_keep_the_effective_batch(no_dropout, tmp_path):
    """A real 2-process run (torchrun, what `accelerate launch --num_processes 2` starts;
    gloo on CPU) trains the recipe's batch of 16 as 8 per process: the same optimizer steps
    on the same examples as the 1-process run (the same losses), recorded in report.json
    and report.md."""
    recipe, one = no_dropout
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lowrank_runner", "run",
         str(recipe), "--output", str(tmp_path / "two"), *SETS],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _report(one), _report(tmp_path / "two")
    assert b["environment"]["hardware"]["num_processes"] == 2
    assert a["steps"] == b["steps"] and b["steps"]["per_epoch"] == 6  # 96 examples / 16 per optimizer step
    assert a["batch"] == {"effective": 16, "per_device": 16, "accumulation": 1, "processes": 1,
                          "batch_size_per": "effective"}
    assert b["batch"] == {"effective": 16, "per_device": 8, "accumulation": 1, "processes": 2,
                          "batch_size_per": "effective"}
    assert "batch 16 per optimizer step = 8 per device x 1 accumulation x 2 process(es)" in (
        tmp_path / "two" / "report.md").read_text()
    la, lb = _losses(one), _losses(tmp_path / "two")
    assert list(la) == list(lb) == [2, 4, 6]
    assert list(lb.values()) == pytest.approx(list(la.values()), rel=1e-4)  # 16 per process would differ
    assert b["final_eval"] == pytest.approx(a["final_eval"], rel=1e-4)


def test_a_per_device_cap_accumulates_the_same_batch(no_dropout, tmp_path):
    """per_device_batch_size: 4 on one process: 4 examples per forward pass, 4 passes per
    optimizer step: the same steps and losses as 16 at once."""
    recipe, one = no_dropout
    code, out = lrr("run", recipe, "--output", tmp_path / "capped", *SETS, "--set", "training.per_device_batch_size=4")
    assert code == 0, out
    report = _report(tmp_path / "capped")
    assert report["batch"] == {"effective": 16, "per_device": 4, "accumulation": 4, "processes": 1,
                               "batch_size_per": "effective"}
    assert report["steps"] == _report(one)["steps"]
    assert list(_losses(tmp_path / "capped").values()) == pytest.approx(list(_losses(one).values()), rel=1e-4)
