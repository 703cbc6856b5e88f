"""Learning-rate guidance (plan/guidance.py): the integrated learning rate of a planned
schedule, the methods' ``x-lr-guidance`` rules, and the warnings of ``lrr inspect``,
``lrr validate`` and ``lrr run`` (no model is trained)."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lowrank_runner.plan.guidance import LR_KEY, RULES_SCHEMA, guidance_rules, lr_guidance
from lowrank_runner.methods.registry import MethodSpec, method_specs
from lowrank_runner.recipe.schema import fill_defaults, property_schema, recipe_schema
from lowrank_runner.plan.schedule import integrated_learning_rate, plan_steps
from tests.test_paper_recipes import invoke

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart.yaml"  # 800 examples, batch 16, 4 epochs: 200 steps, warmup 20
LORA2 = "method={name: lora2, r: 8, k: 1}"
DOCS = 'docs/benchmarks.md, "Learning-rate guidance"'


def training(**values) -> dict:
    """``training`` with the schema's defaults under ``values``."""
    return fill_defaults(values, property_schema("training"), recipe_schema())


cli = invoke  # the CLI run from the repository root (tests/test_paper_recipes.py)


# ------------------------------------------------------------ the integrated learning rate

SCHEDULERS = property_schema("training")["properties"]["lr_scheduler"]["enum"]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("examples,settings", [
    (4000, {"batch_size": 32, "epochs": 1, "warmup_ratio": 0.06}),  # issue 16's SST-2 run: 125 steps, warmup 8
    (800, {"batch_size": 16, "epochs": 4, "warmup_ratio": 0.1}),  # quickstart
    (100, {"batch_size": 10, "max_steps": 37, "warmup_steps": 36}),
    (100, {"batch_size": 10, "max_steps": 1}),
    (100, {"batch_size": 10, "epochs": 2.5}),
])
def test_integrated_lr_is_the_sum_of_the_loops_scheduler(scheduler, examples, settings):
    """Against the optimizer and scheduler the loop builds (build_optimizer, transformers'
    get_scheduler with the plan's warmup and steps): the sum of get_last_lr over the steps."""
    import torch
    from transformers import get_scheduler

    from lowrank_runner.train.optim import build_optimizer

    t = training(learning_rate=3e-3, lr_scheduler=scheduler, **settings)
    plan = plan_steps(examples, t)
    optimizer = build_optimizer(torch.nn.Linear(2, 2), t)
    lr_schedule = get_scheduler(t["lr_scheduler"], optimizer, plan.warmup_steps, plan.total_steps)
    total = 0.0
    for _ in range(plan.total_steps):
        total += lr_schedule.get_last_lr()[0]
        optimizer.step()
        lr_schedule.step()
    assert integrated_learning_rate(plan, t) == pytest.approx(total, rel=1e-6)


def test_issue_16_numbers():
    """SST-2, 4,000 sentences, one epoch at batch 32, 6% warmup: 1e-2 learned (0.625), 2e-3 did not."""
    plan = plan_steps(4000, training(batch_size=32, epochs=1, warmup_ratio=0.06))
    assert (plan.total_steps, plan.warmup_steps) == (125, 8)
    assert integrated_learning_rate(plan, training(learning_rate=1e-2)) == pytest.approx(0.625)
    assert integrated_learning_rate(plan, training(learning_rate=2e-3)) == pytest.approx(0.125)


# ------------------------------------------------------------ the rules


def test_shipped_rules_are_well_formed_and_name_real_parameters():
    import jsonschema

    declared = {name: spec for name, spec in method_specs().items() if "x-lr-guidance" in spec.schema}
    assert {"lora", "lora2", "triadaptlora", "mtlora", "condlora"} <= set(declared)
    for name, spec in declared.items():
        jsonschema.validate(spec.schema["x-lr-guidance"], RULES_SCHEMA)
        for rule in guidance_rules(name):
            for key, value in (rule.get("when") or {}).items():
                assert key in spec.params, (name, key)
                assert value in spec.params[key].get("enum", [value]), (name, key, value)


def fake_method(monkeypatch, rules):
    """Method ``lora``, its schema's x-lr-guidance replaced by ``rules``."""
    spec = method_specs()["lora"]
    fake = MethodSpec(spec.name, {**spec.schema, "x-lr-guidance": rules}, spec.implementation)
    monkeypatch.setattr("lowrank_runner.plan.guidance.get_method_spec", lambda name: fake)


