"""``output.trackers``: a real 2-run recipe logged through Accelerate's TensorBoard, MLflow,
W&B (offline) and trackio trackers, read back from the event files, the MLflow SQLite store,
the W&B offline run directory and trackio's database, and compared with ``metrics.jsonl``;
a resumed run continues its tracker runs, one started again from step 0 replaces them (its own
only); a missing tracker package is a validation error."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import tiny_recipe_text
from lowrank_runner.cli import app

# LoRA2 logs an extra loss (its orthogonality terms) and a rank budget with active ranks.
METHOD = "{name: lora2, r: 4, k: 2, alpha: 8, target_rank: 1, t_init: 2, t_final: 4, mask_interval: 2}"
SLUGS = ["classification-seed0", "classification-seed1"]


def lines_of(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl as (training lines, evaluation lines)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval" not in r], [r for r in rows if "eval" in r]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_bert, sentiment_data):
    """One `lrr run` of a 2-seed recipe with tensorboard, mlflow (default store), wandb and trackio."""
    tmp = tmp_path_factory.mktemp("tracked")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(tiny_recipe_text(tiny_bert, sentiment_data).replace("seed: 0,", "seed: [0, 1],") + textwrap.dedent(f"""
        output:
          dir: {tmp / 'store'}
          trackers: [tensorboard, {{name: mlflow, tags: {{paper: test}}}}, wandb, trackio]
        """))
    with pytest.MonkeyPatch.context() as env:
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "MLFLOW_RUN_ID"):
            env.delenv(name, raising=False)
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            env.setenv(name, str(tmp / "wandb-home"))
        env.setenv("TRACKIO_DIR", str(tmp / "trackio"))
        result = CliRunner().invoke(app, ["run", str(recipe), "--output", str(tmp / "out"), "--set",
                                          f"method={METHOD}"])
    assert result.exit_code == 0, result.output
    return tmp, tmp / "out", result.output


def test_tensorboard_event_files_hold_every_logged_value(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _ = tracked
    for slug in SLUGS:
        events = EventAccumulator(str(out / slug / "tensorboard" / "tiny"), size_guidance={"scalars": 0, "images": 0})
        events.Reload()
        train, evals = lines_of(out / slug)
        assert {"loss", "lr", "extra_loss", "rank_budget", "active_ranks"} <= set(train[0])
        for key in ("loss", "lr", "extra_loss", "rank_budget", "active_ranks", "epoch"):
            logged = {e.step: e.value for e in events.Scalars(f"train/{key}")}
            assert logged == {r["step"]: pytest.approx(r[key], rel=1e-6) for r in train}, key
        logged = {e.step: e.value for e in events.Scalars("eval/accuracy")}
        assert logged == {r["step"]: pytest.approx(r["eval"]["accuracy"], rel=1e-6) for r in evals}
        best = json.loads((out / slug / "metrics.json").read_text())["best"]
        assert events.Scalars("best/step")[0].value == best["step"]
        assert {"plots/loss_curve", "plots/metric_curve"} <= set(events.Tags()["images"])


def test_mlflow_store_has_one_run_per_lrr_run_in_the_recipes_experiment(tracked):
    from mlflow.tracking import MlflowClient

    tmp, out, output = tracked
    store = tmp / "store" / "mlflow.db"
    assert store.is_file() and f"sqlite:///{store.resolve().as_posix()}" in output  # said where at the start
    client = MlflowClient(tracking_uri=f"sqlite:///{store.resolve().as_posix()}")
    experiment = client.get_experiment_by_name("tiny")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == SLUGS
    summary = json.loads((out / "summary.json").read_text())
    for slug in SLUGS:
        run, (train, evals) = runs[slug], lines_of(out / slug)
        assert run.info.status == "FINISHED"
        assert run.data.params["recipe_hash"] == summary["hash"] and run.data.params["method.name"] == "lora2"
        assert run.data.params["training.learning_rate"] == "0.01" and run.data.tags["paper"] == "test"
        assert Path(run.data.params["run_dir"]).is_absolute()  # the store outlives the working directory
        assert run.data.tags["lrr.recipe_hash"] == summary["hash"]
        for key in ("loss", "lr", "extra_loss", "rank_budget"):
            history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"train/{key}")]
            assert sorted(history) == [(r["step"], r[key]) for r in train], key
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/accuracy")]
        assert sorted(history) == [(r["step"], r["eval"]["accuracy"]) for r in evals]
        best = json.loads((out / slug / "metrics.json").read_text())["best"]
        assert run.data.metrics["best/accuracy"] == best["eval"]["accuracy"]
        plots = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "plots")}
        assert {"loss_curve.png", "metric_curve.png", "rank_heatmap.png"} <= plots
        assert {"report.json", "recipe.yaml"} <= {f.path for f in client.list_artifacts(run.info.run_id)}


def test_wandb_writes_an_offline_run_with_the_runs_files(tracked):
    _, out, _ = tracked
    for slug in SLUGS:
        offline = list((out / slug / "wandb").glob("offline-run-*"))
        assert len(offline) == 1, offline
        assert list(offline[0].glob("run-*.wandb"))  # the offline history (wandb sync uploads it)
        assert {"loss_curve.png", "metric_curve.png", "report.md"} <= {p.name for p in (offline[0] / "files").iterdir()}


def test_the_report_and_inspect_say_where_each_tracker_writes(tracked, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    tmp, out, _ = tracked
    report = json.loads((out / SLUGS[0] / "report.json").read_text())
    assert [t["name"] for t in report["trackers"]] == ["tensorboard", "mlflow", "wandb", "trackio"]
    assert str(out / SLUGS[0] / "tensorboard" / "tiny") in report["trackers"][0]["writes"]
    assert "tracked with mlflow: sqlite:///" in (out / SLUGS[0] / "report.md").read_text()
    inspected = CliRunner().invoke(app, ["inspect", str(tmp / "recipe.yaml"), "--json"])
    assert inspected.exit_code == 0, inspected.output
    trackers = json.loads(inspected.stdout)["trackers"]
    assert trackers[2] == {"name": "wandb", "writes": "offline, project tiny, run RUN, files in RUN_DIR/wandb; "
                                                      "upload with wandb sync"}
    assert trackers[1]["writes"].startswith(f"sqlite:///{(tmp / 'store' / 'mlflow.db').resolve().as_posix()}, "
                                            "experiment tiny")


def test_tracker_entries_are_checked_by_validate(tiny_recipe):
    recipe = tiny_recipe("""
        output:
          trackers: [mlfow, {name: mlflow, trackng_uri: x}, {name: wandb, mode: later}, tensorboard, tensorboard]
        """)
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 1
    text = result.output
    assert "output.trackers.0: must be one of 'tensorboard', 'mlflow', 'wandb', 'trackio'; got 'mlfow' " \
           "(did you mean 'mlflow'?)" in text
    assert "output.trackers.1.trackng_uri: unknown key 'trackng_uri' (did you mean 'tracking_uri'?)" in text
    assert "output.trackers.2.mode: must be one of 'offline', 'online', 'disabled'" in text
    assert "output.trackers.4: tensorboard is listed twice" in text


def test_a_missing_tracker_package_is_a_validation_error(tiny_recipe):
    recipe = tiny_recipe("""
        output:
          trackers: [tensorboard, {name: mlflow}]
        """)
    code = ("import sys; sys.modules['mlflow'] = None\n"  # as if it were not installed
            "from lowrank_runner.cli import main\n"
            f"sys.argv = ['lrr', 'validate', {str(recipe)!r}]\n"
            "main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    line = next(ln for ln in (result.stdout + result.stderr).splitlines() if "not installed" in ln)
    assert line.startswith(f"{recipe}:") and ":" in line.split("output.trackers.1")[0]  # file:line:col
    assert line.endswith("output.trackers.1: mlflow is not installed; pip install 'lowrank-runner[tracking]' "
                         "(or pip install mlflow)")


def test_a_resumed_run_continues_its_tracker_runs(tmp_path, tiny_recipe, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    uri = f"sqlite:///{(tmp_path / 'elsewhere.db').as_posix()}"
    recipe = tiny_recipe(f"""
        output:
          trackers: [tensorboard, {{name: mlflow, tracking_uri: '{uri}'}}]
        """)
    out = tmp_path / "out"
    args = ["run", str(recipe), "--output", str(out), "--set", "training.checkpoint_every=4"]
    stopped = CliRunner().invoke(app, [*args, "--stop-after-step", "4"])
    assert stopped.exit_code == 0, stopped.output
    assert (out / "trackers.json").is_file()
    resumed = CliRunner().invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert [r.info.run_name for r in runs] == ["classification-seed0"] and runs[0].info.status == "FINISHED"
    assert runs[0].info.run_id == json.loads((out / "trackers.json").read_text())["mlflow"]
    artifacts = runs[0].info.artifact_uri  # beside the store the recipe named, not ./mlruns of the working directory
    assert artifacts.startswith((tmp_path / "mlartifacts").as_uri()) and not (Path.cwd() / "mlruns").exists()
    train, _ = lines_of(out)
    history = sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "train/loss"))
    assert history == [(r["step"], r["loss"]) for r in train]  # each step once: the run continued from step 4
    events = EventAccumulator(str(out / "tensorboard" / "tiny"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("train/loss")] == \
        [(r["step"], r["loss"]) for r in train]



def test_trackio_logs_to_its_local_database(tracked):
    import sqlite3

    import trackio.utils

    tmp, out, output = tracked
    store = tmp / "trackio"
    assert trackio.utils.TRACKIO_DIR == store  # read when trackio is imported: by the first run
    assert f"tracking: trackio: project tiny, run classification-seed0, local database in {store}" in output
    for slug in SLUGS:
        with sqlite3.connect(store / "tiny.db") as db:
            rows = db.execute("SELECT step, metrics FROM metrics WHERE run_name = ?", (slug,)).fetchall()
        logged = [(step, json.loads(values)) for step, values in rows]
        train, _ = lines_of(out / slug)
        assert {step: v["train/loss"] for step, v in logged if "train/loss" in v} == \
            {r["step"]: pytest.approx(r["loss"], rel=1e-6) for r in train}


def test_a_failed_run_ends_its_tracker_run_as_failed_and_the_next_run_starts_its_own(tmp_path, tiny_recipe,
                                                                                    monkeypatch):
    from mlflow.tracking import MlflowClient

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    recipe = tiny_recipe(f"""
        output:
          dir: {tmp_path / 'store'}
          trackers: [mlflow]
        """)
    result = CliRunner().invoke(app, ["run", str(recipe), "--output", str(tmp_path / "out"), "--set",
                                      "training.learning_rate=1e30", "--set", "training.seed=[0, 1]"])
    assert result.exit_code == 1 and "the training loss is nan" in result.output  # after the trackers started
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'store' / 'mlflow.db').as_posix()}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [(slug, "FAILED") for slug in SLUGS]


def test_parallel_runs_open_one_mlflow_store_at_once(tmp_path):
    """Two processes creating the same SQLite store and experiment together (parallel
    runs): without the lock, one of them fails creating its tables."""
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    code = ("import sys; from lowrank_runner.train.tracking import open_mlflow_experiment; "
            "open_mlflow_experiment(sys.argv[1], 'tiny'); import mlflow; "
            "mlflow.start_run(experiment_id=mlflow.get_experiment_by_name('tiny').experiment_id); mlflow.end_run()")
    children = [subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True) for _ in range(2)]
    outputs = [child.communicate(timeout=120)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    assert len(client.search_runs([client.get_experiment_by_name("tiny").experiment_id])) == 2


INTERRUPT_SEED_1 = """
import sys
from lowrank_runner.train import loop

