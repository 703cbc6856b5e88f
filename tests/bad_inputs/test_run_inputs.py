"""Bad inputs to ``lrr run``: run directories (taken, unwritable, odd names, not a run,
another recipe's run), damaged checkpoints, and signals. Each gives one clear line naming
the file and the fix, a non-zero exit, no traceback, and nothing written; refusals come
before any model or data is loaded. Two tiny runs are trained per session (one
completed, one stopped with two checkpoints); each case breaks a copy."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowrank_runner.recipe.load import load_recipe
from tests.bad_inputs.harness import assert_clean_error, lrr, snapshot
from tests.conftest import default_sigint, tiny_recipe_text

STOP_SETS = ["training.checkpoint_every=1", "training.checkpoints_kept=2", "training.learning_rate=5e-3"]


def sets(overrides) -> list[str]:
    return [w for o in overrides for w in ("--set", o)]


@pytest.fixture(scope="session")
def recipe(tmp_path_factory, tiny_bert, sentiment_data) -> Path:
    path = tmp_path_factory.mktemp("run-inputs") / "tiny.yaml"
    path.write_text(tiny_recipe_text(tiny_bert, sentiment_data).replace("epochs: 2", "epochs: 1"))
    return path


@pytest.fixture(scope="session")
def completed(recipe) -> Path:
    out = recipe.parent / "completed"
    result = lrr("run", recipe, "--output", out)
    assert result.code == 0, result.output
    return out


@pytest.fixture(scope="session")
def stopped(recipe) -> tuple[Path, str]:
    """A run stopped after step 2 with checkpoints at steps 1 and 2, and its output."""
    out = recipe.parent / "stopped"
    result = lrr("run", recipe, "--output", out, *sets(STOP_SETS), "--stop-after-step", 2)
    assert result.code == 0, result.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    return out, result.output


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if anything gets as far as loading a model."""
    from lowrank_runner.train import loop

    def train_run(*args, **kwargs):
        raise AssertionError("train_run was called: the bad input was not refused up front")

    monkeypatch.setattr(loop, "train_run", train_run)


def copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


# ------------------------------------------------------------------ new run directories


def test_runs_started_in_the_same_second_get_their_own_directories(recipe, tmp_path, monkeypatch):
    from lowrank_runner.train import run_dirs

    monkeypatch.setattr(run_dirs, "timestamp", lambda: "20260102-030405")  # both start in the same second
    for _ in range(2):
        result = lrr("run", recipe, "--set", f"output.dir={tmp_path}", "--stop-after-step", 1)
        assert result.code == 0, result.output
    runs = tmp_path / "tiny"
    assert sorted(p.name for p in runs.iterdir()) == ["20260102-030405", "20260102-030405-2"]
    assert all((d / "checkpoints" / "step-000001" / "state.json").is_file() for d in runs.iterdir())


def test_output_under_a_file_is_refused_before_loading(recipe, tmp_path, no_training):
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    result = lrr("run", recipe, "--output", tmp_path / "file" / "run")
    assert_clean_error(result, f"--output {tmp_path / 'file' / 'run'}: cannot create the run directory (Not a directory); "
                               f"choose a writable location", code=2)
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_is_refused_before_loading(recipe, tmp_path, no_training):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = lrr("run", recipe, "--output", locked / "run")
        assert_clean_error(result, f"--output {locked / 'run'}: cannot create the run directory (Permission denied); "
                                   f"choose a writable location", code=2)
        empty = lrr("run", recipe, "--output", locked)
        assert_clean_error(empty, f"--output {locked}: cannot write there (Permission denied); choose a writable location",
                           code=2)
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def test_a_failed_run_leaves_no_directory_behind(recipe, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good film", "label": "positive"}\nnot json\n')
    result = lrr("run", recipe, "--output", tmp_path / "a" / "b", "--set", f"task.data.train={bad}")
    assert result.code == 1 and "Traceback" not in result.output, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]  # neither the run directory nor its parents


