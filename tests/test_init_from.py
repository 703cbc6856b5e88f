"""training.init_from: a run starts from another run's adapter (LoRA's and MTLoRA's
protocol: MRPC, RTE and STS-B from the MNLI adapter), never from its head."""

import json
import random

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.errors import LrrError
from lowrank_runner.recipe.load import check_recipe_file, load_recipe
from lowrank_runner.train import loop
from lowrank_runner.train.loop import RunResult
from lowrank_runner.train.runner import run_recipe


def lrr(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def scores_data(tmp_path_factory):
    """A tiny regression dataset (a number per sentence)."""
    d = tmp_path_factory.mktemp("scores")
    rng = random.Random(1)
    paths = []
    for split, n in (("train", 64), ("validation", 16)):
        path = d / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"text": " ".join(rng.sample(["good", "bad", "film", "very", "the", "it"], 4)),
                                            "label": rng.uniform(0, 5)}) + "\n" for _ in range(n)))
        paths.append(path)
    return paths


def two_tasks(tiny_bert, sentiment_data, scores_data, source_data=None, dependent_extra="", seeds="0"):
    """classification (the source, 2-way head) and regression (starts from it, 1 output),
    listed dependent first so that the runner has to reorder them. ``dependent_extra``:
    YAML lines added to the dependent's entry (4 spaces of indentation)."""
    (train, validation), (s_train, s_validation) = source_data or sentiment_data, scores_data
    return (
        "name: chain\n"
        f"backbone: {{name: {tiny_bert}}}\n"
        "targets: [Wq, Wv]\n"
        "method: {name: lora, r: 4, alpha: 8}\n"
        "task: {max_length: 16}\n"
        f"training: {{learning_rate: 2e-2, epochs: 1, batch_size: 32, seed: {seeds}, log_every: 1}}\n"
        "tasks:\n"
        "  regression:\n"
        f"    task: {{data: {{train: {s_train}, validation: {s_validation}}}}}\n"
        "    training: {init_from: {task: classification}, learning_rate: 1e-9}\n"
        f"{dependent_extra}"
        "  classification:\n"
        f"    task: {{data: {{train: {train}, validation: {validation}}}}}\n"
    )


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_bert, sentiment_data, scores_data):
    root = tmp_path_factory.mktemp("chain")
    recipe = root / "chain.yaml"
    recipe.write_text(two_tasks(tiny_bert, sentiment_data, scores_data))
    code, out = lrr("run", recipe, "--output", root / "run")
    assert code == 0, out
    return root / "run", recipe


@pytest.mark.slow
def test_dependent_starts_from_the_source_adapter_with_a_fresh_head(chain):
    run, recipe = chain
    summary = json.loads((run / "summary.json").read_text())
    assert [r["task"] for r in summary["runs"]] == ["classification", "regression"]  # the source ran first
    source, dependent = run / "classification-seed0" / "adapter", run / "regression-seed0" / "adapter"
    a, b = load_file(str(source / "adapter.safetensors")), load_file(str(dependent / "adapter.safetensors"))
    assert a.keys() == b.keys()
    lora_b = [k for k in a if k.endswith("lora_B")]
    assert lora_b and max(a[k].abs().max().item() for k in lora_b) > 1e-4  # trained: not LoRA's zero init
    # learning rate 1e-9: the dependent's adapter is still the one it started from
    assert all((a[k] - b[k]).abs().max().item() < 1e-6 for k in a)
    heads = load_file(str(source / "head.safetensors")), load_file(str(dependent / "head.safetensors"))
    assert heads[0]["classifier.weight"].shape == (2, 16) and heads[1]["classifier.weight"].shape == (1, 16)
    config = json.loads((dependent / "adapter_config.json").read_text())
    source_config = json.loads((source / "adapter_config.json").read_text())
    assert config["init_from"]["path"] == str(source.resolve())
    assert config["init_from"]["run"] == "classification-seed0" and config["init_from"]["task"] == "classification"
    assert config["init_from"]["recipe_hash"] == source_config["recipe_hash"] == load_recipe(recipe).hash
    report = json.loads((run / "regression-seed0" / "report.json").read_text())
    assert report["init_from"] == config["init_from"]
    assert f"adapter started from `{source.resolve()}`" in (run / "regression-seed0" / "report.md").read_text()
    assert "init_from" not in source_config


