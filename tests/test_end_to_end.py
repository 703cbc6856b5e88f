"""run → export --merge → plain transformers reload, on a tiny random BERT from a config,
and the ways these commands must fail cleanly."""

import importlib.metadata
import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.errors import ExportError
from lowrank_runner.export.merge import export_merged
from lowrank_runner.export.probe import probe_batch
from lowrank_runner.export.source import load_trained_model

runner = CliRunner()


def lrr(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_bert, sentiment_data):
    train, validation = sentiment_data
    root = tmp_path_factory.mktemp("e2e")
    recipe = root / "tiny.yaml"
    recipe.write_text(f"""
name: tiny
backbone: {{name: {tiny_bert}}}
targets: [Wq, Wv, Wo]
method: {{name: lora, r: 4, alpha: 8, dropout: 0.1}}
task:
  name: classification
  data: {{train: {train}, validation: {validation}}}
  max_length: 16
training: {{learning_rate: 2e-2, epochs: 3, batch_size: 16, seed: 0, log_every: 2, eval_every: 6, warmup_ratio: 0.1}}
""")
    code, out = lrr("run", recipe, "--output", root / "run")
    assert code == 0, out
    return root / "run", recipe


def test_run_directory_contents(trained_run):
    run_dir, _ = trained_run
    assert sorted(p.name for p in run_dir.iterdir()) == ["adapter", "loss_curve.png", "metric_curve.png", "metrics.json",
                                                         "metrics.jsonl", "recipe.yaml", "report.json", "report.md",
                                                         "results.csv", "results.md", "results.tex"]
    assert sorted(p.name for p in (run_dir / "adapter").iterdir()) == ["adapter.safetensors", "adapter_config.json", "head.safetensors"]
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [ln for ln in lines if "loss" in ln and "eval" not in ln]
    evals = [ln for ln in lines if "eval" in ln]
    assert [ln["step"] for ln in train] == list(range(2, 19, 2))  # 96/16 = 6 steps/epoch x 3
    assert [ln["step"] for ln in evals] == [6, 12, 18]
    assert train[0]["lr"] > train[-1]["lr"]  # linear decay
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "completed"
    assert report["adapter_params"] == 2 * (4 * 16 * 2 * 2 + 4 * (24 + 16))  # Wq, Wv (16x16) and Wo (16x24), 2 layers
    assert report["steps"]["total"] == 18 and report["steps"]["warmup"] == 2
    assert report["environment"]["packages"]["torch"] == importlib.metadata.version("torch")
    assert report["recipe"]["hash"] and report["command"][:2] == ["lrr", "run"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best"]["step"] in (6, 12, 18)
    assert metrics["best"]["value"] == max(e["eval"]["accuracy"] for e in evals)
    assert "# recipe hash" in (run_dir / "recipe.yaml").read_text()


def test_export_merged_reloads_with_plain_transformers_and_same_logits(trained_run, tmp_path):
    run_dir, _ = trained_run
    out = tmp_path / "merged"
    code, output = lrr("export", run_dir, "--merge", "--out", out)
    assert code == 0, output
    info = json.loads((out / "lrr_export.json").read_text())
    assert info["max_abs_logit_diff"] <= 1e-5 and info["modules_merged"] == 6

    model, adapted, config, _ = load_trained_model(run_dir)
    from transformers import AutoTokenizer

    batch = probe_batch(AutoTokenizer.from_pretrained(out), 16)
    with torch.no_grad():
        expected = model(**batch).logits
    base_logits = _logits_without_adapter(run_dir, batch)
    assert (expected - base_logits).abs().max() > 1e-4, "training changed nothing; the test would prove nothing"
    torch.save(dict(batch), tmp_path / "batch.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForSequenceClassification\n"
        f"m = AutoModelForSequenceClassification.from_pretrained({str(out)!r}).eval()\n"
        f"b = torch.load({str(tmp_path / 'batch.pt')!r})\n"
        "with torch.no_grad():\n    logits = m(**b).logits\n"
        f"torch.save(logits, {str(tmp_path / 'logits.pt')!r})\n"
        "assert not any(k.startswith('lowrank_runner') for k in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-5, atol=1e-5)


def _logits_without_adapter(run_dir, batch):
    model, *_ = load_trained_model(run_dir)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lrr_adapter." in name:
                param.zero_()
        return model(**batch).logits


def test_export_refuses_a_non_empty_output(trained_run, tmp_path):
    run_dir, _ = trained_run
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    code, output = lrr("export", run_dir, "--merge", "--out", tmp_path / "taken")
    assert code == 2 and "exists and is not an empty directory" in output


def test_export_of_a_nan_adapter_writes_nothing(trained_run, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil

    run_dir, _ = trained_run
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    weights = broken / "adapter" / "adapter.safetensors"
    state = load_file(str(weights))
    first = next(iter(state))
    state[first][0, 0] = float("nan")
    save_file(state, str(weights))
    with pytest.raises(ExportError, match="NaN"):
        export_merged(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]  # no temporary directory left behind
    code, output = lrr("export", broken, "--merge", "--out", tmp_path / "out")
    assert code == 1 and "nothing written" in output and not (tmp_path / "out").exists()


def test_export_needs_a_run_directory(tmp_path):
    (tmp_path / "src").mkdir()
    code, output = lrr("export", tmp_path / "src", "--merge", "--out", tmp_path / "x")
    assert code == 2 and "not a run directory" in output


def test_run_refuses_a_non_empty_output_before_doing_anything(trained_run, tmp_path):
    _, recipe = trained_run
    (tmp_path / "f").write_text("x")
    code, output = lrr("run", recipe, "--output", tmp_path)
    assert code == 2 and "exists and is not an empty directory" in output
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_multi_seed_run_writes_one_directory_per_run_and_a_summary(trained_run, tmp_path, monkeypatch):
    from lowrank_runner.tasks.local_files import Classification

    calls = []
    tokenize = Classification.tokenize
    monkeypatch.setattr(Classification, "tokenize", lambda self, *a: calls.append(1) or tokenize(self, *a))
    _, recipe = trained_run
    code, output = lrr("run", recipe, "--output", tmp_path / "multi", "--set", "training.seed=[1,2]",
                       "--set", "training.epochs=1", "--set", "training.eval_every=null")
    assert code == 0, output
    assert sorted(p.name for p in (tmp_path / "multi").iterdir()) == [
        "classification-seed1", "classification-seed2", "report.md", "results.csv", "results.md", "results.tex",
        "summary.json"]
    summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["completed", "completed"]
    assert len(calls) == 1  # the second seed reuses the tokenized data
    values = [100 * r["best"]["value"] for r in summary["runs"]]
    mean = sum(values) / 2
    table = (tmp_path / "multi" / "results.md").read_text()
    assert "| Method | # Params | classification (Acc) | Avg. |" in table and f"{mean:.2f}±" in table
    assert "mean ± std over seeds classification: [1, 2]" in table
    code, output = lrr("export", tmp_path / "multi", "--merge", "--out", tmp_path / "m")
    assert code == 2 and "classification-seed1" in output


def test_two_processes_share_the_work(trained_run, tmp_path):
    """The same loop under torchrun (what `accelerate launch --multi_gpu` starts): 2 gloo
    processes on CPU, each seeing half the batches, one run directory written by rank 0.
    With ``training.batch_size_per: device`` (the per-device meaning; the default, the
    effective batch, is tests/test_batch_semantics.py's) each process trains on 16
    examples per step, so the effective batch is 32."""
    _, recipe = trained_run
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lowrank_runner", "run",
         str(recipe), "--output", str(tmp_path / "ddp"), "--set", "training.epochs=1", "--set", "training.eval_every=null",
         "--set", "training.batch_size_per=device"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["environment"]["hardware"]["num_processes"] == 2
    assert report["steps"]["per_epoch"] == 3  # 96 examples / (16 per device x 2 processes)
    assert report["batch"] == {"effective": 32, "per_device": 16, "accumulation": 1, "processes": 2,
                               "batch_size_per": "device"}
    assert proc.stderr.count("done classification-seed0") == 1  # only rank 0 reports


def test_peft_export_loads_with_peft_and_runs_identically(trained_run, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir, _ = trained_run
    code, output = lrr("export", run_dir, "--peft", "--out", tmp_path / "peft")
    assert code == 0, output
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "peft").iterdir()}
    info = json.loads((tmp_path / "peft" / "lrr_export.json").read_text())
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8

    base = AutoModelForSequenceClassification.from_pretrained(cfg["base_model_name_or_path"], **{
        k: ({int(i): v for i, v in val.items()} if k == "id2label" else val) for k, val in info["head_config"].items()})
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    ours, *_ = load_trained_model(run_dir)
    batch = probe_batch(AutoTokenizer.from_pretrained(tmp_path / "peft"), 16)
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, ours(**batch).logits, rtol=1e-5, atol=1e-5)


def test_peft_export_refuses_both_flags(trained_run, tmp_path):
    run_dir, _ = trained_run
    code, output = lrr("export", run_dir, "--peft", "--merge", "--out", tmp_path / "x")
    assert code == 2 and "choose one export" in output
