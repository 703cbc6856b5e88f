"""The divergence guard (train/divergence.py, ``training.divergence``): a run whose loss
becomes NaN/Inf or explodes stops as failed, naming the step, its learning rate and the
last good checkpoint; the explode rule on synthetic losses; a normal run never trips."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.errors import DivergenceError
from lowrank_runner.train.divergence import DivergenceGuard, ExplodeRule, divergence_settings

RUN = "classification-seed0"


def observe_all(rule: ExplodeRule, losses: list[float]) -> int | None:
    """Feed logged losses (steps 10, 20, ...) to ``rule``; the step at which it stops the run."""
    for i, loss in enumerate(losses, 1):
        if rule.observe(10 * i, loss):
            return 10 * i
    return None


# ------------------------------------------------------------ the explode rule, no training


def test_the_defaults_are_on():
    assert divergence_settings({}) == {"enabled": True, "explode_factor": 10, "window": 5, "patience": 3}
    assert divergence_settings({"divergence": {"patience": 1}})["patience"] == 1


def test_an_explosion_stops_after_patience_lines_and_names_its_first_step():
    rule = ExplodeRule(factor=10, window=5, patience=3)
    losses = [0.70, 0.62, 0.55, 0.50, 0.47, 0.45, 0.44, 6.0, 80.0, 900.0]
    assert observe_all(rule, losses) == 100
    assert [step for step, _, _ in rule.streak] == [80, 90, 100]
    assert rule.baseline() == pytest.approx(0.47)  # the median of the five lines before, not of the explosion


@pytest.mark.parametrize("losses", [
    [9.0, 0.1, 50.0, 0.05, 30.0, 0.6, 0.5, 0.4],  # the noisy first lines: fewer than `window` before them
    [0.7, 0.3, 0.1, 0.05, 0.02, 0.01, 0.01, 0.2, 0.3, 0.25],  # 20x a small loss, below where training started
    [0.7, 0.6, 0.5, 0.5, 0.4, 8.0, 0.4, 9.0, 0.4, 7.0, 0.4],  # spikes, never `patience` in a row
    [2.5, 2.4, 2.3, 2.2, 2.1, 2.0, 2.6, 3.0, 2.9],  # a language model's loss rising a little
])
def test_normal_runs_do_not_trip(losses):
    assert observe_all(ExplodeRule(factor=10, window=5, patience=3), losses) is None


def test_a_run_that_blows_up_at_once_is_caught_against_its_start():
    rule = ExplodeRule(factor=10, window=5, patience=3)
    assert observe_all(rule, [0.69, 2e5, 3e5, 2.5e5]) == 40
    assert rule.streak[0][0] == 20 and rule.baseline_words() == "the first logged loss"


def test_the_rule_resumes_from_its_state():
    """A checkpoint keeps the rule's state (state.json): the resumed rule judges as the
    uninterrupted one, against the run's real start."""
    losses = [0.7, 0.5, 0.3, 0.1, 0.05, 0.02, 0.02, 0.02, 0.3, 0.3, 0.3]  # 15x the recent median, below the start
    whole = ExplodeRule(factor=10, window=3, patience=3)
    assert observe_all(whole, losses) is None
    first, resumed = ExplodeRule(factor=10, window=3, patience=3), ExplodeRule(factor=10, window=3, patience=3)
    observe_all(first, losses[:6])
    resumed.restore(json.loads(json.dumps(first.state())))
    assert observe_all(resumed, losses[6:]) is None and resumed.state() == whole.state()


def test_a_streak_that_ends_starts_over():
    rule = ExplodeRule(factor=10, window=3, patience=2)
    assert observe_all(rule, [0.7, 0.5, 0.4, 9.0, 0.4, 9.0, 0.4]) is None
    assert rule.streak == []


class OneProcess:
    """What the guard asks of an Accelerator, on one process."""

    @staticmethod
    def gather(tensor):
        return tensor


def test_the_first_non_finite_step_is_marked_on_the_device(tmp_path):
    guard = DivergenceGuard({"learning_rate": 5e-3, "max_grad_norm": 1.0}, "cpu", "r.yaml [t, seed 0]", tmp_path)
    window = torch.zeros(())
    for step, loss in [(1, 0.7), (2, 0.6), (3, math.nan), (4, 0.5), (5, math.inf)]:
        window += loss
        guard.after_step(step, window, lr=step * 1e-3)
    guard.check_logged(2, 0.65, OneProcess())  # a finite logged loss passes
    with pytest.raises(DivergenceError) as caught:
        guard.check_logged(5, math.nan, OneProcess())
    assert str(caught.value).startswith("r.yaml [t, seed 0]: training diverged at step 3 (loss nan; lr 3.0e-03): ")
    assert "no checkpoint was written before it; lower training.learning_rate (now 0.005)" in str(caught.value)
    with pytest.raises(DivergenceError, match="at step 3 "):
        guard.check_finite(OneProcess())  # before a checkpoint


# ------------------------------------------------------------ real runs


def run(recipe, out, *sets):
    args = ["run", str(recipe), "--output", str(out)]
    for s in sets:
        args += ["--set", s]
    return CliRunner().invoke(app, args)