@pytest.mark.slow
def test_run_directory_as_source_and_misfits(chain, make_recipe, tiny_bert, sentiment_data, tmp_path):
    run, _ = chain
    source = run / "classification-seed0"
    train, validation = sentiment_data

    def single(method="{name: lora, r: 4, alpha: 8}", targets="[Wq, Wv]", name="one.yaml"):
        return make_recipe(f"""
            name: one
            backbone: {{name: {tiny_bert}}}
            targets: {targets}
            method: {method}
            task: {{name: classification, data: {{train: {train}, validation: {validation}}}, max_length: 16}}
            training: {{learning_rate: 1e-9, epochs: 1, batch_size: 32, init_from: {source}}}
            """, name)

    code, out = lrr("run", single(), "--output", tmp_path / "ok")
    assert code == 0, out
    head = load_file(str(tmp_path / "ok" / "adapter" / "head.safetensors"))["classifier.weight"]
    source_head = load_file(str(source / "adapter" / "head.safetensors"))["classifier.weight"]
    assert head.shape == source_head.shape and (head - source_head).abs().max() > 1e-3  # same labels, head still fresh
    a = load_file(str(source / "adapter" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "ok" / "adapter" / "adapter.safetensors"))
    assert all((a[k] - b[k]).abs().max().item() < 1e-6 for k in a)

    for recipe, message in [
        (single(method="{name: lora, r: 2, alpha: 8}", name="r.yaml"), "method r: 2 here, 4 in the source"),
        (single(method="{name: mtlora, r: 4, alpha: 8}", name="m.yaml"), "is a 'lora' adapter; this run trains 'mtlora'"),
        (single(targets="[Wq]", name="t.yaml"), "its target modules differ (adapted only in the source: bert.encoder.layer.0.attention.self.value"),
    ]:
        code, out = lrr("run", recipe, "--output", tmp_path / recipe.stem)
        assert code == 1, out
        flat = " ".join(out.split())
        assert f"{recipe}:6:" in flat and "training.init_from" in flat and message in flat, out
        assert "Traceback" not in out
        assert not (tmp_path / recipe.stem / "adapter").exists()


