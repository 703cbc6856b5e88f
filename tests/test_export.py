"""lrr export: merged checkpoints of every method (pruned and grown ranks included), tied
embeddings, dtypes, shards, the ways a merge must fail loudly and leave nothing, and the
adapter bundle's round trip. Every run trains once (module-scoped fixtures)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.export.probe import compare_outputs, model_outputs, probe_batch
from lowrank_runner.export.source import head_config_of, load_trained_model
from lowrank_runner.rundir.adapter import save_adapter
from lowrank_runner.rundir.files import write_recipe
from lowrank_runner.rundir.layout import ADAPTER_CONFIG, ADAPTER_DIR, RECIPE_FILE
from tests.conftest import save_tiny_backbone

pytestmark = pytest.mark.slow


def lrr(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


# name: (backbone, targets, method, epochs); pruning and growth need steps to reach their final ranks
METHODS = {
    "lora": ("bert", "[Wq, Wv, Wo]", "{name: lora, r: 4, alpha: 8}", 1),
    "mtlora-dtsm": ("bert", "[Wq, Wv]", "{name: mtlora, r: 2, alpha: 8, structure: dtsm}", 1),
    "mtlora-gpt2-fused-qkv": ("gpt2", "[Wq, Wv, Wf]", "{name: mtlora, r: 2, alpha: 8, structure: ctcm}", 1),
    "lora2-pruned": ("bert", "[Wq, Wv]",
                     "{name: lora2, r: 4, k: 2, alpha: 8, target_rank: 1, t_init: 2, t_final: 4, mask_interval: 2}", 2),
    "triadaptlora-grown": ("bert", "[Wq, Wv]",
                           "{name: triadaptlora, r: 1, r_ref: 3, grow_by: 1, t_init: 2, grow_interval: 2, alpha: 8}", 2),
    "condlora": ("bert", "[Wq, Wv, Wo]", "{name: condlora, r: 2, alpha: 64}", 1),
}
# The other MTLoRA structures and LoRA on GPT-2's fused q/k/v: the trained runs' recipes
# with adapter weights drawn at random (hand_made_run), merged the same way.
DRAWN = {
    "mtlora-shim": ("mtlora-dtsm", {"structure": "shim"}),
    "mtlora-icfm": ("mtlora-dtsm", {"structure": "icfm"}),
    "mtlora-ctcm": ("mtlora-dtsm", {"structure": "ctcm"}),
    "lora-gpt2-fused-qkv": ("mtlora-gpt2-fused-qkv", {"name": "lora", "r": 2, "alpha": 4, "dropout": 0.0, "rslora": False}),
}


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    return {kind: save_tiny_backbone(root / kind, kind) for kind in ("bert", "gpt2")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, backbones, sentiment_data):
    """One trained run per method, plus the drawn variants."""
    train, validation = sentiment_data
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, (kind, targets, method, epochs) in METHODS.items():
        recipe = root / f"{name}.yaml"
        recipe.write_text(f"""
name: {name}
backbone: {{name: {backbones[kind]}}}
targets: {targets}
method: {method}
task:
  name: classification
  data: {{train: {train}, validation: {validation}}}
  max_length: 16