def test_brackets_in_the_output_path_are_printed_as_they_are(recipe, tmp_path):
    out = tmp_path / "run [bold]1[/bold] [red]"
    result = lrr("run", recipe, "--output", out, "--stop-after-step", 1)
    assert result.code == 0, result.output
    assert f"run directory: {out}\n" in result.output and f"--output {shlex.quote(str(out))} --resume" in result.output


# ------------------------------------------------------------------ --resume


def test_resume_of_a_directory_that_holds_no_run(recipe, tmp_path, no_training):
    folder = tmp_path / "my files"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    result = lrr("run", recipe, "--output", folder, "--resume")
    assert_clean_error(result, f"--output {folder}: holds no run of lowrank-runner (no recipe.yaml with a run's header), "
                               f"nothing to resume; give a directory written by lrr run, or drop --resume to start a new run",
                       code=2)
    assert snapshot(tmp_path) == before


def test_resume_of_a_completed_run_with_another_recipe(recipe, completed, tmp_path, no_training):
    run = copy(completed, tmp_path)
    before = snapshot(run)
    changed = load_recipe(recipe, ["training.learning_rate=5e-3"])
    original = load_recipe(recipe)
    result = lrr("run", recipe, "--output", run, "--set", "training.learning_rate=5e-3", "--resume")
    assert_clean_error(result, (
        f"--output {run}: its runs were started by a different recipe or --set overrides ({run / 'recipe.yaml'}: "
        f"recipe hash {original.hash}; {recipe} with these overrides: {changed.hash}); resume with the recipe and "
        f"overrides the run started with: lrr run {recipe} --output {run} --resume"), code=2)
    assert snapshot(run) == before


def test_a_completed_run_whose_report_is_damaged_is_not_trained_over(recipe, completed, tmp_path, no_training):
    run = copy(completed, tmp_path)
    (run / "report.json").write_text('{"status": "compl')
    before = snapshot(run)
    result = lrr("run", recipe, "--output", run, "--resume")
    assert_clean_error(result, contains=(f"{run / 'report.json'}:1:12: not valid JSON (Unterminated string starting at); the run report is "
                                         "damaged: restore it from a copy, or start a new run in a new directory",
                                         "a completed run is never trained over"), code=1)
    assert snapshot(run) == before


def test_the_printed_continue_command_works_as_printed(stopped, tmp_path):
    run, output = stopped
    line = next(ln for ln in output.splitlines() if "continue with: " in ln)
    command = shlex.split(line.split("continue with: ", 1)[1].replace(str(run), str(tmp_path / "run")))
    shutil.copytree(run, tmp_path / "run")
    assert command[:2] == ["lrr", "run"] and "--set" in command
    result = lrr(*command[1:])
    assert result.code == 0, result.output
    assert "resuming classification-seed0 from" in result.output and "(step 2)" in result.output
    assert json.loads((tmp_path / "run" / "report.json").read_text())["status"] == "completed"


def test_resume_without_set_continues_with_the_runs_overrides(recipe, stopped, tmp_path):
    run = copy(stopped[0], tmp_path)
    result = lrr("run", recipe, "--output", run, "--resume")
    assert result.code == 0, result.output
    assert "resuming with the run's --set overrides: " + " ".join(sets(STOP_SETS)) in result.output
    assert json.loads((run / "report.json").read_text())["recipe"]["overrides"] == STOP_SETS


# ------------------------------------------------------------------ damaged checkpoints


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def older_advice(run: Path) -> str:
    return (f"this checkpoint cannot be resumed; the older checkpoint {run / 'checkpoints' / 'step-000001'} looks complete: "
            f"remove {run / 'checkpoints' / 'step-000002'} to resume from it, or start again in a new directory")


