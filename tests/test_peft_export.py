"""lrr export --peft for every method and backbone family: the exact LoRA factorisation
of each method's update (fused GPT-2 q/k/v, pruned and grown ranks, CondLoRA's per-layer
pairs), the PEFT adapter loaded with plain peft + transformers in a process that never
imported lowrank_runner, and PEFT's own merge_and_unload equal to our merged export."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.export.probe import model_outputs, probe_batch
from lowrank_runner.export.source import load_trained_model
from lowrank_runner.methods.base import leaf_items
from lowrank_runner.methods.registry import get_method_spec
from tests.conftest import save_tiny_backbone, tiny_config
from tests.test_export import hand_made_run, tokenizer_of

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft")

FAMILIES = ("bert", "roberta", "deberta-v2", "gpt2", "llama")
DECODERS = ("gpt2", "llama")
TARGETS = ["Wq", "Wv", "Wa", "Wm"]  # GPT-2: q and v are groups of the fused c_attn
METHODS = {
    "lora": {"name": "lora", "r": 2, "alpha": 4},
    "mtlora": {"name": "mtlora", "r": 2, "alpha": 4, "structure": "ctcm"},
    "lora2": {"name": "lora2", "r": 3, "k": 2, "alpha": 4},
    "triadaptlora": {"name": "triadaptlora", "r": 1, "r_ref": 3, "grow_by": 1, "alpha": 4},
    "condlora": {"name": "condlora", "r": 2, "alpha": 8},
    "adalora": {"name": "adalora", "init_r": 3, "target_r": 2, "alpha": 4},
    "sora": {"name": "sora", "r": 3, "alpha": 4},
    "increlora": {"name": "increlora", "r": 1, "target_rank": 3, "incre_rank_num": 1, "alpha": 4},
}


def lrr(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def dynamic_ranks(adapted) -> None:
    """Pruned (LoRA2, AdaLoRA, SoRA) and grown (TriAdaptLoRA, IncreLoRA) ranks that differ per module, one
    module with no rank left at all: what a finished dynamic-rank run saves."""
    for i, (_, leaf) in enumerate(leaf_items(adapted.injection.adapters)):
        if hasattr(leaf, "rank_mask"):  # LoRA2, AdaLoRA: keep i % 4 of the 3 ranks (0 for the first)
            leaf.rank_mask.zero_()
            leaf.rank_mask[: i % 4].fill_(1.0)
            if hasattr(leaf, "lora_E"):  # AdaLoRA masks by zeroing the pruned singular values
                leaf.lora_E["default"].mul_(leaf.rank_mask[:, None])
        elif hasattr(leaf, "gate"):  # SoRA: gates zeroed by the proximal step, all but the first i % 4
            leaf.gate[i % 4:] = 0.0
        elif hasattr(leaf, "add_reserves"):  # IncreLoRA: a reserve (e = 1e-5, in the pair), 0 to 2 ranks grown
            leaf.add_reserves(1, 1, True)
            for _ in range(i % 3):
                leaf.grow(1, 2, True)
        elif hasattr(leaf, "grow"):  # TriAdaptLoRA: grow 0, 1 or 2 ranks beyond r = 1, new entries at std 0.3
            leaf.init_std = 0.3
            leaf.grow(i % 3, None)


def save_backbone(directory, family: str):
    """The tiny backbone; a decoder as a causal LM checkpoint (with its own lm_head, as
    a real LLaMA has)."""
    save_tiny_backbone(directory, family)
    if family in DECODERS:
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(tiny_config(family)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory, sentiment_data):
    """One trained LoRA run per backbone family (the template of the drawn runs)."""
    train, validation = sentiment_data
    root = tmp_path_factory.mktemp("peft-seeds")
    runs = {}
    for family in FAMILIES:
        backbone = save_backbone(root / f"{family}-backbone", family)
        recipe = root / f"{family}.yaml"
        recipe.write_text(f"""
name: {family}
backbone: {{name: {backbone}}}
targets: [Wq, Wv]
method: {{name: lora, r: 2, alpha: 4}}
task:
  name: classification
  data: {{train: {train}, validation: {validation}}}
  max_length: 16
