"""``training.log_update_norm``: ‖ΔW‖ from the adapters' low-rank factors equals the norm
of the explicit ``delta_weight`` for every built-in adapter method, and `lrr run` logs it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.methods.inject import AdaptedLayer, inject, update_norms
from lowrank_runner.methods.registry import get_method_spec
from lowrank_runner.modeling import build_method
from lowrank_runner.targets import resolve_targets
from tests.conftest import tiny_classifier

# BERT: plain Linear modules; GPT-2: Conv1D (stored in x out) and a fused c_attn (q and v groups)
TARGETS = {"bert": ["Wq", "Wk", "Wv", "Wa", "Wm", "Wo"], "gpt2": ["Wq", "Wv", "Wa", "Wf", "Wo"]}
SETTINGS = {"lora": {"r": 4}, "mtlora": {"r": 4}, "lora2": {"r": 4, "k": 3}, "triadaptlora": {"r": 3},
            "condlora": {"r": 4}, "adalora": {"init_r": 4, "target_r": 2},
            "lora2-orthonormal": {"r": 4, "k": 3, "init": "orthonormal"}, "triadaptlora-fan_in": {"r": 3, "init": "fan_in"}}


def adapted(model_type: str, name: str):
    model = tiny_classifier(model_type)
    names = [n for n, _ in model.named_modules()]
    torch.manual_seed(1)
    method_name = name.partition("-")[0]
    method = build_method({"name": method_name, **get_method_spec(method_name).defaults(), **SETTINGS[name]})
    inject(model, method, resolve_targets(TARGETS[model_type], model_type, names))
    return model


def explicit_norms(model) -> list[float]:
    """Each adapted module's ‖ΔW‖_F from the out × in ΔW a merge writes."""
    return [float(m.stored_delta().double().norm()) for m in model.modules() if isinstance(m, AdaptedLayer)]


@pytest.mark.parametrize("model_type", sorted(TARGETS))
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_factor_norm_equals_the_explicit_update(model_type, name):
    model = adapted(model_type, name)
    start = update_norms(model)
    assert start == {"update_norm": 0.0, "update_norm_max": 0.0}  # every method starts at ΔW = 0
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lrr_adapter" in n or "lrr_shared" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    per_module = explicit_norms(model)
    got = update_norms(model)
    assert min(per_module) > 0
    assert got["update_norm"] == pytest.approx(math.sqrt(sum(x * x for x in per_module)), rel=1e-5)
    assert got["update_norm_max"] == pytest.approx(max(per_module), rel=1e-5)


def test_no_adapted_module_logs_nothing():
    model = tiny_classifier("bert")
    inject(model, build_method({"name": "bitfit", **get_method_spec("bitfit").defaults()}), [])
    assert update_norms(model) is None


def test_lrr_run_logs_the_update_norm(tiny_recipe, tmp_path):
    result = CliRunner().invoke(app, ["run", str(tiny_recipe()), "--output", str(tmp_path / "run"), "--set",
                                      "training.epochs=1", "--set", "training.log_every=1",
                                      "--set", "training.log_update_norm=true"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [ln for ln in lines if "loss" in ln and "eval" not in ln]
    norms = [ln["update_norm"] for ln in train]
    assert len(norms) == 6  # 96 examples / 16: every step logged
    assert 0 < norms[0] < norms[-1]
    assert all(0 < ln["update_norm_max"] <= ln["update_norm"] for ln in train)
