"""Target symbols resolve to the right modules on each backbone family."""

import pytest

from lowrank_runner.backbones import build_empty
from lowrank_runner.targets import TargetError, resolve_targets
from tests.conftest import tiny_config


def module_names(model_type):
    import transformers

    model = build_empty(transformers.AutoModelForSequenceClassification, tiny_config(model_type))
    return [n for n, _ in model.named_modules()]


@pytest.mark.parametrize("model_type,symbol,first", [
    ("bert", "Wq", "bert.encoder.layer.0.attention.self.query"),
    ("bert", "Wa", "bert.encoder.layer.0.attention.output.dense"),
    ("bert", "Wo", "bert.encoder.layer.0.output.dense"),
    ("roberta", "Wm", "roberta.encoder.layer.0.intermediate.dense"),
    ("deberta-v2", "Wk", "deberta.encoder.layer.0.attention.self.key_proj"),
    ("deberta-v2", "Wo", "deberta.encoder.layer.0.output.dense"),
    ("gpt2", "Wa", "transformer.h.0.attn.c_proj"),
    ("gpt2", "Wf", "transformer.h.0.mlp.c_fc"),
    ("llama", "Wv", "model.layers.0.self_attn.v_proj"),
    ("llama", "Wo", "model.layers.0.mlp.down_proj"),
])
def test_symbol_matches_one_module_per_layer(model_type, symbol, first):
    found = resolve_targets([symbol], model_type, module_names(model_type))
    assert len(found) == 2  # two layers
    assert found[0].path == first
    assert all(t.symbols == (symbol,) for t in found)


def test_wo_is_the_layer_output_not_the_attention_output():
    paths = [t.path for t in resolve_targets(["Wo"], "bert", module_names("bert"))]
    assert not any("attention" in p for p in paths)


def test_llama_wm_covers_up_and_gate():
    paths = [t.path for t in resolve_targets(["Wm"], "llama", module_names("llama"))]
    assert paths == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                     "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]


def test_gpt2_qkv_select_groups_of_the_fused_projection():
    found = resolve_targets(["Wq", "Wv"], "gpt2", module_names("gpt2"))
    assert [(t.path, t.groups, t.symbols) for t in found] == [
        ("transformer.h.0.attn.c_attn", ("q", "v"), ("Wq", "Wv")),
        ("transformer.h.1.attn.c_attn", ("q", "v"), ("Wq", "Wv")),
    ]


def test_patterns_suffix_and_regex():
    names = module_names("bert")
    assert [t.path for t in resolve_targets(["attention.self.query"], "bert", names)] == [
        "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query"]
    assert [t.path for t in resolve_targets([r"re:layer\.1\..*\.value$"], "bert", names)] == [
        "bert.encoder.layer.1.attention.self.value"]


@pytest.mark.parametrize("targets,message", [
    (["Wf"], "target symbol Wf is not defined for model_type 'bert' (defined: Wq, Wk, Wv, Wa, Wm, Wo)"),
    (["nothing.here"], "target pattern 'nothing.here' matched no module of this bert model"),
])
def test_unresolvable_targets(targets, message):
    with pytest.raises(TargetError) as exc:
        resolve_targets(targets, "bert", module_names("bert"))
    assert str(exc.value) == message