training: {{learning_rate: 5e-2, max_steps: 1, batch_size: 8, seed: 0, eval_every: null}}
""")
        code, output = lrr("run", recipe, "--output", root / family)
        assert code == 0, output
        runs[family] = root / family
    return runs


@pytest.fixture(scope="module")
def exports(seed_runs, tmp_path_factory):
    """Every method on every family (causal LMs for the decoders), drawn at random with
    dynamic ranks, exported with --peft."""
    root = tmp_path_factory.mktemp("peft-exports")
    out = {}
    for family, seed_run in seed_runs.items():
        model_class = "AutoModelForCausalLM" if family in DECODERS else "AutoModelForSequenceClassification"
        for name, method in METHODS.items():
            key = f"{family}-{name}"
            method = {**get_method_spec(name).defaults(), **method}  # as a resolved recipe has it
            run = hand_made_run(seed_run, root / "runs" / key, model_class, targets=TARGETS, method=method,
                                edit=dynamic_ranks)
            code, output = lrr("export", run, "--peft", "--out", root / "peft" / key)
            assert code == 0, f"{key}: {output}"
            out[key] = {"run": run, "peft": root / "peft" / key, "class": model_class,
                        "backbone": seed_run.parent / f"{family}-backbone"}
    return out


@pytest.fixture(scope="module")
def merged(exports, tmp_path_factory):
    """Our --merge export of every drawn run."""
    root = tmp_path_factory.mktemp("peft-merged")
    for key, e in exports.items():
        code, output = lrr("export", e["run"], "--merge", "--out", root / key)
        assert code == 0, f"{key}: {output}"
    return {key: root / key for key in exports}


def test_every_method_factors_exactly_with_ranks_per_module(exports):
    for key, e in exports.items():
        info = json.loads((e["peft"] / "lrr_export.json").read_text())
        cfg = json.loads((e["peft"] / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and info["factorisation_max_abs_diff"] <= 1e-5, key
        assert info["max_abs_logit_diff"] <= 1e-4 and info["reloaded_max_abs_logit_diff"] <= 1e-4, key
        assert info["check_dtype"] == "float32" and info["tolerance"] == 1e-4, key
        ranks = info["rank_pattern"]
        if key.endswith(("lora2", "adalora", "triadaptlora", "sora", "increlora")):
            assert len(set(ranks.values())) > 1, f"{key}: the drawn ranks should differ per module"
            assert cfg["rank_pattern"] and cfg["alpha_pattern"] == cfg["rank_pattern"], key  # scale folded: alpha = r
            assert cfg["lora_alpha"] == cfg["r"], key
        if key.startswith("gpt2") and key.endswith(("-lora", "mtlora", "condlora")):
            fused = [p for p in ranks if p.endswith("c_attn")]
            assert fused and all(ranks[p] == 4 for p in fused), f"{key}: q and v pairs side by side, rank 2r"
        if key.endswith("-lora") and not key.startswith("gpt2"):
            assert (cfg["r"], cfg["lora_alpha"]) == (2, 4) and not cfg["rank_pattern"], key  # LoRA keeps its own r, α


@pytest.mark.parametrize("key", ["bert-lora2", "bert-sora"])
def test_pruned_modules_are_left_out(exports, key):
    e = exports[key]
    modules = json.loads((e["run"] / "adapter" / "adapter_config.json").read_text())["modules"]
    ranks = json.loads((e["peft"] / "lrr_export.json").read_text())["rank_pattern"]
    assert len(ranks) < len(modules) and all(r > 0 for r in ranks.values())
    cfg = json.loads((e["peft"] / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(ranks)


def test_the_adapter_names_the_local_backbone_it_loaded(exports):
    for key, e in exports.items():
        cfg = json.loads((e["peft"] / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == str(e["backbone"]), key
        assert cfg["task_type"] == ("CAUSAL_LM" if "CausalLM" in e["class"] else "SEQ_CLS"), key
        if key.startswith(("bert", "roberta")):
            assert cfg["modules_to_save"] == ["classifier"], key


def test_plain_peft_reproduces_our_model_and_its_merge_equals_ours(exports, merged, tmp_path):
    """In a fresh process that never imports lowrank_runner: PeftModel.from_pretrained on
    the plain backbone gives our adapter model's outputs, and PEFT's merge_and_unload gives
    the weights of our --merge export."""
    probe, expected = {}, {}
    for key, e in exports.items():
        batch = dict(probe_batch(tokenizer_of(e["peft"]), 16))
        model, *_ = load_trained_model(e["run"], dtype="float32")
        expected[key] = model_outputs(model, batch)["logits"]
        probe[key] = {"backbone": str(e["backbone"]), "peft": str(e["peft"]), "merged": str(merged[key]),
                      "class": e["class"], "batch": batch}
    torch.save(probe, tmp_path / "probe.pt")
    code = f"""
import sys, torch, transformers
from peft import PeftModel
probe = torch.load({str(tmp_path / 'probe.pt')!r})
out = {{}}
for key, p in probe.items():
    cls = getattr(transformers, p["class"])
    kwargs = {{}} if "CausalLM" in p["class"] else {{"num_labels": 2}}
    base = cls.from_pretrained(p["backbone"], **kwargs)
    model = PeftModel.from_pretrained(base, p["peft"]).eval()
    with torch.no_grad():
        logits = model(**p["batch"]).logits
    merged = model.merge_and_unload()
    ours = cls.from_pretrained(p["merged"]).state_dict()
    worst = max(float((v - ours[k]).abs().max()) for k, v in merged.state_dict().items())
    out[key] = (logits, worst, sorted(set(ours) ^ set(merged.state_dict())))
torch.save(out, {str(tmp_path / 'out.pt')!r})
assert not any(m.startswith("lowrank_runner") for m in sys.modules), "lowrank_runner was imported"
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    for key in exports:
        logits, worst, differing = got[key]
        torch.testing.assert_close(logits, expected[key], rtol=1e-4, atol=1e-4, msg=key)
        assert worst <= 1e-5 and not differing, f"{key}: PEFT's merge differs from ours by {worst} ({differing[:3]})"


