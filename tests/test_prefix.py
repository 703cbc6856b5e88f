"""Prefix-tuning (Li & Liang 2021), the third kind of method: a prefix of keys and values
that every attention layer attends to, through transformers' cache. Checked against the
model's own attention: a prefix holding the keys and values of real tokens gives the
outputs of those tokens written before the input (causal models: every layer; an encoder:
its one layer), in a forward, in greedy and in beam-search generation; the prefix changes
the output from the start; a finished run saves the prefix without its MLP, and the
bundle reloads to the same outputs; ``--merge``/``--peft`` refuse; DeBERTa is refused."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.export.bundle import load_adapted
from lowrank_runner.methods.inject import (NotMergeable, adapter_state_dict, count_adapter_params, inject,
                                           load_adapter_state, merge_adapters, remove_adapters)
from lowrank_runner.modeling import build_method
from tests.conftest import tiny_classifier, tiny_config, tiny_recipe_text, token_batch

PREFIX = torch.tensor([[7, 8, 9, 11]])  # the real tokens a prefix stands for


def lrr(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def with_prefix(model, length=4, reparameterization=False, hidden=8):
    cfg = {"name": "prefix", "prefix_length": length, "reparameterization": reparameterization,
           "reparameterization_hidden": hidden, "dropout": 0.0}
    inject(model, build_method(cfg), [])
    return model


def set_prefix(model, keys_values: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write per-layer ``(keys, values)`` (each ``1 × heads × P × head size``) into the table."""
    encoder = model.lrr_shared
    length, layers, heads, size = encoder.shape
    table = torch.stack([torch.stack([k[0], v[0]]) for k, v in keys_values])  # layers, 2, heads, P, size
    with torch.no_grad():
        encoder.table.copy_(table.permute(3, 0, 1, 2, 4).reshape(length, -1))


def cached_keys_values(model, ids) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


