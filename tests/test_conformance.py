"""One conformance suite for every registered method (built-in or third-party), on tiny
BERT, RoBERTa, DeBERTa-v2, GPT-2 and LLaMA models of the exact architectures."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load, save

from lowrank_runner.methods.inject import head_parameter_names
from lowrank_runner.methods.inject import NotMergeable, adapter_state_dict, inject, mark_trainable, merge_adapters
from lowrank_runner.methods.registry import method_specs
from lowrank_runner.modeling import build_method, uses_targets
from lowrank_runner.targets import resolve_targets
from tests.conftest import tiny_classifier, token_batch

FAMILIES = ["bert", "roberta", "deberta-v2", "gpt2", "llama"]
TARGETS = {
    "bert": ["Wq", "Wv", "Wa", "Wm", "Wo"], "roberta": ["Wq", "Wk", "Wm", "Wo"], "deberta-v2": ["Wq", "Wk", "Wv", "Wa", "Wm", "Wo"],
    "gpt2": ["Wq", "Wv", "Wa", "Wf", "Wo"],  # q and v of the fused c_attn: k stays untouched
    "llama": ["Wq", "Wk", "Wv", "Wa", "Wm", "Wo"],
}
# Small but non-degenerate settings per method; anything not listed uses the schema defaults.
SETTINGS = {"lora": {"r": 4}, "lora2": {"r": 4, "k": 2}, "triadaptlora": {"r": 3}, "condlora": {"r": 4},
            "adalora": {"init_r": 4, "target_r": 2}, "increlora": {"r": 2, "target_rank": 4},
            "houlsby": {"bottleneck": 4}, "pfeiffer": {"bottleneck": 4},
            "prefix": {"prefix_length": 3, "reparameterization_hidden": 8}}
# Methods that train backbone parameters themselves (trainable_base_parameters) and need them:
# a backbone without biases (LLaMA) has nothing for BitFit (refused; tests/test_baselines.py);
# DeBERTa-v2's attention reads no key/value cache, so no prefix (refused; tests/test_prefix.py).
REFUSED = {("bitfit", "llama"), ("prefix", "deberta-v2")}


def method_configs():
    out = []
    for name, spec in sorted(method_specs().items()):
        base = {"name": name, **spec.defaults(), **SETTINGS.get(name, {})}
        if "r" in spec.params and name not in SETTINGS:
            base["r"] = 4
        if name == "mtlora":
            out += [pytest.param({**base, "structure": s}, id=f"mtlora-{s}") for s in ("shim", "icfm", "ctcm", "dtsm")]
        else:
            out.append(pytest.param(base, id=name))
    return out


METHODS = method_configs()


def targets_for(model_type: str, method_cfg: dict) -> list[str]:
    """The family's test targets, or the symbols a method that places its modules itself
    (bottleneck adapters: its schema's ``x-targets``) must be given."""
    return method_specs()[method_cfg["name"]].fixed_targets or TARGETS[model_type]


def build(model_type: str, method_cfg: dict, seed: int = 0):
    if (method_cfg["name"], model_type) in REFUSED:
        pytest.skip(f"{method_cfg['name']} refuses {model_type} (its own tests check the error)")
    model = tiny_classifier(model_type, seed)
    names = [n for n, _ in model.named_modules()]
    targets = resolve_targets(targets_for(model_type, method_cfg), model_type, names) if uses_targets(method_cfg) else []
    torch.manual_seed(seed + 1)
    injection = inject(model, build_method(method_cfg), targets)
    head = head_parameter_names(model)
    trainable = mark_trainable(model, head + injection.base_names)
    return model, injection, head, trainable


def trained(name: str, injection) -> bool:
    """A parameter the method trains (adapter, shared, or a backbone tensor it names)."""
    return "lrr_adapter" in name or "lrr_shared" in name or name in injection.base_names


def trained_state(model, injection):
    return adapter_state_dict(model, base_names=injection.base_names)


batch = token_batch


LABELS = torch.tensor([0, 2, 1])


def perturb(model, seed=4, scale=0.05, base_names=()):
    """Give every adapter parameter (and trained backbone tensor) a non-trivial value
    (initial ΔW is zero by design)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lrr_adapter" in name or "lrr_shared" in name or name in base_names):
                p.add_(torch.randn(p.shape, generator=g) * scale)


def logits(model):
    with torch.no_grad():
        return model(**batch()).logits


pytestmark = pytest.mark.parametrize("model_type", FAMILIES)


@pytest.mark.parametrize("method_cfg", METHODS)
def test_starts_exactly_at_the_base_model(model_type, method_cfg):
    """Weight updates and inserted modules start at the backbone; a prefix, attended to from
    the first step (Li & Liang), changes the output from the start."""
    expected = logits(tiny_classifier(model_type))
    model, *_ = build(model_type, method_cfg)
    if method_specs()[method_cfg["name"]].kind == "prompt":
        assert not torch.allclose(logits(model), expected)
        return
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method_cfg", METHODS)
def test_only_adapters_and_head_train_and_frozen_weights_get_no_gradient(model_type, method_cfg):
    model, injection, head, trainable = build(model_type, method_cfg)
    model.train()
    trainable = set(trainable)
    assert trainable and all((trained(n, injection) or n in head) for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(**batch(), labels=LABELS).loss
        extra = injection.method.extra_loss(injection.adapters)
        (loss if extra is None else loss + extra).backward()
        for n, p in model.named_parameters():
            if n not in trainable:
                assert p.grad is None, f"frozen {n} got a gradient"
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable
    assert any(trained(n, injection) for n in changed), "no adapter parameter changed"


@pytest.mark.parametrize("method_cfg", METHODS)
def test_merged_equals_unmerged(model_type, method_cfg):
    model, injection, *_ = build(model_type, method_cfg)
    perturb(model, base_names=injection.base_names)
    kind = method_specs()[method_cfg["name"]].kind
    if kind in ("inserted", "prompt"):  # no ΔW: every adapter (a prefix: the model's own module) says so, a merge refuses
        adapters = injection.adapters.values() if kind == "inserted" else [model.lrr_shared]
        assert adapters and not any(a.mergeable for a in adapters)
        with pytest.raises(NotMergeable):
            merge_adapters(model)
        return
    assert all(a.mergeable and a.acts_on == "input" for a in injection.adapters.values())
    unmerged = logits(model)
    merged = merge_adapters(model)
    assert not any("lrr_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method_cfg", METHODS)
def test_saved_adapter_reproduces_outputs(model_type, method_cfg):
    model, injection, *_ = build(model_type, method_cfg)
    perturb(model, base_names=injection.base_names)
    expected = logits(model)
    blob = save({k: v.contiguous() for k, v in trained_state(model, injection).items()})
    fresh, *_ = build(model_type, method_cfg, seed=0)
    torch.manual_seed(123)  # a different adapter init, overwritten by the load
    loaded = load(blob)
    result = fresh.load_state_dict(loaded, strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lrr_" in k]
    torch.testing.assert_close(logits(fresh), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method_cfg", METHODS)
def test_extra_loss_is_finite_and_differentiable(model_type, method_cfg):
    model, injection, *_ = build(model_type, method_cfg)
    perturb(model)
    extra = injection.method.extra_loss(injection.adapters)
    if extra is None:
        return
    assert extra.ndim == 0 and torch.isfinite(extra)
    extra.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lrr_" in n and p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("method_cfg", METHODS)
def test_bf16_autocast_forward_and_backward(model_type, method_cfg):
    model, *_ = build(model_type, method_cfg)
    perturb(model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch(), labels=LABELS)
    assert torch.isfinite(out.logits.float()).all()
    out.loss.backward()


@pytest.mark.parametrize("method_cfg", METHODS)
def test_a_seed_makes_training_repeatable(model_type, method_cfg):
    def train_once():
        model, injection, *_ = build(model_type, method_cfg, seed=7)
        model.train()
        torch.manual_seed(11)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(2):
            loss = model(**batch(), labels=LABELS).loss
            extra = injection.method.extra_loss(injection.adapters)
            (loss if extra is None else loss + extra).backward()
            opt.step()
            opt.zero_grad()
        return trained_state(model, injection)

    a, b = train_once(), train_once()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method_cfg", METHODS)
def test_an_adapter_that_says_it_ignores_w0_does(model_type, method_cfg):
    """``reads_w0 = False`` makes a quantized base hand the adapter ``None`` for ``W0``
    (no dequantized copy): its output must not depend on ``W0`` (checked with trained,
    non-zero factors and a perturbed ``W0``)."""
    from lowrank_runner.methods.base import weight_out_in

    model, injection, *_ = build(model_type, method_cfg)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lrr_adapter." in name or name.startswith("lrr_shared."):
                param.add_(0.1 * torch.randn_like(param))
    for path, adapter in injection.adapters.items():
        layer = model.get_submodule(path)
        w0 = weight_out_in(layer.base_layer, layer.info.fan_in_fan_out).detach()
        width = layer.info.out_features if adapter.acts_on == "output" else layer.info.in_features
        x = torch.randn(2, 3, width)
        with torch.no_grad():
            with_w0 = adapter(x, w0)
            if adapter.reads_w0:
                continue
            torch.testing.assert_close(adapter(x, None), with_w0, rtol=0, atol=0)
            torch.testing.assert_close(adapter(x, 2 * w0), with_w0, rtol=0, atol=0)