def test_a_pair_that_does_not_give_the_methods_update_writes_nothing(exports, tmp_path, monkeypatch):
    from lowrank_runner.methods.lora2 import LoRA2Adapter

    real = LoRA2Adapter.lora_factors
    monkeypatch.setattr(LoRA2Adapter, "lora_factors", lambda self, w0: (lambda b, a, s: (b, a, 2 * s))(*real(self, w0)))
    code, output = lrr("export", exports["bert-lora2"]["run"], "--peft", "--out", tmp_path / "x")
    assert code == 1 and "the LoRA pair differs from the method's ΔW" in output and not (tmp_path / "x").exists()


def test_each_methods_pair_is_its_update(exports):
    """The factorisation itself, module by module, on the drawn dynamic-rank adapters."""
    from lowrank_runner.methods.base import weight_out_in
    from lowrank_runner.methods.inject import AdaptedLayer

    for key in ("gpt2-mtlora", "gpt2-lora2", "llama-triadaptlora", "deberta-v2-condlora", "roberta-adalora",
                "gpt2-increlora"):
        model, *_ = load_trained_model(exports[key]["run"], dtype="float32")
        for path, module in model.named_modules():
            if isinstance(module, AdaptedLayer):
                w0 = weight_out_in(module.base_layer, module.info.fan_in_fan_out)
                with torch.no_grad():
                    b, a, scale = module.lrr_adapter.lora_factors(w0)
                    delta = module.lrr_adapter.delta_weight(w0)
                assert b.shape == (delta.shape[0], a.shape[0]) and a.shape[1] == delta.shape[1], (key, path)
                torch.testing.assert_close(scale * (b @ a), delta, rtol=1e-5, atol=1e-6, msg=f"{key} {path}")


def test_peft_export_of_a_causal_lm_loads_in_transformers_peft_integration(exports):
    """transformers' own PEFT integration (load_adapter), as serving stacks built on it do."""
    e = exports["llama-lora2"]
    model = transformers.AutoModelForCausalLM.from_pretrained(e["backbone"])
    model.load_adapter(str(e["peft"]))
    batch = probe_batch(tokenizer_of(e["peft"]), 16)
    ours, *_ = load_trained_model(e["run"], dtype="float32")
    torch.testing.assert_close(model_outputs(model.eval(), batch)["logits"], model_outputs(ours, batch)["logits"],
                               rtol=1e-4, atol=1e-4)


def test_condlora_shared_maps_are_adapter_not_head(exports):
    """CondLoRA registers its shared θ maps at the model's top level; they are adapter
    parameters (adapter.safetensors), never part of the task head (modules_to_save)."""
    cfg = json.loads((exports["bert-condlora"]["run"] / "adapter" / "adapter_config.json").read_text())
    assert cfg["head"] == ["classifier.weight", "classifier.bias"]
    peft_cfg = json.loads((exports["bert-condlora"]["peft"] / "adapter_config.json").read_text())
    assert peft_cfg["modules_to_save"] == ["classifier"]


def test_a_bfloat16_run_is_checked_in_float32_at_the_default_tolerance(seed_runs, tmp_path, monkeypatch):
    """A run on a bfloat16 BERT: PEFT's LoRA layers add the float32 update before rounding
    to bfloat16, ours after, so the check loads the backbone in float32 for both and holds
    them to the default 1e-4 (no --tolerance needed); a pair at a slightly wrong scale is refused."""
    import shutil

    import yaml

    from lowrank_runner.export import peft as peft_export
    from lowrank_runner.export.peft import Pair
    from lowrank_runner.rundir.layout import ADAPTER_DIR, RECIPE_FILE

    seed = tmp_path / "bf16-seed"
    shutil.copytree(seed_runs["bert"] / ADAPTER_DIR, seed / ADAPTER_DIR)
    config = yaml.safe_load((seed_runs["bert"] / RECIPE_FILE).read_text())
    config["backbone"]["dtype"] = "bfloat16"
    (seed / RECIPE_FILE).write_text(yaml.safe_dump(config))
    run = hand_made_run(seed, tmp_path / "run", "AutoModelForSequenceClassification")  # adapters far from zero
    code, output = lrr("export", run, "--peft", "--out", tmp_path / "peft")
    assert code == 0, output
    info = json.loads((tmp_path / "peft" / "lrr_export.json").read_text())
    assert info["check_dtype"] == "float32" and info["max_abs_logit_diff"] <= info["tolerance"] == 1e-4
    assert yaml.safe_load((run / RECIPE_FILE).read_text())["backbone"]["dtype"] == "bfloat16"
    real = peft_export.unit_scale
    monkeypatch.setattr(peft_export, "unit_scale",
                        lambda pairs: {k: Pair(p.b * 1.01, p.a, p.alpha) for k, p in real(pairs).items()})
    code, output = lrr("export", run, "--peft", "--out", tmp_path / "wrong")
    assert code == 1 and "PEFT's model differs from ours by" in output and not (tmp_path / "wrong").exists()
