"""IncreLoRA against hand-written re-implementations of the reference's formulas
(github.com/FeiyuZhang98/IncreLoRA: loralib/loralib/increlora.py ``loraW``, ``SVDLinear``,
``RankAllocator``; NLU/src/transformers/trainer.py ``compute_svd_orth_regu``;
NLU/src/transformers/optimization.py ``Multi_LambdaLR``) on tiny tensors: the update and
its scaling, the importance and its two moving averages step by step, which modules grow,
the reserve blocks trained ahead, the orthogonal regulariser and its gradient, the new
parameters' fresh Adam state and restarted warm-up, the final rank, the schedule checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.methods.base import Adapter, LayerInfo, leaf_items
from lowrank_runner.methods.increlora import RESERVE_E, IncreLoRAAdapter
from lowrank_runner.methods.inject import head_parameter_names, inject, mark_trainable, merge_adapters
from lowrank_runner.methods.rank_budget import increlora_schedule
from lowrank_runner.methods.registry import get_method_spec
from lowrank_runner.modeling import build_method
from lowrank_runner.targets import resolve_targets
from lowrank_runner.tasks.rules import GLUE_TRAIN_SIZES
from lowrank_runner.train.optim import StagedAdamW, build_optimizer, build_scheduler
from tests.conftest import tiny_classifier, token_batch

LABELS = torch.tensor([0, 2, 1])
TRAINING = {"learning_rate": 1e-2, "adam_betas": [0.9, 0.999], "adam_epsilon": 1e-8, "weight_decay": 0.01}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def ref_lora_w(a_list, e_list, b_list, scaling, ranknum):
    """The reference's ``loraW.forward``, verbatim."""
    return torch.cat([b for b in b_list], 1) @ (torch.cat([a for a in a_list], 0) * torch.cat([e for e in e_list], 0)) \
        * scaling / (ranknum + 1e-5)


def ref_blocks(adapter: IncreLoRAAdapter):
    """The adapter's used blocks as the reference's lists (one entry per block)."""
    n = adapter.used
    return ([adapter.lora_A[i: i + 1].detach().clone() for i in range(n)],
            [adapter.lora_E[i: i + 1].detach().clone() for i in range(n)],
            [adapter.lora_B[:, i: i + 1].detach().clone() for i in range(n)])


def layer(in_f=5, out_f=4) -> LayerInfo:
    return LayerInfo("m", ("Wq",), in_f, out_f, False, None, torch.device("cpu"), torch.float32)


def test_the_update_is_the_references_blocks_at_its_scaling():
    torch.manual_seed(0)
    adapter = IncreLoRAAdapter(layer(), r=2, capacity=6, alpha=8, dropout=0.0)
    assert adapter.delta_weight(None).abs().max() == 0  # E = 0 at the start: ΔW = 0
    with torch.no_grad():
        adapter.lora_E[:2].normal_()
    adapter.add_reserves(2, step=1, advance=True)  # after the first step: the reserves, e = 1e-5
    assert (adapter.lora_E[2:4, 0] == RESERVE_E).all() and adapter.ranknum == 2 and adapter.used == 4
    x = torch.randn(3, 5)
    for grown in (0, 1):
        a, e, b = ref_blocks(adapter)
        expected = ref_lora_w(a, e, b, 8.0, adapter.ranknum)
        torch.testing.assert_close(adapter.delta_weight(None), expected, rtol=1e-6, atol=1e-7)
        assert adapter.scaling == 8.0 / (adapter.ranknum + 1e-5)
        for scoring in (False, True):  # the factored forward, and the one forming ΔW to score it
            adapter.scoring = scoring
            torch.testing.assert_close(adapter(x, None), x @ expected.T, rtol=1e-5, atol=1e-6)
        b_, a_, scale = adapter.lora_factors(None)  # a live reserve is part of ΔW: in the pair
        assert b_.shape[1] == adapter.used and torch.allclose(scale * b_ @ a_, expected, rtol=1e-5, atol=1e-7)
        if not grown:
            adapter.grow(1, step=3, advance=True)  # a reserve becomes a rank, a new reserve is appended
            assert (adapter.ranknum, adapter.reserves, adapter.used) == (3, 2, 5)
            assert adapter.start_e[2] == 3 and adapter.start_ab[2] == 1 and adapter.start_ab[4] == 3
    adapter.retire_reserves()  # the budget is spent: the reserves' e = 0, they leave the pair
    assert adapter.lora_E[3:5, 0].tolist() == [0.0, 0.0]
    b_, a_, scale = adapter.lora_factors(None)
    assert b_.shape[1] == 3
    torch.testing.assert_close(scale * b_ @ a_, adapter.delta_weight(None), rtol=1e-5, atol=1e-7)