def test_a_rule_applies_only_when_its_parameters_match(monkeypatch):
    rule = {"min_integrated_lr": 10.0, "evidence": "here", "fix": "do this"}
    fake_method(monkeypatch, [{**rule, "when": {"r": 16}}, {**rule, "when": {"r": 8, "rslora": True}}])
    t = training(learning_rate=1e-3)
    plan = plan_steps(800, t)
    assert lr_guidance({"name": "lora", "r": 8}, t, plan) == []  # r: 16 and rslora: true (default false) do not hold
    [warning] = lr_guidance({"name": "lora", "r": 16}, t, plan)
    assert warning.startswith(f"{LR_KEY}: 0.001 integrates to ") and "lora (r: 16) needs at least 10" in warning
    assert warning.endswith(f"do this ({DOCS})")
    fake_method(monkeypatch, [rule])  # no when: always
    [always] = lr_guidance({"name": "lora"}, t, plan)
    assert "lora needs at least 10 " in always
    fake_method(monkeypatch, [{**rule, "min_integrated_lr": 0.01}])
    assert lr_guidance({"name": "lora"}, t, plan) == []  # reached


def test_methods_lists_the_rules():
    result = cli("methods", "lora2")  # `lrr methods NAME` shows one method in full
    assert result.exit_code == 0, result.output
    assert ("learning-rate guidance: needs an integrated learning rate of at least 0.6 with init: gaussian "
            f"({DOCS})") in " ".join(result.stdout.split())  # rich wraps the line


def test_a_malformed_rule_is_named(monkeypatch):
    fake_method(monkeypatch, [{"min_integrated_lr": "high", "evidence": "e", "fix": "f"}])
    with pytest.raises(ValueError, match=r"method 'lora': x-lr-guidance\[0\]\.min_integrated_lr: 'high' is not of type"):
        guidance_rules("lora")
    from lowrank_runner.plan.checks import check_method_schedule  # inspect and run: a warning, the run goes on

    method = SimpleNamespace(schedule_problems=lambda steps: [])
    t = training()
    [note] = check_method_schedule(method, plan_steps(800, t), "recipe.yaml [classification, seed 0]", {"name": "lora"}, t)
    assert note.startswith("recipe.yaml [classification, seed 0]: method 'lora': x-lr-guidance[0].min_integrated_lr: ")
    assert note.endswith("; no learning-rate guidance")


# ------------------------------------------------------------ lrr inspect, lrr validate, lrr run


def lora2_warning(lines, peak="0.002"):
    """The lora2 guidance lines among ``lines``."""
    return [ln for ln in lines if f"{LR_KEY}: " in ln and f"{peak} integrates to" in ln and "lora2 (init: gaussian)" in ln]


def test_inspect_warns_about_lora2_at_a_papers_learning_rate():
    result = cli("inspect", str(QUICKSTART), "--set", LORA2)
    assert result.exit_code == 0, result.output
    [warning] = lora2_warning(result.stderr.splitlines())
    assert warning == (
        f"warning: {QUICKSTART} [classification, seed 0]: {LR_KEY}: 0.002 integrates to 0.2 over the 200 planned steps "
        "(linear, warmup 20); lora2 (init: gaussian) needs at least 0.6 to learn at this budget (a peak of about 0.006 "
        f"at these steps); set method.init: orthonormal, or raise training.learning_rate ({DOCS})")
    assert "learning rate: peak 0.002, integrated 0.2 over 200 steps (linear, warmup 20)" in result.stdout
    as_json = cli("inspect", str(QUICKSTART), "--json", "--set", LORA2)
    [run] = json.loads(as_json.stdout)["runs"]
    assert run["integrated_lr"] == pytest.approx(0.2)
    assert lora2_warning(run["warnings"])


@pytest.mark.parametrize("fix", ["training.learning_rate=6e-3", "method.init=orthonormal"])
def test_inspect_is_quiet_with_the_fix(fix):
    result = cli("inspect", str(QUICKSTART), "--json", "--set", LORA2, "--set", fix)
    assert result.exit_code == 0, result.output
    [run] = json.loads(result.stdout)["runs"]
    assert run["warnings"] == []


