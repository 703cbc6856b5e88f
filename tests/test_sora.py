"""SoRA (methods/sora.py) against a hand-written reimplementation of the authors' code
(github.com/TsinghuaC3I/SoRA: ``src/lora.py``, ``src/sparse_optimizer.py``,
``src/sparse_optimizer_multiply_lr.py``, ``src/trainer.py``) on tiny tensors: the
forward, the L1 term, the gates' Adam step followed by the proximal step (both threshold
scales, both operators) step by step, no weight decay on the gates, zeroed gates dropped
from the LoRA pair, the compact state and the counts; then ``lrr run`` on a tiny BERT:
the logged L1 term and threshold, a resumed run equal to an uninterrupted one, and the
run's rank pattern and counts describing the adapter it saves."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.methods.base import LayerInfo, leaf_items
from lowrank_runner.methods.inject import adapter_state_dict, head_parameter_names, inject, load_adapter_state, \
    mark_trainable, merge_adapters
from lowrank_runner.methods.registry import get_method_spec
from lowrank_runner.methods.sora import SoRAAdapter, reference_threshold, soft_threshold
from lowrank_runner.modeling import build_method
from lowrank_runner.targets import resolve_targets
from lowrank_runner.train.optim import build_optimizer, weight_decay_groups
from tests.conftest import tiny_classifier, token_batch
from tests.test_inspect import config_dirs, inspect  # noqa: F401  (config_dirs is a fixture)

IN, OUT, R = 6, 5, 4


def sora(**over) -> dict:
    return {**get_method_spec("sora").defaults(), "name": "sora", **over}


def layer_info() -> LayerInfo:
    return LayerInfo("m", ("Wq",), IN, OUT, False, None, torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------- the authors' code, by hand


def reference_forward(x, lora_A, lora_B, gate, scaling):
    """``LowRankLinear.forward`` (src/lora.py:46-47), the gate of shape (1, r)."""
    return ((x @ lora_A.T).mul(gate.reshape(1, -1)) @ lora_B.T) * scaling


def reference_l1(gates, sparse_lambda):
    """``SparseTrainer.compute_loss``'s term (src/trainer.py:400-407)."""
    sparse_loss, p_total = 0.0, 0
    for p in gates:
        sparse_loss += torch.sum(torch.abs(p))
        p_total += torch.numel(p.data)
    return sparse_lambda * sparse_loss / p_total


def reference_operator_in_place(p, lam):
    """src/sparse_optimizer.py:117-119 (multiply_lr: the same with lam = sparse_lambda x lr)."""
    p[p > lam] -= lam
    p[p < -lam] += lam
    p[abs(p) < lam] = 0.0


def papers_operator(p, xi):
    """Eq. 5 written case by case: x − ξ (x > ξ), 0 (−ξ ≤ x ≤ ξ), x + ξ (x < −ξ)."""
    p.copy_(torch.where(p > xi, p - xi, torch.where(p < -xi, p + xi, torch.zeros_like(p))))


class ReferenceSparseAdamW:
    """``SparseAdamW.step`` (transformers' AdamW maths, correct_bias, weight decay 0 for the
    gates, src/sparse_optimizer.py:53-121), then the threshold: ``lam`` (``constant``) or
    ``lam x lr`` (``lr``, src/sparse_optimizer_multiply_lr.py:112-115), applied by the
    authors' operator or the paper's."""

    def __init__(self, betas, eps, sparse_lambda, scale, operator):
        self.betas, self.eps, self.sparse_lambda, self.scale, self.operator = betas, eps, sparse_lambda, scale, operator
        self.state = {}

    def step(self, p, grad, lr):
        state = self.state.setdefault(id(p), {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)})
        beta1, beta2 = self.betas
        state["step"] += 1
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = state["exp_avg_sq"].sqrt().add_(self.eps)
        step_size = lr * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
        p.add_(torch.div(state["exp_avg"], denom) * (-step_size))
        lam = self.sparse_lambda * (lr if self.scale == "lr" else 1.0)
        if self.sparse_lambda > 0:
            (reference_operator_in_place if self.operator == "reference" else papers_operator)(p, lam)


# ---------------------------------------------------------------- unit tests


def test_the_forward_is_the_authors_gated_lora_and_delta_weight_merges_it():
    torch.manual_seed(0)
    a = SoRAAdapter(layer_info(), R, alpha=16, dropout=0.0, gate_init="normal")
    with torch.no_grad():
        a.lora_B.normal_()
        a.gate[1] = 0.0
    x = torch.randn(3, 7, IN)
    expected = reference_forward(x, a.lora_A, a.lora_B, a.gate, 16 / R)
    torch.testing.assert_close(a(x, None), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x @ a.delta_weight(None).T, expected, rtol=1e-5, atol=1e-5)
    ones = SoRAAdapter(layer_info(), R, alpha=16, dropout=0.0, gate_init="ones")
    assert torch.equal(ones.gate.detach(), torch.ones(R)) and torch.equal(ones.lora_B.detach(), torch.zeros(OUT, R))


