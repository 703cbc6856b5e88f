"""lrr export --merge in bounded memory: on a model large enough to tell (about 400 MB in
float32, saved in several safetensors shards), the streamed merge's peak memory stays
well under the model's size while a whole-model check (which loads the model) does not;
the streamed merge of a sharded backbone writes the tensors the in-memory merge writes,
bit for bit; the per-module output check catches an update folded in transposed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

from lowrank_runner.cli import app
from tests.conftest import SPECIAL, WORDS, tiny_config, write_sentiment_data

pytestmark = pytest.mark.slow

# BERT-base width, 14 layers: about 99M parameters, 400 MB in float32
BIG = dict(hidden_size=768, num_hidden_layers=14, num_attention_heads=12, intermediate_size=3072, max_position_embeddings=64)


def lrr(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def save_backbone(directory: Path, shard_size: str, **config) -> int:
    """A random-weight BERT saved in safetensors shards of ``shard_size``; its float32 size."""
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(tiny_config("bert", **config))
    model.save_pretrained(directory, max_shard_size=shard_size)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(SPECIAL + WORDS)}).save_pretrained(directory)
    return sum(p.numel() * 4 for p in model.parameters())


def trained_run(root: Path, backbone: Path, method: str, targets: str) -> Path:
    """A run of one optimizer step (a high learning rate, so the update is not zero)."""
    train, validation = write_sentiment_data(root, n_train=8, n_eval=4)
    recipe = root / "recipe.yaml"
    recipe.write_text(f"""
name: memory
backbone: {{name: {backbone}}}
targets: {targets}
method: {method}
task:
  name: classification
  data: {{train: {train}, validation: {validation}}}
  max_length: 12
training: {{learning_rate: 5e-2, max_steps: 1, batch_size: 4, seed: 0, log_every: 1, eval_every: null}}
""")
    code, output = lrr("run", recipe, "--output", root / "run")
    assert code == 0, output
    return root / "run"


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    size = save_backbone(root / "bert", "100MB", **BIG)
    assert len(list((root / "bert").glob("model-*.safetensors"))) >= 4
    return trained_run(root, root / "bert", "{name: lora, r: 4, alpha: 8}", "[Wq, Wv]"), size


# Runs `lrr export --merge` in a fresh process. Imports first: a merge of a tiny model
# (`warm`) imports whatever the export imports lazily; then the high-water mark of the
# resident memory is reset (clear_refs 5), so `peak - before` is what the export added.
MEASURE = """
import json, sys
from pathlib import Path
from lowrank_runner.cli import app

def export_merged(source, out, max_memory, max_shard_size="5GB"):
    args = ["export", str(source), "--merge", "--out", str(out), "--max-memory", str(max_memory),
            "--max-shard-size", max_shard_size]
    app(args, standalone_mode=False)
    return json.loads((out / "lrr_export.json").read_text())