def poison_after(monkeypatch, step: int) -> None:
    """After optimizer step ``step``, one adapter weight becomes NaN (a method gone wrong):
    the next step's loss is NaN."""
    from lowrank_runner.train import loop

    real = loop.TrainingRun.optimizer_step

    def optimizer_step(self):
        logs = real(self)
        if self.state.step == step:
            with torch.no_grad():
                next(p for n, p in self.model.named_parameters() if "lora_B" in n).fill_(math.nan)
        return logs

    monkeypatch.setattr(loop.TrainingRun, "optimizer_step", optimizer_step)


def test_a_nan_loss_stops_the_run_naming_step_lr_and_checkpoint(tmp_path, tiny_recipe, monkeypatch):
    poison_after(monkeypatch, 5)
    out = tmp_path / "out"
    result = run(tiny_recipe(), out, "training.checkpoint_every=2", "training.log_every=4")
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())
    found = re.search(r"training diverged at step 6 \(loss nan; lr (\S+)\): the training loss is nan", message)
    assert found, message
    assert found[1] == f"{0.01 * 7 / 12:.1e}"  # linear to 0 over 12 steps, no warmup: step 6 runs at 7/12 of the peak
    assert f"last good checkpoint: step 4 ({out / 'checkpoints' / 'step-000004'})" in message
    assert "lower training.learning_rate (now 0.01)" in message
    assert "to continue from that checkpoint with the same settings: lrr run " in message and "--resume" in message
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed" and "training diverged at step 6" in report["error"]
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines if "loss" in ln] == [4]  # the lines logged before the stop stay
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004"]  # none after (one kept)


def test_an_absurd_learning_rate_stops_the_run(tmp_path, tiny_recipe):
    out = tmp_path / "out"
    result = run(tiny_recipe(), out, "training.learning_rate=1e6", "training.log_every=1")
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())
    # the loss blows up at once: 10x the first logged loss (the explode rule), or NaN/Inf
    assert re.search(r"training diverged at step \d+ \(loss \S+; lr \d\.\de[+-]\d\d\): ", message), message
    assert "lower training.learning_rate (now 1e+06)" in message
    assert json.loads((out / "report.json").read_text())["status"] == "failed"
    assert (out / "metrics.jsonl").is_file()  # kept, with whatever was logged


def test_an_exploding_loss_stops_the_run(tmp_path, tiny_recipe, monkeypatch):
    """The logged loss made to jump 100-fold from step 8: three lines later the run stops."""
    from lowrank_runner.train import loop

    real = loop.TrainingRun.train_step

    def train_step(self, batch, num_items=None):
        extra = real(self, batch, num_items)
        if self.state.step >= 7:  # the forward of step 8 on
            self.state.window_loss *= 100
        return extra

    monkeypatch.setattr(loop.TrainingRun, "train_step", train_step)
    out = tmp_path / "out"
    result = run(tiny_recipe(), out, "training.log_every=1", "training.divergence={window: 3, patience: 3}")
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())
    assert re.search(r"training diverged at step 8 \(loss [\d.]+; lr \d\.\de-\d\d\): the logged training loss "
                     r"exploded: above 10 x [\d.]+ \(the median of the 3 logged losses before\) and above where "
                     r"training started \([\d.]+\) at 3 logged steps in a row \(8, 9, 10\); ", message), message
    assert "raise training.divergence.explode_factor or set training.divergence.enabled: false" in message
    assert "last good checkpoint: step 6" in message  # the end of the first epoch
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert 10 in steps and 11 not in steps
    assert json.loads((out / "report.json").read_text())["status"] == "failed"
    ok = run(tiny_recipe(), tmp_path / "off", "training.log_every=1",
             "training.divergence={enabled: false}")  # the rule off: the run completes
    assert ok.exit_code == 0, ok.output


def test_a_normal_run_does_not_trip(tmp_path, tiny_recipe):
    out = tmp_path / "out"
    result = run(tiny_recipe(), out, "training.log_every=1", "training.divergence={window: 1, patience: 1}")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["status"] == "completed"


POISON_RANK_1 = """
import math, os, sys
import torch
from lowrank_runner.train import loop

real = loop.TrainingRun.optimizer_step


def optimizer_step(self):
    logs = real(self)
    if self.state.step == 5 and os.environ.get("RANK") == "1":  # one process goes wrong, the other does not
        with torch.no_grad():
            next(p for n, p in self.model.named_parameters() if "lora_B" in n).fill_(math.nan)
    return logs


loop.TrainingRun.optimizer_step = optimizer_step
from lowrank_runner.cli import main

sys.argv = ["lrr", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_two_processes_stop_together(tmp_path, tiny_recipe):
    """Under 2 processes (torchrun, gloo on CPU) a NaN on one of them stops both at the
    same step, with the same message; neither is left waiting for the other."""
    import subprocess
    import sys

    script = tmp_path / "poison.py"
    script.write_text(POISON_RANK_1)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), "run",
         str(tiny_recipe()), "--output", str(out), "--set", "training.checkpoint_every=2", "--set",
         "training.log_every=4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    message = " ".join(proc.stderr.split())
    assert "training diverged at step 6 (loss nan; lr " in message, proc.stderr[-3000:]
    assert f"last good checkpoint: step 4 ({out / 'checkpoints' / 'step-000004'})" in message
    assert json.loads((out / "report.json").read_text())["status"] == "failed"
