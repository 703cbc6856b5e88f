"""LoRA beyond the conformance suite: numerically the same as HF PEFT's LoRA given the
same weights, and float32 adapters on a bfloat16 backbone."""

import copy

import pytest
import torch

from lowrank_runner.methods.inject import adapter_state_dict, inject
from lowrank_runner.methods.lora import LoRA
from lowrank_runner.targets import resolve_targets
from tests.conftest import tiny_classifier, token_batch

ALL = ["Wq", "Wk", "Wv", "Wa", "Wm", "Wo"]


def adapt(model, **params):
    targets = resolve_targets(ALL, "bert", [n for n, _ in model.named_modules()])
    return inject(model, LoRA(**{"r": 4, "alpha": 8, "dropout": 0.0, "rslora": False, **params}), targets)


def randomize_adapters(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lrr_adapter." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("rslora", [False, True])
def test_same_outputs_as_peft_lora_given_the_same_weights(rslora):
    peft = pytest.importorskip("peft")
    ours = tiny_classifier("bert")
    theirs = copy.deepcopy(ours)
    adapt(ours, rslora=rslora)
    randomize_adapters(ours)
    # PEFT's suffix match for "output.dense" also takes attention.output.dense: the same set as Wa + Wo.
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=rslora, bias="none",
                             target_modules=["query", "key", "value", "intermediate.dense", "output.dense"])
    theirs = peft.get_peft_model(theirs, config).eval()
    mapping = {}
    for key, value in adapter_state_dict(ours).items():
        module, _, param = key.partition(".lrr_adapter.")
        mapping[f"base_model.model.{module}.{param}.default.weight"] = value
    assert set(mapping) == {k for k in theirs.state_dict() if ".lora_" in k}
    theirs.load_state_dict(mapping, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(**token_batch()).logits, theirs(**token_batch()).logits, rtol=1e-5, atol=1e-6)


def test_bf16_backbone_with_fp32_adapters():
    model = tiny_classifier("bert").to(torch.bfloat16)
    injection = adapt(model)
    assert all(p.dtype == torch.float32 for a in injection.adapters.values() for p in a.parameters())
    randomize_adapters(model)
    with torch.no_grad():
        assert torch.isfinite(model(**token_batch()).logits.float()).all()