def test_validate_warns_when_max_steps_plans_the_steps(tmp_path):
    recipe = tmp_path / "lora2.yaml"
    recipe.write_text(QUICKSTART.read_text().replace("method: {name: lora, r: 8, alpha: 16, dropout: 0.05}",
                                                     "method: {name: lora2, r: 8}")
                      .replace("  epochs: 4\n", "  max_steps: 200\n"))
    result = cli("validate", str(recipe))
    assert result.exit_code == 0, result.output
    [warning] = lora2_warning(result.stdout.splitlines())
    line = next(i for i, ln in enumerate(recipe.read_text().splitlines(), 1) if "learning_rate" in ln)
    assert warning.startswith(f"warning: {recipe}:{line}:18: {LR_KEY}: task classification: 0.002 integrates to 0.2 "
                              "over the 200")
    [problem] = [p for p in json.loads(cli("validate", "--json", str(recipe)).stdout)["files"][0]["problems"]]
    assert (problem["severity"], problem["path"]) == ("warning", LR_KEY)
    assert cli("validate", str(recipe), "--set", "method.init=orthonormal").stdout.count("integrates") == 0
    search = "search={n_trials: 2, space: {training.learning_rate: {log_uniform: [1.0e-4, 1.0e-2]}}}"
    assert cli("validate", str(recipe), "--set", search).exit_code == 0  # a trial's low lr is no error either
    epochs = tmp_path / "epochs.yaml"  # local files: their size is read only when training plans
    epochs.write_text(recipe.read_text().replace("  max_steps: 200\n", "  epochs: 4\n"))
    assert "integrates" not in cli("validate", str(epochs)).stdout


def test_validate_plans_hub_glue_from_the_official_sizes():
    """A hub GLUE task's steps come from its official size (task.max_train_samples
    applies): RTE's 2,490 examples at batch 32 for one epoch are 78 steps."""
    from lowrank_runner.commands.validate import validate_file

    def check_recipe_file(path, overrides):  # what lrr validate says of it
        return validate_file(path, overrides).problems

    sets = [LORA2, "tasks={rte: {}}", "training.epochs=1", "training.batch_size=32", "training.learning_rate=2e-3"]
    [warning] = [str(p) for p in check_recipe_file(QUICKSTART, [*sets, "~task.data", "~task.labels"])
                 if p.path == LR_KEY]
    assert f"{LR_KEY}: task rte: 0.002 integrates to " in warning and "over the 78 planned steps" in warning
    few = check_recipe_file(QUICKSTART, [*sets, "~task.data", "~task.labels", "task.max_train_samples=320"])
    assert "over the 10 planned steps" in next(str(p) for p in few if p.path == LR_KEY)


@pytest.mark.parametrize("recipe", ["lora2_deberta_glue.yaml", "triadaptlora_deberta_glue.yaml",
                                    "condlora_roberta_glue.yaml", "mtlora_roberta_glue.yaml"])
def test_the_papers_long_schedules_pass(recipe):
    from lowrank_runner.recipe.load import check_recipe_file

    assert [str(p) for p in check_recipe_file(REPO / "recipes" / recipe) if p.path == LR_KEY] == []


def test_run_prints_the_guidance_at_its_start(capsys):
    """``lrr run``: the loop's method set-up (TrainingRun._setup_method) prints the
    schedule notes, the guidance among them, before training."""
    from lowrank_runner.train.loop import TrainingRun

    t = training(learning_rate=2e-3, epochs=4, batch_size=16, warmup_ratio=0.1)
    method = SimpleNamespace(schedule_problems=lambda steps: [], on_train_begin=lambda steps, adapters: None)
    run = SimpleNamespace(method=method, plan=plan_steps(800, t), where="recipe.yaml [classification, seed 0]",
                          cfg={"method": {"name": "lora2"}, "training": t}, training=t, main=True, adapters={})
    TrainingRun._setup_method(run)
    [warning] = lora2_warning(capsys.readouterr().err.splitlines())
    assert warning.startswith(f"warning: recipe.yaml [classification, seed 0]: {LR_KEY}: 0.002 integrates to 0.2")


def test_guidance_stays_torch_free():
    import subprocess

    code = "import sys, lowrank_runner.plan.guidance, lowrank_runner.recipe.validate; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.strip() == "False", proc.stderr


# ------------------------------------------------------------ ceilings: a peak above what the method trained at

CONDLORA = "method={name: condlora, r: 8}"