def kb(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

source, out, memory, warm = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
export_merged(Path(warm), Path(out + "-warm-up"), max_memory=memory)
Path("/proc/self/clear_refs").write_text("5")
before = kb("VmRSS")
info = export_merged(Path(source), Path(out), max_shard_size="40MB", max_memory=memory)
print(json.dumps({"added": kb("VmHWM") - before, "checked": info["outputs_checked"], "shards": len(info["shards"])}))
"""


def measured_export(run: Path, out: Path, max_memory: int, warm: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(run), str(out), str(max_memory), str(warm)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_streamed_merge_peak_memory_stays_well_under_the_model_size(big, sharded, tmp_path):
    run, size = big
    assert size > 380e6
    streamed = measured_export(run, tmp_path / "streamed", max_memory=50_000_000, warm=sharded)
    assert streamed["checked"] == "per module" and streamed["shards"] >= 10
    assert streamed["added"] < 0.4 * size, f"the streamed merge added {streamed['added'] / 1e6:.0f} MB"
    # the control: the whole-model check loads the model; the measurement tells
    whole = measured_export(run, tmp_path / "whole", max_memory=10 * size, warm=sharded)
    assert whole["checked"] == "whole model"
    assert whole["added"] > 0.9 * size, f"the whole-model check added only {whole['added'] / 1e6:.0f} MB"
    print(f"model {size / 1e6:.0f} MB (float32); added peak memory: streamed {streamed['added'] / 1e6:.0f} MB, "
          f"with the whole-model check {whole['added'] / 1e6:.0f} MB")  # docs/benchmarks.md (pytest -s)
    info = json.loads((tmp_path / "streamed" / "lrr_export.json").read_text())
    assert info["merge"] == "streamed" and info["max_abs_logit_diff"] is None
    assert "--max-memory" in info["outputs_check_skipped"] and info["module_outputs_checked"] == 28
    for name in ("model.safetensors.index.json", "config.json", "tokenizer_config.json"):
        assert (tmp_path / "streamed" / name).is_file()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A small BERT in several shards, and a CondLoRA run on it (ΔW depends on W0)."""
    root = tmp_path_factory.mktemp("sharded")
    save_backbone(root / "bert", "8KB")
    assert len(list((root / "bert").glob("model-*.safetensors"))) > 2
    return trained_run(root, root / "bert", "{name: condlora, r: 2, alpha: 64}", "[Wq, Wv, Wo]")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_merge_equals_the_in_memory_merge_bit_for_bit(sharded, tmp_path, dtype):
    from lowrank_runner.export.merge import export_in_memory, export_merged

    shard = "10KB" if dtype == "float32" else "5KB"
    info = export_merged(sharded, tmp_path / "streamed", dtype=dtype, max_shard_size=shard)
    assert info["merge"] == "streamed" and info["outputs_checked"] == "whole model" and info["dtype"] == dtype
    assert info["max_abs_logit_diff"] <= 1e-5 and info["module_outputs_checked"] == 6
    assert info["reloaded_max_abs_logit_diff"] <= (1e-5 if dtype == "float32" else info["cast_allowed"])
    again = export_in_memory(sharded, tmp_path / "memory", 1e-3, dtype, shard, None, None)
    assert again["merge"] == "in memory" and info["shards"] == again["shards"] and len(info["shards"]) > 2
    for name in info["shards"]:
        a, b = load_file(str(tmp_path / "streamed" / name)), load_file(str(tmp_path / "memory" / name))
        assert list(a) == list(b) and all(a[k].dtype == getattr(torch, dtype) and torch.equal(a[k], b[k]) for k in a)
    for name in ("model.safetensors.index.json", "config.json"):
        assert json.loads((tmp_path / "streamed" / name).read_text()) == json.loads((tmp_path / "memory" / name).read_text())


def corrupted(run: Path, dst: Path, edit) -> Path:
    """A copy of ``run`` whose CondLoRA θ_B tensors ``edit`` changed."""
    from safetensors.torch import save_file

    shutil.copytree(run, dst)
    weights = dst / "adapter" / "adapter.safetensors"
    state = load_file(str(weights))
    for key, value in state.items():
        if key.endswith("theta_B"):
            edit(value)
    save_file(state, str(weights))
    return dst


@pytest.mark.parametrize("edit, dtype, message", [
    (lambda t: t.zero_(), None, r"is exactly zero \(6 modules\)"),
    (lambda t: t.mul_(1e-12), None, "below the precision of float32"),
    (lambda t: t.view(-1)[0].fill_(float("nan")), None, "the adapter's update ΔW holds NaN/Inf"),
    (lambda t: t.mul_(1e12), "float16", "cast to float16, .* overflows"),
])
def test_the_streamed_checks_refuse_an_update_that_changes_nothing_or_is_broken(sharded, tmp_path, edit, dtype, message):
    from lowrank_runner.errors import ExportError
    from lowrank_runner.export.merge import export_merged

    broken = corrupted(sharded, tmp_path / "broken", edit)
    with pytest.raises(ExportError, match=message):
        export_merged(broken, tmp_path / "out", dtype=dtype, max_memory=1000)  # the streamed checks alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_a_transposed_update_is_caught_per_module_and_nothing_is_written(sharded, tmp_path, monkeypatch):
    from lowrank_runner.errors import ExportError
    from lowrank_runner.export.merge import export_merged
    from lowrank_runner.methods.inject import AdaptedLayer

    original = AdaptedLayer.stored_delta
    monkeypatch.setattr(AdaptedLayer, "stored_delta", lambda self: original(self).T.contiguous())
    with pytest.raises(ExportError, match="does not reproduce the adapter's output") as caught:
        export_merged(sharded, tmp_path / "out", max_memory=1000)  # no whole-model check: the per-module one catches it
    assert "attention.self.query" in str(caught.value) and "nothing written" in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_backbone_without_safetensors_is_merged_in_memory(sharded, tmp_path):
    moved = tmp_path / "bin-bert"  # the same weights, as a PyTorch pickle only
    shutil.copytree(sharded.parent / "bert", moved, ignore=shutil.ignore_patterns("model*.safetensors*"))
    state = {k: v for shard in (sharded.parent / "bert").glob("model-*.safetensors") for k, v in load_file(str(shard)).items()}
    torch.save(state, moved / "pytorch_model.bin")
    code, output = lrr("export", sharded, "--merge", "--backbone", moved, "--out", tmp_path / "out")
    assert code == 0 and "no safetensors weights" in output and "merging in memory" in output, output
    info = json.loads((tmp_path / "out" / "lrr_export.json").read_text())
    assert info["merge"] == "in memory" and info["reloaded_max_abs_logit_diff"] <= 1e-5


@pytest.mark.parametrize("size", ["20000", "20KiB"])
def test_max_shard_size_in_bytes_or_binary_units(sharded, tmp_path, size):
    """Every size the option accepts reaches the writer as the same number of bytes."""
    code, output = lrr("export", sharded, "--merge", "--out", tmp_path / "out", "--max-shard-size", size)
    assert code == 0, output
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
