"""``lrr run RECIPE --parallel N`` of a search: its trials in child processes on one study
(``search.db``, SQLite's locking shared by the driver and its children), the same trials
as a sequential search, a killed trial continued by ``--resume`` with no trial lost or
repeated, Ctrl-C, and the options a search refuses."""

import json
import os
import signal

import pytest

from tests.test_parallel import driver, progress, wait_for
from tests.test_search import lrr, search_recipe, searched, study  # noqa: F401  (fixtures)


def trial_log(out, number: int) -> str:
    return (out / "logs" / f"classification-trial-{number:04d}.log").read_text()


def starts(log: str) -> int:
    """How many times a child was started on this trial (each start writes its command)."""
    return sum(line.startswith("$ ") and "--trial-of" in line for line in log.splitlines())


@pytest.mark.slow
def test_a_parallel_search_runs_the_sequential_searchs_trials(search_recipe, searched, tmp_path):
    out = tmp_path / "par"
    result = lrr("run", search_recipe, "--output", out, "--parallel", "2")
    assert result.exit_code == 0, result.output
    assert "3 trials, 2 at a time" in result.output and "started trial 1 (" in result.output
    sequential, parallel = study(searched).trials, study(out).trials
    assert [(t.number, t.state.name, t.params) for t in parallel] == [(t.number, t.state.name, t.params)
                                                                      for t in sequential]
    assert [t.value for t in parallel] == pytest.approx([t.value for t in sequential], abs=1e-6)
    for seq, par in zip(sequential, parallel):  # every evaluation reported to the study by the trial's child
        assert par.intermediate_values == pytest.approx(seq.intermediate_values, abs=1e-6) and par.intermediate_values
        assert starts(trial_log(out, par.number)) == 1
    record = json.loads((out / "search.json").read_text())
    assert record["status"] == "completed"
    assert record["tasks"]["classification"]["best"] == json.loads((searched / "search.json").read_text())[
        "tasks"]["classification"]["best"]

    def best_runs(root):
        runs = json.loads((root / "best" / "summary.json").read_text())["runs"]
        return [(r["seed"], r["status"], round(r["best"]["value"], 6)) for r in runs]

    assert best_runs(out) == best_runs(searched)  # the best point's seeds, trained as --parallel 2 trains a recipe
    assert "2 runs, 2 at a time" in result.output


@pytest.mark.slow
def test_a_killed_trial_stays_running_and_resume_finishes_the_study_with_none_lost_or_repeated(search_recipe, tmp_path):
    out = tmp_path / "run"
    proc = driver(search_recipe, "--output", out, "--parallel", "2", "--set", "training.epochs=60",
                  "--set", "search.n_trials=2", "--set", "training.seed=0")  # one best run: in the driver
    wait_for(lambda: progress(out, "classification-trial-0001").get("step", 0) >= 10, proc)
    os.kill(progress(out, "classification-trial-0001")["pid"], signal.SIGKILL)
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, text
    assert "trial 1's process was killed by SIGKILL: the trial stays running in its study" in text
    assert "search incomplete: trial 1 of classification did not finish" in text
    assert f"--output {out} --resume --parallel 2" in text
    before = study(out).trials
    assert [t.state.name for t in before] == ["COMPLETE", "RUNNING"]  # the other trial went on; none replaced it
    assert json.loads((out / "search.json").read_text())["status"] == "interrupted"
    assert not (out / "best").exists()  # no best point before every trial finished
    logs = {0: trial_log(out, 0)}

    result = lrr("run", search_recipe, "--output", out, "--resume", "--parallel", "2")
    assert result.exit_code == 0, result.output
    after = study(out).trials
    assert [(t.number, t.state.name, t.params) for t in after] == [(t.number, "COMPLETE", t.params) for t in before]
    assert after[0].value == before[0].value
    assert {0: trial_log(out, 0)} == logs  # the finished trial not started again
    resumed = trial_log(out, 1)
    assert starts(resumed) == 2 and "ended without giving it back (killed?)" in resumed
    assert "resuming classification-seed0 from" in resumed  # from the checkpoint the killed child left
    assert "started trial 1 (" in result.output and "started trial 0" not in result.output
    assert json.loads((out / "search.json").read_text())["status"] == "completed"
    assert json.loads((out / "best" / "report.json").read_text())["status"] == "completed"  # one seed: best/ is the run


@pytest.mark.slow
def test_ctrl_c_stops_every_trial_and_leaves_them_running_for_resume(search_recipe, tmp_path):
    out = tmp_path / "run"
    proc = driver(search_recipe, "--output", out, "--parallel", "2", "--set", "training.epochs=200")
    wait_for(lambda: all(progress(out, f"classification-trial-000{n}").get("step", 0) > 0 for n in (0, 1)), proc)
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, text
    assert "stopping 2 running trial(s)" in text and "trial 0's process was interrupted" in text
    assert "search interrupted; continue it with:" in text
    assert [t.state.name for t in study(out).trials] == ["RUNNING", "RUNNING"]
    for n in (0, 1):  # each child marked its run interrupted, resumable from its checkpoint
        report = json.loads((out / "search" / "classification" / f"trial-000{n}" / "report.json").read_text())
        assert report["status"] == "interrupted"
    assert json.loads((out / "search.json").read_text())["status"] == "interrupted"


@pytest.mark.parametrize("args, message", [
    (["--gpus-per-run", "2"], "--gpus-per-run 2: a search's trial trains in one process"),
    (["--parallel", "2", "--executor", "slurm"], "--executor slurm: choose local"),
])
def test_options_a_parallel_search_refuses_are_usage_errors(search_recipe, tmp_path, args, message):
    result = lrr("run", search_recipe, "--output", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()  # refused before anything was written
