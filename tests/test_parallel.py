"""``lrr run RECIPE --parallel N``: a recipe's runs in child processes on this machine
(CPU processes here), with the same results as a sequential run, failures kept to their
run, init_from order, Ctrl-C and --resume."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.recipe.load import load_recipe
from lowrank_runner.train.run_dirs import resume_points
from tests.conftest import default_sigint

SLUGS = ["classification-seed0", "classification-seed1", "regression-seed0", "regression-seed1"]


def lrr(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def driver(*args) -> subprocess.Popen:
    """``lrr run ...`` as its own process (as a user starts it: signals reach it alone)."""
    return subprocess.Popen([sys.executable, "-m", "lowrank_runner", "run", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=default_sigint)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_bert, sentiment_data):
    """2 tasks x 2 seeds; regression starts from the classification adapter (init_from)."""
    root = tmp_path_factory.mktemp("parallel")
    rng = random.Random(1)
    scores = []
    for split, n in (("train", 64), ("validation", 16)):
        path = root / f"scores-{split}.jsonl"
        path.write_text("".join(json.dumps({"text": " ".join(rng.sample(["good", "bad", "film", "very", "the", "it"], 4)),
                                            "label": rng.uniform(0, 5)}) + "\n" for _ in range(n)))
        scores.append(path)
    train, validation = sentiment_data
    path = root / "chain.yaml"
    path.write_text(
        "name: chain\n"
        f"backbone: {{name: {tiny_bert}}}\n"
        "targets: [Wq, Wv]\n"
        "method: {name: lora, r: 4, alpha: 8}\n"
        "task: {max_length: 16}\n"
        "training: {learning_rate: 2e-2, epochs: 1, batch_size: 32, seed: [0, 1], log_every: 1}\n"
        "tasks:\n"
        "  regression:\n"
        f"    task: {{data: {{train: {scores[0]}, validation: {scores[1]}}}}}\n"
        "    training: {init_from: {task: classification}}\n"
        "  classification:\n"
        f"    task: {{data: {{train: {train}, validation: {validation}}}}}\n")
    return path


def statuses(root) -> dict:
    summary = json.loads((root / "summary.json").read_text())
    return {f"{r['task']}-seed{r['seed']}": r["status"] for r in summary["runs"]}


def progress(root, slug) -> dict:
    try:
        return json.loads((root / "logs" / f"{slug}.progress.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_for(condition, proc, seconds=120):
    """Poll ``condition`` while the driver runs (it is killed if the wait fails)."""
    deadline = time.time() + seconds
    try:
        while not condition():
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "timed out"
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        raise


def test_parallel_gives_the_sequential_table_and_keeps_init_from_order(recipe, tmp_path):
    code, out = lrr("run", recipe, "--output", tmp_path / "seq")
    assert code == 0, out
    code, out = lrr("run", recipe, "--output", tmp_path / "par", "--parallel", "2")
    assert code == 0, out
    seq, par = tmp_path / "seq", tmp_path / "par"
    for name in ("results.md", "results.csv"):
        assert (par / name).read_text() == (seq / name).read_text()
    assert statuses(par) == statuses(seq) == {slug: "completed" for slug in SLUGS}
    best = lambda root: [(r["task"], r["seed"], r["best"]) for r in json.loads((root / "summary.json").read_text())["runs"]]
    assert best(par) == best(seq)  # same order of entries, same numbers
    for seed in (0, 1):  # each dependent started training after its source had written its results
        source_done = (par / f"classification-seed{seed}" / "metrics.json").stat().st_mtime
        assert progress(par, f"regression-seed{seed}")["started"] >= source_done
        log = (par / "logs" / f"regression-seed{seed}.log").read_text()
        assert "--only-run" in log and f"regression-seed{seed}" in log
        assert f"log: {par / 'logs' / f'regression-seed{seed}.log'}" in out
    assert "4/4 done · 0 running · 0 waiting · 0 failed" in out
    assert not (par / "regression-seed0" / "summary.json").exists()  # children write no batch files


def test_a_killed_child_fails_only_its_run_and_resume_trains_only_it(recipe, tmp_path):
    root = tmp_path / "run"
    proc = driver(recipe, "--output", root, "--parallel", "2", "--set", "tasks.regression.training.epochs=8")
    wait_for(lambda: progress(root, "regression-seed1").get("step", 0) > 0, proc)
    os.kill(progress(root, "regression-seed1")["pid"], signal.SIGKILL)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 1, out
    assert statuses(root) == {"classification-seed0": "completed", "classification-seed1": "completed",
                              "regression-seed0": "completed", "regression-seed1": "failed"}
    assert "run regression-seed1 failed: the process training this run was killed by SIGKILL" in out
    assert str(root / "logs" / "regression-seed1.log") in out
    assert json.loads((root / "regression-seed1" / "report.json").read_text())["status"] == "failed"
    logs = {slug: (root / "logs" / f"{slug}.log").read_text() for slug in SLUGS}
    code, out = lrr("run", recipe, "--output", root, "--resume", "--parallel", "2")
    assert code == 0, out
    assert statuses(root) == {slug: "completed" for slug in SLUGS}
    for slug in SLUGS[:3]:
        assert f"already completed: {slug}" in out
        assert (root / "logs" / f"{slug}.log").read_text() == logs[slug]  # not started again
    resumed = (root / "logs" / "regression-seed1.log").read_text()
    started = [ln for ln in resumed.splitlines() if ln.startswith("$ ") and "--only-run regression-seed1" in ln]
    assert resumed.startswith(logs["regression-seed1"]) and len(started) == 2
    assert "which ended without giving it back (killed?)" in resumed  # the killed child's lock, named


def test_ctrl_c_stops_every_child_and_leaves_the_batch_resumable(recipe, tmp_path):
    root = tmp_path / "run"
    proc = driver(recipe, "--output", root, "--parallel", "2", "--set", "training.epochs=200")
    wait_for(lambda: all(progress(root, s).get("step", 0) > 0 for s in SLUGS[:2]), proc)
    pids = [progress(root, s)["pid"] for s in SLUGS[:2]]
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    for pid in pids:  # the children ended (and were reaped by the driver)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert set(statuses(root).values()) == {"interrupted"}
    for slug in SLUGS[:2]:
        report = json.loads((root / slug / "report.json").read_text())
        assert report["status"] == "interrupted" and "--resume --parallel 2" in report["error"]
    assert "is resumable: " in out and "--resume --parallel 2" in out
    rec = load_recipe(recipe, ["training.epochs=200"])
    points = resume_points(rec, root)  # every checkpoint verifies; nothing completed
    assert not any(isinstance(p, tuple) for p in points.values())


def test_the_resume_command_keeps_every_parallel_option():
    from lowrank_runner.train.parallel.slots import ParallelOptions

    words = ParallelOptions(2, "0,1", 2, "ray", "head:6379").words()
    assert words == ["--parallel", "2", "--devices", "0,1", "--gpus-per-run", "2", "--executor", "ray",
                     "--address", "head:6379"]
    assert ParallelOptions(1, None, None, "local", None).sequential


@pytest.mark.parametrize("args, message", [
    (["--parallel", "0"], "--parallel"),
    (["--parallel", "2", "--devices", "0"], "--devices 0: no CUDA device 0; no CUDA device is visible on this machine"),
    (["--parallel", "2", "--gpus-per-run", "2"], "--gpus-per-run 2: no CUDA device is visible"),
    (["--parallel", "2", "--executor", "slurm"], "--executor slurm: choose local"),
    (["--parallel", "2", "--address", "ray://head:10001"], "--address is the Ray cluster's address"),
    (["--address", "127.0.0.1:9"], "--address is the Ray cluster's address"),  # not silently trained here
])
def test_bad_parallel_options_are_usage_errors(recipe, tmp_path, args, message):
    code, out = lrr("run", recipe, "--output", tmp_path / "run", *args)
    assert code == 2, out
    assert message in " ".join(out.split()), out
    assert not (tmp_path / "run").exists()


def test_ray_executor_without_ray_says_how_to_install_it(recipe, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if it were not installed
    code, out = lrr("run", recipe, "--output", tmp_path / "run", "--parallel", "2", "--executor", "ray")
    assert code == 2, out
    assert "pip install 'lowrank-runner[ray]'" in out


@pytest.fixture
def four_gpus(monkeypatch):
    """The device division of a machine with 4 CUDA devices (this one has none)."""
    from lowrank_runner.train.parallel import slots

    monkeypatch.setattr(slots, "visible_devices", lambda: ["0", "1", "2", "3"])
    return slots


def test_devices_are_divided_into_groups_of_gpus_per_run(four_gpus, recipe, tmp_path):
    from lowrank_runner.train.invocation import Invocation
    from lowrank_runner.train.parallel.driver import child_job

    plan, Options = four_gpus.plan_slots, four_gpus.ParallelOptions
    assert plan(Options(parallel=4)).groups == (("0",), ("1",), ("2",), ("3",))
    assert plan(Options(parallel=2, devices="3,1")).groups == (("3",), ("1",))
    assert plan(Options(parallel=2, gpus_per_run=3)).groups == (("0", "1", "2"),)  # device 3 is left over
    slots = plan(Options(parallel=2, gpus_per_run=2))
    assert slots.groups == (("0", "1"), ("2", "3")) and slots.gpus == 2
    with pytest.raises(four_gpus.UsageError, match="--gpus-per-run 5: more than the 4 device"):
        plan(Options(parallel=2, gpus_per_run=5))
    with pytest.raises(four_gpus.UsageError, match="--devices 1,1: device 1 is given twice"):
        plan(Options(parallel=2, devices="1,1"))
    with pytest.raises(four_gpus.UsageError, match="no CUDA device 7; the visible devices are 0,1,2,3"):
        plan(Options(parallel=2, devices="0,7"))
    rec = load_recipe(recipe, ())
    inv = Invocation(rec, tmp_path, [], {}, None, {r.index: tmp_path / r.slug for r in rec.runs}, "")
    job = child_job(inv, rec.runs[0], slots, ("2", "3"), Options(parallel=2, gpus_per_run=2))
    launch = job.argv[job.argv.index("accelerate.commands.launch"):]
    assert launch[1:3] == ["--num_processes", "2"] and "--multi_gpu" in launch
    assert job.argv[-2:] == ["--only-run", rec.runs[0].slug] and job.gpus == 2
    assert job.env["CUDA_VISIBLE_DEVICES"] == "2,3" and job.log == tmp_path / "logs" / f"{rec.runs[0].slug}.log"


def test_stop_after_step_says_how_to_continue(recipe, tmp_path):
    """--stop-after-step with --parallel: the runs are stopped, not done, and the line
    says how to continue (as the sequential path does)."""
    code, out = lrr("run", recipe, "--output", tmp_path / "par", "--parallel", "2", "--stop-after-step", "2")
    assert code == 0, out
    text = " ".join(out.split())
    assert "after step 2 with a checkpoint; continue with:" in text and "--resume --parallel 2" in text
    assert "0/4 done" in text and "stopped" in text