def ceiling_warnings(lines, method="condlora"):
    return [ln for ln in lines if f"{LR_KEY}: " in ln and f"the highest {method} is known to train at" in ln]


def test_inspect_warns_above_condloras_ceiling_and_not_below():
    result = cli("inspect", str(QUICKSTART), "--json", "--set", CONDLORA, "--set", "training.learning_rate=5e-3")
    assert result.exit_code == 0, result.output
    [run] = json.loads(result.stdout)["runs"]
    [warning] = run["warnings"]
    assert warning.startswith(f"{QUICKSTART} [classification, seed 0]: {LR_KEY}: a peak of 0.005 is above 0.003, "
                              "the highest condlora is known to train at (bench/settings/sweep_sst2.yaml ")
    assert "the majority class at 5e-3 and 1e-2 (diverged)" in warning
    assert warning.endswith(f"lower training.learning_rate to 3e-3 or below (2e-3 learned best in the sweep) ({DOCS})")
    for lr in ("3e-3", "2e-3"):  # at the ceiling and below: nothing (the floor is reached too)
        quiet = cli("inspect", str(QUICKSTART), "--json", "--set", CONDLORA, "--set", f"training.learning_rate={lr}")
        assert json.loads(quiet.stdout)["runs"][0]["warnings"] == [], lr


def test_the_shipped_ceilings():
    from lowrank_runner.plan.guidance import lr_ceilings

    t = training(learning_rate=2e-3)
    assert lr_ceilings({"name": "mtlora"}, t) and not lr_ceilings({"name": "mtlora"}, training(learning_rate=1e-3))
    assert "0.569 at 2e-3 (unstable there)" in lr_ceilings({"name": "mtlora"}, t)[0]
    assert not lr_ceilings({"name": "condlora"}, t) and not lr_ceilings({"name": "lora"}, training(learning_rate=1.0))


def test_a_ceiling_rule_applies_when_its_parameters_match(monkeypatch):
    fake_method(monkeypatch, [{"when": {"r": 16}, "max_learning_rate": 1e-3, "evidence": "measured", "fix": "lower it"}])
    t = training(learning_rate=2e-3)
    plan = plan_steps(800, t)
    assert lr_guidance({"name": "lora", "r": 8}, t, plan) == []
    [warning] = lr_guidance({"name": "lora", "r": 16}, t, plan)
    assert warning == (f"{LR_KEY}: a peak of 0.002 is above 0.001, the highest lora (r: 16) is known to train at "
                       f"(measured); lower it ({DOCS})")


@pytest.mark.parametrize("rule", [{"evidence": "e", "fix": "f"},
                                  {"min_integrated_lr": 0.1, "max_learning_rate": 1e-3, "evidence": "e", "fix": "f"}])
def test_a_rule_is_a_floor_or_a_ceiling(monkeypatch, rule):
    fake_method(monkeypatch, [rule])
    with pytest.raises(ValueError, match=r"method 'lora': x-lr-guidance\[0\]: "):
        guidance_rules("lora")


def test_validate_warns_above_a_ceiling_without_planned_steps(tmp_path):
    """A ceiling needs no planned steps: local data of unknown size is warned too."""
    recipe = tmp_path / "condlora.yaml"
    recipe.write_text(QUICKSTART.read_text().replace("method: {name: lora, r: 8, alpha: 16, dropout: 0.05}",
                                                     "method: {name: condlora, r: 8}"))
    result = cli("validate", str(recipe), "--set", "training.learning_rate=1e-2")
    assert result.exit_code == 0, result.output
    [warning] = ceiling_warnings(result.stdout.splitlines())
    assert f"{LR_KEY}: task classification: a peak of 0.01 is above 0.003" in warning
    assert ceiling_warnings(cli("validate", str(recipe)).stdout.splitlines()) == []


def test_a_ceiling_in_words():
    """What ``lrr methods`` says of a rule (commands/render.py)."""
    from lowrank_runner.plan.guidance import describe_rule

    assert [describe_rule(rule) for rule in guidance_rules("condlora")] == [
        "needs an integrated learning rate of at least 0.03", "warns above a peak learning rate of 0.003"]
    assert describe_rule({"when": {"init": "gaussian"}, "max_learning_rate": 1e-2}) == \
        "warns above a peak learning rate of 0.01 with init: gaussian"