def test_the_l1_term_is_the_authors_mean_over_every_gate():
    model, injection = adapted(sora(r=4, l1_weight=10.0))
    gates = [leaf.gate for _, leaf in leaf_items(injection.adapters)]
    with torch.no_grad():
        gates[0][2] = 0.0
    ours = injection.method.extra_loss(injection.adapters)
    torch.testing.assert_close(ours, reference_l1(gates, 10.0), rtol=1e-6, atol=0)
    ours.backward()
    n = sum(g.numel() for g in gates)
    for g in gates:  # d/dg of l1 x mean|g|: l1 x sign(g) / n (0 at a zeroed gate)
        torch.testing.assert_close(g.grad, 10.0 * g.detach().sign() / n, rtol=1e-6, atol=0)
    assert build_method(sora(l1_weight=0)).extra_loss(injection.adapters) is None


def test_the_authors_operator_zeroes_below_twice_the_threshold_bit_for_bit():
    xi = 0.1
    x = torch.cat([torch.tensor([-0.35, -0.25, -0.15, -0.05, 0.0, 0.05, 0.15, 0.25, 0.35]), torch.randn(2000) * 0.3])
    theirs = x.clone()
    reference_operator_in_place(theirs, xi)
    assert torch.equal(reference_threshold(x, xi), theirs)
    paper = x.clone()
    papers_operator(paper, xi)
    assert torch.equal(soft_threshold(x, xi), paper)
    differ = soft_threshold(x, xi) != reference_threshold(x, xi)
    band = (x.abs() > xi) & (x.abs() < 2 * xi)  # shrunk into (0, ξ) by T, zeroed by the authors' code
    assert torch.equal(differ, band) and band.sum() > 100
    assert torch.equal(reference_threshold(x, xi)[band], torch.zeros(int(band.sum())))


def adapted(method_cfg, model_type="bert", seed=0):
    model = tiny_classifier(model_type, seed)
    targets = resolve_targets(["Wq", "Wv", "Wm"], model_type, [n for n, _ in model.named_modules()])
    torch.manual_seed(seed + 1)
    injection = inject(model, build_method(method_cfg), targets)
    mark_trainable(model, head_parameter_names(model))
    return model, injection


def test_the_gates_are_not_decayed_and_the_factors_are():
    model, _ = adapted(sora(r=2))
    decay, no_decay = weight_decay_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay}
    assert {n for n in exempt if ".lrr_adapter." in n} == {n for n, _ in model.named_parameters() if n.endswith(".gate")}
    assert all(names[id(p)].endswith((".lora_A", ".lora_B", "classifier.weight")) for p in decay)
    opt = build_optimizer(model, {"learning_rate": 1e-2, "adam_betas": [0.9, 0.999], "adam_epsilon": 1e-8,
                                  "weight_decay": 0.5})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()  # zero gradients: only weight decay moves a parameter
    for n, p in model.named_parameters():
        if n.endswith(".gate"):
            assert torch.equal(p.detach(), before[n]), n
        elif n.endswith(".lora_A"):
            torch.testing.assert_close(p.detach(), before[n] * (1 - 1e-2 * 0.5))


