"""``method: lora`` draws as PEFT does: the same seed gives the same initial ``A``, head and
generator state as ``peft.get_peft_model(LoraConfig(...))`` on the same backbone, so an
``lrr run`` and a plain PEFT loop (bench/quality.py's, which takes lrr's data pipeline and
optimizer) are the same run: every trained parameter equal, bit for bit, after a few
steps with dropout on. This guards the loop against silent drift (issue 25: a 1.1-point
"gap" to PEFT on SST-2 was the two libraries' different draws)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lowrank_runner.cli import app

peft = pytest.importorskip("peft")

STEPS = 6


def recipe_text(tiny_bert, sentiment_data, dropout: float) -> str:
    train, validation = sentiment_data
    return f"""
name: draws
backbone: {{name: {tiny_bert}}}
targets: [Wq, Wk, Wv, Wo]
method: {{name: lora, r: 4, alpha: 8, dropout: {dropout}}}
task:
  name: classification
  data: {{train: {train}, validation: {validation}}}
  max_length: 16
training: {{learning_rate: 1.0e-2, max_steps: {STEPS}, batch_size: 8, seed: 3, warmup_ratio: 0.2}}
"""


def lora_weights(named) -> dict[str, torch.Tensor]:
    """``{module path + A/B: tensor}`` from lrr's (``lrr_adapter.lora_A``) or PEFT's
    (``lora_A.default.weight``) parameter names."""
    out = {}
    for name, p in named:
        for kind in ("lora_A", "lora_B"):
            if f".{kind}" in name:
                module = name.split(f".{kind}")[0].replace(".lrr_adapter", "").replace("base_model.model.", "")
                out[f"{module}.{kind}"] = p.detach().float().cpu().clone()
    return out


def head_weights(named) -> dict[str, torch.Tensor]:
    """The classification head (PEFT's trained copy: ``modules_to_save.default``)."""
    out = {}
    for name, p in named:
        if "classifier" in name and "original_module" not in name:
            key = name.replace("base_model.model.", "").replace("modules_to_save.default.", "")
            out[key] = p.detach().float().cpu().clone()
    return out


def peft_trained(quality, recipe: Path):
    """bench/quality.py's PEFT model on the recipe's run, trained STEPS steps as lrr's loop
    trains (clip, step, schedule, clear)."""
    from transformers import get_scheduler

    from lowrank_runner.plan.schedule import plan_steps
    from lowrank_runner.recipe.load import load_recipe
    from lowrank_runner.train.data import build_dataloaders
    from lowrank_runner.train.optim import build_optimizer

    run = load_recipe(recipe).runs[0]
    training = run.config["training"]
    accelerator, mixed, tokenizer, task, tokenized, model = quality.peft_setup(run)
    initial = {**lora_weights(model.named_parameters()), **head_weights(model.named_parameters())}
    plan = plan_steps(len(tokenized["train"]), training, accelerator.num_processes)
    train_dl, _, _ = build_dataloaders(tokenized, tokenizer, task, training, run.seed, mixed, task.eval_splits())
    optimizer = build_optimizer(model, training)
    scheduler = get_scheduler(training["lr_scheduler"], optimizer, plan.warmup_steps, plan.total_steps)
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    step = 0
    while step < plan.total_steps:
        for batch in train_dl:
            accelerator.backward(model(**batch).loss)
            accelerator.clip_grad_norm_(params, training["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step >= plan.total_steps:
                break
    accelerator.end_training()
    return initial, model


def test_lora_starts_where_peft_starts(quality, make_recipe, tiny_bert, sentiment_data):
    """The adapted model built as the loop builds it (seed, tokenizer, data, model): the
    same A, B and head as PEFT's, and the generator where PEFT leaves it (the next draw is
    equal)."""
    from accelerate.utils import set_seed

    from lowrank_runner.backbones import load_tokenizer, resolve
    from lowrank_runner.modeling import build_adapted_model
    from lowrank_runner.recipe.load import load_recipe
    from lowrank_runner.train.data import prepared_data

    recipe = make_recipe(recipe_text(tiny_bert, sentiment_data, 0.1))
    run = load_recipe(recipe).runs[0]
    *_, model = quality.peft_setup(run)
    after_peft = torch.rand(8)
    cfg = run.config
    set_seed(run.seed)
    ref = resolve(cfg["backbone"])
    task, _, _ = prepared_data(cfg, load_tokenizer(ref, cfg["backbone"].get("tokenizer")))
    ours = build_adapted_model(cfg, task.model_class, task.model_config_kwargs(), weights=True, ref=ref).model
    after_ours = torch.rand(8)
    theirs = {**lora_weights(model.named_parameters()), **head_weights(model.named_parameters())}
    mine = {**lora_weights(ours.named_parameters()), **head_weights(ours.named_parameters())}
    assert sorted(mine) == sorted(theirs) and len(mine) == 2 * 4 * 2 + 2  # A, B on 4 kinds x 2 layers; head weight, bias
    for name in theirs:
        assert torch.equal(mine[name], theirs[name]), name
    assert torch.equal(after_ours, after_peft)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_an_lrr_run_is_a_plain_peft_loop_bit_for_bit(quality, make_recipe, tiny_bert, sentiment_data, tmp_path,
                                                     dropout):
    from lowrank_runner import load_adapted

    recipe = make_recipe(recipe_text(tiny_bert, sentiment_data, dropout))
    result = CliRunner().invoke(app, ["run", str(recipe), "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    initial, peft_model = peft_trained(quality, recipe)
    theirs = {**lora_weights(peft_model.named_parameters()), **head_weights(peft_model.named_parameters())}
    ours = load_adapted(tmp_path / "run")
    mine = {**lora_weights(ours.named_parameters()), **head_weights(ours.named_parameters())}
    assert sorted(mine) == sorted(theirs)
    for name in theirs:
        assert not torch.equal(theirs[name], initial[name]), name  # trained
        assert torch.equal(mine[name], theirs[name]), name