@pytest.mark.parametrize("name,damage,problem", [
    ("state.json", truncate, "not a complete checkpoint state (truncated or edited)"),
    ("state.json", lambda p: p.unlink(), "missing"),
    ("state.json", lambda p: p.write_text(p.read_text().replace('"step": 2', '"step": 3')),
     "damaged or edited (its content does not match its digest)"),
    ("trainable.safetensors", truncate, "damaged (its size or SHA-256 differs from {state})"),
    ("optimizer.safetensors", flip_byte, "damaged (its size or SHA-256 differs from {state})"),
    ("method.safetensors", lambda p: p.write_text(""), "damaged (its size or SHA-256 differs from {state})"),
    ("rng-0.safetensors", lambda p: p.unlink(), "missing"),
])
def test_a_damaged_checkpoint_names_the_file_and_the_older_one(recipe, stopped, tmp_path, no_training, name, damage, problem):
    run = copy(stopped[0], tmp_path)
    latest = run / "checkpoints" / "step-000002"
    damage(latest / name)
    before = snapshot(run)
    result = lrr("run", recipe, "--output", run, "--resume")
    assert_clean_error(result, f"{latest / name}: {problem.format(state=latest / 'state.json')}; {older_advice(run)}", code=1)
    assert snapshot(run) == before


def test_following_the_advice_resumes_from_the_older_checkpoint(recipe, stopped, tmp_path):
    run = copy(stopped[0], tmp_path)
    truncate(run / "checkpoints" / "step-000002" / "trainable.safetensors")
    shutil.rmtree(run / "checkpoints" / "step-000002")
    result = lrr("run", recipe, "--output", run, "--resume")
    assert result.code == 0 and "(step 1)" in result.output, result.output


def test_a_damaged_only_checkpoint_says_there_is_no_older_one(recipe, stopped, tmp_path, no_training):
    run = copy(stopped[0], tmp_path)
    shutil.rmtree(run / "checkpoints" / "step-000001")
    latest = run / "checkpoints" / "step-000002"
    truncate(latest / "state.json")
    result = lrr("run", recipe, "--output", run, "--resume")
    assert_clean_error(result, f"{latest / 'state.json'}: not a complete checkpoint state (truncated or edited); this "
                               f"checkpoint cannot be resumed; there is no older checkpoint: start the run again in a new "
                               f"directory (lrr run RECIPE --output NEW_DIR)", code=1)


def test_a_checkpoint_of_the_pickle_format_is_refused(recipe, stopped, tmp_path, no_training):
    run = copy(stopped[0], tmp_path)
    latest = run / "checkpoints" / "step-000002"
    for old in ("optimizer", "scheduler", "method", "rng-0"):
        (latest / f"{old}.safetensors").rename(latest / f"{old}.pt")
    state = json.loads((latest / "state.json").read_text())
    del state["format"], state["files"]
    (latest / "state.json").write_text(json.dumps(state))
    result = lrr("run", recipe, "--output", run, "--resume")
    assert_clean_error(result, f"{latest}: written by an older lowrank-runner (pickled .pt files, which lrr no longer "
                               f"loads); it cannot be resumed: start the run again in a new directory "
                               f"(lrr run RECIPE --output NEW_DIR)", code=1)


# ------------------------------------------------------------------ signals


def start(recipe: Path, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lowrank_runner", "run", str(recipe), "--output", str(out),
                             "--set", "training.epochs=50", *extra],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=default_sigint)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run ended or timed out before the signal (exit {proc.poll()})")
        time.sleep(0.1)