def method_cfg(**over) -> dict:
    base = {"r": 1, "target_rank": 3, "top_h": 3, "incre_rank_num": 1, "init_warmup": 1, "incre_interval": 2,
            "alpha": 8, "dropout": 0.0}
    return {**get_method_spec("increlora").defaults(), "name": "increlora", **base, **over}


def adapted(cfg: dict, model_type="bert", symbols=("Wq", "Wv", "Wa", "Wm", "Wo")):
    model = tiny_classifier(model_type)
    targets = resolve_targets(list(symbols), model_type, [n for n, _ in model.named_modules()])
    torch.manual_seed(1)
    injection = inject(model, build_method(cfg), targets)
    mark_trainable(model, head_parameter_names(model))
    return model, injection


class Capture:
    """``∂L/∂ΔW`` of every module by hand: the adapter's input x and the gradient of its
    output g give ``gᵀ x`` (the adapter computes ``x ΔWᵀ``)."""

    def __init__(self, leaves):
        self.x, self.g = {}, {}
        for path, adapter in leaves:
            adapter.register_forward_hook(lambda m, args, out, p=path: self.x.__setitem__(p, args[0].detach()))
            adapter.register_full_backward_hook(lambda m, gin, gout, p=path: self.g.__setitem__(p, gout[0].detach()))

    def grad(self, path, out_f, in_f):
        return self.g[path].reshape(-1, out_f).T @ self.x[path].reshape(-1, in_f)


