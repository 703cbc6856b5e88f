"""TriAdaptLoRA adaptive rank growth (seed 002, §III-B–D, eqs. 6-14) driven by the loop."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.methods.base import LayerInfo
from lowrank_runner.methods.inject import adapter_state_dict, inject, load_adapter_state, mark_trainable
from lowrank_runner.methods.rank_budget import growth_count, growth_plan
from lowrank_runner.methods.registry import get_method_spec
from lowrank_runner.methods.triadaptlora import TriAdaptLoRAAdapter
from lowrank_runner.modeling import MethodConfigError, build_method
from lowrank_runner.targets import resolve_targets
from tests.conftest import tiny_classifier, token_batch


def growth_cfg(**over):
    return {"name": "triadaptlora", **get_method_spec("triadaptlora").defaults(),
            "r": 1, "r_ref": 3, "grow_by": 1, "t_init": 2, "grow_interval": 2, "alpha": 8, **over}


# --- the budget formulas, by hand --------------------------------------------------------

def test_k_of_t_follows_eqs_13_and_14():
    # R(t) = 504 (DeBERTa-base, 72 modules, r 1 -> r_ref 8), t0 = 100, T = 10100, t = 1100: α = 0.1
    assert growth_count("linear", 504, 1100, 100, 10100) == 51  # ⌈504 · 0.1⌉ = ⌈50.4⌉
    assert growth_count("nonlinear", 504, 1100, 100, 10100) == 2  # ⌈exp(0.1 · ln 504)⌉ = ⌈1.863⌉
    assert growth_count("nonlinear", 504, 9100, 100, 10100) == 271  # ⌈504^0.9⌉ = ⌈270.4⌉
    assert growth_count("fixed_k", 504, 1100, 100, 10100, fixed_k=6) == 6
    assert growth_count("linear", 504, 101, 100, 10100) == 1  # ⌈0.0504⌉: the lower bound k ≥ 1 holds anyway
    assert growth_count("linear", 0, 5000, 100, 10100) == 0  # budget spent: nobody grows
    with pytest.raises(ValueError, match="unknown growth mode"):
        growth_count("cubic", 10, 5, 0, 10)


def test_growth_plan_picks_the_top_k_within_capacity_and_budget():
    scores = [0.1, 0.5, 0.3, 0.5]  # ties broken by module order: 1, 3, 2, 0
    assert growth_plan(scores, [1, 1, 1, 1], 4, k=2, grow_by=2, remaining=10) == [0, 2, 0, 2]
    assert growth_plan(scores, [1, 1, 1, 1], 4, k=2, grow_by=2, remaining=3) == [0, 2, 0, 1]  # budget never exceeded
    assert growth_plan(scores, [1, 4, 1, 1], 4, k=2, grow_by=2, remaining=10) == [0, 0, 2, 2]  # a full module is skipped
    # the run's last evaluation spends everything, round after round, best first
    assert growth_plan(scores, [1, 1, 1, 1], 4, k=1, grow_by=2, remaining=7, exhaust=True) == [1, 2, 2, 2]
    assert growth_plan(scores, [1, 1, 1, 1], 4, k=1, grow_by=1, remaining=9, exhaust=True) == [2, 3, 2, 2]
    assert growth_plan(scores, [4, 4, 4, 3], 4, k=3, grow_by=2, remaining=5, exhaust=True) == [0, 0, 0, 1]


# --- the adapter: eqs. 6-9 on pre-allocated capacity ---------------------------------------

def make_adapter(r=2, capacity=6, seed=0):
    torch.manual_seed(seed)
    info = LayerInfo("m", ("Wq",), 7, 5, False, None, torch.device("cpu"), torch.float32)
    return TriAdaptLoRAAdapter(info, r, capacity, alpha=4.0, eps=1e-5, dropout=0.0, init_std=0.02)


def test_growth_appends_rows_and_columns_and_keeps_the_triangles_exact():
    a = make_adapter(r=2)
    with torch.no_grad():
        a.tri_B[:, :2].normal_()  # a trained B
    old_A, old_B, old_L, old_U = a.tri_A[:2].clone(), a.tri_B[:, :2].clone(), a.lower().clone(), a.upper().clone()
    a.grow(3, generator=torch.Generator().manual_seed(1))
    assert a.r == 5 and int(a.active_rank) == 5
    L, U = a.lower(), a.upper()
    assert L.shape == U.shape == (5, 5)
    assert torch.equal(L, L.tril()) and torch.equal(U, U.triu())  # exact at every step
    assert torch.equal(L[:2, :2], old_L) and torch.equal(U[:2, :2], old_U)  # eq. 8 / eq. 9 keep the old block
    assert torch.equal(a.tri_A[:2], old_A) and torch.equal(a.tri_B[:, :2], old_B)  # eqs. 6, 7
    new = [a.tri_A[2:5], a.tri_B[:, 2:5], L[2:, :2], L[2:, 2:].tril(), U[:2, 2:], U[2:, 2:].triu()]
    assert all(t.abs().sum() > 0 for t in new)  # A_aug, B_aug, L_down, L_aug, U_up, U_aug: Gaussian
    assert a.tri_A[5:].abs().sum() == 0 and a.tri_B[:, 5:].abs().sum() == 0  # capacity left untouched
    assert a.scaling == pytest.approx(4.0 / (5 + 1e-5))  # α/(r + ε) at the current rank
    with pytest.raises(ValueError, match="beyond the capacity 6"):
        a.grow(2, generator=None)


def test_forward_equals_delta_weight_and_counts_follow_the_rank():
    a = make_adapter(r=3)
    with torch.no_grad():
        a.tri_B.normal_()
    x = torch.randn(4, 7)
    torch.testing.assert_close(a(x, None), x @ a.delta_weight(None).T)
    assert a.active_parameters() == 3 * (7 + 5) + 3 * 4
    a.grow(1, None)
    torch.testing.assert_close(a(x, None), x @ a.delta_weight(None).T)
    assert a.active_parameters() == 4 * (7 + 5) + 4 * 5


def test_parameters_beyond_the_active_rank_get_no_gradient():
    a = make_adapter(r=2)
    with torch.no_grad():
        a.tri_B.normal_()
    a(torch.randn(3, 7), None).sum().backward()
    assert a.tri_A.grad[2:].abs().sum() == 0 and a.tri_B.grad[:, 2:].abs().sum() == 0
    assert a.tri_L.grad[3:].abs().sum() == 0 and a.tri_U.grad[3:].abs().sum() == 0
    assert a.tri_A.grad[:2].abs().sum() > 0 and a.tri_L.grad[:3].abs().sum() > 0


# --- the allocator in a training loop -------------------------------------------------------

def train(method_cfg, steps, targets=("Wq", "Wv"), seed=0, until=None):
    """``until`` optimizer steps of a run planned for ``steps``."""
    torch.manual_seed(seed)
    model = tiny_classifier("bert").train()
    resolved = resolve_targets(list(targets), "bert", [n for n, _ in model.named_modules()])
    method = build_method(method_cfg)
    injection = inject(model, method, resolved)
    mark_trainable(model)
    method.on_train_begin(total_steps=steps, adapters=injection.adapters)  # as the loop calls it
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    logs = []
    for step in range(1, (until or steps) + 1):
        model(**token_batch(), labels=torch.tensor([0, 1, 2])).loss.backward()
        opt.step()
        logs.append(method.after_optimizer_step(step, injection.adapters, opt))
        opt.zero_grad()
    return model, method, injection, opt, logs


@pytest.mark.parametrize("mode", ["linear", "nonlinear", "fixed_k"])
def test_every_mode_ends_at_exactly_r_ref_times_m_and_never_exceeds_it(mode):
    cfg = growth_cfg(growth=mode, r=1, r_ref=4, grow_by=1, t_init=2, grow_interval=2, fixed_k=1)
    model, method, injection, _, logs = train(cfg, steps=15)
    m = len(injection.adapters)  # 2 layers x {Wq, Wv}
    totals = [log["active_ranks"] for log in logs]
    assert totals[0] == m and totals == sorted(totals)  # starts at r·M, only grows
    assert all(log["active_ranks"] <= log["rank_budget"] == 4 * m for log in logs)
    assert totals[-1] == 4 * m and sum(method.rank_pattern(injection.adapters).values()) == 4 * m
    grown_at = [i + 1 for i in range(1, len(totals)) if totals[i] > totals[i - 1]]
    assert set(grown_at) <= {4, 6, 8, 10, 12, 14}  # every grow_interval after t_init, last one before T


def test_modes_spend_the_budget_at_different_paces():
    paces = {}
    for mode in ("linear", "nonlinear"):
        *_, logs = train(growth_cfg(growth=mode, r=1, r_ref=6, grow_by=1, t_init=2, grow_interval=2), steps=21)
        paces[mode] = [log["active_ranks"] for log in logs]
    # after the first evaluations the linear threshold has grown more modules than the non-linear one
    assert paces["linear"][9] > paces["nonlinear"][9]
    assert paces["linear"][-1] == paces["nonlinear"][-1] == 6 * 4


def test_the_most_changed_module_grows_first():
    cfg = growth_cfg(growth="fixed_k", fixed_k=1, r=1, r_ref=2, grow_by=1, t_init=0, grow_interval=1)
    model = tiny_classifier("bert")
    resolved = resolve_targets(["Wq", "Wv"], "bert", [n for n, _ in model.named_modules()])
    method = build_method(cfg)
    injection = inject(model, method, resolved)
    method.on_train_begin(total_steps=10, adapters=injection.adapters)  # t0 = 0: reference norms at the start
    chosen = list(injection.adapters)[2]
    with torch.no_grad():
        injection.adapters[chosen].tri_L.mul_(10.0)  # ‖L + U‖_F / r changes most here
    logs = method.after_optimizer_step(1, injection.adapters)
    assert logs["grown_modules"] == 1 and method.rank_pattern(injection.adapters)[chosen] == 2


@pytest.mark.parametrize("t_init", [0, 3])
def test_the_first_growth_step_is_t_init_plus_grow_interval(t_init):
    """§III-D / docs/methods.md: growth every grow_interval steps after t_init warm-up
    steps; with t_init 0 the first is grow_interval (it used to be twice that)."""
    cfg = growth_cfg(growth="fixed_k", fixed_k=1, r=1, r_ref=3, grow_by=1, t_init=t_init, grow_interval=3)
    *_, logs = train(cfg, steps=t_init + 10)
    grown_at = [i + 1 for i, log in enumerate(logs) if log.get("grown_modules")]
    assert grown_at[0] == t_init + 3 and grown_at == list(range(t_init + 3, t_init + 10, 3))


def test_schedule_problems_against_the_planned_steps():
    method = build_method(growth_cfg(t_init=100, grow_interval=100))  # the defaults
    [never] = method.schedule_problems(81)
    assert (never.path, never.severity) == ("method.t_init", "error")
    assert "does not come before the end of training (81 optimizer steps)" in never.message
    [once] = method.schedule_problems(250)
    assert (once.path, once.severity) == ("method.grow_interval", "warning")
    assert str(once) == ("method.grow_interval: grows only once, at step 200 of 250: the whole budget (r_ref x "
                         "modules) is allocated at once; lower grow_interval (100) or t_init (100), or train longer")
    assert method.schedule_problems(301) == []
    assert build_method(growth_cfg(r=3, r_ref=3)).schedule_problems(5) == []  # nothing to grow
    assert build_method(growth_cfg(growth="none")).schedule_problems(5) == []


def test_run_and_inspect_warn_about_a_schedule_that_acts_only_once(tmp_path, tiny_recipe, capsys):
    from lowrank_runner.recipe.load import load_recipe
    from lowrank_runner.train.loop import TrainingRun

    path = tiny_recipe()
    sets = ["method={name: triadaptlora, r: 1, r_ref: 3, grow_by: 1, t_init: 4, grow_interval: 4}"]
    recipe = load_recipe(path, sets)  # 2 epochs of 6 steps: T = 12, one growth step (8)
    expected = (f"warning: {recipe.source} [classification, seed 0]: method.grow_interval: grows only once, at step 8 "
                "of 12: the whole budget (r_ref x modules) is allocated at once; lower grow_interval (4) or t_init "
                "(4), or train longer")
    inspected = CliRunner().invoke(app, ["inspect", str(path), "--set", sets[0]])
    assert inspected.exit_code == 0 and expected in inspected.stderr.splitlines()
    as_json = CliRunner().invoke(app, ["inspect", str(path), "--json", "--set", sets[0]])
    schedule = [w for w in json.loads(as_json.stdout)["runs"][0]["warnings"] if "training.learning_rate" not in w]
    assert schedule == [expected[len("warning: "):]]  # (and the learning-rate guidance: tests/test_guidance.py)
    TrainingRun(recipe, recipe.runs[0], tmp_path / "run", ["test"]).setup()
    assert expected in capsys.readouterr().err.splitlines()


def test_inspect_refuses_a_schedule_that_never_grows(tiny_recipe):
    path = tiny_recipe()
    result = CliRunner().invoke(app, ["inspect", str(path), "--set", "method={name: triadaptlora, r: 1, r_ref: 3}"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {path} [classification, seed 0]: method.t_init: triadaptlora growth: the first growth step (t_init "
        "100 + grow_interval 100) does not come before the end of training (12 optimizer steps); lower them or "
        "train longer")


def test_a_grown_module_restarts_its_optimizer_state():
    cfg = growth_cfg(growth="fixed_k", fixed_k=1, r=1, r_ref=2, grow_by=1, t_init=2, grow_interval=2)
    model, method, injection, opt, logs = train(cfg, steps=9, until=5)  # growth after step 4, then one more step
    grown = [a for a in injection.adapters.values() if a.r == 2]
    assert len(grown) == 1 and logs[3]["grown_modules"] == 1
    for p in (grown[0].tri_A, grown[0].tri_B, grown[0].tri_L, grown[0].tri_U):
        assert int(opt.state[p]["step"]) == 1  # re-created by Adam at step 5: fresh moments, bias-corrected
    others = [a for a in injection.adapters.values() if a.r == 1]
    assert all(int(opt.state[a.tri_A]["step"]) == 5 for a in others)


def test_final_ranks_are_saved_without_dead_capacity_and_load_back():
    cfg = growth_cfg(growth="linear", r=1, r_ref=3, grow_by=2, t_init=2, grow_interval=2)
    model, method, injection, *_ = train(cfg, steps=9)
    model.eval()
    expected = model(**token_batch()).logits
    compact = adapter_state_dict(model, compact=True)
    ranks = {k: v.shape[0] for k, v in compact.items() if k.endswith("tri_A")}
    assert sum(ranks.values()) == 3 * 4 and all(compact[k.replace("tri_A", "tri_L")].numel() == r * (r + 1) // 2
                                                for k, r in ranks.items())
    fresh = tiny_classifier("bert")
    resolved = resolve_targets(["Wq", "Wv"], "bert", [n for n, _ in fresh.named_modules()])
    inject(fresh, build_method(cfg), resolved)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lrr_" not in k}, strict=False)
    assert load_adapter_state(fresh, compact) == []
    torch.testing.assert_close(fresh.eval()(**token_batch()).logits, expected, rtol=0, atol=0)


def test_impossible_settings_are_user_errors():
    with pytest.raises(MethodConfigError, match="max_rank \\(4\\) must be at least r_ref \\(6\\)"):
        build_method(growth_cfg(r_ref=6, max_rank=4))
    method = build_method(growth_cfg(t_init=5, grow_interval=5))
    with pytest.raises(ValueError, match="does not come before the end of training \\(10 optimizer steps\\)"):
        method.on_train_begin(total_steps=10)
    fixed = build_method(growth_cfg(growth="none", r=3))
    assert fixed.capacity == 3 and fixed.after_optimizer_step(1, {}) is None


@pytest.mark.parametrize("mode", ["linear", "nonlinear", "fixed_k"])
def test_growth_in_a_real_run_is_visible_and_exports(tmp_path, tiny_recipe, mode):
    recipe = tiny_recipe()
    out = tmp_path / "run"
    args = ["run", str(recipe), "--output", str(out),
            "--set", "method={name: triadaptlora, r: 1, r_ref: 3, grow_by: 1, t_init: 2, grow_interval: 2, alpha: 8, "
                     f"growth: {mode}, fixed_k: 1}}",
            "--set", "training.epochs=3", "--set", "training.log_every=1", "--set", "training.eval_every=3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    pattern = json.loads((out / "rank_pattern.json").read_text())
    assert len(pattern) == 4 and sum(pattern.values()) == 3 * 4  # r_ref x M
    assert (out / "rank_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    actives = [ln["active_ranks"] for ln in lines if "active_ranks" in ln]
    assert actives[0] == 4 and actives[-1] == 12 and all(ln["rank_budget"] == 12 for ln in lines if "rank_budget" in ln)
    saved = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert sum(v.shape[0] for k, v in saved.items() if k.endswith("tri_A")) == 12  # no dead capacity ships
    report = json.loads((out / "report.json").read_text())
    assert report["adapter_params_allocated"] > report["adapter_params"] > 0
    export = CliRunner().invoke(app, ["export", str(out), "--merge", "--out", str(tmp_path / "merged")])
    assert export.exit_code == 0, export.output


def test_two_processes_grow_identically(tmp_path, tiny_recipe):
    """torchrun with 2 gloo processes: every growth step cross-checks both processes'
    decisions (a divergence stops the run), and the run ends at r_ref x M."""
    import subprocess
    import sys

    recipe = tiny_recipe()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lowrank_runner", "run",
           str(recipe), "--output", str(tmp_path / "ddp"),
           "--set", "method={name: triadaptlora, r: 1, r_ref: 3, grow_by: 1, t_init: 1, grow_interval: 2}",
           "--set", "training.epochs=3", "--set", "training.eval_every=null"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["environment"]["hardware"]["num_processes"] == 2
    assert report["steps"]["total"] == 18  # 96 examples / 16 per optimizer step (8 per process) x 3 epochs
    assert sum(json.loads((tmp_path / "ddp" / "rank_pattern.json").read_text()).values()) == 3 * 4
