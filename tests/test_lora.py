"""LoRA: starts at the backbone, trains only adapters (+ declared head), merges exactly,
and matches HF PEFT's LoRA numerically given the same weights."""

import copy

import pytest
import torch
import transformers

from lowrank_runner.backbones import head_parameter_names
from lowrank_runner.methods.inject import adapter_state_dict, inject, mark_trainable, merge_adapters
from lowrank_runner.methods.lora import LoRA
from lowrank_runner.targets import resolve_targets
from tests.conftest import tiny_config

FAMILIES = ["bert", "roberta", "deberta-v2", "gpt2", "llama"]
ALL = {"bert": ["Wq", "Wk", "Wv", "Wa", "Wm", "Wo"], "roberta": ["Wq", "Wk", "Wv", "Wa", "Wm", "Wo"],
       "deberta-v2": ["Wq", "Wk", "Wv", "Wa", "Wm", "Wo"], "gpt2": ["Wq", "Wk", "Wv", "Wa", "Wf", "Wo"],
       "llama": ["Wq", "Wk", "Wv", "Wa", "Wm", "Wo"]}


def tiny_model(model_type, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(tiny_config(model_type, num_labels=3))
    return model.eval()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def adapt(model, model_type, **params):
    names = [n for n, _ in model.named_modules()]
    targets = resolve_targets(ALL[model_type], model_type, names)
    defaults = {"r": 4, "alpha": 8, "dropout": 0.0, "rslora": False}
    return inject(model, LoRA(**{**defaults, **params}), targets)


def randomize_adapters(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lrr_adapter." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_output_equals_base_at_initialisation(model_type):
    base = tiny_model(model_type)
    reference = base(**batch()).logits
    adapt(base, model_type)
    torch.testing.assert_close(base(**batch()).logits, reference, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_merge_matches_unmerged(model_type):
    model = tiny_model(model_type)
    adapt(model, model_type)
    randomize_adapters(model)
    unmerged = model(**batch()).logits
    merged = merge_adapters(model)
    assert not any(".lrr_adapter." in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(**batch()).logits, unmerged, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_only_adapters_and_head_receive_gradients(model_type):
    model = tiny_model(model_type).train()
    adapt(model, model_type)
    head = head_parameter_names(model)
    trainable = set(mark_trainable(model, head))
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        out = model(**batch(), labels=torch.tensor([0, 1, 2]))
        out.loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (n in trainable), n
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if n not in trainable)
    changed = [n for n, p in model.named_parameters() if n in trainable]
    assert changed and all(".lrr_adapter." in n or n in head for n in changed)


@pytest.mark.parametrize("rslora", [False, True])
def test_same_outputs_as_peft_lora_given_the_same_weights(rslora):
    peft = pytest.importorskip("peft")
    ours = tiny_model("bert")
    theirs = copy.deepcopy(ours)
    adapt(ours, "bert", r=4, alpha=8, rslora=rslora)
    randomize_adapters(ours)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=rslora,
                             target_modules=["query", "key", "value", "attention.output.dense", "intermediate.dense",
                                             r"output.dense"], bias="none")
    # PEFT's suffix match for "output.dense" also takes attention.output.dense: the same set as Wa + Wo.
    theirs = peft.get_peft_model(theirs, config).eval()
    mapping = {}
    for key, value in adapter_state_dict(ours).items():
        module, _, param = key.partition(".lrr_adapter.")
        mapping[f"base_model.model.{module}.{param}.default.weight"] = value
    peft_state = theirs.state_dict()
    assert set(mapping) == {k for k in peft_state if ".lora_" in k}
    theirs.load_state_dict(mapping, strict=False)
    torch.testing.assert_close(ours(**batch()).logits, theirs(**batch()).logits, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_forward():
    model = tiny_model("bert")
    adapt(model, "bert")
    randomize_adapters(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch()).logits
    assert torch.isfinite(out).all()


def test_bf16_backbone_with_fp32_adapters():
    model = tiny_model("bert").to(torch.bfloat16)
    injection = adapt(model, "bert")
    assert all(p.dtype == torch.float32 for a in injection.adapters.values() for p in a.parameters())
    randomize_adapters(model)
    assert torch.isfinite(model(**batch()).logits.float()).all()


def test_seed_makes_adapter_init_repeatable():
    a, b = tiny_model("bert"), tiny_model("bert")
    torch.manual_seed(5)
    adapt(a, "bert")
    torch.manual_seed(5)
    adapt(b, "bert")
    sa, sb = adapter_state_dict(a), adapter_state_dict(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