def causal_lm(model_type):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_a_prefix_of_real_keys_and_values_equals_those_tokens_before_the_input(model_type):
    model = causal_lm(model_type)
    x = torch.tensor([[5, 6, 12, 13, 14], [15, 16, 17, 18, 19]])
    full = torch.cat([PREFIX.expand(2, -1), x], dim=1)
    with torch.no_grad():
        expected = model(input_ids=full).logits[:, PREFIX.shape[1]:]
    kv = cached_keys_values(model, PREFIX)
    with_prefix(model)
    set_prefix(model, kv)
    with torch.no_grad():
        got = model(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beams", [1, 3])
def test_generation_sees_the_prefix_greedy_and_beam_search(beams):
    model = causal_lm("gpt2")
    x = torch.tensor([[5, 6, 12], [0, 15, 16]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])  # the second one left-padded
    full = torch.cat([PREFIX.expand(2, -1), x], dim=1)
    full_mask = torch.cat([torch.ones(2, PREFIX.shape[1], dtype=torch.long), mask], dim=1)
    settings = dict(max_new_tokens=6, num_beams=beams, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(input_ids=full, attention_mask=full_mask, **settings)[:, full.shape[1]:]
        without = model.generate(input_ids=x, attention_mask=mask, **settings)[:, x.shape[1]:]
    kv = cached_keys_values(model, PREFIX)
    with_prefix(model)
    set_prefix(model, kv)
    with torch.no_grad():
        got = model.generate(input_ids=x, attention_mask=mask, **settings)[:, x.shape[1]:]
    assert torch.equal(got, expected)
    assert not torch.equal(got, without)  # the prefix is what made the difference


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_an_encoder_attends_to_the_prefix_as_to_tokens_before_its_input(model_type):
    """In a one-layer encoder the keys and values of tokens written before the input do not
    depend on the input, so a prefix holding them must give the same hidden states."""
    torch.manual_seed(0)
    config = tiny_config(model_type)
    config.num_hidden_layers = 1
    model = transformers.AutoModel.from_config(config, add_pooling_layer=False).eval()
    x = torch.tensor([[5, 6, 12, 13], [15, 16, 17, 1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    full = torch.cat([PREFIX.expand(2, -1), x], dim=1)
    full_mask = torch.cat([torch.ones(2, PREFIX.shape[1], dtype=torch.long), mask], dim=1)
    with torch.no_grad():
        expected = model(input_ids=full, attention_mask=full_mask).last_hidden_state[:, PREFIX.shape[1]:]
    projections = {}
    attention = model.encoder.layer[0].attention.self
    hooks = [getattr(attention, name).register_forward_hook(lambda m, i, o, name=name: projections.update({name: o}))
             for name in ("key", "value")]
    with torch.no_grad():
        model(input_ids=PREFIX)
    for hook in hooks:
        hook.remove()
    heads = config.num_attention_heads
    kv = [tuple(projections[n].view(1, PREFIX.shape[1], heads, -1).transpose(1, 2) for n in ("key", "value"))]
    with_prefix(model)
    set_prefix(model, kv)
    with torch.no_grad():
        got = model(input_ids=x, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


def test_the_prefix_counts_changes_the_output_from_the_start_and_trains_alone():
    model = tiny_classifier("bert")
    before = model(**token_batch()).logits
    with_prefix(model, length=3, reparameterization=True, hidden=8)
    encoder = model.lrr_shared
    layers, width = 2, 16  # tiny BERT: 2 layers, hidden 16
    assert count_adapter_params(model) == 3 * width + (width * 8 + 8) + (8 * layers * 2 * width + layers * 2 * width)
    assert not torch.allclose(model(**token_batch()).logits, before)  # attention over the prefix from step 0
    saved = adapter_state_dict(model, compact=True)
    assert list(saved) == ["lrr_shared.table"] and saved["lrr_shared.table"].numel() == 3 * layers * 2 * width
    assert encoder.compact_state()["table"].shape == (3, layers * 2 * width)
    with pytest.raises(NotMergeable):
        merge_adapters(model)
    plain = remove_adapters(model)
    torch.testing.assert_close(plain(**token_batch()).logits, before, rtol=0, atol=0)  # the hook went with it


def test_the_saved_prefix_without_its_mlp_reproduces_the_outputs():
    model = with_prefix(tiny_classifier("roberta"), reparameterization=True)
    expected = model(**token_batch()).logits
    fresh = with_prefix(tiny_classifier("roberta"), reparameterization=True)
    assert load_adapter_state(fresh, adapter_state_dict(model, compact=True)) == []
    assert not hasattr(fresh.lrr_shared, "mlp")
    torch.testing.assert_close(fresh(**token_batch()).logits, expected, rtol=0, atol=0)


def test_a_backbone_without_a_key_value_cache_is_refused():
    with pytest.raises(ValueError, match="prefix cannot reach the attention of deberta-v2 models"):
        with_prefix(tiny_classifier("deberta-v2"))


# ---------------------------------------------------------------- through the CLI


@pytest.fixture
def prefix_recipe(tmp_path, tiny_bert, sentiment_data):
    text = tiny_recipe_text(tiny_bert, sentiment_data).replace("targets: [Wq, Wv]\n", "")
    text = text.replace("method: {name: lora, r: 4, alpha: 8}", "method: {name: prefix, prefix_length: 4, "
                                                                  "reparameterization_hidden: 8}")
    path = tmp_path / "prefix.yaml"
    path.write_text(text)
    return path


def test_inspect_counts_and_refuses_a_prefix_beyond_the_position_table(prefix_recipe):
    code, out = lrr("inspect", prefix_recipe, "--json")
    assert code == 0, out
    run = json.loads(out)["runs"][0]
    assert run["adapter_params"] == 4 * 16 + (16 * 8 + 8) + (8 * 2 * 2 * 16 + 2 * 2 * 16)
    code, out = lrr("inspect", prefix_recipe, "--set", "method.prefix_length=60")
    assert code != 0 and "the 60 positions method.name places before the input" in out, out


def test_a_run_trains_resumes_exactly_and_travels_as_a_bundle(prefix_recipe, tmp_path):
    common = ["--set", "training.epochs=3", "--set", "training.eval_every=3", "--set", "training.checkpoint_every=2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    code, out = lrr("run", prefix_recipe, "--output", whole, *common)
    assert code == 0, out
    saved = load_file(str(whole / "adapter" / "adapter.safetensors"))
    assert list(saved) == ["lrr_shared.table"]  # the MLP was dropped
    code, out = lrr("run", prefix_recipe, "--output", parts, *common, "--stop-after-step", 5)
    assert code == 0 and "stopped" in out, out
    code, out = lrr("run", prefix_recipe, "--output", parts, *common, "--resume")
    assert code == 0, out
    assert (parts / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
    assert torch.equal(load_file(str(parts / "adapter" / "adapter.safetensors"))["lrr_shared.table"],
                       saved["lrr_shared.table"])
    code, out = lrr("export", whole, "--adapter", "--out", tmp_path / "bundle")
    assert code == 0, out
    with torch.no_grad():
        a = load_adapted(whole)(**token_batch()).logits
        b = load_adapted(tmp_path / "bundle")(**token_batch()).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for option in ("--merge", "--peft"):
        code, out = lrr("export", whole, option, "--out", tmp_path / f"refused{option}")
        assert code == 2 and "which learns keys and values that every attention layer attends to" in out, out
        assert not (tmp_path / f"refused{option}").exists()


def test_lrrs_batched_left_padded_generation_with_a_prefix_equals_one_by_one():
    """lrr's own decoding (tasks/generation.py) with a prefix: prompts decoded together
    (left-padded) give what each gives alone, so the prefix's positions follow the mask. A
    prompt decoded alone is unpadded, and ``generate`` then passes no mask: the prefix's
    mask must cover the cached positions at every step (one covering the new token only
    failed here)."""
    from tests.test_nlg import decoded_together_and_alone, decoder_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = decoder_model(tokenizer)
    without, _ = decoded_together_and_alone(model, tokenizer)
    with_prefix(model)  # its N(0, 1) start changes the continuations
    together, alone = decoded_together_and_alone(model, tokenizer)
    assert together == alone and together != without


@pytest.mark.slow
def test_a_gpt2_data_to_text_run_trains_the_prefix_and_decodes_with_it(tmp_path):
    from tests.test_nlg import tiny_nlg_recipe, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    backbone = tmp_path / "tiny-gpt2"
    tokenizer.save_pretrained(backbone)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(tiny_config("gpt2", vocab_size=len(tokenizer), initializer_range=0.5)).save_pretrained(backbone)
    recipe = tiny_nlg_recipe(backbone, tmp_path)
    recipe.write_text(recipe.read_text().replace("targets: [Wq, Wv]\n", "").replace(
        "method: {name: lora, r: 2, alpha: 4, dropout: 0.1}", "method: {name: prefix, prefix_length: 3, reparameterization: false}"))
    code, out = lrr("run", recipe, "--output", tmp_path / "run")
    assert code == 0, out
    evals = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    assert evals[1]["eval"]["loss"] < evals[0]["eval"]["loss"]  # the prefix alone learns
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["adapter_params"] == report["trainable_params"] == 3 * 2 * 2 * 16  # P x layers x (key, value) x d
    outputs = [json.loads(ln) for ln in (tmp_path / "run" / "outputs_validation.jsonl").read_text().splitlines()]
    assert outputs and all(isinstance(o["output"], str) for o in outputs)



def test_gradient_checkpointing_is_refused_at_its_key(prefix_recipe):
    """transformers drops the cache from checkpointed layers: the prefix would be lost (the
    attention mask then no longer fits: measured, every family fails)."""
    code, out = lrr("validate", prefix_recipe, "--set", "training.gradient_checkpointing=true")
    assert code != 0 and "training.gradient_checkpointing: method prefix cannot train with gradient checkpointing" in out
