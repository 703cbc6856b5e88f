"""LoRA2 importance pruning (Algorithm 1, eq. 9) driven by the training loop."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.methods.inject import inject, mark_trainable
from lowrank_runner.methods.registry import get_method_spec
from lowrank_runner.modeling import MethodConfigError, build_method
from lowrank_runner.targets import resolve_targets
from tests.conftest import tiny_classifier, token_batch

PRUNING = {**get_method_spec("lora2").defaults(), "name": "lora2", "r": 4, "k": 2, "alpha": 8, "dropout": 0.0, "init_std": 0.02, "orth_reg": 0.1,
           "orth_terms": ["PQ", "UV", "uv"], "target_rank": 1, "t_init": 2, "t_final": 3, "mask_interval": 2,
           "beta1": 0.85, "beta2": 0.85}


def test_only_the_small_factors_are_scored_and_the_budget_is_met():
    model = tiny_classifier("bert").train()
    targets = resolve_targets(["Wq", "Wv"], "bert", [n for n, _ in model.named_modules()])
    method = build_method(PRUNING)
    injection = inject(model, method, targets)
    mark_trainable(model)
    method.on_train_begin(total_steps=12)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    small = {f"{path}.{name}" for path in injection.adapters for name in ("u", "lambda", "U")}
    budgets = []
    for step in range(1, 13):
        model(**token_batch(), labels=torch.tensor([0, 1, 2])).loss.backward()
        opt.step()
        logs = method.after_optimizer_step(step, injection.adapters)
        opt.zero_grad()
        budgets.append(logs["rank_budget"])
        if step in (2, 4, 6, 8, 9, 12):  # masking steps: the active ranks match the budget exactly
            assert logs["active_ranks"] == logs["rank_budget"]
    assert set(method.sensitivity.mean) == small  # v and V (in x k, k x out) are never scored
    for path, adapter in injection.adapters.items():
        assert method.sensitivity.mean[f"{path}.u"].shape == adapter.lora2_u.shape
    assert budgets[0] == 4 * 4 and budgets[-1] == 4 * 1 and budgets == sorted(budgets, reverse=True)
    pattern = method.rank_pattern(injection.adapters)
    assert set(pattern) == {t.path for t in targets} and sum(pattern.values()) == 4  # global top-k: any split


def test_impossible_settings_are_user_errors():
    with pytest.raises(MethodConfigError, match=r"target_rank \(5\) cannot exceed r \(4\)"):
        build_method({**PRUNING, "target_rank": 5})
    method = build_method(PRUNING)
    with pytest.raises(ValueError, match="leave no steps to prune in 5 optimizer steps"):
        method.on_train_begin(total_steps=5)


def test_schedule_problems_against_the_planned_steps():
    [never] = build_method(PRUNING).schedule_problems(5)  # t_init 2 + t_final 3 >= 5
    assert (never.path, never.severity) == ("method.t_init", "error")
    assert build_method(PRUNING).schedule_problems(12) == []  # masks at 4, 6, 8 and 9
    [once] = build_method({**PRUNING, "mask_interval": 10}).schedule_problems(12)
    assert str(once) == ("method.mask_interval: masks only once, at step 9: the budget drops from r x modules to "
                         "target_rank x modules in one step (the decay has 7 steps, mask_interval is 10); lower "
                         "mask_interval or train longer") and once.severity == "warning"
    [final] = build_method({**PRUNING, "t_final": 0}).schedule_problems(12)
    assert final.path == "method.t_final" and final.severity == "warning"
    assert "never trains at target_rank and only the last step can be selected" in final.message
    assert build_method({**PRUNING, "target_rank": None}).schedule_problems(1) == []  # no pruning, no schedule


def test_pruning_in_a_real_run_ends_at_the_target_and_ships_no_dead_capacity(tmp_path, tiny_recipe):
    recipe = tiny_recipe()
    out = tmp_path / "run"
    sets = ["method={name: lora2, r: 4, k: 2, alpha: 8, target_rank: 1, t_init: 2, t_final: 4, mask_interval: 2}",
            "training.epochs=3", "training.log_every=1", "training.eval_every=3"]
    args = ["run", str(recipe), "--output", str(out)]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    pattern = json.loads((out / "rank_pattern.json").read_text())
    assert (out / "rank_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(pattern) == 4 and sum(pattern.values()) == 4  # target_rank x M
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    budgets = [ln["rank_budget"] for ln in lines if "rank_budget" in ln]
    assert budgets[0] == 16 and budgets[-1] == 4
    actives = [ln["active_ranks"] for ln in lines if "active_ranks" in ln]
    assert actives[0] == 16 and actives[-1] == 4
    best = json.loads((out / "metrics.json").read_text())["best"]
    assert best["step"] >= 18 - 4  # only checkpoints at the final budget are eligible
    saved = load_file(str(out / "adapter" / "adapter.safetensors"))
    lambdas = {k: v for k, v in saved.items() if k.endswith("lora2_lambda")}
    assert len(lambdas) == 4 and sum(v.numel() for v in lambdas.values()) == 4  # stored at the final ranks
    for key, lam in lambdas.items():
        assert saved[key.replace("lora2_lambda", "lora2_u")].shape == (2, lam.numel())
        assert saved[key.replace("lora2_lambda", "lora2_U")].shape == (lam.numel(), 2)
    export = CliRunner().invoke(app, ["export", str(out), "--merge", "--out", str(tmp_path / "merged")])
    assert export.exit_code == 0, export.output


def test_rank_grid_is_layers_by_symbols():
    from lowrank_runner.rundir.plots import rank_grid

    pattern = {"bert.encoder.layer.0.attention.self.query": 2, "bert.encoder.layer.1.attention.self.query": 0,
               "bert.encoder.layer.1.output.dense": 3, "transformer.h.0.attn.c_attn[v]": 1}
    symbols = {"bert.encoder.layer.0.attention.self.query": ["Wq"], "bert.encoder.layer.1.attention.self.query": ["Wq"],
               "bert.encoder.layer.1.output.dense": ["Wo"]}
    layers, columns, grid = rank_grid(pattern, symbols)
    assert layers == [0, 1] and columns == ["Wq", "Wv", "Wo"]
    assert grid[0][:2] == [2.0, 1.0] and grid[1][0] == 0.0 and grid[1][2] == 3.0
    assert grid[0][2] != grid[0][2]  # nan: layer 0's Wo was not adapted


def test_two_processes_make_identical_rank_decisions(tmp_path, tiny_recipe):
    """torchrun with 2 gloo processes: every masking step cross-checks the masks of both
    ranks (a divergence stops the run), and the run ends at target_rank x M."""
    import subprocess
    import sys

    recipe = tiny_recipe()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lowrank_runner", "run",
           str(recipe), "--output", str(tmp_path / "ddp"),
           "--set", "method={name: lora2, r: 4, k: 2, alpha: 8, target_rank: 1, t_init: 1, t_final: 2, mask_interval: 1}",
           "--set", "training.epochs=3", "--set", "training.eval_every=null"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["environment"]["hardware"]["num_processes"] == 2
    assert report["steps"]["total"] == 18  # 96 examples / 16 per optimizer step (8 per process) x 3 epochs
    assert sum(json.loads((tmp_path / "ddp" / "rank_pattern.json").read_text()).values()) == 4


def test_diverging_masks_across_processes_stop_training(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "diverge.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from lowrank_runner.methods.base import check_same_across_processes\n"
        "dist.init_process_group('gloo')\n"
        "check_same_across_processes(torch.tensor([1.0, 0.0, 1.0]), 'lora2 pruning', 3)  # same on both ranks: passes\n"
        "mask = torch.tensor([1.0, 0.0]) if dist.get_rank() == 0 else torch.tensor([0.0, 1.0])\n"
        "try:\n"
        "    check_same_across_processes(mask, 'lora2 pruning', 4)\n"
        "except RuntimeError as exc:\n"
        "    print('caught:', exc, flush=True)\n"
        "dist.destroy_process_group()\n"
    )
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("lora2 pruning: processes took different rank decisions at step 4") == 2  # both ranks


# --- skipped optimizer steps (fp16 loss scaling) and non-finite gradients -------------------

def allocator_run(overflow_at=None, overflow="inf", steps=12):
    """The allocator over ``steps`` steps; at ``overflow_at`` the optimizer skips its step
    and the allocator sees ``overflow``: "inf"/"nan" gradients on one module's λ (an fp16
    overflow), "cleared" gradients (the loop's skip path) or "dropped" (not called)."""
    torch.manual_seed(0)
    model = tiny_classifier("bert").train()
    targets = resolve_targets(["Wq", "Wv"], "bert", [n for n, _ in model.named_modules()])
    method = build_method(PRUNING)
    injection = inject(model, method, targets)
    mark_trainable(model)
    method.on_train_begin(total_steps=steps)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = next(iter(injection.adapters.values()))
    for step in range(1, steps + 1):
        model(**token_batch(), labels=torch.tensor([0, 1, 2])).loss.backward()
        if step != overflow_at:
            opt.step()
            method.after_optimizer_step(step, injection.adapters)
        elif overflow in ("inf", "nan"):
            first.lora2_lambda.grad[0] = float(overflow)
            method.after_optimizer_step(step, injection.adapters)
        elif overflow == "cleared":
            opt.zero_grad(set_to_none=True)
            method.after_optimizer_step(step, injection.adapters)
        opt.zero_grad()
    masks = [a.rank_mask.clone() for a in injection.adapters.values()]
    return method.sensitivity, masks


def assert_same_allocator(a, b):
    (sens_a, masks_a), (sens_b, masks_b) = a, b
    for key in sens_b.mean:
        assert torch.equal(sens_a.mean[key], sens_b.mean[key]) and torch.equal(sens_a.uncertainty[key],
                                                                                sens_b.uncertainty[key]), key
    assert all(torch.equal(x, y) for x, y in zip(masks_a, masks_b))


@pytest.mark.parametrize("overflow", ["inf", "nan", "cleared"])
def test_a_step_without_usable_gradients_leaves_the_importance_as_if_dropped(overflow):
    sensitivity, _ = run = allocator_run(overflow_at=5, overflow=overflow)  # step 5: in the decay, no masking
    assert all(bool(t.isfinite().all()) for t in (*sensitivity.mean.values(), *sensitivity.uncertainty.values()))
    assert_same_allocator(run, allocator_run(overflow_at=5, overflow="dropped"))


def test_an_overflow_at_a_masking_step_masks_with_the_scores_it_had():
    assert_same_allocator(allocator_run(overflow_at=6, overflow="inf"), allocator_run(overflow_at=6, overflow="cleared"))


def with_loss_scaler(optimizer):
    """Give Accelerate's optimizer wrapper a GradScaler (scale 1: values unchanged), as
    ``mixed_precision: fp16`` does on a GPU, so inf/NaN gradients make it skip the step."""
    from accelerate.optimizer import patch_optimizer_step

    optimizer.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    optimizer.scaler.scale(torch.zeros(()))  # creates its scale tensor
    optimizer._accelerate_step_called = False
    optimizer._optimizer_original_step_method = optimizer.optimizer.step
    optimizer._optimizer_patched_step_method = patch_optimizer_step(optimizer, optimizer.optimizer.step)


def test_the_loop_skips_allocator_updates_and_the_scheduler_on_a_skipped_step(tmp_path, tiny_recipe):
    from lowrank_runner.recipe.load import load_recipe
    from lowrank_runner.train.loop import TrainingRun

    recipe = load_recipe(tiny_recipe(), [
        "method={name: lora2, r: 4, k: 2, alpha: 8, target_rank: 1, t_init: 2, t_final: 4, mask_interval: 2}",
        "training.epochs=3", "training.log_every=1", "training.eval_every=null", "training.warmup_steps=0"])
    run = TrainingRun(recipe, recipe.runs[0], tmp_path / "run", ["test"])
    run.setup()
    run.open_outputs()
    with_loss_scaler(run.optimizer)
    lam = next(p for n, p in run.model.named_parameters() if n.endswith("lora2_lambda"))
    overflow_step = 5
    lam.register_hook(lambda g: torch.full_like(g, float("inf")) if run.state.step == overflow_step - 1 else g)
    run.train()
    run.finish()
    sensitivity = run.method.sensitivity
    assert all(bool(t.isfinite().all()) for t in (*sensitivity.mean.values(), *sensitivity.uncertainty.values()))
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {ln["step"]: ln for ln in lines if "loss" in ln}
    assert [s for s, ln in logged.items() if ln.get("optimizer_step_skipped")] == [overflow_step]
    assert logged[overflow_step]["lr"] == logged[overflow_step - 1]["lr"] > logged[overflow_step + 1]["lr"]
    assert sum(json.loads((tmp_path / "run" / "rank_pattern.json").read_text()).values()) == 4