def test_sigterm_after_a_checkpoint_leaves_a_resumable_run(recipe, tmp_path):
    """SIGTERM (a cluster scheduler's stop) acts like Ctrl-C: exit 130, the run marked resumable."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = start(recipe, out, log, "--set", "training.checkpoint_every=1")
    wait_for(lambda: any((out / "checkpoints").glob("step-*[0-9]")), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    text = log.read_text()
    assert "Traceback" not in text and text.splitlines()[-1] == "interrupted", text
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "interrupted"
    assert re.match(r"interrupted; resumable from its checkpoint at step \d+ with: lrr run .* --resume$", report["error"])
    assert f"{out} is resumable: lrr run {recipe} --set training.epochs=50 --set training.checkpoint_every=1 " \
           f"--output {out} --resume" in text


def test_ctrl_c_before_the_first_checkpoint_removes_the_run(recipe, tmp_path):
    out, log = tmp_path / "new" / "run", tmp_path / "log.txt"
    proc = start(recipe, out, log, "--set", "training.log_every=1", "--set", "training.checkpoint_every=100000")
    wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    text = log.read_text()
    assert "Traceback" not in text and text.splitlines()[-1] == "interrupted", text
    assert "before the first checkpoint: nothing to resume" in text
    assert [p.name for p in tmp_path.iterdir()] == ["log.txt"]


def test_a_checkpoint_of_another_run_is_refused(recipe, stopped, tmp_path, no_training):
    from lowrank_runner.rundir.files import write_recipe

    run = copy(stopped[0], tmp_path)
    plain = load_recipe(recipe)  # this directory now says it is a run of the recipe without --set
    (run / "recipe.yaml").unlink()
    write_recipe(run / "recipe.yaml", plain.runs[0].config, plain.hash, plain.runs[0].config_hash, str(recipe))
    stop = load_recipe(recipe, STOP_SETS)
    result = lrr("run", recipe, "--output", run, "--resume")
    assert_clean_error(result, f"{run / 'checkpoints' / 'step-000002' / 'state.json'}: written by a different recipe "
                               f"(config hash {stop.runs[0].config_hash}, this run's {plain.runs[0].config_hash}); it "
                               f"cannot be resumed by this run: remove {run / 'checkpoints'} to start the run over", code=2)


def test_resume_with_another_number_of_processes_is_refused(recipe, stopped, tmp_path, no_training):
    run = copy(stopped[0], tmp_path)
    result = lrr("run", recipe, "--output", run, "--resume", env={"WORLD_SIZE": "2"})
    assert_clean_error(result, f"{run / 'checkpoints' / 'step-000002'}: written by 1 process(es), this command runs 2; "
                               f"resume with the same number of processes", code=2)


@pytest.mark.parametrize("damage,message", [
    (lambda a: (a / "adapter.safetensors").write_bytes(b"garbage"),
     "{run}/adapter/adapter.safetensors: not a readable safetensors file (truncated or corrupted)"),
    (lambda a: (a / "adapter.safetensors").unlink(), "{run}/adapter/adapter.safetensors: missing"),
    (lambda a: (a / "adapter_config.json").write_text("{"), "{run}/adapter/adapter_config.json:1:2: not valid JSON"),
])
def test_init_from_a_damaged_run_fails_before_training(run_copy, tmp_path, tiny_bert, sentiment_data, damage, message):
    from tests.conftest import tiny_recipe_text

    damage(run_copy / "adapter")
    recipe = tmp_path / "from.yaml"
    recipe.write_text(tiny_recipe_text(tiny_bert, sentiment_data).replace(
        "seed: 0,", f"seed: 0, init_from: {run_copy},"))
    result = lrr("run", recipe, "--output", tmp_path / "out")
    assert_clean_error(result, code=1)
    expected = message.format(run=run_copy)
    assert any(expected in line and "cannot start from" in line for line in result.error_lines()), result.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ found by the second corpus


def test_a_damaged_metrics_log_is_found_before_training_resumes(recipe, stopped, tmp_path):
    run = copy(stopped[0], tmp_path)
    (run / "metrics.jsonl").write_text("{broken\n")
    result = lrr("run", recipe, "--output", run, "--resume")
    assert_clean_error(result, code=1)
    assert any(f"{run / 'metrics.jsonl'}:1: not a JSON object" in ln for ln in result.error_lines()), result.stderr
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists()  # nothing trained, nothing written


def test_resume_after_the_training_data_changed_is_refused(recipe, tmp_path, sentiment_data):
    """The same recipe over a data file edited in place between stop and resume (the
    config hash is of the recipe, not of the data): the plan's step count tells."""
    (tmp_path / "data").mkdir()
    moved = tmp_path / "moved.yaml"
    edited = tmp_path / "data" / "train.jsonl"
    edited.write_text(sentiment_data[0].read_text())
    moved.write_text(recipe.read_text().replace(str(sentiment_data[0]), str(edited)))
    out = tmp_path / "again"
    assert lrr("run", moved, "--output", out, *sets(STOP_SETS), "--stop-after-step", 2).code == 0
    edited.write_text("".join(edited.read_text().splitlines(keepends=True)[:48]))
    result = lrr("run", moved, "--output", out, "--resume")
    assert_clean_error(result, code=1)
    assert any("the run planned 6 optimizer steps when this checkpoint was written and plans 3 now: its training data "
               "changed" in ln for ln in result.error_lines()), result.stderr


