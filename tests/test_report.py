"""The reproducibility report: report.json's fields are there and true, report.md and the
plots exist, the recipe hash is canonical, and `lrr report` shows one run or compares
several (and refuses what is not a run directory)."""

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

import lowrank_runner
from lowrank_runner.cli import app
from lowrank_runner.methods.inject import is_adapter_param
from lowrank_runner.recipe.load import load_recipe
from lowrank_runner.train import fingerprint
from tests.conftest import tiny_recipe_text

cli = CliRunner()


def lrr(*args):
    result = cli.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert, sentiment_data):
    """A: the tiny LoRA recipe; B: the same with another learning rate and two seeds (a
    multi-run directory)."""
    root = tmp_path_factory.mktemp("report")
    recipe = root / "tiny.yaml"
    recipe.write_text(tiny_recipe_text(tiny_bert, sentiment_data))
    code, out = lrr("run", recipe, "--output", root / "a")
    assert code == 0, out
    code, out = lrr("run", recipe, "--set", "training.learning_rate=0.05", "--set", "training.seed=[0, 1]",
                    "--output", root / "b")
    assert code == 0, out
    return root / "a", root / "b", recipe


def report_of(run_dir):
    return json.loads((run_dir / "report.json").read_text())


@pytest.mark.slow
def test_versions_environment_and_seeds_are_true(runs):
    a, b, _ = runs
    report = report_of(a)
    assert report["format"] == "lowrank-runner-report" and report["status"] == "completed"
    packages = report["environment"]["packages"]
    for name in ("torch", "transformers", "accelerate", "datasets", "peft", "tokenizers"):
        assert packages[name] == importlib.metadata.version(name), name
    own = report["environment"]["lowrank_runner"]
    assert own["version"] == lowrank_runner.__version__
    repo = os.path.dirname(os.path.dirname(lowrank_runner.__file__))
    if os.path.exists(os.path.join(repo, ".git")):
        head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert own["commit"] == head and isinstance(own["dirty"], bool)
    hw = report["environment"]["hardware"]
    import torch

    assert hw["cpu_count"] == len(os.sched_getaffinity(0)) and hw["num_processes"] == 1
    assert hw["gpu_count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert report["environment"]["python"] == ".".join(map(str, __import__("sys").version_info[:3]))
    assert report["seeds"] == {"run": 0, "data_order": 0, "holdout_split": None, "recipe": [0]}
    seeds_b = [report_of(b / f"classification-seed{s}")["seeds"] for s in (0, 1)]
    assert [s["run"] for s in seeds_b] == [0, 1] and seeds_b[1]["recipe"] == [0, 1]
    assert report["command"][:2] == ["lrr", "run"] and report["wall_time_s"] > 0
    assert report["peak_memory"]["cpu_max_rss_mb"] > 50
    assert report["recipe"]["config"]["training"]["learning_rate"] == 0.01


@pytest.mark.slow
def test_parameter_counts_equal_the_models(runs):
    from lowrank_runner.export.source import load_trained_model

    a, _, _ = runs
    report = report_of(a)
    model, adapted, _, adapter_cfg = load_trained_model(a)
    params = dict(model.named_parameters())
    adapter = sum(p.numel() for n, p in params.items() if is_adapter_param(n))
    head = sum(params[n].numel() for n in adapter_cfg["head"])
    assert report["adapter_params"] == adapter == 2 * 2 * 4 * (16 + 16)  # Wq, Wv, 2 layers, r 4
    assert report["trainable_params"] == adapter + head
    assert report["total_params"] == sum(p.numel() for p in params.values())
    assert report["modules"] == 4 and report["method"]["name"] == "lora"


@pytest.mark.slow
def build_task_of(task: dict):
    from lowrank_runner.recipe.schema import fill_defaults, recipe_schema
    from lowrank_runner.tasks.base import build_task

    return build_task(fill_defaults({"task": task}, recipe_schema())["task"])


def test_backbone_and_data_fingerprints_are_the_files_hashes(runs, tiny_bert, sentiment_data, tmp_path):
    a, _, _ = runs
    report = report_of(a)
    backbone = report["backbone"]
    assert backbone["source"] == "local" and backbone["location"] == str(tiny_bert.resolve())
    assert backbone["files"]["model.safetensors"]["sha256"] == sha256(tiny_bert / "model.safetensors")
    assert backbone["files"]["config.json"]["sha256"] == sha256(tiny_bert / "config.json")
    data = report["data"]
    assert data["source"] == "local"
    assert {f["role"]: f["sha256"] for f in data["files"]} == {"train": sha256(sentiment_data[0]),
                                                               "validation": sha256(sentiment_data[1])}
    assert data["splits"]["train"]["rows"] == 96 and data["splits"]["validation"]["rows"] == 32

    # the same bytes elsewhere give the same fingerprint; one changed byte another one
    copies = [str(shutil.copy(p, tmp_path / p.name)) for p in sentiment_data]
    task = build_task_of({"name": "classification", "data": {"train": copies[0], "validation": copies[1]}})
    assert fingerprint.data_fingerprint(task)["fingerprint"] == data["fingerprint"]
    text = (tmp_path / "validation.jsonl").read_text()
    (tmp_path / "validation.jsonl").write_text(text.replace("positive", "negative", 1))
    changed = fingerprint.data_fingerprint(task)
    assert changed["fingerprint"] != data["fingerprint"]
    assert changed["files"][1]["sha256"] == sha256(tmp_path / "validation.jsonl")


@pytest.mark.slow
def test_metrics_match_metrics_json_and_the_log(runs):
    a, _, _ = runs
    report, metrics = report_of(a), json.loads((a / "metrics.json").read_text())
    for key in ("step", "metric", "value", "eval"):
        assert report["best"][key] == metrics["best"][key]
    assert report["final_eval"] == metrics["last"]["eval"]
    assert report["best"]["epoch"] == report["best"]["step"] / 6 and (a / report["best"]["checkpoint"] / "adapter_config.json").is_file()
    evals = [json.loads(ln) for ln in (a / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    assert [e["epoch"] for e in report["per_epoch"]] == [1, 2]
    assert [e["eval"] for e in report["per_epoch"]] == [e["eval"] for e in evals]  # eval once per epoch (6 steps)
    assert report["per_epoch"][0]["train_loss"] > 0 and report["rank_pattern"] is None


@pytest.mark.slow
def test_report_md_and_plots(runs):
    a, b, _ = runs
    report, text = report_of(a), (a / "report.md").read_text()
    for fact in (report["recipe"]["hash"], "lrr run", report["backbone"]["location"], "lora",
                 f"{report['best']['value']:.4f}", report["data"]["files"][0]["sha256"],
                 report["environment"]["packages"]["torch"], "loss_curve.png", "metric_curve.png", "546"):
        assert fact in text, fact
    for name in ("loss_curve.png", "metric_curve.png"):
        from PIL import Image

        with Image.open(a / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300
    assert report["files"]["plots"].keys() == {"loss_curve.png", "metric_curve.png"}
    root = (b / "report.md").read_text()  # the multi-run directory links its runs' reports
    assert "[classification-seed0](classification-seed0/report.md)" in root
    assert "[classification-seed1](classification-seed1/report.md)" in root and "Avg." in root


def test_recipe_hash_is_canonical(make_recipe, tiny_bert, sentiment_data):
    train, validation = sentiment_data
    body = {
        "name": "name: tiny",
        "backbone": f"backbone: {{name: {tiny_bert}}}",
        "targets": "targets: [Wq, Wv]",
        "method": "method: {name: lora, r: 4, alpha: 8}",
        "task": f"task: {{name: classification, data: {{train: {train}, validation: {validation}}}}}",
        "training": "training: {learning_rate: 1e-2, epochs: 2, seed: 0}",
    }
    first = load_recipe(make_recipe("\n".join(body.values()), "a.yaml")).hash
    reordered = dict(body, method="method: {alpha: 8, r: 4, name: lora}",
                     training="training: {seed: 0, epochs: 2.0, learning_rate: 0.01}")
    spelled = load_recipe(make_recipe("\n".join(reversed(list(reordered.values()))), "b.yaml"))
    assert spelled.hash == first
    assert type(spelled.runs[0].config["training"]["epochs"]) is int  # the run uses what was hashed
    changed = dict(body, training="training: {learning_rate: 2e-2, epochs: 2, seed: 0}")
    assert load_recipe(make_recipe("\n".join(changed.values()), "c.yaml")).hash != first
    assert load_recipe(make_recipe("\n".join(body.values()), "d.yaml"), ["method.r=8"]).hash != first


@pytest.mark.slow
def test_lrr_report_shows_one_run(runs):
    a, _, _ = runs
    code, out = lrr("report", a)
    assert code == 0, out
    assert "Run report: tiny" in out and report_of(a)["recipe"]["hash"] in out
    code, out = lrr("report", a, "--json")
    assert code == 0 and json.loads(out) == report_of(a)
    (a / "report.md").unlink()
    (a / "loss_curve.png").unlink()
    code, out = lrr("report", a, "--render")
    assert code == 0, out
    assert (a / "report.md").is_file() and (a / "loss_curve.png").is_file()


@pytest.mark.slow
def test_lrr_report_compares_runs(runs):
    a, b, _ = runs
    code, out = lrr("report", a, b)  # b is a multi-run directory: it stands for its two runs
    assert code == 0, out
    assert "3 runs" in out and "training.learning_rate" in out and "0.01" in out and "0.05" in out
    assert "training.seed" in out and "same backbone and data" in out
    data = json.loads(lrr("report", a, b, "--json")[1])
    assert data["recipe_differences"]["training.learning_rate"] == [0.01, 0.05, 0.05]
    assert data["recipe_differences"]["training.seed"] == [0, 0, 1]
    assert data["environment_differences"] == {} and data["input_differences"] == {}
    losses = [row["best_eval"]["loss"] for row in data["metrics"]]
    assert losses[0] != losses[1]
    for loss in losses[:2]:
        assert f"{loss:.4f}" in out  # the metric table shows each run's value


@pytest.mark.slow
def test_lrr_report_refuses_what_is_not_a_run(runs, tmp_path):
    a, _, _ = runs
    code, out = lrr("report", tmp_path / "missing")
    assert code != 0 and "no such run directory" in out
    code, out = lrr("report", tmp_path)
    assert code != 0 and "not a run directory" in out and "report.json" in out
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "report.json").write_text("{not json")
    code, out = lrr("report", a, broken)
    assert code == 1 and f"{broken / 'report.json'}:1:2: not valid JSON" in out


def test_hub_backbones_are_identified_by_the_cached_commit(tmp_path):
    commit, blob = "a" * 40, hashlib.sha256(b"{}").hexdigest()
    repo = tmp_path / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    (repo / "blobs" / blob).write_text("{}")
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(f"../../blobs/{blob}")
    out = fingerprint.backbone_fingerprint("org/tiny", "org/tiny", local=False, cache_dir=tmp_path)
    assert out["source"] == "hub" and out["commit"] == commit and out["files"] == {"config.json": {"blob": blob}}
    missing = fingerprint.backbone_fingerprint("org/other", "org/other", local=False, cache_dir=tmp_path)
    assert missing["commit"] is None and missing["fingerprint"] is None


def test_large_files_are_hashed_by_size_head_and_tail(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "FULL_HASH_MAX_BYTES", 64)
    monkeypatch.setattr(fingerprint, "EDGE_BYTES", 16)
    small, large = tmp_path / "small.bin", tmp_path / "large.bin"
    small.write_bytes(b"x" * 64)
    large.write_bytes(bytes(range(200)))
    assert fingerprint.file_digest(small) == {"sha256": sha256(small), "bytes": 64, "method": "full"}
    digest = fingerprint.file_digest(large)
    assert digest["method"] == "head+tail" and digest["bytes"] == 200
    large.write_bytes(b"\xff" + bytes(range(1, 200)))
    os.utime(large, ns=(1, 1))  # a new mtime, so the memo does not answer
    assert fingerprint.file_digest(large)["sha256"] != digest["sha256"]


def test_a_failed_run_gets_a_report_md_too(tmp_path):
    from lowrank_runner.train.run_dirs import mark_failed

    mark_failed(tmp_path, "Traceback (most recent call last):\n  ...\nRuntimeError: out of memory")
    assert json.loads((tmp_path / "report.json").read_text())["status"] == "failed"
    assert "failed — RuntimeError: out of memory" in (tmp_path / "report.md").read_text()
    code, out = lrr("report", tmp_path)  # shown, and the exit code says the run failed
    assert code == 1 and "**Status:** failed — RuntimeError: out of memory" in out  # piped: report.md's text
    assert f"error: {tmp_path}: the run failed: RuntimeError: out of memory; the traceback is in {tmp_path / 'error.txt'}" in out


def test_hub_datasets_are_identified_by_the_commit_datasets_resolved():
    commit = "b" * 40

    class Split(list):  # what the fingerprint reads of a datasets.Dataset
        _fingerprint = "f00d"
        cache_files = [{"filename": f"/cache/nyu-mll___glue/rte/0.0.0/{commit}/glue-train.arrow"}]

    task = build_task_of({"name": "rte", "dataset": "nyu-mll/glue"})
    out = fingerprint.data_fingerprint(task, {"train": Split([1, 2, 3])})
    assert out["source"] == "hub" and out["dataset"] == "nyu-mll/glue" and out["revision"] == commit
    assert out["splits"] == {"train": {"rows": 3, "fingerprint": "f00d"}} and out["files"] == []
    Split._fingerprint = "beef"  # other rows loaded: another fingerprint
    assert fingerprint.data_fingerprint(task, {"train": Split([1, 2, 3])})["fingerprint"] != out["fingerprint"]
