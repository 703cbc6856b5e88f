"""Memory-lean training (train/memory.py): gradient checkpointing gives the gradients of
the run without it, for every backbone family and several methods; on a bfloat16 base the
adapters, CondLoRA's shared maps, the head and AdamW's state stay float32 (or
``training.adapter_dtype``), rank scores are float32, and ``lrr run`` / ``lrr export
--merge --dtype`` do all this end to end."""

from __future__ import annotations

import json
import re
import textwrap

import pytest
import torch
import transformers
from safetensors import safe_open
from typer.testing import CliRunner

from lowrank_runner.methods.inject import head_parameter_names
from lowrank_runner.cli import app
from lowrank_runner.methods.inject import inject, is_adapter_param, mark_trainable
from lowrank_runner.methods.registry import method_specs
from lowrank_runner.modeling import build_adapted_model, build_method, uses_targets
from lowrank_runner.recipe.load import load_recipe
from lowrank_runner.targets import resolve_targets
from lowrank_runner.tasks.base import build_task
from lowrank_runner.train.optim import build_optimizer
from lowrank_runner.train.memory import CheckpointingError, enable_gradient_checkpointing, keep_trainable_in
from tests.conftest import save_tiny_backbone, tiny_config, token_batch
from tests.test_conformance import SETTINGS, TARGETS, perturb

# Several methods per family: CondLoRA (W0 read in forward, shared maps) on four, the
# five seed methods on two or more, GPT-2's fused c_attn with MTLoRA's coupled groups.
CASES = {"bert": ["lora", "triadaptlora", "bitfit"], "roberta": ["condlora", "mtlora"],
         "deberta-v2": ["condlora", "lora2"], "gpt2": ["condlora", "mtlora", "adalora"],
         "llama": ["lora", "condlora", "lora2", "triadaptlora", "full"]}
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0, attention_dropout=0.0, classifier_dropout=0.0, pooler_dropout=0.0,
                  summary_first_dropout=0.0)
LABELS = torch.tensor([0, 2, 1])
PRUNING = {"target_rank": 2, "t_init": 1, "t_final": 1, "mask_interval": 1}  # LoRA2 scoring from step 1


def method_cfg(name: str, **extra) -> dict:
    spec = method_specs()[name]
    return {"name": name, **spec.defaults(), **({"r": 4} if "r" in spec.params else {}), **SETTINGS.get(name, {}), **extra}


def adapted_classifier(model_type: str, name: str, checkpointing: bool, **settings):
    """A tiny classifier of the family with the method's (perturbed) adapters or trained
    backbone tensors, in train mode with every dropout off."""
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(tiny_config(model_type, num_labels=3, **NO_DROPOUT))
    cfg = method_cfg(name, **settings)
    targets = resolve_targets(TARGETS[model_type], model_type, [n for n, _ in model.named_modules()]) if uses_targets(cfg) else []
    torch.manual_seed(1)
    injection = inject(model, build_method(cfg), targets)
    mark_trainable(model, head_parameter_names(model) + injection.base_names)
    perturb(model, base_names=injection.base_names)
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model.train(), injection


def gradients(model_type: str, name: str, checkpointing: bool):
    """Every trainable parameter's gradient after one backward of task loss + the
    method's regulariser, and how many times the first block's first linear layer ran
    (2: recomputed in the backward)."""
    model, injection = adapted_classifier(model_type, name, checkpointing, **(PRUNING if name == "lora2" else {}))
    calls = []
    first_block_linear(model).register_forward_hook(lambda *_: calls.append(1))
    loss = model(**token_batch(), labels=LABELS).loss
    extra = injection.method.extra_loss(injection.adapters)
    (loss if extra is None else loss + extra).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    injection.method.on_train_begin(1000, adapters=injection.adapters)
    injection.method.after_optimizer_step(1, injection.adapters)  # the rank hooks run on checkpointed gradients
    return grads, len(calls)


def first_block_linear(model):
    """The first linear layer of the first transformer block (what checkpointing recomputes)."""
    return next(m for n, m in model.named_modules() if re.search(r"\.(layer|layers|h)\.0\.", n)
                and type(m).__name__ in ("Linear", "Conv1D"))


@pytest.mark.parametrize("model_type, name", [(f, m) for f, methods in CASES.items() for m in methods])
def test_checkpointing_gives_the_same_gradients(model_type, name):
    plain, plain_calls = gradients(model_type, name, checkpointing=False)
    lean, lean_calls = gradients(model_type, name, checkpointing=True)
    assert (plain_calls, lean_calls) == (1, 2)  # the block really was recomputed in the backward
    assert plain.keys() == lean.keys() and (any(is_adapter_param(n) for n in plain) or name in ("full", "bitfit"))
    for key in plain:
        assert plain[key].abs().sum() > 0 or "lrr_shared" not in key, key  # shared maps get their gradient
        torch.testing.assert_close(lean[key], plain[key], rtol=1e-5, atol=1e-7, msg=key)


def test_a_backbone_without_checkpointing_support_is_refused():
    model = transformers.AutoModelForSequenceClassification.from_config(tiny_config("bert", num_labels=2))
    model.supports_gradient_checkpointing = False
    with pytest.raises(CheckpointingError) as info:
        enable_gradient_checkpointing(model)
    assert info.value.key == "training.gradient_checkpointing" and "BertForSequenceClassification" in str(info.value)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny-llama"), "llama")


