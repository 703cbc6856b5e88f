"""LoRA2 importance pruning (Algorithm 1, eq. 9) driven by the training loop."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.methods.inject import inject, mark_trainable
from lowrank_runner.modeling import MethodConfigError, build_method
from lowrank_runner.targets import resolve_targets
from tests.conftest import tiny_classifier, token_batch

PRUNING = {"name": "lora2", "r": 4, "k": 2, "alpha": 8, "dropout": 0.0, "init_std": 0.02, "orth_reg": 0.1,
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
    from lowrank_runner.plots import rank_grid

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
    assert report["environment"]["hardware"]["num_processes"] == 2 and report["steps"]["total"] == 9
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
