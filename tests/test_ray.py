"""``lrr run --parallel N --executor ray``: the Ray executor on a REAL local Ray cluster
(started once for the module by the executor itself: ``ray.init(address="local",
num_cpus=CORES)``, 2 CPUs on this machine), its jobs real child processes."""

import json
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from typer.testing import CliRunner  # noqa: E402

from lowrank_runner.cli import app  # noqa: E402
from lowrank_runner.errors import LrrError, UsageError  # noqa: E402
from lowrank_runner.train.parallel import ray_executor  # noqa: E402
from lowrank_runner.train.parallel.jobs import Job  # noqa: E402
from lowrank_runner.train.parallel.ray_executor import RayExecutor, import_ray  # noqa: E402
from tests.test_init_from import scores_data, two_tasks  # noqa: E402,F401  (a fixture and the 2-task recipe)
from tests.test_search import search_recipe  # noqa: E402,F401  (a fixture: the tiny search)


def lrr(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def executor():
    """The executor's own local Ray instance, shared by the module's tests."""
    if ray.is_initialized():  # left by another module: this one tests the executor's own start
        ray.shutdown()
    ex = RayExecutor(None, capacity=2, gpus_per_run=0, cpus_per_run=1, grace=20)
    assert ex.owned and ray.is_initialized()
    yield ex
    ex.close()


def python_job(root: Path, slug: str, code: str, *args, env=None) -> Job:
    """A job whose child runs the Python ``code`` (argv[1:] = ``args``)."""
    return Job(slug=slug, argv=[sys.executable, "-c", code, *map(str, args)], env=env or {}, run_dir=root / slug,
               log=root / "logs" / f"{slug}.log", gpus=0, cpus=1)


def wait_for(ex, count: int, timeout: float = 90) -> dict:
    """slug -> exit code of the next ``count`` jobs to finish."""
    done, deadline = {}, time.monotonic() + timeout
    while len(done) < count and time.monotonic() < deadline:
        done.update({job.slug: code for job, code in ex.wait_any(timeout=1)})
    assert len(done) == count, done
    return done


REPORT_ENV = """
import json, os, sys
print("hello from", sys.argv[2])
open(sys.argv[1], "w").write(json.dumps({k: os.environ.get(k) for k in ("LRR_TEST", "CUDA_VISIBLE_DEVICES",
                                                                          "OMP_NUM_THREADS")}))
sys.exit(int(sys.argv[3]))
"""


def test_jobs_run_as_ray_tasks_with_their_environment_and_exit_codes(executor, tmp_path):
    jobs = [python_job(tmp_path, slug, REPORT_ENV, tmp_path / f"{slug}.json", slug, code,
                       env={"LRR_TEST": slug, "OMP_NUM_THREADS": "1"})
            for slug, code in (("ok", 0), ("failed", 1), ("odd", 7))]
    for job in jobs:  # on 2 CPUs, Ray queues the third
        executor.submit(job)
    assert wait_for(executor, 3) == {"ok": 0, "failed": 1, "odd": 7}
    for job in jobs:
        seen = json.loads((tmp_path / f"{job.slug}.json").read_text())
        # a CPU job sees no GPU (not the driver's devices): CUDA_VISIBLE_DEVICES is Ray's assignment
        assert seen == {"LRR_TEST": job.slug, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        log = job.log.read_text()
        assert log.startswith("$ ") and "LRR_TEST=" + job.slug in log and f"hello from {job.slug}" in log
    assert executor.wait_any(timeout=0.1) == []
    assert not list(tmp_path.glob(".lrr-ray-check-*"))  # the shared-filesystem marker is removed


def test_a_node_without_the_drivers_working_directory_fails_the_job(executor, tmp_path, monkeypatch):
    monkeypatch.setattr(ray_executor, "driver_cwd", lambda: str(tmp_path / "only-on-the-driver"))
    job = python_job(tmp_path, "cwd", "open('ran', 'w')")
    executor.submit(job)
    assert wait_for(executor, 1) == {"cwd": 1}
    assert f"the driver's working directory {tmp_path / 'only-on-the-driver'} does not exist on" in job.log.read_text()
    assert not list(tmp_path.rglob("ran"))  # the command did not run somewhere else


ON_SIGTERM = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def stop(*_):
    time.sleep(0.5)  # the executor waits for the child to finish its clean-up
    (out / "terminated").write_text("SIGTERM")
    sys.exit(130)
signal.signal(signal.SIGTERM, stop)
(out / "started").write_text("")
time.sleep(300)
"""


def test_stop_all_terminates_the_running_children_and_waits_for_them(executor, tmp_path):
    job = python_job(tmp_path, "long", ON_SIGTERM, tmp_path)
    executor.submit(job)
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists():
        assert time.monotonic() < deadline, job.log.read_text() if job.log.exists() else "no log"
        time.sleep(0.2)
    start = time.monotonic()
    executor.stop_all()
    assert (tmp_path / "terminated").read_text() == "SIGTERM"  # the child got SIGTERM, and stop_all waited for it
    assert time.monotonic() - start < 15
    assert executor.wait_any(timeout=0) == [(job, 130)]


CRASH_WORKER = """
import os, pathlib, signal, sys
run_dir = pathlib.Path(sys.argv[1])
if "--resume" in sys.argv:
    print("resumed after", sys.argv[1:])
    sys.exit(0)
run_dir.mkdir(parents=True)
(run_dir / "recipe.yaml").write_text("started")  # what a run writes first
os.kill(os.getppid(), signal.SIGKILL)  # the Ray worker running this task dies
"""


def test_a_task_whose_worker_died_is_retried_and_resumes_its_run(executor, tmp_path):
    job = python_job(tmp_path, "crash", CRASH_WORKER, tmp_path / "crash")
    executor.submit(job)
    assert wait_for(executor, 1) == {"crash": 0}
    log = job.log.read_text()
    assert log.count("$ CUDA_VISIBLE_DEVICES=") == 2  # two attempts
    assert f"resumed after [{str(tmp_path / 'crash')!r}, '--resume']" in log


def test_output_directory_must_be_seen_by_every_node(executor, tmp_path, monkeypatch):
    elsewhere = tmp_path / "not-mounted-here"
    monkeypatch.setattr(ray_executor, "path_on_node", lambda marker: str(elsewhere / marker.name))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LrrError) as error:
        executor.submit(python_job(out, "x", "pass"))
    message = str(error.value)
    assert f"the output directory {out} is not visible from every node" in message
    assert "shared filesystem (e.g. NFS)" in message and "--output" in message
    assert not list(out.glob(".lrr-ray-check-*")) and not (out / "logs").exists()  # nothing started
    monkeypatch.undo()
    executor.check_shared(out)  # seen: no error


def test_a_run_needing_more_gpus_than_any_node_has_is_said(executor, capsys):
    other = RayExecutor(None, capacity=1, gpus_per_run=1)  # this process's cluster (not its own): a warning
    assert not other.owned
    assert ("warning: --gpus-per-run 1: no node of the Ray cluster has 1 GPU(s) and 1 CPU(s) for one run"
            in capsys.readouterr().err)
    other.owned = True  # as if it had started the instance itself: an error (no autoscaler will add a GPU)
    with pytest.raises(LrrError, match="this machine has no GPU Ray can use: drop --gpus-per-run"):
        other._check_fits(1, 1)
    other.owned = False
    other.close()
    assert ray.is_initialized()  # closing an executor that did not start the instance leaves it running


def test_an_unreachable_cluster_is_an_error_within_seconds():
    start = time.monotonic()
    with pytest.raises(LrrError) as error:
        RayExecutor("127.0.0.1:9", capacity=2)
    assert time.monotonic() - start < 10
    assert str(error.value).startswith("--address 127.0.0.1:9: no Ray cluster answers there")
    assert "ray start --head" in str(error.value)


def test_without_ray_the_option_says_how_to_install_it(monkeypatch, tiny_recipe, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UsageError, match=r"pip install 'lowrank-runner\[ray\]'"):
        import_ray()
    recipe = tiny_recipe("", name="r.yaml")
    code, output = lrr("run", recipe, "--set", "training.seed=[0,1]", "--output", tmp_path / "o", "--parallel", "2",
                       "--executor", "ray")
    assert code == 2 and "pip install 'lowrank-runner[ray]'" in output, output


@pytest.mark.slow
def test_a_recipe_on_ray_gives_the_sequential_results_table(executor, tiny_bert, sentiment_data, scores_data, tmp_path):
    """The issue's check: 2 tasks x 2 seeds, regression starting from classification's
    adapter (training.init_from), with --parallel 2 --executor ray on the local cluster."""
    recipe = tmp_path / "chain.yaml"
    recipe.write_text(two_tasks(tiny_bert, sentiment_data, scores_data, seeds="[0, 1]"))
    code, output = lrr("run", recipe, "--output", tmp_path / "seq")
    assert code == 0, output
    code, output = lrr("run", recipe, "--output", tmp_path / "ray", "--parallel", "2", "--executor", "ray")
    assert code == 0, output
    assert "4 runs, 2 at a time" in output and "started regression-seed0 on ray" in output
    assert (tmp_path / "ray" / "results.md").read_text() == (tmp_path / "seq" / "results.md").read_text()

    def best(out):
        runs = json.loads((tmp_path / out / "summary.json").read_text())["runs"]
        return {(r["task"], r["seed"]): (r["status"], r["best"]["value"], r["best"]["step"]) for r in runs}

    assert best("ray") == best("seq") and len(best("ray")) == 4
    assert ray.is_initialized()  # the command used this process's cluster, and left it running


@pytest.mark.slow
def test_a_search_on_ray_trains_its_trials_as_ray_tasks_on_one_study(executor, search_recipe, tmp_path):
    """``--parallel 2 --executor ray`` of a search: each trial a Ray task whose child reports
    its evaluations to the study in search.db."""
    import optuna

    out = tmp_path / "ray"
    code, output = lrr("run", search_recipe, "--output", out, "--parallel", "2", "--executor", "ray",
                       "--set", "search.n_trials=2", "--set", "training.seed=0")  # one best run: in the driver
    assert code == 0, output
    assert "started trial 1 (" in output and "on ray" in output
    trials = optuna.load_study(study_name="classification", storage=f"sqlite:///{out / 'search.db'}").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all(t.intermediate_values for t in trials)  # reported from the Ray tasks' children
    for t in trials:
        first = (out / "logs" / f"classification-trial-{t.number:04d}.log").read_text().splitlines()[0]
        assert "--trial-of" in first and "(Ray)" in first
    assert json.loads((out / "best" / "report.json").read_text())["status"] == "completed"
    assert ray.is_initialized()
