"""Checkpoints and ``lrr run --resume``: an interrupted run, continued, ends exactly where
an uninterrupted one does (deterministic CPU settings), rank allocators included."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lowrank_runner.cli import app

METHODS = {
    "triadaptlora": "method={name: triadaptlora, r: 1, r_ref: 3, grow_by: 1, t_init: 2, grow_interval: 2, alpha: 8}",
    "lora2": "method={name: lora2, r: 4, k: 2, alpha: 8, target_rank: 1, t_init: 2, t_final: 4, mask_interval: 2}",
    # stopped after step 5, between the growth steps 3, 5 and 7 (reserves trained ahead, restarted warm-ups)
    "increlora": "method={name: increlora, r: 1, target_rank: 3, top_h: 3, incre_rank_num: 1, init_warmup: 1, "
                 "incre_interval: 2, alpha: 8}",
}
COMMON = ["training.epochs=3", "training.log_every=1", "training.eval_every=3", "training.checkpoint_every=2",
          "task.max_length=16"]


def lrr(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def run_args(recipe, out, method):
    args = ["run", recipe, "--output", out, "--set", METHODS[method]]
    for s in COMMON:
        args += ["--set", s]
    return args


def run_outputs(out):
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return (lines, json.loads((out / "rank_pattern.json").read_text()), json.loads((out / "metrics.json").read_text()),
            load_file(str(out / "adapter" / "adapter.safetensors")))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path, tiny_recipe, method):
    recipe = tiny_recipe()
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert lrr(*run_args(recipe, whole, method)).exit_code == 0
    stopped = lrr(*run_args(recipe, parts, method), "--stop-after-step", 5)
    assert stopped.exit_code == 0, stopped.output
    assert "stopped" in stopped.output and "--resume" in stopped.output
    assert not (parts / "adapter").exists() and (parts / "checkpoints" / "step-000005").is_dir()
    assert [p.name for p in (parts / "checkpoints").iterdir()] == ["step-000005"]  # checkpoints_kept: 1
    resumed = lrr(*run_args(recipe, parts, method), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output
    a_lines, a_pattern, a_metrics, a_adapter = run_outputs(whole)
    b_lines, b_pattern, b_metrics, b_adapter = run_outputs(parts)
    assert b_lines == a_lines  # every logged loss, lr, budget, rank total and eval, bit for bit
    assert b_pattern == a_pattern and b_metrics == a_metrics
    assert a_adapter.keys() == b_adapter.keys() and all(torch.equal(a_adapter[k], b_adapter[k]) for k in a_adapter)


def test_resume_refuses_a_changed_recipe_and_needs_a_run_directory(tmp_path, tiny_recipe):
    recipe = tiny_recipe()
    out = tmp_path / "run"
    assert lrr(*run_args(recipe, out, "lora2"), "--stop-after-step", 2).exit_code == 0
    changed = lrr(*run_args(recipe, out, "lora2"), "--set", "training.learning_rate=5e-3", "--resume")
    assert changed.exit_code != 0 and "different recipe" in changed.output
    missing = lrr("run", recipe, "--resume")
    assert missing.exit_code == 2 and "--output RUN_DIR" in missing.output


def test_an_unfinished_checkpoint_is_ignored_and_a_completed_run_is_kept(tmp_path, tiny_recipe):
    recipe = tiny_recipe()
    out = tmp_path / "run"
    assert lrr(*run_args(recipe, out, "lora2"), "--stop-after-step", 4).exit_code == 0
    (out / "checkpoints" / "step-000006.tmp").mkdir()  # a write cut short by a kill
    (out / "checkpoints" / "step-000006.tmp" / "state.json").write_text("{")
    resumed = lrr(*run_args(recipe, out, "lora2"), "--resume")
    assert resumed.exit_code == 0 and "step 4" in resumed.output, resumed.output
    again = lrr(*run_args(recipe, out, "lora2"), "--resume")
    assert again.exit_code == 0 and "already completed" in again.output


def torchrun(*args, timeout=300):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lowrank_runner", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.slow
def test_two_processes_stop_and_resume_like_an_uninterrupted_run(tmp_path, tiny_recipe):
    """torchrun with 2 gloo processes: one RNG file per process, the default run directory
    chosen by rank 0 and shared with rank 1, and the resumed run equal to an uninterrupted one."""
    recipe = tiny_recipe()
    args = run_args(recipe, tmp_path / "whole", "lora2")
    torchrun(*args)
    stopped = torchrun(*[a for a in args if a not in ("--output", tmp_path / "whole")],
                       "--set", f"output.dir={tmp_path / 'default'}", "--stop-after-step", 4)
    (parts,) = (tmp_path / "default" / "tiny").iterdir()  # one directory for both processes
    assert sorted(p.name for p in (parts / "checkpoints" / "step-000004").iterdir()) == [
        "method.safetensors", "optimizer.safetensors", "rng-0.safetensors", "rng-1.safetensors",
        "scheduler.safetensors", "state.json", "trainable.safetensors"]
    assert f"--output {parts} --resume  (launched as before, with 2 processes)" in stopped
    resumed = torchrun("run", recipe, "--output", parts, "--resume")  # the run's --set overrides are reused
    assert resumed.count("resuming classification-seed0") == 1
    a_lines, a_pattern, a_metrics, a_adapter = run_outputs(tmp_path / "whole")
    b_lines, b_pattern, b_metrics, b_adapter = run_outputs(parts)
    assert b_lines == a_lines and b_pattern == a_pattern and b_metrics == a_metrics
    assert all(torch.equal(a_adapter[k], b_adapter[k]) for k in a_adapter)


def test_ctrl_c_while_a_run_writes_its_results_leaves_it_resumable(tmp_path, tiny_recipe, monkeypatch):
    """Interrupted after metrics.json and adapter/ but before report.json (which marks a run
    completed), the run was neither complete nor resumable; now it resumes from its last
    checkpoint and completes."""
    import lowrank_runner.train.loop as loop

    real = loop.write_run_report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "write_run_report", interrupted)
    out = tmp_path / "run"
    args = ["run", tiny_recipe(), "--output", out, "--set", "training.checkpoint_every=2", "--set", "training.epochs=1"]
    result = lrr(*args)
    assert result.exit_code == 130, result.output
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()
    assert json.loads((out / "report.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(loop, "write_run_report", real)
    resumed = lrr(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "report.json").read_text())["status"] == "completed"
    assert (out / "adapter" / "adapter.safetensors").is_file() and not (out / "checkpoints").exists()


def test_ctrl_c_in_a_multi_run_recipe_keeps_what_finished_in_its_summary(tmp_path, tiny_recipe, monkeypatch):
    """summary.json and the tables are written at Ctrl-C too (they were not, so `lrr report
    --table` called the directory not a recipe's output)."""
    import lowrank_runner.train.invocation as runner

    real, calls = runner._train, []

    def interrupted_second(batch, run, run_dir, checkpoint):
        calls.append(run.seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(batch, run, run_dir, checkpoint)

    monkeypatch.setattr(runner, "_train", interrupted_second)
    out = tmp_path / "multi"
    args = ["run", tiny_recipe(), "--output", out, "--set", "training.seed=[0,1]", "--set", "training.epochs=1"]
    assert lrr(*args).exit_code == 130
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["seed"], r["status"]) for r in summary["runs"]] == [(0, "completed"), (1, "interrupted")]
    assert "*" in (out / "results.md").read_text()  # seed 1 missing
    monkeypatch.setattr(runner, "_train", real)
    resumed = lrr(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert [r["status"] for r in json.loads((out / "summary.json").read_text())["runs"]] == ["completed", "completed"]


def test_resume_with_a_stop_step_already_passed_is_refused(tmp_path, tiny_recipe):
    out = tmp_path / "run"
    args = ["run", tiny_recipe(), "--output", out, "--set", "training.epochs=1"]
    assert lrr(*args, "--stop-after-step", 3).exit_code == 0
    refused = lrr(*args, "--resume", "--stop-after-step", 2)
    assert refused.exit_code == 2
    assert ("--stop-after-step 2: run classification-seed0 resumes from step 3, already past it; give a later step, "
            "or drop --stop-after-step") in refused.output