@pytest.mark.parametrize("scale", ["constant", "lr"])
@pytest.mark.parametrize("operator", ["reference", "soft"])
def test_adamw_and_the_proximal_step_follow_the_authors_sparse_adamw(scale, operator):
    """Eight steps of a linear schedule on a tiny regression: our AdamW (the gates in its
    no-decay group) + ``after_optimizer_step`` (before the scheduler steps, as the loop)
    against the authors' SparseAdamW maths by hand, the factors with the same AdamW in
    both. The two Adams place ε differently (transformers': √v + ε with the bias
    corrections in the step size; torch's: √v/√(1−β2ᵗ) + ε), so ε is tiny here: then
    they agree to float32 rounding."""
    lr, xi, l1, steps, eps = 0.05, 0.06, 0.5, 8, 1e-12
    threshold = xi / lr if scale == "lr" else xi  # the same size of threshold at the peak either way
    method = build_method(sora(r=R, l1_weight=l1, threshold=threshold, threshold_scale=scale,
                               threshold_operator=operator))
    torch.manual_seed(0)
    adapter = method.create_adapter(layer_info(), None)
    with torch.no_grad():
        adapter.gate.copy_(torch.tensor([0.9, -0.2, 0.12, -1.3]))
    holder = nn.Module()
    holder.lrr_adapter = adapter
    adapters = {"m": adapter}
    w0 = torch.randn(OUT, IN)
    x, y = torch.randn(16, IN), torch.randn(16, OUT)
    optimizer = build_optimizer(holder, {"learning_rate": lr, "adam_betas": [0.9, 0.999], "adam_epsilon": eps,
                                         "weight_decay": 0.1})
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)

    ref = {k: v.detach().clone().requires_grad_(True) for k, v in
           (("A", adapter.lora_A), ("B", adapter.lora_B), ("g", adapter.gate))}
    ref_factors = torch.optim.AdamW([ref["A"], ref["B"]], lr=lr, betas=(0.9, 0.999), eps=eps, weight_decay=0.1)
    ref_schedule = torch.optim.lr_scheduler.LambdaLR(ref_factors, lambda s: 1 - s / steps)
    ref_gates = ReferenceSparseAdamW((0.9, 0.999), eps, threshold, scale, operator)

    zeroed_during = set()
    for step in range(1, steps + 1):
        loss = ((x @ w0.T + adapter(x, None) - y) ** 2).mean() + method.extra_loss(adapters)
        loss.backward()
        optimizer.step()
        logs = method.after_optimizer_step(step, adapters, optimizer)
        step_lr = schedule.get_last_lr()[0]
        schedule.step()
        optimizer.zero_grad(set_to_none=True)

        out = x @ w0.T + reference_forward(x, ref["A"], ref["B"], ref["g"], 16 / R)
        ref_loss = ((out - y) ** 2).mean() + reference_l1([ref["g"]], l1)
        ref_loss.backward()
        ref_factors.step()
        with torch.no_grad():
            ref_gates.step(ref["g"], ref["g"].grad, step_lr)
        ref_schedule.step()
        ref_factors.zero_grad()
        ref["g"].grad = None

        assert logs["gate_threshold"] == pytest.approx(threshold * (step_lr if scale == "lr" else 1.0), rel=1e-12)
        for ours, key in ((adapter.lora_A, "A"), (adapter.lora_B, "B"), (adapter.gate, "g")):
            torch.testing.assert_close(ours.detach(), ref[key].detach(), rtol=1e-5, atol=1e-7, msg=lambda m, key=key, step=step: f"{key} step {step}: {m}")
        assert torch.equal(adapter.gate == 0, ref["g"] == 0), step
        assert logs["active_ranks"] == int((adapter.gate != 0).sum())
        zeroed_during |= set((adapter.gate == 0).nonzero().flatten().tolist())
    assert zeroed_during and len(zeroed_during) < R, zeroed_during  # the step zeroed gates, not all of them


