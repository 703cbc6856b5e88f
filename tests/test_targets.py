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


def module_kinds(model_type):
    """Module names and the class names of those no adapter can wrap (what lrr passes)."""
    import transformers

    from lowrank_runner.methods.inject import is_adaptable

    model = build_empty(transformers.AutoModelForSequenceClassification, tiny_config(model_type))
    modules = dict(model.named_modules())
    return list(modules), {n: type(m).__name__ for n, m in modules.items() if not is_adaptable(m)}


@pytest.mark.parametrize("model_type,targets,first_bad", [
    ("bert", ["re:.*"], "the whole model (BertForSequenceClassification)"),
    ("bert", ["embeddings.word_embeddings"], "bert.embeddings.word_embeddings (Embedding)"),
    ("bert", ["re:LayerNorm$"], "bert.embeddings.LayerNorm (LayerNorm)"),
    ("bert", ["re:layer\\.0$"], "bert.encoder.layer.0 (BertLayer)"),
    ("gpt2", ["wte"], "transformer.wte (Embedding)"),
    ("llama", ["re:norm"], "model.layers.0.input_layernorm (LlamaRMSNorm)"),
    ("deberta-v2", ["rel_embeddings"], "deberta.encoder.rel_embeddings (Embedding)"),
])
def test_targets_that_are_not_linear_layers_are_refused(model_type, targets, first_bad):
    names, not_adaptable = module_kinds(model_type)
    with pytest.raises(TargetError) as exc:
        resolve_targets(targets, model_type, names, not_adaptable)
    assert f"cannot be adapted: {first_bad}" in str(exc.value)
    assert "only linear layers (nn.Linear, GPT-2's Conv1D) can" in str(exc.value)


def test_linear_targets_pass_the_adaptable_check():
    names, not_adaptable = module_kinds("gpt2")
    found = resolve_targets(["Wq", "Wv", "Wa", "re:mlp\\.c_(fc|proj)$"], "gpt2", names, not_adaptable)
    assert len(found) == 8 and all(t.path not in not_adaptable for t in found)


def test_a_target_matching_nothing_lists_what_can_be_adapted():
    names, not_adaptable = module_kinds("llama")
    with pytest.raises(TargetError) as exc:
        resolve_targets(["attention.self.query"], "llama", names, not_adaptable)
    assert str(exc.value) == (
        "target pattern 'attention.self.query' matched no module of this llama model; its adaptable modules: "
        "self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, self_attn.o_proj, mlp.gate_proj, mlp.up_proj, "
        "mlp.down_proj, score")


def test_an_invalid_regular_expression_is_a_target_error():
    with pytest.raises(TargetError) as exc:
        resolve_targets(["re:("], "bert", module_names("bert"))
    assert str(exc.value).startswith("target pattern 're:(' is not a valid regular expression: missing ), ")