def test_importance_moving_averages_growth_reserves_and_final_rank_follow_the_reference():
    """Step by step on a tiny BERT (10 modules, rank 1 → 3, top_h 3): the score
    ``Σ|ΔW ⊙ ∂L/∂ΔW| / √numel`` of the ΔW before the step, the averages (β₁, β₂), the
    modules that grow (the top_h highest ``Ī·Ū``, the last step only what is left),
    the reserves (e frozen at 1e-5, a and b trained ahead), the final 30 ranks."""
    cfg = method_cfg()
    model, injection = adapted(cfg)
    method, leaves = injection.method, list(leaf_items(injection.adapters))
    total_steps = 16
    optimizer = build_optimizer(model, TRAINING)
    assert isinstance(optimizer, StagedAdamW)
    scheduler = build_scheduler(optimizer, "linear", 2, total_steps)
    method.on_train_begin(total_steps, injection.adapters)
    capture = Capture(leaves)
    ipt, unc = torch.zeros(len(leaves)), torch.zeros(len(leaves))
    b1, b2 = cfg["beta1"], cfg["beta2"]
    model.train()
    done_at = None
    for step in range(1, total_steps + 1):
        loss = model(**token_batch(), labels=LABELS).loss
        (loss + method.extra_loss(injection.adapters)).backward()
        scoring = not method.done
        if scoring:
            scores = []
            for path, a in leaves:
                delta = a.delta_weight(None).detach()  # ΔW before the step, as the reference's hook sees it
                g = capture.grad(path, *delta.shape)
                scores.append(float((delta.abs() * g).abs().sum() / math.sqrt(delta.numel())))
            scores = torch.tensor(scores)
            ipt = b1 * ipt + (1 - b1) * scores
            unc = b2 * unc + (1 - b2) * (scores - ipt).abs()
        before = [a.ranknum for _, a in leaves]
        reserves = [(a.lora_E[a.ranknum: a.used, 0].clone(), a.lora_A[a.ranknum: a.used].clone()) for _, a in leaves]
        optimizer.step()
        method.after_optimizer_step(step, injection.adapters, optimizer)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if scoring:
            torch.testing.assert_close(method.exp_avg_ipt, ipt, rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(method.exp_avg_unc, unc, rtol=1e-4, atol=1e-9)
        after = [a.ranknum for _, a in leaves]
        grown = [i for i, (x, y) in enumerate(zip(before, after)) if y > x]
        g = step - 1
        if scoring and g > cfg["init_warmup"] and g % cfg["incre_interval"] == 0:
            left = 3 * len(leaves) - sum(before)
            k = min(cfg["top_h"], left)
            assert grown == sorted(sorted(range(len(leaves)), key=lambda i: -float(ipt[i] * unc[i]))[:k]), step
            assert all(after[i] - before[i] == 1 for i in grown)
        else:
            assert not grown, step
        if step == 1:  # the reference's global_step 0: one reserve block per module, e = 1e-5
            assert all(a.used == 2 and a.lora_E[1, 0] == RESERVE_E for _, a in leaves)
        elif step >= 3 and not method.done:  # past the reserves' first step (its warm-up lr is 0)
            for i, (_, a) in enumerate(leaves):
                if i not in grown and a.start_ab[a.ranknum] <= step - 2:  # not new (its first lr is 0)
                    e_before, a_before = reserves[i]
                    assert (e_before == RESERVE_E).all() and torch.equal(a.lora_E[a.ranknum: a.used, 0], e_before)
                    assert not torch.equal(a.lora_A[a.ranknum: a.used], a_before)  # trained ahead
        if method.done and done_at is None:
            done_at = step
        assert method.checkpoint_eligible(step) == (done_at is not None)
    assert sum(method.rank_pattern(injection.adapters).values()) == 3 * len(leaves) == method.total
    assert done_at == 1 + cfg["init_warmup"] + 1 + 6 * cfg["incre_interval"]  # 7 growth steps: 3,5,...,15
    assert all(a.lora_E[a.ranknum: a.used].abs().sum() == 0 and not a.scoring for _, a in leaves)  # reserves retired
    assert method.active_parameter_count(injection.adapters) == sum(
        a.ranknum * (a.shape[0] + a.shape[1] + 1) for _, a in leaves)
    model.eval()
    with torch.no_grad():
        unmerged = model(**token_batch()).logits
        torch.testing.assert_close(merge_adapters(model)(**token_batch()).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_without_advance_learning_reserves_wait_frozen_with_e_zero():
    """``advance_learn: false``: a reserve block is frozen with e = 0 until it becomes a rank
    (after step 3 here), then its e trains."""
    model, injection = adapted(method_cfg(advance_learn=False))
    method, leaves = injection.method, list(leaf_items(injection.adapters))
    optimizer = build_optimizer(model, TRAINING)
    scheduler = build_scheduler(optimizer, "linear", 0, 20)
    method.on_train_begin(20, injection.adapters)  # a run of 20 steps, the first 4 of them
    model.train()
    for step in range(1, 5):
        loss = model(**token_batch(), labels=LABELS).loss
        (loss + method.extra_loss(injection.adapters)).backward()
        optimizer.step()
        method.after_optimizer_step(step, injection.adapters, optimizer)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1:
            reserve = {path: a.lora_A[1].clone() for path, a in leaves}
            assert all(a.used == 2 and a.lora_E[1, 0] == 0 and a.start_ab[1] == -1 for _, a in leaves)
        if step == 3:
            grown = {path for path, a in leaves if a.ranknum == 2}
    assert len(grown) == 3
    for path, a in leaves:
        if path in grown:  # its e left 0 at step 4
            assert a.lora_E[1, 0] != 0 and a.start_e[1] == 3 and a.start_ab[1] == 3
        else:
            assert a.lora_E[1, 0] == 0 and torch.equal(a.lora_A[1], reserve[path])


def test_increments_spend_exactly_the_budget_in_blocks_of_incre_rank_num():
    """The reference's k = min(top_h, target − total) modules gain incre_rank_num each, which
    overshoots when incre_rank_num does not divide what is left; here the last gains the rest."""
    model, injection = adapted(method_cfg(target_rank=2, incre_rank_num=4, top_h=2))
    method, leaves = injection.method, list(leaf_items(injection.adapters))
    method.on_train_begin(50, injection.adapters)
    for _, a in leaves:
        a.add_reserves(method.incre, 1, True)
    method.reserved = True
    method.exp_avg_ipt = torch.arange(len(leaves), dtype=torch.float32)
    method.exp_avg_unc = torch.ones(len(leaves))
    first = method.increments()
    assert first == [0] * (len(leaves) - 2) + [4, 4]  # the two highest scores
    for (_, a), n in zip(leaves, first):
        if n:
            a.grow(n, 3, True)
    method.total += sum(first)
    assert method.increments() == [0] * (len(leaves) - 1) + [2]  # the best module gets the 2 left, one module
    assert method.budget == 2 * len(leaves)


def test_orthogonal_regulariser_value_and_gradient_are_the_references():
    """``compute_svd_orth_regu``: per module ‖[A; a…][A; a…]ᵀ − I‖_F + ‖[B | b…]ᵀ[B | b…] − I‖_F
    over every block (reserves included), summed over modules, divided by 2 per module,
    times reg_orth_coef; frozen blocks (a reserve without advance learning) get no gradient."""
    cfg = method_cfg(r=2, orth_reg=0.3, advance_learn=False)
    model, injection = adapted(cfg, symbols=("Wq", "Wv"))
    method, leaves = injection.method, list(leaf_items(injection.adapters))
    for _, a in leaves:
        a.add_reserves(1, 1, advance=False)
    value = method.extra_loss(injection.adapters)
    value.backward()
    expected, refs = 0.0, []
    for _, a in leaves:
        blocks = [a.lora_A[i: i + 1].detach().clone().requires_grad_(i < 2) for i in range(a.used)]
        cols = [a.lora_B[:, i: i + 1].detach().clone().requires_grad_(i < 2) for i in range(a.used)]
        wa, wb = torch.cat(blocks, 0), torch.cat(cols, 1)
        cov_a, cov_b = wa @ wa.T, wb.T @ wb
        eye = torch.eye(*cov_a.size(), out=torch.empty_like(cov_a))
        expected = expected + torch.norm(cov_a - eye, p="fro") + torch.norm(cov_b - eye, p="fro")
        refs.append((blocks, cols))
    expected = cfg["orth_reg"] * expected / (2 * len(leaves))
    expected.backward()
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    for (_, a), (blocks, cols) in zip(leaves, refs):
        torch.testing.assert_close(a.lora_A.grad[:2], torch.cat([b.grad for b in blocks[:2]]), rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(a.lora_B.grad[:, :2], torch.cat([c.grad for c in cols[:2]], 1), rtol=1e-5, atol=1e-8)
        assert a.lora_A.grad[2:].abs().sum() == 0 and a.lora_B.grad[:, 2:].abs().sum() == 0


class Rows(Adapter):
    """A toy adapter whose rows start training at different steps (0, 2, 5) or never (-1)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))
        self.register_buffer("starts", torch.tensor([0, 2, 5, -1]))

    def entry_starts(self):
        return {"w": self.starts[:, None]}


class MultiLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """The reference's ``Multi_LambdaLR`` (optimization.py), its debugging calls left out."""

    def __init__(self, optimizer, get_lr_lambda, num_warmup_steps, num_training_steps, last_epoch=-1):
        self.get_lr_lambda = get_lr_lambda
        self.num_warmup_steps = num_warmup_steps
        self.num_training_steps = num_training_steps
        self.group_steps = [-1] * len(optimizer.param_groups)
        super().__init__(optimizer, get_lr_lambda(num_warmup_steps, num_training_steps), last_epoch)

    def check_new_params(self):
        if len(self.optimizer.param_groups) == len(self.group_steps):
            return
        self.group_steps.append(-1)
        self.lr_lambdas.append(self.get_lr_lambda(self.num_warmup_steps, self.num_training_steps - self.last_epoch))
        group = self.optimizer.param_groups[-1]
        group.setdefault("initial_lr", group["lr"])
        self.base_lrs.append(group["initial_lr"])

    def get_lr(self):
        self.check_new_params()
        self.group_steps = [step + 1 for step in self.group_steps]
        return [base_lr * lmbda(step) for lmbda, base_lr, step in zip(self.lr_lambdas, self.base_lrs, self.group_steps)]


def ref_lr_lambda(num_warmup_steps, num_training_steps):
    """The reference's ``get_lr_lambda`` (linear warm-up, linear decay to 0)."""
    def lr_lambda(current_step: int):
        if current_step < num_warmup_steps:
            return float(current_step) / float(max(1, num_warmup_steps))
        return max(0.0, float(num_training_steps - current_step) / float(max(1, num_training_steps - num_warmup_steps)))
    return lr_lambda


def test_new_entries_get_a_fresh_adam_state_and_their_own_warmup_as_the_references_new_groups():
    """Rows starting after steps 0, 2 and 5 of 12 (warm-up 3) against the reference: each
    row a parameter, added to the optimizer as a new group at global_step start − 1 (before
    its step; its gradient arrives from the next step), the schedule ``Multi_LambdaLR``; a
    row that never starts is never changed (weight decay included), whatever its gradient."""
    torch.manual_seed(0)
    toy = nn.Module()
    toy.rows = Rows()
    n, warmup, lr, wd = 12, 3, 0.1, 0.1
    grads = [torch.randn(4, 3) for _ in range(n)]
    initial = toy.rows.w.detach().clone()
    ours = build_optimizer(toy, {**TRAINING, "learning_rate": lr, "weight_decay": wd})
    scheduler = build_scheduler(ours, "linear", warmup, n)
    rows = [nn.Parameter(initial[i].clone()) for i in range(3)]
    ref = torch.optim.AdamW([{"params": [rows[0]], "weight_decay": wd}], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    ref_scheduler = MultiLambdaLR(ref, ref_lr_lambda, warmup, n)
    starts = {1: 2, 2: 5}
    for g in range(n):  # the reference's global_step; our step g + 1
        for i, start in starts.items():
            if g == start - 1:  # RankAllocator adds the group before the optimizer step
                ref.add_param_group({"params": [rows[i]], "weight_decay": wd})
        for i in range(3):
            rows[i].grad = grads[g][i].clone() if g >= starts.get(i, 0) else None
        ref.step()
        ref_scheduler.step()
        toy.rows.w.grad = grads[g].clone()  # every row has a gradient here: the optimizer must hold them
        ours.step()
        scheduler.step()
        for i in range(3):
            torch.testing.assert_close(toy.rows.w[i].detach(), rows[i].detach(), rtol=1e-5, atol=1e-6,
                                       msg=f"row {i} after step {g + 1}")
        assert torch.equal(toy.rows.w[3], initial[3])
    assert not torch.equal(toy.rows.w[2], initial[2])


def test_entries_from_the_start_are_torchs_adamw():
    torch.manual_seed(0)
    toy = nn.Module()
    toy.rows = Rows()
    toy.rows.starts.zero_()
    twin = nn.Parameter(toy.rows.w.detach().clone())
    ours = build_optimizer(toy, TRAINING)
    scheduler = build_scheduler(ours, "cosine", 2, 6)
    ref = torch.optim.AdamW([{"params": [twin], "weight_decay": 0.01}], lr=1e-2)
    ref_scheduler = torch.optim.lr_scheduler.LambdaLR(ref, scheduler.lr_lambdas[0])
    for _ in range(6):
        g = torch.randn(4, 3)
        toy.rows.w.grad, twin.grad = g.clone(), g.clone()
        ours.step(), ref.step()
        scheduler.step(), ref_scheduler.step()
    torch.testing.assert_close(toy.rows.w.detach(), twin.detach(), rtol=1e-6, atol=1e-7)


GLUE_RANK8 = {  # the reference's NLU/scripts/rank=8/run_*.sh: top_h, incre_interval (= init_warmup), epochs,
    # incre_rank_num (None: the rank_dic default, 4 for target 8); batch 32 everywhere
    "mnli": (18, 1000, 7, 1), "sst2": (6, 1000, 24, None), "cola": (3, 100, 25, None), "qqp": (3, 1000, 7, None),
    "qnli": (22, 500, 5, None), "rte": (9, 100, 50, None), "mrpc": (10, 100, 30, None),
}


@pytest.mark.parametrize("task", sorted(GLUE_RANK8))
def test_the_references_glue_schedules_reach_the_target_on_debertav3_base(task):
    top_h, interval, epochs, incre = GLUE_RANK8[task]
    steps = -(-GLUE_TRAIN_SIZES[task] // 32) * epochs
    p = {"r": 1, "target_rank": 8, "top_h": top_h, "init_warmup": interval, "incre_interval": interval,
         "incre_rank_num": incre}
    assert increlora_schedule(p, steps, modules=72) == []


def test_squad2_at_table_vi_cannot_reach_the_target():
    """TriAdaptLoRA's Table VI (r_ref 8, incre rank num 1, interval 1000, batch 16, 14 epochs)
    with the reference's SQuAD 2.0 script (top_h 1, init_warmup 1000): 504 growth steps
    needed for 72 modules, about 113 fit; the fix names top_h 5."""
    steps = -(-130_319 // 16) * 14  # at least this many (the questions; the context windows are more)
    p = {"r": 1, "target_rank": 8, "top_h": 1, "init_warmup": 1000, "incre_interval": 1000, "incre_rank_num": 1}
    [problem] = increlora_schedule(p, steps, modules=72)
    assert problem.severity == "error" and problem.path == "method.top_h"
    assert "needs 504 growth steps" in problem.message and "raise top_h to 5" in problem.message
    assert increlora_schedule({**p, "top_h": 5}, steps, modules=72) == []


def test_schedule_checks_without_and_with_the_module_count():
    p = {"r": 1, "target_rank": 3, "top_h": 2, "init_warmup": 10, "incre_interval": 10, "incre_rank_num": 1}
    [never] = increlora_schedule(p, 15)  # growth after steps 21, 31, ...: none before step 15
    assert never.severity == "error" and never.path == "method.init_warmup" and "15 optimizer steps" in never.message
    [few] = increlora_schedule({**p, "target_rank": 5}, 25)  # one growth step, one module needs 4
    assert few.severity == "error" and few.path == "method.incre_interval"
    [once] = increlora_schedule({**p, "target_rank": 2}, 25)  # one growth step, enough for few modules
    assert once.severity == "warning" and once.path == "method.incre_interval"
    assert increlora_schedule(p, 200) == []
    [short] = increlora_schedule(p, 200, modules=20)  # 20 growth steps needed, 18 fit
    assert short.severity == "error" and short.path == "method.top_h" and "needs 20 growth steps" in short.message
    [late] = increlora_schedule(p, 200, modules=18)  # 18 needed: the last after step 191 of 200, within 10
    assert late.severity == "warning" and "after step 191 of 200" in late.message
    assert increlora_schedule(p, 200, modules=17) == []  # the last after step 181: 19 steps at the final ranks
    assert increlora_schedule(p, 200, modules=10) == []
    assert increlora_schedule({**p, "target_rank": 1}, 5, modules=10) == []  # nothing to grow


def test_capacity_holds_every_rank_the_schedule_can_give_one_module():
    model, injection = adapted(method_cfg(target_rank=4, top_h=2, incre_rank_num=2))
    method = injection.method
    # 10 modules, 30 ranks to add, 2 modules x 2 ranks per growth step: 8 steps, a module at most 1 + 16 ranks
    assert method.modules == 10 and method.capacity == 1 + 16 + 2
    model, injection = adapted(method_cfg(target_rank=4, top_h=2, incre_rank_num=2, max_rank=6))
    assert injection.method.capacity == 6 + 2


def test_a_run_reaches_the_target_and_its_export_reproduces_it(tmp_path, tiny_recipe):
    """``lrr run`` on the tiny BERT: growth inside the run, ``rank_pattern.json`` and the
    report's count at the final budget, and the saved adapter reloaded exactly."""
    from lowrank_runner import load_adapted

    recipe = tiny_recipe()
    out = tmp_path / "run"
    args = ["run", recipe, "--output", out, "--set", "method={name: increlora, r: 1, target_rank: 3, top_h: 3, "
            "incre_rank_num: 1, init_warmup: 1, incre_interval: 2, alpha: 8}", "--set", "training.eval_every=6",
            "--set", "training.log_every=1"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    pattern = json.loads((out / "rank_pattern.json").read_text())
    assert sum(pattern.values()) == 3 * 4 and len(set(pattern.values())) > 1  # Wq, Wv on 2 layers
    report = json.loads((out / "report.json").read_text())
    assert report["adapter_params"] == sum(r * (16 + 16 + 1) for r in pattern.values())
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines if ln.get("grown_modules")] == [3, 5, 7]  # 8 ranks to add, 3 per growth step
    best = json.loads((out / "metrics.json").read_text())["best"]["step"]
    assert best >= 7  # only the final budget can be selected
    model = load_adapted(out)
    assert model is not None