real = loop.TrainingRun.after_step


def after_step(self, out, batches_in_epoch):
    if self.run.seed == 1 and self.state.step == 3:  # Ctrl-C after step 2 was logged, before any checkpoint
        raise KeyboardInterrupt
    return real(self, out, batches_in_epoch)


loop.TrainingRun.after_step = after_step
from lowrank_runner.cli import main

sys.argv = ["lrr", *sys.argv[1:]]
main()
"""


def test_a_run_started_again_from_step_0_replaces_its_earlier_tracker_runs(tmp_path, tiny_recipe):
    """Seed 1 of a 2-seed recipe interrupted after logging step 2, before its first
    checkpoint; ``--resume`` starts it again from step 0: each tracker then holds one run
    of it with one history (TensorBoard's events, MLflow's runs, the W&B offline runs, the
    trackio runs), the earlier attempt's replaced; seed 0 (completed) is left as it was."""
    import sqlite3

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    recipe = tiny_recipe(f"""
        output:
          trackers: [tensorboard, {{name: mlflow, tracking_uri: '{uri}'}}, wandb, trackio]
        """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_"))}
    env.update(WANDB_CONFIG_DIR=str(tmp_path / "wandb-home"), WANDB_CACHE_DIR=str(tmp_path / "wandb-home"),
               WANDB_DATA_DIR=str(tmp_path / "wandb-home"), TRACKIO_DIR=str(tmp_path / "trackio"))
    out, seed1 = tmp_path / "out", tmp_path / "out" / SLUGS[1]
    args = ["run", str(recipe), "--output", str(out), "--set", "training.seed=[0, 1]"]

    def lrr(code: str, *more: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, *args, *more], capture_output=True, text=True,
                              timeout=600, env=env, cwd=tmp_path)

    interrupted = lrr(INTERRUPT_SEED_1)
    assert interrupted.returncode == 130, interrupted.stdout[-2000:] + interrupted.stderr[-4000:]
    earlier = json.loads((seed1 / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(earlier["mlflow"]).info.status == "KILLED"
    resumed = lrr("from lowrank_runner.cli import main; import sys; sys.argv = ['lrr', *sys.argv[1:]]; main()",
                  "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert f"{SLUGS[1]} starts again from step 0" in resumed.stderr
    ids = json.loads((seed1 / "trackers.json").read_text())
    assert all(ids[name] != earlier[name] for name in ("mlflow", "wandb", "trackio"))
    train, _ = lines_of(seed1)
    assert train[0]["step"] == 2
    expected = [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train]  # each step once
    events = EventAccumulator(str(seed1 / "tensorboard" / "tiny"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == expected
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [(slug, "FINISHED") for slug in SLUGS]
    assert client.get_run(earlier["mlflow"]).info.lifecycle_stage == "deleted"
    history = sorted((m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "train/loss"))
    assert history == expected
    offline = list((seed1 / "wandb").glob("offline-run-*"))
    assert [p.name.rsplit("-", 1)[1] for p in offline] == [ids["wandb"]]
    with sqlite3.connect(tmp_path / "trackio" / "tiny.db") as db:
        rows = db.execute("SELECT run_id, step, metrics FROM metrics WHERE run_name = ?", (SLUGS[1],)).fetchall()
    logged = sorted((run_id, step, json.loads(values)["train/loss"]) for run_id, step, values in rows
                    if "train/loss" in json.loads(values))
    assert logged == [(ids["trackio"], *pair) for pair in expected]


def test_a_restart_deletes_only_its_own_earlier_mlflow_run(tmp_path, monkeypatch):
    """``trackers.json`` naming an MLflow run of another run directory (a copied
    directory), or one the store does not hold: nothing is deleted; the run's own earlier
    run is (once)."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from lowrank_runner.train.tracking import Tracking

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("tiny", artifact_location=(tmp_path / "artifacts").as_uri())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    own = client.create_run(experiment, tags={"lrr.run_dir": str(run_dir.resolve())}).info.run_id
    other = client.create_run(experiment, tags={"lrr.run_dir": str(tmp_path / "elsewhere")}).info.run_id
    recipe = SimpleNamespace(name="tiny", source="recipe.yaml", hash="h")
    run = SimpleNamespace(config={"output": {"trackers": [{"name": "mlflow", "tracking_uri": uri}]}}, slug="s",
                          task="classification", seed=0, config_hash="h")
    tracking = Tracking(recipe, run, run_dir)
    for run_id in (other, "0" * 32, own, own):
        (run_dir / "trackers.json").write_text(json.dumps({"mlflow": run_id}))
        tracking._replace_earlier_attempt()
    assert client.get_run(other).info.lifecycle_stage == "active"
    assert client.get_run(own).info.lifecycle_stage == "deleted"


# ------------------------------------------------------------------ servers that do not answer (issue 23)

NETWORK_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_HTTP_REQUEST_TIMEOUT",
               "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "WANDB_MODE", "WANDB_BASE_URL", "TRACKIO_SPACE_ID",
               "TRACKIO_SERVER_URL", "HF_ENDPOINT", "LRR_TRACKER_TIMEOUT")


@pytest.fixture
def network_env(monkeypatch, tmp_path):
    """None of the variables that point trackers at servers; whatever the check sets in
    os.environ (MLflow's request bounds) is undone after the test."""
    for name in NETWORK_ENV:
        monkeypatch.setenv(name, "")  # recorded as unset, so restored as unset
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-home"))  # no `wandb login --host` of this machine
    return monkeypatch


@pytest.fixture
def refusing_port():
    """A local port bound but not listening: connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def silent_port():
    """A local port that accepts connections and never answers (a hung server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


@pytest.fixture
def fake_servers():
    """A local HTTP server: an MLflow tracking server's search answer (as a real one gives
    it) under /, a 503 (a proxy whose server is down) under /down, a 404 elsewhere."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path.startswith("/down"):
                code, body = 503, b"Service Unavailable"
            elif self.path.startswith("/api/2.0/mlflow/experiments/search") or self.path in ("/", "/api/spaces/me/space"):
                code, body = 200, b'{"experiments": []}'
            else:
                code, body = 404, b"Not Found"
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_mlflow_server_that_refuses_stops_lrr_run_before_anything_is_written(tmp_path, tiny_recipe, network_env,
                                                                               refusing_port):
    uri = f"http://127.0.0.1:{refusing_port}"
    recipe = tiny_recipe(f"""
        output:
          dir: {tmp_path / 'store'}
          trackers: [tensorboard, {{name: mlflow, tracking_uri: '{uri}'}}]
        """)
    start = time.monotonic()
    result = CliRunner().invoke(app, ["run", str(recipe), "--output", str(tmp_path / "out")])
    assert time.monotonic() - start < 20
    assert result.exit_code == 1, result.output
    line = next(ln for ln in result.output.splitlines() if "output.trackers" in ln)
    assert re.search(rf"{re.escape(str(recipe))}:\d+:\d+: output\.trackers\.1\.tracking_uri: the MLflow tracking "
                     rf"server {re.escape(uri)} refused the connection", line), line
    store = f"sqlite:///{(tmp_path / 'store' / 'mlflow.db').resolve().as_posix()}"
    assert line.endswith(f"nothing was started. Start the server, fix tracking_uri, or remove tracking_uri to use the "
                         f"local SQLite store {store} (or remove the tracker)")
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()  # nothing written


def test_a_silent_mlflow_server_from_the_environment_stops_a_parallel_run_in_bounded_time(tmp_path, tiny_recipe,
                                                                                         network_env, silent_port):
    uri = f"http://127.0.0.1:{silent_port}"
    network_env.setenv("MLFLOW_TRACKING_URI", uri)
    network_env.setenv("LRR_TRACKER_TIMEOUT", "1")
    recipe = tiny_recipe("""
        output:
          trackers: [mlflow]
        """)
    start = time.monotonic()
    result = CliRunner().invoke(app, ["run", str(recipe), "--output", str(tmp_path / "out"), "--set",
                                      "training.seed=[0, 1]", "--parallel", "2"])
    assert time.monotonic() - start < 20
    assert result.exit_code == 1, result.output
    assert f"output.trackers.0 (mlflow): the MLflow tracking server {uri} (from $MLFLOW_TRACKING_URI) did not answer " \
           "within 1 s ($LRR_TRACKER_TIMEOUT sets how long lrr waits); nothing was started. Start the server, fix " \
           "MLFLOW_TRACKING_URI, or unset it to use the local SQLite store sqlite:///" in result.output
    assert not (tmp_path / "out").exists()  # the driver claimed nothing, started no child


def recipe_with(path: Path, trackers: str):
    from lowrank_runner.recipe.load import load_recipe

    return load_recipe(path, [f"output.trackers={trackers}"])


def test_the_check_passes_a_server_that_answers_and_bounds_mlflows_requests(tiny_recipe, network_env, fake_servers):
    from lowrank_runner.train.tracking import check_endpoints, endpoints

    path = tiny_recipe()
    local = recipe_with(path, "[tensorboard, {name: mlflow, tracking_uri: 'sqlite:////tmp/x.db'}, wandb, trackio]")
    assert endpoints(local) == []  # local stores: nothing to ask
    check_endpoints(local)
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    network_env.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")  # the user's: kept
    check_endpoints(recipe_with(path, f"[{{name: mlflow, tracking_uri: '{fake_servers}/'}}]"))
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "20" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
    network_env.setenv("WANDB_BASE_URL", fake_servers)
    network_env.setenv("HF_ENDPOINT", fake_servers)
    check_endpoints(recipe_with(path, "[{name: wandb, mode: online}, {name: trackio, space_id: me/space}]"))


@pytest.mark.parametrize("where, said", [
    ("/down", "answered HTTP 503 Service Unavailable"),
    ("/elsewhere", "answered HTTP 404 Not Found for GET /elsewhere/api/2.0/mlflow/experiments/search: not an MLflow "
                   "tracking server there"),
])
def test_an_mlflow_uri_that_answers_with_an_error_is_refused(tiny_recipe, network_env, fake_servers, where, said):
    from lowrank_runner.train.tracking import TrackerError, check_endpoints

    with pytest.raises(TrackerError) as caught:
        check_endpoints(recipe_with(tiny_recipe(), f"[{{name: mlflow, tracking_uri: '{fake_servers}{where}'}}]"))
    assert f"output.trackers.0.tracking_uri: the MLflow tracking server {fake_servers}{where} {said}; " in str(caught.value)


def test_wandb_online_and_trackio_spaces_are_checked_too(tiny_recipe, network_env, refusing_port, silent_port):
    from lowrank_runner.train.tracking import TrackerError, check_endpoints

    path = tiny_recipe()
    network_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{refusing_port}")
    with pytest.raises(TrackerError, match=r"output\.trackers\.0\.mode: W&B's server http://127\.0\.0\.1:\d+ \(from "
                                           r"\$WANDB_BASE_URL\) refused the connection .*log offline \(mode: offline"):
        check_endpoints(recipe_with(path, "[{name: wandb, mode: online}]"))
    network_env.setenv("WANDB_MODE", "online")
    with pytest.raises(TrackerError, match=r"output\.trackers\.1 \(wandb, mode online from \$WANDB_MODE\): "):
        check_endpoints(recipe_with(path, "[tensorboard, wandb]"))
    network_env.setenv("TRACKIO_SERVER_URL", f"http://127.0.0.1:{refusing_port}/?write_token=tok123")
    with pytest.raises(TrackerError) as caught:
        check_endpoints(recipe_with(path, "[trackio]"))
    assert f"output.trackers.0 (trackio): the trackio server http://127.0.0.1:{refusing_port}/ (from " \
           "$TRACKIO_SERVER_URL) refused the connection" in str(caught.value) and "tok123" not in str(caught.value)
    network_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent_port}")  # trackio would wait for ever
    network_env.setenv("LRR_TRACKER_TIMEOUT", "0.5")
    start = time.monotonic()
    with pytest.raises(TrackerError, match=r"output\.trackers\.0\.space_id: the Hugging Face Hub http://127\.0\.0\.1:"
                                           r"\d+ \(trackio's Space me/space\) did not answer within 0\.5 s .*drop "
                                           r"space_id"):
        check_endpoints(recipe_with(path, "[{name: trackio, space_id: me/space}]"))
    assert time.monotonic() - start < 5


def test_the_check_says_no_password_and_wants_a_valid_timeout(tiny_recipe, network_env, refusing_port):
    from lowrank_runner.train.tracking import TrackerError, check_endpoints

    from lowrank_runner.recipe.load import load_recipe

    recipe = load_recipe(tiny_recipe(f"""
        output:
          trackers: [{{name: mlflow, tracking_uri: 'http://me:s3cret@127.0.0.1:{refusing_port}'}}]
        """))
    with pytest.raises(TrackerError) as caught:
        check_endpoints(recipe)
    assert f"server http://127.0.0.1:{refusing_port} refused" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    network_env.setenv("LRR_TRACKER_TIMEOUT", "soon")
    with pytest.raises(TrackerError, match=r"\$LRR_TRACKER_TIMEOUT=soon: not a number of seconds above 0"):
        check_endpoints(recipe)


# ------------------------------------------------------------------ a damaged trackers.json (--resume)


@pytest.mark.parametrize("text, problem", [
    ("", "empty"),
    ('{"mlflow": "abc', "not JSON: "),
    ('["abc"]', 'not a mapping of tracker names to run ids: ["abc"]'),
    ('{"mlflow": 42}', "not a mapping of tracker names to run ids"),
])
def test_a_damaged_trackers_json_is_named_with_the_fix(tmp_path, text, problem):
    from lowrank_runner.train.tracking import TrackerError, recorded_ids

    assert recorded_ids(tmp_path) == {}  # none yet
    (tmp_path / "trackers.json").write_text(text)
    with pytest.raises(TrackerError) as caught:
        recorded_ids(tmp_path)
    said = str(caught.value)
    assert said.startswith(f"{tmp_path / 'trackers.json'} is damaged ({problem}")
    assert "delete it to start new tracker runs" in said and "Restore it" in said


def test_resume_refuses_a_damaged_trackers_json_before_anything_trains(tmp_path, tiny_recipe, network_env):
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    recipe = tiny_recipe(f"""
        output:
          trackers: [{{name: mlflow, tracking_uri: '{uri}'}}]
        """)
    out = tmp_path / "out"
    args = ["run", str(recipe), "--output", str(out), "--set", "training.checkpoint_every=2", "--set",
            "training.epochs=1"]
    stopped = CliRunner().invoke(app, [*args, "--stop-after-step", "2"])
    assert stopped.exit_code == 0, stopped.output
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    metrics = (out / "metrics.jsonl").read_text()
    (out / "trackers.json").write_text('{"mlflow": "' + run_id[:10])  # cut short
    refused = CliRunner().invoke(app, [*args, "--resume"])
    assert refused.exit_code == 1, refused.output
    assert f"{out / 'trackers.json'} is damaged (not JSON: " in refused.output
    assert "delete it to start new tracker runs for this run" in refused.output and "Traceback" not in refused.output
    assert (out / "metrics.jsonl").read_text() == metrics  # nothing trained
    (out / "trackers.json").unlink()  # the fix the message names: the run continues, with a new MLflow run
    resumed = CliRunner().invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "trackers.json").read_text())["mlflow"] != run_id