def recipe_text(backbone, data, method: str, extra: str = "") -> str:
    train, validation = data
    return textwrap.dedent(f"""
        name: lean
        backbone: {{name: {backbone}, dtype: bfloat16}}
        targets: [Wq, Wv]
        method: {method}
        task:
          name: classification
          data: {{train: {train}, validation: {validation}}}
          max_length: 16
        training: {{learning_rate: 1e-2, max_steps: 3, batch_size: 16, seed: 0, log_every: 1, mixed_precision: "no"{extra}}}
        """).lstrip()


@pytest.mark.parametrize("adapter_dtype", ["float32", "bfloat16"])
def test_bf16_base_keeps_adapters_shared_maps_head_and_optimizer_state_in_their_dtype(
        tmp_path, tiny_llama, sentiment_data, adapter_dtype):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(tiny_llama, sentiment_data, "{name: condlora, r: 4}", f", adapter_dtype: {adapter_dtype}"))
    cfg = load_recipe(path).runs[0].config
    task = build_task(cfg["task"])
    adapted = build_adapted_model(cfg, task.model_class, task.model_config_kwargs(), weights=True)
    model, want = adapted.model, getattr(torch, adapter_dtype)
    keep_trainable_in(model, adapted.trainable_names, cfg["training"]["adapter_dtype"])
    params = dict(model.named_parameters())
    assert {params[n].dtype for n in adapted.trainable_names if n.startswith("lrr_shared.")} == {want}
    assert {params[n].dtype for n in adapted.trainable_names if is_adapter_param(n)} == {want}
    assert adapted.head_names == ["score.weight"] and params["score.weight"].dtype == want
    assert {p.dtype for n, p in params.items() if not p.requires_grad} == {torch.bfloat16}  # the frozen base
    optimizer = build_optimizer(model, cfg["training"])
    out = model.train()(**token_batch(), labels=torch.tensor([0, 1, 1]))
    assert out.logits.dtype == want  # the head ran in its own dtype on the bf16 hidden states
    out.loss.backward()
    optimizer.step()
    assert {s["exp_avg"].dtype for s in optimizer.state.values()} == {want}
    assert {s["exp_avg_sq"].dtype for s in optimizer.state.values()} == {want}


def test_rank_scores_are_float32_with_bf16_adapters():
    for name in ("lora2", "triadaptlora"):
        model, injection = adapted_classifier("llama", name, checkpointing=False, **(PRUNING if name == "lora2" else {}))
        keep_trainable_in(model, [n for n, p in model.named_parameters() if p.requires_grad], torch.bfloat16)
        model(**token_batch(), labels=LABELS).loss.backward()
        method = injection.method
        if name == "lora2":
            method.on_train_begin(4, adapters=injection.adapters)
            method.after_optimizer_step(1, injection.adapters)
            scores = list(method.sensitivity.mean.values()) + list(method.sensitivity.uncertainty.values())
            assert scores and {s.dtype for s in scores} == {torch.float32}
        else:
            assert method._norms(method._modules(injection.adapters)).dtype == torch.float32
            assert next(iter(injection.adapters.values())).transform_norm().dtype == torch.float32


runner = CliRunner()


def lrr(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def tensor_dtypes(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def test_bf16_base_run_with_checkpointing_and_merged_export(tmp_path, tiny_llama, sentiment_data):
    recipe = tmp_path / "lean.yaml"
    recipe.write_text(recipe_text(tiny_llama, sentiment_data, "{name: lora2, r: 4, k: 2, target_rank: 2, t_init: 1, t_final: 1, mask_interval: 1}", ", gradient_checkpointing: true"))
    code, out = lrr("run", recipe, "--output", tmp_path / "run")
    assert code == 0, out
    run = tmp_path / "run"
    assert tensor_dtypes(run / "adapter" / "adapter.safetensors") == {"F32"}
    assert tensor_dtypes(run / "adapter" / "head.safetensors") == {"F32"}
    report = json.loads((run / "report.json").read_text())
    assert report["precision"] == {"backbone_dtype": "bfloat16", "adapter_dtype": "float32", "head_dtype": "float32",
                                   "optimizer_state_dtype": "float32", "quantization": None,
                                   "gradient_checkpointing": True}
    assert "precision: backbone bfloat16 · adapters float32 · head float32" in (run / "report.md").read_text()
    code, out = lrr("export", run, "--merge", "--dtype", "bfloat16", "--out", tmp_path / "merged")
    assert code == 0, out
    assert tensor_dtypes(tmp_path / "merged" / "model.safetensors") == {"BF16"}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("setting, method, says", [
    ("mixed_precision: fp16", "{name: lora, r: 4}", "cannot train under training.mixed_precision fp16"),
    ("mixed_precision: 'no'", "{name: adalora, init_r: 4, target_r: 2}", "method adalora needs float32 adapters"),
])
def test_impossible_adapter_dtype_combinations_are_refused_at_their_line(tmp_path, tiny_bert, sentiment_data, setting,
                                                                         method, says):
    train, validation = sentiment_data
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: bad
        backbone: {{name: {tiny_bert}}}
        targets: [Wq, Wv]
        method: {method}
        task: {{name: classification, data: {{train: {train}, validation: {validation}}}}}
        training:
          {setting}
          adapter_dtype: bfloat16
        """).lstrip())
    code, out = lrr("validate", recipe)
    assert code != 0
    assert f"{recipe}:8:" in out and "training.adapter_dtype" in out and says in out, out
