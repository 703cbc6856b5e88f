"""Quantized bases (``backbone.quantization``, bitsandbytes, QLoRA-style): every adapter
method trains on a 4-bit (and 8-bit) base with only its adapters and the head learning
and the packed weights untouched; CondLoRA's ``W0`` is bitsandbytes' own dequantization;
``lrr export --merge`` of a quantized run dequantizes, merges in float32 and reloads as a
plain float model matching the adapter model on its quantized base; bad combinations are
refused by ``lrr validate`` at the recipe line. Runs on the CPU (bitsandbytes' CPU backend)."""

from __future__ import annotations

import json
import textwrap

import pytest

bnb = pytest.importorskip("bitsandbytes")

import torch  # noqa: E402
import transformers  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from lowrank_runner import backbones  # noqa: E402
from lowrank_runner.cli import app  # noqa: E402
from lowrank_runner.errors import RecipeError  # noqa: E402
from lowrank_runner.methods.base import weight_out_in  # noqa: E402
from lowrank_runner.methods.inject import AdaptedLayer, is_adapter_param  # noqa: E402
from lowrank_runner.methods.registry import method_specs  # noqa: E402
from lowrank_runner.modeling import build_adapted_model  # noqa: E402
from lowrank_runner.recipe.load import load_recipe  # noqa: E402
from tests.conftest import save_tiny_backbone, token_batch  # noqa: E402
from tests.test_conformance import SETTINGS  # noqa: E402

METHODS = ["lora", "lora2", "triadaptlora", "condlora", "mtlora"]
CLASSIFIER = transformers.AutoModelForSequenceClassification
STEPS = {"triadaptlora": {"t_init": 1, "grow_interval": 1, "r_ref": 4}}  # a growth step within two steps
LABELS = torch.tensor([0, 1, 1])


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny-llama"), "llama")


def run_config(backbone, method: str, quantization: dict, targets=("Wq", "Wv")) -> dict:
    params = {**method_specs()[method].defaults(), "r": 4, **SETTINGS.get(method, {}), **STEPS.get(method, {})}
    return {"backbone": {"name": str(backbone), "dtype": "float32", "quantization": quantization, "revision": None,
                         "trust_remote_code": False},
            "targets": list(targets), "method": {"name": method, **params},
            "task": {"max_length": 16}, "training": {"train_head": True}}


def quantized_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if backbones.is_quantized_layer(m)}


def train_steps(adapted, steps: int = 2) -> list[float]:
    """What the loop does per step, on the model alone: task loss (+ the method's
    regulariser), backward, AdamW, the method's rank hook, gradients cleared."""
    model, method, adapters = adapted.model.train(), adapted.method, adapted.injection.adapters
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    method.on_train_begin(10, adapters=adapters)  # a planned run of 10 steps, the first few taken
    losses = []
    for step in range(1, steps + 1):
        loss = model(**token_batch(), labels=LABELS).loss
        extra = method.extra_loss(adapters)
        (loss if extra is None else loss + extra).backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None}
        assert grads and grads <= set(adapted.trainable_names), grads - set(adapted.trainable_names)
        optimizer.step()
        method.after_optimizer_step(step, adapters, optimizer)
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_a_4bit_llama(tiny_llama, method):
    adapted = build_adapted_model(run_config(tiny_llama, method, {"bits": 4}), CLASSIFIER, {"num_labels": 2},
                                  weights=True)
    layers = quantized_layers(adapted.model)
    assert len(layers) == 2 * 7 and all(type(m.weight).__name__ == "Params4bit" for m in layers.values())
    assert all(isinstance(m, AdaptedLayer) for n, m in adapted.model.named_modules()
               if n.endswith(("q_proj", "v_proj")) and not n.startswith("lrr_shared"))
    assert type(adapted.model.get_submodule("model.layers.0.mlp.up_proj")).__name__ == "Linear4bit"  # not adapted
    assert type(adapted.model.score) is torch.nn.Linear and adapted.model.score.weight.requires_grad  # the head: float
    assert layers["model.layers.0.self_attn.q_proj.base_layer"].compute_dtype == torch.bfloat16
    packed = {n: m.weight.data.clone() for n, m in layers.items()}
    shared = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if is_adapter_param(n)}
    losses = train_steps(adapted)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.equal(layers[n].weight.data, w) for n, w in packed.items())  # the base stays as loaded
    assert all(type(m.weight).__name__ == "Params4bit" for m in layers.values())
    changed = [n for n, p in adapted.model.named_parameters() if n in shared and not torch.equal(p, shared[n])]
    assert changed  # the adapters (CondLoRA: its shared maps) learned
    assert not any(p.requires_grad for n, p in adapted.model.named_parameters() if n in {f"{k}.weight" for k in layers})


