"""Weight decay by role, not by shape: biases and normalisation weights are not decayed;
every other trainable parameter is (adapter factors of any shape, head weights)."""

import pytest
import torch
from torch import nn

from lowrank_runner.methods.inject import inject, mark_trainable
from lowrank_runner.methods.registry import get_method_spec
from lowrank_runner.modeling import build_method
from lowrank_runner.targets import resolve_targets
from lowrank_runner.train.optim import build_optimizer, weight_decay_groups
from tests.conftest import tiny_classifier

TRAINING = {"learning_rate": 1e-3, "adam_betas": [0.9, 0.999], "adam_epsilon": 1e-8, "weight_decay": 0.1}
METHODS = {
    "lora": {"name": "lora", "r": 2, "alpha": 4, "dropout": 0.0, "rslora": False},
    "lora2": {**get_method_spec("lora2").defaults(), "name": "lora2", "r": 4, "k": 1, "alpha": 8, "dropout": 0.0, "init_std": 0.02, "orth_reg": 0.1,
              "orth_terms": ["PQ"], "target_rank": 2, "t_init": 0, "t_final": 2, "mask_interval": 2,
              "beta1": 0.85, "beta2": 0.85},
    "triadaptlora": {**get_method_spec("triadaptlora").defaults(), "name": "triadaptlora", "r": 1, "alpha": 8, "eps": 1e-5, "dropout": 0.0, "init_std": 0.02,
                     "orth_reg": 0.1, "growth": "linear", "r_ref": 2, "max_rank": None, "grow_by": 1, "t_init": 0,
                     "grow_interval": 2, "fixed_k": 1, "importance_norm": "rank"},
}


def adapted(method_cfg, model_type="bert"):
    model = tiny_classifier(model_type)
    targets = resolve_targets(["Wq", "Wv"], model_type, [n for n, _ in model.named_modules()])
    inject(model, build_method(method_cfg), targets)
    mark_trainable(model, ["classifier.weight", "classifier.bias"])  # the head, as modeling.py marks it
    return model


def names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_only_biases_and_norm_weights_are_exempt(method):
    model = adapted(METHODS[method])
    decay, no_decay = weight_decay_groups(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names(model, decay) | names(model, no_decay) == trainable and not set(decay) & set(no_decay)
    assert names(model, no_decay) == {n for n in trainable if n.endswith(".bias")}  # the tiny heads have no norms
    adapter_params = {n for n in trainable if ".lrr_adapter." in n}
    assert adapter_params and adapter_params <= names(model, decay)  # 1-D ones included
    assert "classifier.weight" in names(model, decay) and "classifier.bias" in names(model, no_decay)


def test_lora2_lambda_and_triadaptlora_triangles_are_decayed():
    decayed = names(m := adapted(METHODS["lora2"]), weight_decay_groups(m)[0])
    assert any(n.endswith("lora2_lambda") for n in decayed)
    decayed = names(m := adapted(METHODS["triadaptlora"]), weight_decay_groups(m)[0])
    assert any(n.endswith("tri_L") for n in decayed) and any(n.endswith("tri_U") for n in decayed)


class OwnRMSNorm(nn.Module):  # like LlamaRMSNorm: not a torch norm subclass
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.normalizer = nn.Linear(4, 4)  # "norm" in its name, but a linear layer: weight decayed
        self.ln = nn.LayerNorm(4)
        self.rms = nn.RMSNorm(4)
        self.own = OwnRMSNorm(4)
        self.scale = nn.Parameter(torch.ones(4))  # a 1-D parameter that is no bias: decayed


def test_norms_are_found_by_module_type_not_by_name():
    model = Toy()
    decay, no_decay = weight_decay_groups(model)
    assert names(model, decay) == {"normalizer.weight", "scale"}
    assert names(model, no_decay) == {"normalizer.bias", "ln.weight", "ln.bias", "rms.weight", "own.weight"}


def test_llama_rms_norms_are_exempt():
    model = tiny_classifier("llama")
    for p in model.parameters():
        p.requires_grad_(True)
    decay, no_decay = weight_decay_groups(model)
    norm_params = {n for n, _ in model.named_parameters() if "norm" in n}
    assert norm_params and names(model, no_decay) == norm_params  # LLaMA has no biases
    assert "score.weight" in names(model, decay)


def test_the_optimizer_decays_the_first_group_only():
    model = adapted(METHODS["lora2"])
    opt = build_optimizer(model, TRAINING)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    lam = next(p for n, p in model.named_parameters() if n.endswith("lora2_lambda"))
    bias = dict(model.named_parameters())["classifier.bias"]
    with torch.no_grad():
        lam.fill_(1.0)
        bias.fill_(1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()  # zero gradients: only weight decay moves a parameter
    torch.testing.assert_close(lam.detach(), torch.full_like(lam, 1.0 - 1e-3 * 0.1))
    assert torch.equal(bias.detach(), torch.ones_like(bias))  # not decayed (Adam's update of a zero gradient is 0)
