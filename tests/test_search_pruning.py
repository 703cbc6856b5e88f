"""``search.pruner``: each trial reports its selection metric at every evaluation to the
study (Optuna, SQLite storage), and a trial the pruner stops ends there as a completed run
that stopped early, recorded as pruned and never the best point."""

from __future__ import annotations

import json
import textwrap

import optuna
import pytest

from lowrank_runner.rundir.layout import REPORT_FILE
from tests.test_search import lrr, study

SEARCH = """
    search:
      n_trials: {n}
      sampler: random
      pruner: {pruner}
      space:
        training.learning_rate: {{log_uniform: [1.0e-2, 2.0e-1]}}
    """


@pytest.fixture
def pruned_recipe(tmp_path, tiny_bert, sentiment_data):
    def make(pruner: str, n: int = 4):
        train, validation = sentiment_data
        recipe = tmp_path / f"search-{pruner}.yaml"
        recipe.write_text(textwrap.dedent(f"""
            name: tiny-pruned
            backbone: {{name: {tiny_bert}}}
            targets: [Wq, Wv]
            method: {{name: lora, r: 4, alpha: 8}}
            task:
              name: classification
              data: {{train: {train}, validation: {validation}}}
              labels: [negative, positive]
              max_length: 16
            training: {{epochs: 3, batch_size: 16, seed: 0, log_every: 2, eval_every: 2, checkpoint_every: 2}}
            """) + textwrap.dedent(SEARCH.format(pruner=pruner, n=n)))
        return recipe

    return make


class AfterTheFirstTrial(optuna.pruners.BasePruner):
    """Prunes every trial but the first at its second report: a deterministic pruner (it
    takes MedianPruner's settings and ignores them)."""

    def __init__(self, **settings):
        pass

    def prune(self, study, trial) -> bool:
        return trial.number > 0 and len(trial.intermediate_values) >= 2


def test_pruned_trials_stop_early_are_recorded_and_never_the_best(pruned_recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(optuna.pruners, "MedianPruner", AfterTheFirstTrial)
    out = tmp_path / "out"
    result = lrr("run", pruned_recipe("median"), "--output", out)
    assert result.exit_code == 0, result.output
    trials = study(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "PRUNED", "PRUNED"]
    for t in trials:
        run_dir = out / "search" / "classification" / f"trial-{t.number:04d}"
        report = json.loads((run_dir / REPORT_FILE).read_text())
        assert report["status"] == "completed"
        steps = sorted(t.intermediate_values)
        assert steps[:2] == [2, 4]  # every evaluation reported, at its optimizer step
        if t.state.name == "PRUNED":
            assert report["stopped_early"] == {"step": 4, "by": "pruner", "reason": report["stopped_early"]["reason"]}
            assert "median pruner" in report["stopped_early"]["reason"] and t.user_attrs["pruned_at"] == 4
            assert t.value == t.intermediate_values[4]
        else:
            assert "stopped_early" not in report
    entry = json.loads((out / "search.json").read_text())["tasks"]["classification"]
    assert entry["best"]["number"] == 0
    assert [t.get("pruned_at") for t in entry["trials"]] == [None, 4, 4, 4]
    assert "pruned at step 4" in (out / "search.md").read_text()


def test_without_a_pruner_a_trial_reports_but_is_never_asked_to_stop():
    """``none`` (or no ``search.pruner``): Optuna's NopPruner, and the observer reports each
    evaluation without asking whether to prune."""
    from lowrank_runner.recipe.search import SearchSpec
    from lowrank_runner.search.study import Pruning, study_pruner

    assert isinstance(study_pruner(optuna, SearchSpec(1, "tpe", 0, ()).pruner), optuna.pruners.NopPruner)  # the default
    assert isinstance(study_pruner(optuna, "median"), optuna.pruners.MedianPruner)
    assert isinstance(study_pruner(optuna, "hyperband"), optuna.pruners.HyperbandPruner)

    class Trial:
        def __init__(self):
            self.reported = []

        def report(self, value, step):
            self.reported.append((step, value))

        def should_prune(self):
            raise AssertionError("asked")

    trial = Trial()
    assert Pruning(trial, "none", "accuracy").after_evaluation(4, 0.5) is None and trial.reported == [(4, 0.5)]


def test_the_pruners_settings_reach_optuna():
    """``search.pruner: {name, settings}``: MedianPruner's start-up trials and warm-up steps,
    HyperbandPruner's first rung and reduction factor, as the recipe gives them (checked on
    Optuna's own in-memory study: a trial worse than the only completed one is pruned once
    one completed trial is enough, not before the warm-up step, never with the defaults)."""
    from lowrank_runner.search.study import study_pruner

    def pruned(pruner, step: int) -> bool:
        study = optuna.create_study(direction="maximize", pruner=pruner)
        first = study.ask()
        first.report(0.9, step)
        study.tell(first, 0.9)
        worse = study.ask()
        worse.report(0.1, step)
        return worse.should_prune()

    assert not pruned(study_pruner(optuna, "median"), 4)  # Optuna's default: 5 completed trials first
    assert pruned(study_pruner(optuna, "median", (("startup_trials", 1),)), 4)
    assert not pruned(study_pruner(optuna, "median", (("startup_trials", 1), ("warmup_steps", 5))), 4)
    assert pruned(study_pruner(optuna, "median", {"startup_trials": 1, "warmup_steps": 5}.items()), 6)
    hyperband = study_pruner(optuna, "hyperband", (("min_resource", 10), ("reduction_factor", 2)))
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner)
    assert (hyperband._min_resource, hyperband._reduction_factor) == (10, 2)  # Optuna keeps its arguments so


def test_a_pruners_settings_are_checked_and_shown(tiny_recipe):
    from tests.test_search import lrr as run_lrr

    good = tiny_recipe(SEARCH.format(pruner="{name: median, startup_trials: 2, warmup_steps: 10}", n=3), "good.yaml")
    shown = run_lrr("inspect", good)
    assert shown.exit_code == 0, shown.output
    assert "pruner median (startup_trials 2, warmup_steps 10)" in " ".join(shown.output.split())
    bad = tiny_recipe(SEARCH.format(pruner="{name: median, min_resource: 2}", n=3), "bad.yaml")
    refused = run_lrr("validate", bad)
    assert refused.exit_code != 0
    assert "search.pruner" in refused.output and "min_resource" in refused.output, refused.output