def test_a_bert_classifier_and_an_8bit_base_train(tmp_path):
    bert = save_tiny_backbone(tmp_path / "bert", "bert")
    adapted = build_adapted_model(run_config(bert, "lora", {"bits": 4, "type": "fp4", "compute_dtype": "float32"},
                                             ("Wq", "Wv")), CLASSIFIER, {"num_labels": 2}, weights=True)
    layers = quantized_layers(adapted.model)
    assert layers and all(m.weight.quant_state.quant_type == "fp4" for m in layers.values())
    assert "classifier" not in {n.rpartition(".")[0] for n in layers} and adapted.model.classifier.weight.requires_grad
    assert all(torch.isfinite(torch.tensor(train_steps(adapted))))
    eight = build_adapted_model(run_config(bert, "condlora", {"bits": 8}, ("Wq", "Wv")), CLASSIFIER, {"num_labels": 2},
                                weights=True)
    layers = quantized_layers(eight.model)
    assert layers and all(m.weight.dtype == torch.int8 for m in layers.values())
    packed = {n: m.weight.data.clone() for n, m in layers.items()}
    assert all(torch.isfinite(torch.tensor(train_steps(eight))))
    assert all(torch.equal(layers[n].weight.data, w) for n, w in packed.items())


def test_weight_out_in_is_the_dequantized_weight(tiny_llama):
    four = build_adapted_model(run_config(tiny_llama, "condlora", {"bits": 4}), CLASSIFIER, {"num_labels": 2},
                               weights=True)
    layer = four.model.get_submodule("model.layers.1.self_attn.q_proj").base_layer
    w0 = weight_out_in(layer, False)
    assert w0.shape == (layer.out_features, layer.in_features) and w0.dtype == torch.float32
    assert torch.equal(w0, bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    plain = transformers.AutoModel.from_pretrained(tiny_llama).layers[1].self_attn.q_proj.weight
    assert 0 < (w0 - plain).abs().max() < 0.5 * plain.abs().max()  # quantized: close, not equal
    eight = build_adapted_model(run_config(tiny_llama, "lora", {"bits": 8}), CLASSIFIER, {"num_labels": 2}, weights=True)
    layer = eight.model.get_submodule("model.layers.1.self_attn.q_proj").base_layer
    expected = bnb.functional.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)
    assert torch.equal(weight_out_in(layer, False), expected)
    assert eight.injection.layers["model.layers.1.self_attn.q_proj"].dtype == torch.float16


def lrr(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def recipe(tmp_path, backbone, data, quantization: str, method: str = "condlora, r: 4, alpha: 8", extra: str = ""):
    train, validation = data
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(f"""
        name: q
        backbone: {{name: {backbone}, quantization: {quantization}}}
        targets: [Wq, Wv]
        method: {{name: {method}}}
        task:
          name: classification
          data: {{train: {train}, validation: {validation}}}
          max_length: 16
        training: {{learning_rate: 5e-2, max_steps: 2, batch_size: 16, seed: 0, log_every: 1}}
        output: {{dir: {tmp_path / 'runs'}}}
        """).lstrip() + extra)
    return path