def test_zeroed_gates_drop_their_ranks_from_the_pair_the_pattern_and_the_counts():
    model, injection = adapted(sora(r=4))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lrr_adapter." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        leaves = list(leaf_items(injection.adapters))
        for i, (_, leaf) in enumerate(leaves):
            leaf.gate[4 - i % 5:] = 0.0  # keep the first 4 - i % 5 gates (none, for i = 4)
    method, adapters = injection.method, injection.adapters
    expected = {path: 4 - i % 5 for i, (path, _) in enumerate(leaves)}
    assert method.rank_pattern(adapters) == expected and 0 in expected.values()
    assert method.active_parameter_count(adapters) == sum(
        expected[path] * (leaf.lora_A.shape[1] + leaf.lora_B.shape[0]) for path, leaf in leaves)
    for path, leaf in leaves:
        b, a, scale = leaf.lora_factors(None)
        assert b.shape[1] == a.shape[0] == expected[path] and scale == 16 / 4
        torch.testing.assert_close(scale * (b @ a), leaf.delta_weight(None), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        logits = model(**token_batch()).logits
    compact = adapter_state_dict(model, compact=True)
    for path, leaf in leaves:
        assert compact[f"{path}.lrr_adapter.gate"].shape == (expected[path],)
        assert compact[f"{path}.lrr_adapter.lora_A"].shape == (expected[path], leaf.lora_A.shape[1])
    fresh, fresh_injection = adapted(sora(r=4), seed=0)
    assert not load_adapter_state(fresh, compact)
    assert fresh_injection.method.rank_pattern(fresh_injection.adapters) == expected
    with torch.no_grad():
        torch.testing.assert_close(fresh(**token_batch()).logits, logits, rtol=1e-6, atol=1e-6)
        merged = merge_adapters(fresh)
        torch.testing.assert_close(merged(**token_batch()).logits, logits, rtol=1e-5, atol=1e-5)


def test_inspect_counts_the_papers_parameters(config_dirs):  # noqa: F811
    """LoRA2 Table 1 (DeBERTaV3-base, all six matrices) prints LoRA 0.17M (r = 1) and 1.33M
    (r = 8); SoRA at r_max counts the same before training (its 0.12M and 0.91M are what
    remains after sparsification, averaged over tasks); the gates are allocated, not counted."""
    for r, expected in ((1, 165_888), (8, 1_327_104)):
        out = inspect(f"backbone.name={config_dirs['deberta-v3-base']}", "targets=[Wq,Wk,Wv,Wa,Wm,Wo]",
                      "method={name: sora}", f"method.r={r}")
        (run,) = out["runs"]
        assert run["adapter_params"] == expected
        assert run["adapter_params_allocated"] == expected + 72 * r


# ---------------------------------------------------------------- lrr run on a tiny BERT

RUN = ["method={name: sora, r: 4, alpha: 8, l1_weight: 1.0, threshold: 4.0, threshold_scale: lr}",
       "training.epochs=3", "training.log_every=1", "training.eval_every=3", "training.checkpoint_every=2",
       "training.warmup_ratio=0.2", "task.max_length=16"]


def lrr_run(recipe, out, *extra):
    args = ["run", recipe, "--output", out]
    for s in RUN:
        args += ["--set", s]
    result = CliRunner().invoke(app, [str(a) for a in (*args, *extra)])
    assert result.exit_code == 0, result.output
    return result


def train_lines(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_run_logs_the_l1_term_and_the_steps_threshold_and_resumes_exactly(tmp_path, tiny_recipe):
    """``extra_loss`` at step 6 is l1 x mean|g| of the gates after step 5 (the checkpoint);
    ``gate_threshold`` at step t is ξ x the learning rate step t used (the lr logged at
    t − 1: the scheduler advances after the hook); stopped after step 5 and resumed, the
    run ends bit for bit where the uninterrupted one does."""
    recipe = tiny_recipe()
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    lrr_run(recipe, whole)
    lrr_run(recipe, parts, "--stop-after-step", 5)
    saved = load_file(str(parts / "checkpoints" / "step-000005" / "trainable.safetensors"))
    gates = [v for k, v in saved.items() if k.endswith(".lrr_adapter.gate")]
    lines = train_lines(whole)
    by_step = {r["step"]: r for r in lines}
    n = sum(g.numel() for g in gates)
    assert by_step[6]["extra_loss"] == pytest.approx(1.0 * float(sum(g.abs().sum() for g in gates)) / n, rel=1e-6)
    assert by_step[5]["active_ranks"] == sum(int(g.count_nonzero()) for g in gates)
    for t in range(2, len(lines) + 1):
        assert by_step[t]["gate_threshold"] == pytest.approx(4.0 * by_step[t - 1]["lr"], rel=1e-12), t
    assert by_step[len(lines)]["active_ranks"] < by_step[1]["active_ranks"] <= 4 * 4  # gates zeroed during the run
    lrr_run(recipe, parts, "--resume")
    assert train_lines(parts) == lines
    for name in ("rank_pattern.json", "metrics.json"):
        assert (parts / name).read_text() == (whole / name).read_text()
    a, b = (load_file(str(d / "adapter" / "adapter.safetensors")) for d in (whole, parts))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_rank_pattern_and_counts_describe_the_saved_checkpoint(tmp_path, tiny_recipe, monkeypatch):
    """The first evaluation is selected (ranks are zeroed after it): rank_pattern.json and
    report.json's adapter_params are those of the saved adapter, not of the last step."""
    from lowrank_runner.train.loop import TrainingRun

    monkeypatch.setattr(TrainingRun, "_improves", lambda self, value: self.state.best["value"] is None)
    out = tmp_path / "run"
    lrr_run(tiny_recipe(), out)
    assert json.loads((out / "metrics.json").read_text())["best"]["step"] == 3
    saved = load_file(str(out / "adapter" / "adapter.safetensors"))
    pattern = json.loads((out / "rank_pattern.json").read_text())
    assert pattern == {k.removesuffix(".lrr_adapter.gate"): v.numel() for k, v in saved.items() if k.endswith(".gate")}
    lines = train_lines(out)
    assert sum(pattern.values()) == lines[2]["active_ranks"] != lines[-1]["active_ranks"]
    report = json.loads((out / "report.json").read_text())
    assert report["adapter_params"] == sum(
        v.shape[0] * v.shape[1] for k, v in saved.items() if k.endswith((".lora_A", ".lora_B")))
