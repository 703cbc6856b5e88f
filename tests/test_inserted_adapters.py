"""Inserted modules, the second kind of method: the ``houlsby`` and ``pfeiffer`` bottleneck
adapters. They start at the backbone, train only themselves (and the head), count
``2·d·b + b + d`` parameters per adapter, take only their own targets, resume exactly,
travel in a bundle, and are refused by ``--merge`` and ``--peft`` (no ΔW)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.export.bundle import load_adapted
from lowrank_runner.methods.inject import (NotMergeable, count_adapter_params, head_parameter_names, inject,
                                           mark_trainable, merge_adapters, update_norms)
from lowrank_runner.methods.registry import method_specs
from lowrank_runner.modeling import build_method
from lowrank_runner.targets import resolve_targets
from tests.conftest import tiny_classifier, tiny_recipe_text, token_batch

PLACEMENT = {"houlsby": ["Wa", "Wo"], "pfeiffer": ["Wo"]}
PER_LAYER = {"houlsby": 2, "pfeiffer": 1}
LABELS = torch.tensor([0, 2, 1])


def lrr(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def adapted(model_type: str, name: str, bottleneck: int = 4, **params):
    model = tiny_classifier(model_type)
    cfg = {"name": name, **method_specs()[name].defaults(), "bottleneck": bottleneck, **params}
    targets = resolve_targets(PLACEMENT[name], model_type, [n for n, _ in model.named_modules()])
    torch.manual_seed(1)
    injection = inject(model, build_method(cfg), targets)
    head = head_parameter_names(model)
    return model, injection, head, mark_trainable(model, head)


def logits(model):
    with torch.no_grad():
        return model(**token_batch()).logits


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("name", sorted(PLACEMENT))
def test_the_adapted_model_starts_at_the_backbone_and_counts_its_bottlenecks(model_type, name):
    expected = logits(tiny_classifier(model_type))
    model, injection, *_ = adapted(model_type, name, bottleneck=4)
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)
    d, b, layers = 16, 4, 2  # tests/conftest.py tiny_config
    assert count_adapter_params(model) == layers * PER_LAYER[name] * (2 * d * b + b + d)
    assert all(a.acts_on == "output" and not a.mergeable for a in injection.adapters.values())
    assert update_norms(model) is None  # no ΔW to measure


def test_near_identity_init_starts_near_not_at_the_backbone():
    expected = logits(tiny_classifier("bert"))
    model, *_ = adapted("bert", "houlsby", init="near_identity")
    diff = float((logits(model) - expected).abs().max())
    assert 0 < diff < 1e-2


@pytest.mark.parametrize("name", sorted(PLACEMENT))
def test_gradients_reach_only_the_inserted_modules_and_the_head(name):
    model, injection, head, trainable = adapted("bert", name)
    model.train()
    model(**token_batch(), labels=LABELS).loss.backward()
    assert set(trainable) == {n for n, _ in model.named_parameters() if ".lrr_adapter." in n} | set(head)
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    ups = [p for n, p in model.named_parameters() if n.endswith("adapter_up.weight")]
    assert len(ups) == 2 * PER_LAYER[name] and all(p.grad.abs().sum() > 0 for p in ups)


def test_an_inserted_module_has_no_delta_w_and_refuses_a_merge():
    model, injection, *_ = adapted("bert", "houlsby")
    with pytest.raises(NotMergeable, match="inserted after the layer"):
        merge_adapters(model)
    adapter = next(iter(injection.adapters.values()))
    with pytest.raises(NotImplementedError):
        adapter.lora_factors(None)


def test_inject_refuses_modules_outside_the_placement():
    model = tiny_classifier("bert")
    targets = resolve_targets(["Wq", "Wo"], "bert", [n for n, _ in model.named_modules()])
    cfg = {"name": "pfeiffer", **method_specs()["pfeiffer"].defaults()}
    with pytest.raises(ValueError, match=r"pfeiffer inserts its adapters after Wo only.*set targets: \[Wo\]"):
        inject(model, build_method(cfg), targets)


# ---------------------------------------------------------------- the recipe and the CLI

@pytest.fixture
def recipe(tmp_path, tiny_bert, sentiment_data):
    """The tiny LoRA recipe with ``targets`` and ``method`` replaced."""

    def make(targets: str, method: str):
        text = tiny_recipe_text(tiny_bert, sentiment_data)
        text = text.replace("targets: [Wq, Wv]", f"targets: {targets}")
        text = text.replace("method: {name: lora, r: 4, alpha: 8}", f"method: {method}")
        path = tmp_path / f"recipe-{abs(hash((targets, method)))}.yaml"
        path.write_text(text)
        return path

    return make


@pytest.mark.parametrize("name, targets", [("houlsby", "[Wq, Wv]"), ("houlsby", "[Wo]"), ("pfeiffer", "[Wa, Wo]"),
                                           ("pfeiffer", "[output.dense]")])
def test_other_targets_are_refused_at_the_key(recipe, name, targets):
    code, out = lrr("inspect", recipe(targets, f"{{name: {name}, bottleneck: 4}}"))
    fixed = ", ".join(PLACEMENT[name])
    assert code != 0
    assert f"method '{name}' inserts its modules at fixed places" in out and f"set targets: [{fixed}]" in out, out
    assert "targets" in out and "Traceback" not in out


def test_the_placement_in_any_order_and_a_bottleneck_above_the_hidden_size(recipe):
    code, out = lrr("inspect", recipe("[Wo, Wa]", "{name: houlsby, bottleneck: 4}"), "--json")
    assert code == 0, out
    run = json.loads(out)["runs"][0]
    assert run["adapter_params"] == 2 * 2 * (2 * 16 * 4 + 4 + 16)
    code, out = lrr("inspect", recipe("[Wa, Wo]", "{name: houlsby, bottleneck: 32}"))
    assert code != 0 and "method.bottleneck 32 is above" in out, out


def test_validate_accepts_the_methods_and_their_parameters(recipe):
    code, out = lrr("validate", recipe("[Wa, Wo]", "{name: houlsby, bottleneck: 8, activation: gelu}"))
    assert code == 0, out
    code, out = lrr("validate", recipe("[Wo]", "{name: pfeiffer, activation: tanh}"))
    assert code != 0 and "tanh" in out, out


COMMON = ["training.epochs=3", "training.log_every=1", "training.eval_every=3", "training.checkpoint_every=2"]


def run_args(recipe_path, out):
    args = ["run", recipe_path, "--output", out]
    for s in COMMON:
        args += ["--set", s]
    return args


@pytest.fixture
def houlsby_run(recipe, tmp_path):
    path = recipe("[Wa, Wo]", "{name: houlsby, bottleneck: 4, dropout: 0.1}")
    out = tmp_path / "whole"
    code, output = lrr(*run_args(path, out))
    assert code == 0, output
    return path, out


def test_a_run_trains_and_a_resumed_run_equals_an_uninterrupted_one(houlsby_run, tmp_path):
    path, whole = houlsby_run
    saved = load_file(str(whole / "adapter" / "adapter.safetensors"))
    assert saved and all(".lrr_adapter.adapter_" in k for k in saved)
    assert any(k.endswith("adapter_up.weight") and v.abs().sum() > 0 for k, v in saved.items())  # it trained
    parts = tmp_path / "parts"
    code, output = lrr(*run_args(path, parts), "--stop-after-step", 5)
    assert code == 0 and "stopped" in output, output
    code, output = lrr(*run_args(path, parts), "--resume")
    assert code == 0 and "resuming" in output, output
    assert (parts / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
    resumed = load_file(str(parts / "adapter" / "adapter.safetensors"))
    assert resumed.keys() == saved.keys() and all(torch.equal(resumed[k], saved[k]) for k in saved)


def test_the_bundle_reloads_and_merge_and_peft_are_refused(houlsby_run, tmp_path):
    _, run = houlsby_run
    code, output = lrr("export", run, "--adapter", "--out", tmp_path / "bundle")
    assert code == 0, output
    info = json.loads((tmp_path / "bundle" / "lrr_export.json").read_text())
    assert info["max_abs_logit_diff"] == 0
    batch = token_batch()
    with torch.no_grad():
        a = load_adapted(run)(**batch).logits
        b = load_adapted(tmp_path / "bundle")(**batch).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for option in ("--merge", "--peft"):
        for source in (run, tmp_path / "bundle"):
            out = tmp_path / f"refused{option}"
            code, output = lrr("export", source, option, "--out", out)
            assert code == 2, output
            assert f"{option}: this run used 'houlsby', which inserts new modules" in output
            assert "no update ΔW to merge" in output and "--adapter" in output and not out.exists()


def test_validate_refuses_other_targets_at_the_key(make_recipe, tiny_bert, sentiment_data):
    from typer.testing import CliRunner

    from lowrank_runner.cli import app
    from tests.conftest import tiny_recipe_text

    text = tiny_recipe_text(tiny_bert, sentiment_data).replace("{name: lora, r: 4, alpha: 8}", "{name: houlsby}")
    result = CliRunner().invoke(app, ["validate", str(make_recipe(text))])
    assert result.exit_code != 0
    assert "targets: method 'houlsby' inserts its modules at fixed places, after Wa and Wo; set targets: [Wa, Wo] " \
           "(got [Wq, Wv])" in result.output
    fixed = text.replace("targets: [Wq, Wv]", "targets: [Wa, Wo]")
    assert CliRunner().invoke(app, ["validate", str(make_recipe(fixed, "ok.yaml"))]).exit_code == 0