def test_resume_without_a_checkpoint_says_it_starts_again(recipe, stopped, tmp_path):
    run = copy(stopped[0], tmp_path)
    shutil.rmtree(run / "checkpoints")
    result = lrr("run", recipe, "--output", run, "--resume")
    assert result.code == 0, result.output
    assert f"no checkpoint in {run / 'checkpoints'}: classification-seed0 starts again from step 0" in \
        " ".join(result.output.split())


def test_a_diverged_run_stops_with_the_reason(recipe, tmp_path, tiny_bert):
    """A backbone of NaN weights: the loss is NaN from the first step; the run stops
    instead of 'completing' with NaN metrics."""
    from safetensors.torch import load_file, save_file

    nan = Path(shutil.copytree(tiny_bert, tmp_path / "nan-bert"))
    weights = nan / "model.safetensors"
    save_file({k: v.clone().fill_(float("nan")) if v.is_floating_point() else v for k, v in load_file(weights).items()},
              weights, metadata={"format": "pt"})
    result = lrr("run", recipe, "--output", tmp_path / "out", "--set", f"backbone.name={nan}")
    assert_clean_error(result, code=1)
    assert any("training diverged at step 1 (loss nan; lr " in ln and "the training loss is nan, not a finite number"
               in ln and "no checkpoint was written before it" in ln for ln in result.error_lines()), result.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_init_from_an_adapter_of_nan_values_is_refused(run_copy, tmp_path, tiny_bert, sentiment_data):
    from safetensors.torch import load_file, save_file

    weights = run_copy / "adapter" / "adapter.safetensors"
    save_file({k: v.clone().fill_(float("nan")) for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    recipe = tmp_path / "from.yaml"
    recipe.write_text(tiny_recipe_text(tiny_bert, sentiment_data).replace("seed: 0,", f"seed: 0, init_from: {run_copy},"))
    result = lrr("run", recipe, "--output", tmp_path / "out")
    assert_clean_error(result, code=1)
    assert any(f"{weights} holds NaN or Inf values" in ln for ln in result.error_lines()), result.stderr


def test_output_with_a_quoted_tilde_is_the_home_directory(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    result = lrr("run", recipe, "--output", "~/runs/x", "--stop-after-step", 1, cwd=tmp_path)
    assert result.code == 0, result.output
    assert (tmp_path / "home" / "runs" / "x" / "recipe.yaml").is_file() and not (tmp_path / "~").exists()



def test_a_completed_run_without_its_report_is_not_trained_over(recipe, completed, tmp_path, no_training):
    run = copy(completed, tmp_path)
    (run / "report.json").unlink()
    before = snapshot(run)
    assert_clean_error(lrr("run", recipe, "--output", run, "--resume"),
                       f"{run}: this run completed (metrics.json and adapter/ are there) but its report.json is "
                       "missing; it is not resumed, so a completed run is never trained over: restore report.json from "
                       "a copy, or start a new run in a new directory", code=1)
    assert snapshot(run) == before


def test_init_from_an_all_zero_adapter_is_refused(run_copy, tmp_path, tiny_bert, sentiment_data):
    from safetensors.torch import load_file, save_file

    weights = run_copy / "adapter" / "adapter.safetensors"
    save_file({k: v.clone().zero_() for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    recipe = tmp_path / "from.yaml"
    recipe.write_text(tiny_recipe_text(tiny_bert, sentiment_data).replace("seed: 0,", f"seed: 0, init_from: {run_copy},"))
    result = lrr("run", recipe, "--output", tmp_path / "out")
    assert_clean_error(result, code=1)
    assert any(f"every tensor of {weights} is zero" in ln for ln in result.error_lines()), result.stderr