training: {{learning_rate: 5e-2, epochs: {epochs}, batch_size: 16, seed: 0, log_every: 6, eval_every: null}}
""")
        code, output = lrr("run", recipe, "--output", root / name)
        assert code == 0, output
        out[name] = root / name
    for name, (base, method) in DRAWN.items():
        out[name] = hand_made_run(out[base], root / name, "AutoModelForSequenceClassification", method=method)
    return out


def tokenizer_of(directory):
    from lowrank_runner.backbones import BackboneRef, load_tokenizer

    return load_tokenizer(BackboneRef(str(directory), str(directory), True))


def reference_outputs(source, batch, **kwargs):
    model, *_ = load_trained_model(source, dtype="float32", **kwargs)
    return model_outputs(model, batch)


@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("merged")
    out = {}
    for name, run_dir in runs.items():
        code, output = lrr("export", run_dir, "--merge", "--out", root / name)
        assert code == 0, f"{name}: {output}"
        out[name] = root / name
    return out


def test_every_method_merges_and_reloads_with_plain_transformers(runs, merged, tmp_path):
    expected, batches = {}, {}
    for name, run_dir in runs.items():
        info = json.loads((merged[name] / "lrr_export.json").read_text())
        assert info["max_abs_logit_diff"] <= 1e-5 and info["reloaded_max_abs_logit_diff"] <= 1e-5, name
        assert info["largest_abs_delta"] > 0 and info["outputs_compared"] == ["logits"] and info["dtype"] == "float32"
        batch = probe_batch(tokenizer_of(merged[name]), 16)
        expected[name], batches[name] = reference_outputs(run_dir, batch)["logits"], dict(batch)
        plain, *_ = load_trained_model(run_dir, with_adapter=False)
        changed, _ = compare_outputs({"logits": expected[name]}, model_outputs(plain, batch))
        assert changed > 1e-4, f"{name}: the adapter barely changes the outputs; the comparison would prove little"
    torch.save({"dirs": {n: str(p) for n, p in merged.items()}, "batches": batches}, tmp_path / "probe.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForSequenceClassification\n"
        f"probe = torch.load({str(tmp_path / 'probe.pt')!r})\n"
        "out = {}\n"
        "for name, d in probe['dirs'].items():\n"
        "    m = AutoModelForSequenceClassification.from_pretrained(d).eval()\n"
        "    with torch.no_grad():\n        out[name] = m(**probe['batches'][name]).logits\n"
        f"torch.save(out, {str(tmp_path / 'logits.pt')!r})\n"
        "assert not any(k.startswith('lowrank_runner') for k in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "logits.pt")
    for name in runs:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)


def test_pruned_and_grown_ranks_are_what_is_merged(runs, merged):
    pattern = json.loads((runs["lora2-pruned"] / "rank_pattern.json").read_text())
    assert sum(pattern.values()) == 4  # target_rank x modules: the pruned adapter, not the initial one
    grown = json.loads((runs["triadaptlora-grown"] / "rank_pattern.json").read_text())
    assert sum(grown.values()) == 12
    fused = json.loads((merged["mtlora-gpt2-fused-qkv"] / "lrr_export.json").read_text())
    assert fused["modules_merged"] == 4  # c_attn (q, v coupled) and mlp.c_fc in two blocks


def hand_made_run(src_run: Path, dst: Path, model_class: str, targets=None, method=None, seed: int = 0,
                  edit=None) -> Path:
    """A run directory as `lrr run` writes it, for a model class no task trains here yet
    (causal LM, extractive QA): adapter and head weights drawn at random; ``edit(adapted)``
    may then change them (e.g. prune or grow ranks) before they are saved."""
    from lowrank_runner.methods.inject import adapter_state_dict, is_adapter_param
    from lowrank_runner.modeling import build_adapted_model

    config = yaml.safe_load((src_run / RECIPE_FILE).read_text())
    if targets is not None:
        config["targets"] = targets
    if method is not None:  # another method replaces the parameters; the same one updates them
        same = method.get("name", config["method"]["name"]) == config["method"]["name"]
        config["method"] = {**config["method"], **method} if same else method
    adapter_cfg = json.loads((src_run / ADAPTER_DIR / ADAPTER_CONFIG).read_text())
    same_head = model_class == adapter_cfg["task"]["model_class"]
    task = adapter_cfg["task"] if same_head else {"name": "handmade", "model_class": model_class}
    adapted = build_adapted_model(config, getattr(transformers, model_class), head_config_of({"task": task}), weights=True)
    model = adapted.model
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter_param(name) or name in adapted.head_names:
                param.normal_(0.0, 0.3)
        if edit is not None:
            edit(adapted)
    adapter_cfg.update(
        method=config["method"], targets=config["targets"], head=adapted.head_names, task=task,
        modules=[{"path": t.path, "symbols": list(t.symbols), "groups": list(t.groups) if t.groups else None} for t in adapted.targets],
    )
    state = model.state_dict()
    save_adapter(dst / ADAPTER_DIR, adapter_state_dict(model, compact=True),
                     {n: state[n] for n in adapted.head_names}, adapter_cfg)
    write_recipe(dst / RECIPE_FILE, config, "hand", "hand", "test")
    return dst


def test_gpt2_causal_lm_stays_tied_and_matches(runs, tmp_path):
    run = hand_made_run(runs["lora-gpt2-fused-qkv"], tmp_path / "lm", "AutoModelForCausalLM")
    code, output = lrr("export", run, "--merge", "--out", tmp_path / "out")
    assert code == 0, output
    info = json.loads((tmp_path / "out" / "lrr_export.json").read_text())
    assert info["tied_word_embeddings"] is True and info["max_abs_logit_diff"] <= 1e-5
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight
    batch = probe_batch(tokenizer_of(tmp_path / "out"), 16)
    torch.testing.assert_close(model_outputs(reloaded, batch)["logits"], reference_outputs(run, batch)["logits"],
                               rtol=1e-5, atol=1e-5)


def test_merging_into_a_tied_weight_is_refused(runs, tmp_path):
    run = hand_made_run(runs["lora-gpt2-fused-qkv"], tmp_path / "lm", "AutoModelForCausalLM", targets=["lm_head"])
    code, output = lrr("export", run, "--merge", "--out", tmp_path / "out")
    assert code == 1 and "lm_head: its weight is tied to transformer.wte.weight" in output and "nothing written" in output
    assert not (tmp_path / "out").exists()


def test_question_answering_compares_start_and_end_logits(runs, tmp_path):
    run = hand_made_run(runs["lora"], tmp_path / "qa", "AutoModelForQuestionAnswering")
    code, output = lrr("export", run, "--merge", "--out", tmp_path / "out")
    assert code == 0, output
    info = json.loads((tmp_path / "out" / "lrr_export.json").read_text())
    assert info["outputs_compared"] == ["end_logits", "start_logits"] and info["max_abs_logit_diff"] <= 1e-5
    reloaded = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "out").eval()
    batch = probe_batch(tokenizer_of(tmp_path / "out"), 16)
    diff, _ = compare_outputs(reference_outputs(run, batch), model_outputs(reloaded, batch))
    assert diff <= 1e-5


def corrupted_copy(run_dir: Path, dst: Path, edit) -> Path:
    shutil.copytree(run_dir, dst)
    weights = dst / "adapter" / "adapter.safetensors"
    state = load_file(str(weights))
    edit(state)
    save_file(state, str(weights))
    return dst


def test_a_nan_adapter_exits_non_zero_and_writes_nothing(runs, tmp_path):
    def poison(state):
        key = next(k for k in state if k.endswith("lora_B"))
        state[key][0, 0] = float("nan")

    broken = corrupted_copy(runs["lora"], tmp_path / "broken", poison)
    code, output = lrr("export", broken, "--merge", "--out", tmp_path / "out")
    assert code == 1 and "NaN/Inf" in output and "nothing written" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no output, no temporary directory


def test_an_adapter_that_changes_nothing_exits_non_zero_and_writes_nothing(runs, tmp_path):
    def zero(state):
        for key, value in state.items():
            if key.endswith("lora_B"):
                value.zero_()

    inert = corrupted_copy(runs["lora"], tmp_path / "inert", zero)
    code, output = lrr("export", inert, "--merge", "--out", tmp_path / "out")
    assert code == 1 and "would change nothing" in output and "6 modules" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inert"]

    def shrink(state):
        for key, value in state.items():
            if key.endswith("lora_B"):
                value.mul_(1e-12)

    tiny = corrupted_copy(runs["lora"], tmp_path / "tiny", shrink)
    code, output = lrr("export", tiny, "--merge", "--out", tmp_path / "out")
    assert code == 1 and "below the precision of float32" in output and not (tmp_path / "out").exists()

    empty = corrupted_copy(runs["lora"], tmp_path / "empty", lambda state: state.clear())
    code, output = lrr("export", empty, "--merge", "--out", tmp_path / "out")
    assert code == 1 and "adapter weights missing" in output and not (tmp_path / "out").exists()


def saved_dtypes(directory: Path) -> set:
    return {str(v.dtype) for f in directory.glob("*.safetensors") for v in load_file(str(f)).values()}


def test_dtype_from_the_option_the_recipe_and_the_backbone(runs, backbones, tmp_path):
    run = runs["lora"]
    code, output = lrr("export", run, "--merge", "--dtype", "float16", "--out", tmp_path / "fp16")
    assert code == 0, output
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["dtype"] == "float16"
    assert saved_dtypes(tmp_path / "fp16") == {"torch.float16"}
    info = json.loads((tmp_path / "fp16" / "lrr_export.json").read_text())
    assert info["dtype"] == "float16" and 0 < info["cast_max_abs_logit_diff"] <= info["cast_allowed"]

    bf16_recipe = tmp_path / "bf16-run"
    shutil.copytree(run, bf16_recipe)
    config = yaml.safe_load((bf16_recipe / "recipe.yaml").read_text())
    config["backbone"]["dtype"] = "bfloat16"
    (bf16_recipe / "recipe.yaml").write_text(yaml.safe_dump(config))
    code, output = lrr("export", bf16_recipe, "--merge", "--out", tmp_path / "bf16")
    assert code == 0, output
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert saved_dtypes(tmp_path / "bf16") == {"torch.bfloat16"}

    # a backbone stored in bfloat16 (recipe: float32 by default) exports in bfloat16
    model = transformers.AutoModel.from_pretrained(backbones["bert"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bert-bf16")
    transformers.AutoTokenizer.from_pretrained(backbones["bert"]).save_pretrained(tmp_path / "bert-bf16")
    code, output = lrr("export", run, "--merge", "--backbone", tmp_path / "bert-bf16", "--out", tmp_path / "own")
    assert code == 0, output
    assert saved_dtypes(tmp_path / "own") == {"torch.bfloat16"}
    assert lrr("export", run, "--merge", "--dtype", "float64", "--out", tmp_path / "x")[0] == 2


def test_sharded_export_writes_an_index_and_reloads(runs, tmp_path):
    code, output = lrr("export", runs["condlora"], "--merge", "--max-shard-size", "2KB", "--out", tmp_path / "out")
    assert code == 0, output
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(shards) > 3 and set(index["weight_map"].values()) == {p.name for p in shards}
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    batch = probe_batch(tokenizer_of(tmp_path / "out"), 16)
    diff, _ = compare_outputs(reference_outputs(runs["condlora"], batch), model_outputs(reloaded, batch))
    assert diff <= 1e-5
    assert lrr("export", runs["condlora"], "--merge", "--max-shard-size", "lots", "--out", tmp_path / "x")[0] == 2


def test_bundle_round_trip_load_back_and_merge_from_it(runs, merged, backbones, tmp_path):
    import lowrank_runner

    run = runs["mtlora-gpt2-fused-qkv"]
    code, output = lrr("export", run, "--adapter", "--out", tmp_path / "bundle")
    assert code == 0, output
    bundle = tmp_path / "bundle"
    assert {"adapter.safetensors", "head.safetensors", "adapter_config.json", "recipe.yaml", "lrr_export.json",
            "tokenizer_config.json"} <= {p.name for p in bundle.iterdir()}
    cfg = json.loads((bundle / "adapter_config.json").read_text())
    assert cfg["method"]["structure"] == "ctcm" and cfg["modules"][0]["groups"] == ["q", "v"]
    assert cfg["backbone"]["name"] == str(backbones["gpt2"].resolve()) and cfg["task"]["model_class"]

    batch = probe_batch(tokenizer_of(bundle), 16)
    ours, *_ = load_trained_model(run)
    loaded = lowrank_runner.load_adapted(bundle)
    torch.testing.assert_close(model_outputs(loaded, batch), model_outputs(ours, batch), rtol=0, atol=0)
    moved = shutil.copytree(backbones["gpt2"], tmp_path / "moved-gpt2")
    again = lowrank_runner.load_adapted(bundle, backbone=str(moved))
    torch.testing.assert_close(model_outputs(again, batch), model_outputs(ours, batch), rtol=0, atol=0)

    code, output = lrr("export", bundle, "--merge", "--out", tmp_path / "from-bundle")
    assert code == 0, output
    for shard in ("model.safetensors",):
        a, b = load_file(str(tmp_path / "from-bundle" / shard)), load_file(str(merged["mtlora-gpt2-fused-qkv"] / shard))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_needs_exactly_one_format_and_merge_only_options(runs, tmp_path):
    code, output = lrr("export", runs["lora"], "--merge", "--adapter", "--out", tmp_path / "x")
    assert code == 2 and "choose one export" in output
    code, output = lrr("export", runs["lora"], "--adapter", "--dtype", "float16", "--out", tmp_path / "x")
    assert code == 2 and "--merge only" in output
    if importlib.util.find_spec("peft") is not None:
        code, output = lrr("export", runs["lora"], "--peft", "--out", tmp_path / "x")
        assert code == 0, output
    code, output = lrr("export", runs["condlora"], "--adapter", "--max-shard-size", "1GB", "--out", tmp_path / "y")
    assert code == 2 and "--merge only" in output


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")
def test_every_trained_run_exports_as_a_standard_lora_adapter(runs, tmp_path):
    """--peft on the trained runs (pruned LoRA2, grown TriAdaptLoRA, coupled GPT-2 q/k/v):
    the adapter holds each module's final rank (tests/test_peft_export.py: every family)."""
    for name, run_dir in runs.items():
        code, output = lrr("export", run_dir, "--peft", "--out", tmp_path / name)
        assert code == 0, f"{name}: {output}"
        ranks = json.loads((tmp_path / name / "lrr_export.json").read_text())["rank_pattern"]
        if (run_dir / "rank_pattern.json").exists():
            final = json.loads((run_dir / "rank_pattern.json").read_text())
            assert ranks == {k: v for k, v in final.items() if v}, name
    fused = json.loads((tmp_path / "mtlora-gpt2-fused-qkv" / "lrr_export.json").read_text())["rank_pattern"]
    assert {k: v for k, v in fused.items() if k.endswith("c_attn")} == {
        "transformer.h.0.attn.c_attn": 4, "transformer.h.1.attn.c_attn": 4}  # q and v coupled: 2r


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("1.5GB", 1_500_000_000), ("1.5 GB", 1_500_000_000),
                                        ("0.5GiB", 2**29), ("2KiB", 2048), ("1000", 1000), ("5Gb", 625_000_000)])
def test_sizes_read_as_transformers_reads_them_and_with_decimals(text, size):
    """--max-shard-size 1.5GB was refused without a word about decimals: they are read."""
    from lowrank_runner.export.common import check_size

    assert check_size(text, "--max-shard-size") == size