@pytest.mark.slow
def test_misfit_source_of_the_same_recipe_is_refused_before_training(make_recipe, tiny_bert, sentiment_data, scores_data, tmp_path):
    """Tasks of one recipe whose methods differ cannot share an adapter: validation says
    so at the init_from line, before the source trains (a run directory as the source is
    checked when the dependent starts: test_run_directory_as_source_and_misfits)."""
    recipe = make_recipe(two_tasks(tiny_bert, sentiment_data, scores_data, dependent_extra="    method: {r: 2}\n"))
    code, out = lrr("run", recipe, "--output", tmp_path / "run")
    assert code == 1
    assert f"{recipe}:" in out and "tasks.regression.training.init_from.task: task 'regression' starts from the " \
        "adapter of task 'classification', whose method differs (r: 2 here, 4 there)" in " ".join(out.split())
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_failed_source_fails_the_dependent_without_training(make_recipe, tiny_bert, sentiment_data, scores_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good film", "label": "positive"}\nnot json\n')
    recipe = make_recipe(two_tasks(tiny_bert, sentiment_data, scores_data,
                                   source_data=(bad, bad)))
    code, out = lrr("run", recipe, "--output", tmp_path / "run")
    assert code == 1
    summary = {r["task"]: r for r in json.loads((tmp_path / "run" / "summary.json").read_text())["runs"]}
    assert summary["classification"]["status"] == "failed"
    error = summary["regression"]["error"]
    assert summary["regression"]["status"] == "failed"
    assert "starts from the adapter of run classification-seed0, which failed" in error and f"{recipe}:" in error
    assert "--resume" in error
    failed = tmp_path / "run" / "regression-seed0"  # a directory holding only the failure, for lrr report
    assert "which failed" in (failed / "error.txt").read_text() and not (failed / "adapter").exists()
    assert json.loads((failed / "report.json").read_text())["status"] == "failed"


def test_runner_orders_sources_first_and_keeps_going(monkeypatch, make_recipe, tiny_bert, sentiment_data, scores_data, tmp_path):
    """Seeds 0 and 1: the source's seed-0 run fails; only its dependent fails with it,
    seed 1's dependent runs after its own source and gets it as init_from."""
    calls = []

    def fake_train_run(recipe, run, run_dir, argv, resume=None, stop_after=None, init_from=None, observer=None):
        calls.append((run.slug, init_from.run if init_from else None))
        if run.slug == "classification-seed0":
            raise LrrError("data broken")
        (run_dir / "adapter").mkdir(parents=True)
        (run_dir / "adapter" / "adapter_config.json").write_text(json.dumps({"task": {"name": run.task}, "recipe_hash": recipe.hash}))
        (run_dir / "report.json").write_text("{}")
        return RunResult(run_dir, {"metric": "accuracy", "value": 0.5, "step": 1})

    monkeypatch.setattr(loop, "train_run", fake_train_run)
    recipe = load_recipe(make_recipe(two_tasks(tiny_bert, sentiment_data, scores_data, seeds="[0, 1]")))
    failures = run_recipe(recipe, tmp_path / "run", [])
    assert calls == [("classification-seed0", None), ("classification-seed1", None), ("regression-seed1", "classification-seed1")]
    assert failures == ["classification-seed0", "regression-seed0"]


def problems_of(make_recipe, tiny_bert, sentiment_data, tasks_yaml):
    train, validation = sentiment_data
    path = make_recipe(
        "name: v\n"
        f"backbone: {{name: {tiny_bert}}}\n"
        "targets: [Wq]\n"
        "method: {name: lora}\n"
        f"task: {{name: classification, data: {{train: {train}, validation: {validation}}}}}\n"
        "training: {seed: 0}\n"
        "tasks:\n" + tasks_yaml)
    return path, [p for p in check_recipe_file(path) if p.severity == "error"]


@pytest.mark.parametrize("tasks_yaml,path,message", [
    ("  classification: {training: {init_from: {task: mnli}}}\n  regression: {}\n",
     "tasks.classification.training.init_from.task", "task 'mnli' is not in this recipe; its tasks: classification, regression"),
    ("  classification: {}\n  regression: {training: {init_from: {task: regression}}}\n",
     "tasks.regression.training.init_from.task", "task 'regression' cannot start from its own adapter"),
    ("  classification: {training: {init_from: {task: regression}}}\n  regression: {training: {init_from: {task: classification}}}\n",
     "tasks.classification.training.init_from.task", "tasks start from each other in a cycle: classification -> regression -> classification"),
    ("  classification: {training: {seed: [0, 1]}}\n  regression: {training: {seed: 2, init_from: {task: classification}}}\n",
     "tasks.regression.training.init_from.task", "task 'classification' has no run with seed 2 (its seeds: 0, 1)"),
    ("  classification: {training: {init_from: no/such/run}}\n",
     "tasks.classification.training.init_from", "no such run directory: no/such/run"),
])
def test_validate_catches_bad_references(make_recipe, tiny_bert, sentiment_data, tasks_yaml, path, message):
    recipe, problems = problems_of(make_recipe, tiny_bert, sentiment_data, tasks_yaml)
    assert any(p.path == path and message in p.message and p.location.source == str(recipe) and p.location.line >= 8
               for p in problems), [str(p) for p in problems]


def test_validate_rejects_a_task_reference_outside_a_multi_task_recipe(tiny_recipe):
    problems = check_recipe_file(tiny_recipe(), ["training.init_from={task: mnli}"])
    assert any("names another task of a multi-task recipe" in p.message for p in problems), [str(p) for p in problems]


def test_validate_accepts_the_mtlora_recipes():
    from pathlib import Path

    for name in ("", "_icfm", "_ctcm", "_dtsm"):
        path = Path(__file__).resolve().parent.parent / "recipes" / f"mtlora_roberta_glue{name}.yaml"
        assert [str(p) for p in check_recipe_file(path)] == []
        runs = {(r.task, r.seed): r for r in load_recipe(path).runs}
        for task in ("rte", "mrpc", "stsb"):
            assert runs[(task, 1)].config["training"]["init_from"] == {"task": "mnli"}
            assert "mtlora_roberta_glue.yaml:" in runs[(task, 1)].init_from_at
        assert "init_from" not in runs[("mnli", 0)].config["training"]


def test_dependent_of_a_stopped_source_waits_for_resume(monkeypatch, make_recipe, tiny_bert, sentiment_data, scores_data, tmp_path):
    """--stop-after-step: the source stops with a checkpoint; its dependent is not started
    (not failed either) and continues with --resume."""
    calls = []

    def fake_train_run(recipe, run, run_dir, argv, resume=None, stop_after=None, init_from=None, observer=None):
        calls.append(run.slug)
        return RunResult(run_dir, {"metric": "accuracy", "value": None, "step": None}, stopped_at=stop_after)

    monkeypatch.setattr(loop, "train_run", fake_train_run)
    recipe = load_recipe(make_recipe(two_tasks(tiny_bert, sentiment_data, scores_data)))
    assert run_recipe(recipe, tmp_path / "run", [], stop_after=2) == []
    assert calls == ["classification-seed0"]
    summary = {r["task"]: r for r in json.loads((tmp_path / "run" / "summary.json").read_text())["runs"]}
    assert summary["regression"]["status"] == "stopped" and summary["regression"]["waits_for"] == "classification-seed0"