def test_merge_export_of_a_4bit_run_reloads_as_a_float_model(tmp_path, tiny_llama, sentiment_data):
    from lowrank_runner.export.merge import quantized_allowed
    from lowrank_runner.export.probe import compare_outputs, model_outputs, probe_batch
    from lowrank_runner.export.source import load_trained_model

    code, out = lrr("run", recipe(tmp_path, tiny_llama, sentiment_data, "{bits: 4}"))
    assert code == 0, out
    run = next((tmp_path / "runs" / "q").iterdir())
    precision = json.loads((run / "report.json").read_text())["precision"]
    assert precision["quantization"] == {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    code, out = lrr("export", run, "--merge", "--out", tmp_path / "merged")
    assert code == 0, out
    assert "merging in memory" in out and "quantized base" in out
    info = json.loads((tmp_path / "merged" / "lrr_export.json").read_text())
    assert info["quantization"] == {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    assert info["quantized_max_abs_logit_diff"] <= info["quantized_allowed"] and info["dtype"] == "float32"
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = CLASSIFIER.from_pretrained(tmp_path / "merged").eval()
    assert not quantized_layers(merged) and {p.dtype for p in merged.parameters()} == {torch.float32}
    ours, *_ = load_trained_model(run, dtype="float32")  # the adapter model on its 4-bit base, as trained
    assert quantized_layers(ours)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batch = probe_batch(tokenizer, 16)
    reference = model_outputs(ours, batch)
    diff, _ = compare_outputs(reference, model_outputs(merged, batch))
    assert diff <= quantized_allowed({"bits": 4}, reference, 1e-3)
    # the merge is not the unquantized backbone plus ΔW: the base weights are the dequantized ones
    plain = transformers.AutoModel.from_pretrained(tiny_llama).layers[0].mlp.gate_proj.weight
    assert not torch.equal(merged.model.layers[0].mlp.gate_proj.weight, plain)
    # in bfloat16: the model checked in memory is the one reloaded (LLaMA's rotary inv_freq,
    # computed when the model is built, stays float32 in both: the reload matches exactly)
    code, out = lrr("export", run, "--merge", "--dtype", "bfloat16", "--out", tmp_path / "merged16")
    assert code == 0, out
    info16 = json.loads((tmp_path / "merged16" / "lrr_export.json").read_text())
    assert info16["dtype"] == "bfloat16" and info16["reloaded_max_abs_logit_diff"] <= info16["cast_allowed"]

    # --peft: a QLoRA adapter, loaded with plain PEFT onto the backbone quantized by plain transformers
    peft = pytest.importorskip("peft")
    code, out = lrr("export", run, "--peft", "--out", tmp_path / "peft")
    assert code == 0, out
    assert json.loads((tmp_path / "peft" / "lrr_export.json").read_text())["backbone"]["quantization"] == {"bits": 4}
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["score"])
    base = CLASSIFIER.from_pretrained(tiny_llama, num_labels=2, quantization_config=q, device_map="cpu")
    backbones.keep_standard_layout(base)  # bitsandbytes' CPU repacking needs output sizes in multiples of 32
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    diff, _ = compare_outputs(reference, model_outputs(theirs, batch))
    assert diff <= 1e-4


def test_a_quantized_gpt2_merges_back_into_conv1d_layers(tmp_path):
    """transformers quantizes GPT-2's Conv1D layers as out x in linear layers: the merge
    dequantizes, folds ΔW in and stores them as Conv1D again (the layout GPT-2 loads)."""
    from lowrank_runner.export.merge import quantized_allowed
    from lowrank_runner.export.probe import compare_outputs, model_outputs
    from lowrank_runner.methods.inject import merge_adapters

    gpt2 = save_tiny_backbone(tmp_path / "gpt2", "gpt2")
    adapted = build_adapted_model(run_config(gpt2, "condlora", {"bits": 4}), CLASSIFIER, {"num_labels": 2},
                                  weights=True)
    model = adapted.model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_param(name):
                p.normal_(0, 0.1)
    batch = token_batch()
    quantized = model_outputs(model, batch)
    model = backbones.restore_source_layers(merge_adapters(backbones.dequantize_model(model)))
    conv = model.transformer.h[0].attn.c_attn
    assert type(conv).__name__ == "Conv1D" and tuple(conv.weight.shape) == (16, 48)
    model.save_pretrained(tmp_path / "merged")
    reloaded = CLASSIFIER.from_pretrained(tmp_path / "merged").eval()
    diff, _ = compare_outputs(quantized, model_outputs(reloaded, batch))
    assert diff <= quantized_allowed({"bits": 4}, quantized, 1e-3)


@pytest.mark.parametrize("quantization, method, says", [
    ("{bits: 4}", "full", "method 'full' trains the backbone's own weights"),
    ("{bits: 4}", "bitfit", "method 'bitfit' trains the backbone's own weights"),
    ("{bits: 8, type: nf4}", "lora", "unknown key 'type' (allowed here: bits, threshold)"),
    ("{bits: 4, compute_dtype: int8}", "lora", "must be one of 'float32', 'bfloat16', 'float16'"),
    ("{bits: 2}", "lora", "must be one of 4, 8; got 2"),
    ("{bits: '4'}", "lora", "got '4' (write 4 without quotes: a number, not a string)"),
    ("{bits: 4}", "lora fsdp", "cannot be sharded with training.fsdp"),
])
def test_bad_quantization_settings_are_refused(tmp_path, tiny_bert, sentiment_data, quantization, method, says):
    path = recipe(tmp_path, tiny_bert, sentiment_data, quantization, method.split()[0])
    if method in ("full", "bitfit"):
        path.write_text(path.read_text().replace("targets: [Wq, Wv]\n", ""))
    if method.endswith("fsdp"):
        path.write_text(path.read_text().replace("training: {", "training: {fsdp: {enabled: true}, "))
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    assert says in str(exc.value) and "backbone.quantization" in str(exc.value)
    assert str(exc.value).startswith(f"{path}:2:"), str(exc.value)


def test_a_missing_or_unusable_bitsandbytes_is_named(tmp_path, tiny_bert, sentiment_data, monkeypatch):
    import importlib.util

    path = recipe(tmp_path, tiny_bert, sentiment_data, "{bits: 4}", "lora")
    assert load_recipe(path).runs[0].config["backbone"]["quantization"] == {"bits": 4}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    code, out = lrr("validate", path)
    assert code == 1 and "backbone.quantization: bitsandbytes is not installed; pip install" in out
    monkeypatch.undo()

    def broken(self, x):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", broken)
    with pytest.raises(backbones.QuantizationError) as exc:
        backbones.check_quantized_runs({"bits": 4}, torch.device("cpu"))
    assert exc.value.key == "backbone.quantization"
    assert "cannot run 4-bit layers on cpu (RuntimeError: no kernel for this device)" in str(exc.value)


@pytest.mark.parametrize("cast", ["saved tensors", "model.to"])
def test_a_half_cast_keeps_what_the_reloaded_model_computes(tmp_path, cast):
    """The merge casts what the checkpoint stores only: LLaMA's rotary ``inv_freq`` (built
    with the model, float32 after ``from_pretrained`` in any dtype) stays float32, so the
    model checked in memory computes exactly what the written checkpoint computes once
    reloaded. ``model.to(bfloat16)`` rounds it too and the two differ (the control)."""
    from lowrank_runner.export.merge import cast_saved_tensors
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config("llama", max_position_embeddings=256, rope_theta=10000.0)).eval()
    if cast == "saved tensors":
        cast_saved_tensors(model, torch.bfloat16)
    else:
        model.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m", dtype="auto").eval()
    ids = torch.randint(5, 40, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        same = torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    assert same is (cast == "saved tensors")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_bitsandbytes_import_notes_stay_out_of_a_run():
    """peft imports bitsandbytes (and transformers' optimizers import peft), whose CPU
    backend warns at import that it could not fetch an optional kernel: quiet_libraries,
    which every training, inspect and export entry calls, keeps that out of the display
    whether or not this CPU triggers it; bitsandbytes' errors still show."""
    import subprocess
    import sys

    code = ("import logging; logging.basicConfig()\n"
            "from lowrank_runner.quiet import quiet_libraries; quiet_libraries()\n"
            "log = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
            "log.warning('Failed to load CPU gemm_4bit_forward'); log.error('a real bitsandbytes error')\n"
            "logging.getLogger('kernels._internals.hf_hub').warning('Skipping publisher trust check')\n")
    said = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "gemm_4bit" not in said and "trust check" not in said and "a real bitsandbytes error" in said
