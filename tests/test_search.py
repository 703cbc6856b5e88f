"""Searches (a recipe's ``search:`` block): Optuna studies in RUN_DIR/search.db, trials as
run directories scored on the selection split, ``--resume`` continuing the study, the
best point trained with every seed, and the block's checks at their lines."""

import json
import textwrap

import optuna
import pytest
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.recipe.load import check_recipe_file
from lowrank_runner.rundir.files import read_recipe_header
from lowrank_runner.rundir.layout import ADAPTER_CONFIG, METRICS_FILE, RECIPE_FILE, REPORT_FILE, SUMMARY_FILE

SEARCH = """
    search:
      n_trials: 3
      space:
        training.learning_rate: {log_uniform: [5.0e-2, 3.0e-1]}
        method.r: {choices: [2, 4]}
        targets: {choices: [[Wq, Wv], [Wq]]}
    """


def lrr(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def study(out, name="classification"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'search.db'}")


def trial_summary(out, name="classification"):
    return [(t.number, t.state.name, t.params, t.value) for t in study(out, name).trials]


@pytest.fixture(scope="module")
def search_recipe(tmp_path_factory, tiny_bert, sentiment_data):
    """The tiny recipe with a search, selecting on a held-out quarter of train; the test
    set (the validation file) has its labels flipped, so a score on it differs from the
    held-out one."""
    root = tmp_path_factory.mktemp("search")
    train, validation = sentiment_data
    flipped = root / "test.jsonl"
    rows = [json.loads(line) for line in validation.read_text().splitlines()]
    flipped.write_text("".join(json.dumps({**r, "label": "negative" if r["label"] == "positive" else "positive"}) + "\n"
                               for r in rows))
    recipe = root / "search.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: tiny-search
        backbone: {{name: {tiny_bert}}}
        targets: [Wq, Wv]
        method: {{name: lora, r: 4, alpha: 8}}
        task:
          name: classification
          data: {{train: {train}, validation: {flipped}}}
          labels: [negative, positive]
          max_length: 16
          holdout_fraction: 0.25
        training: {{learning_rate: 1e-2, epochs: 4, batch_size: 16, seed: [0, 1], log_every: 2, eval_every: 5,
                    checkpoint_every: 2}}
        """) + textwrap.dedent(SEARCH))
    return recipe


@pytest.fixture(scope="module")
def searched(search_recipe, tmp_path_factory):
    """The search run once, uninterrupted."""
    out = tmp_path_factory.mktemp("searched") / "out"
    result = lrr("run", search_recipe, "--output", out)
    assert result.exit_code == 0, result.output
    return out


def test_a_search_runs_trials_in_a_sqlite_study_then_the_best_point_with_every_seed(searched):
    out = searched
    trials = study(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert optuna.get_all_study_names(f"sqlite:///{out / 'search.db'}") == ["classification"]
    assert study(out).direction.name == "MAXIMIZE"
    flipped = False
    for t in trials:
        run_dir = out / "search" / "classification" / f"trial-{t.number:04d}"
        metrics = json.loads((run_dir / METRICS_FILE).read_text())
        assert t.value == metrics["best"]["value"]  # the held-out selection split ...
        assert not any(k.startswith("test") for k in metrics["best"]["eval"])
        # ... never the test set (its labels flipped: its loss, and mostly its accuracy, differ)
        flipped |= (t.value, metrics["best"]["eval"]["loss"]) != (metrics["test"]["accuracy"], metrics["test"]["loss"])
        header = read_recipe_header(run_dir / RECIPE_FILE)
        assert header["overrides"][0] == "~search"  # the trial reproduces with these --set overrides
        config = json.loads((run_dir / REPORT_FILE).read_text())["recipe"]["config"]
        assert config["training"]["learning_rate"] == t.params["training.learning_rate"]
        assert config["targets"] == json.loads(t.params["targets"]) and config["method"]["r"] == t.params["method.r"]
        assert config["training"]["seed"] == 0 and "search" not in config
    assert flipped
    best = study(out).best_trial
    record = json.loads((out / "search.json").read_text())
    entry = record["tasks"]["classification"]
    assert record["status"] == "completed" and entry["metric"] == "accuracy" and entry["direction"] == "maximize"
    assert [t["params"]["training.learning_rate"] for t in entry["trials"]] == \
        [t.params["training.learning_rate"] for t in trials]
    assert entry["best"]["number"] == best.number and entry["best"]["value"] == best.value
    assert entry["best"]["params"]["targets"] == json.loads(best.params["targets"])
    assert "★" in (out / "search.md").read_text()
    summary = json.loads((out / "best" / SUMMARY_FILE).read_text())
    assert [(r["seed"], r["status"]) for r in summary["runs"]] == [(0, "completed"), (1, "completed")]
    for seed in (0, 1):
        config = (out / "best" / f"classification-seed{seed}" / "adapter" / ADAPTER_CONFIG).read_text()
        assert json.loads(config)["method"]["r"] == best.params["method.r"]
        assert json.loads(config)["targets"] == json.loads(best.params["targets"])
    assert (out / "best" / "results.md").is_file()


def test_a_trials_recorded_overrides_rerun_it_alone(search_recipe, searched):
    """``lrr run RECIPE --set …`` with a trial's recorded overrides plans that trial's one
    run (its seed, not every seed of training.seed: [0, 1])."""
    from lowrank_runner.recipe.load import load_recipe

    for t in study(searched).trials:
        header = read_recipe_header(searched / "search" / "classification" / f"trial-{t.number:04d}" / RECIPE_FILE)
        assert "training.seed=0" in header["overrides"]
        rerun = load_recipe(search_recipe, header["overrides"])
        assert [(run.task, run.seed, run.config_hash) for run in rerun.runs] == [
            ("classification", 0, header["config_hash"])]


def test_report_and_export_read_a_searchs_final_runs(searched, tmp_path):
    best = searched / "best"
    shown = CliRunner().invoke(app, ["report", str(searched), "--json"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    note = (f"{searched}: a search; reading its final runs, {best} (each task's best point with every seed; "
            f"its trials are in {searched / 'search'})")
    assert note in shown.stderr and note not in shown.stdout
    assert [r["label"] for r in json.loads(shown.stdout)["runs"]] == [
        f"{best}/classification-seed0", f"{best}/classification-seed1"]
    table = lrr("report", "--table", searched)
    assert table.exit_code == 0, table.output
    assert note in table.stderr and "tiny-search" in table.stdout
    refused = lrr("export", searched, "--merge", "--out", tmp_path / "merged")
    assert refused.exit_code == 2
    trials = ", ".join(str(searched / "search" / "classification" / f"trial-{n:04d}") for n in range(3))
    assert (f"it holds several runs, export one of: {best}/classification-seed0, {best}/classification-seed1, "
            f"{trials}") in refused.output
    (best.rename(tmp_path / "moved"))
    try:
        missing = lrr("report", searched)
        assert missing.exit_code == 2
        assert (f"{searched}: a search (lrr run of a recipe with a search: block) without final runs: no best/ (no "
                f"trial completed, or the search has not trained its best points yet; {searched / 'search.md'} says "
                f"which); its trials are run directories: {searched / 'search'}/TASK/trial-NNNN") in missing.output
    finally:
        (tmp_path / "moved").rename(best)


def test_an_interrupted_search_resumes_its_study(search_recipe, searched, tmp_path, monkeypatch):
    out = tmp_path / "out"
    stopped = lrr("run", search_recipe, "--output", out, "--stop-after-step", 2)
    assert stopped.exit_code == 0, stopped.output
    assert "search stopped" in stopped.output and "--resume" in stopped.output
    assert [t[1] for t in trial_summary(out)] == ["RUNNING"]
    assert (out / "search" / "classification" / "trial-0000" / "checkpoints").is_dir()

    import lowrank_runner.search.study as search_study

    real = search_study.run_recipe

    def interrupted(recipe, run_dir, *args, **kwargs):
        if run_dir.name == "trial-0001":
            raise KeyboardInterrupt
        return real(recipe, run_dir, *args, **kwargs)

    monkeypatch.setattr(search_study, "run_recipe", interrupted)
    stopped = lrr("run", search_recipe, "--output", out, "--resume")
    assert stopped.exit_code == 130, stopped.output
    assert f"continue it with: lrr run {search_recipe} --output {out} --resume" in stopped.output
    assert [t[1] for t in trial_summary(out)] == ["COMPLETE", "RUNNING"]
    report = json.loads((out / "search" / "classification" / "trial-0000" / REPORT_FILE).read_text())
    assert report["run"]["resumed_from_step"] == 2  # the running trial continued from its checkpoint
    assert json.loads((out / "search.json").read_text())["status"] == "interrupted"
    kept = (out / "search" / "classification" / "trial-0000" / METRICS_FILE).stat().st_mtime_ns

    monkeypatch.setattr(search_study, "run_recipe", real)
    resumed = lrr("run", search_recipe, "--output", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (out / "search" / "classification" / "trial-0000" / METRICS_FILE).stat().st_mtime_ns == kept
    # the study went on to n_trials, with the parameters an uninterrupted search samples
    assert [t[:3] for t in trial_summary(out)] == [t[:3] for t in trial_summary(searched)]
    assert json.loads((out / "search.json").read_text())["status"] == "completed"
    assert (out / "best" / SUMMARY_FILE).is_file()


def test_one_study_per_task_and_a_sampled_value_wins_over_the_tasks_own(tmp_path, make_recipe, tiny_bert,
                                                                       sentiment_data):
    train, validation = sentiment_data
    scores = {}
    for split, path in (("train", train), ("validation", validation)):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        scores[split] = tmp_path / f"{split}-scores.jsonl"
        scores[split].write_text("".join(json.dumps({"text": r["text"], "label": float(r["label"] == "positive")}) + "\n"
                                         for r in rows))
    recipe = make_recipe(f"""
        name: two-tasks
        backbone: {{name: {tiny_bert}}}
        targets: [Wq, Wv]
        method: {{name: lora, r: 2, alpha: 4}}
        task: {{max_length: 16}}
        training: {{epochs: 1, batch_size: 32, seed: 0, learning_rate: 1e-2}}
        tasks:
          classification: {{task: {{data: {{train: {train}, validation: {validation}}}}},
                            training: {{learning_rate: 0.5}}}}
          regression: {{task: {{data: {{train: {scores['train']}, validation: {scores['validation']}}}}}}}
        search:
          n_trials: 2
          sampler: random
          space: {{training.learning_rate: {{uniform: [1.0e-3, 2.0e-3]}}}}
        """)
    out = tmp_path / "out"
    result = lrr("run", recipe, "--output", out)
    assert result.exit_code == 0, result.output
    from lowrank_runner.recipe.load import load_recipe

    for task, other in (("classification", "regression"), ("regression", "classification")):
        header = read_recipe_header(out / "search" / task / "trial-0001" / RECIPE_FILE)
        assert f"~tasks.{other}" in header["overrides"] and f"tasks.{task}.training.seed=0" in header["overrides"]
        rerun = load_recipe(recipe, header["overrides"])  # the trial alone, not both tasks
        assert [(run.task, run.config_hash) for run in rerun.runs] == [(task, header["config_hash"])]
    storage = f"sqlite:///{out / 'search.db'}"
    assert sorted(optuna.get_all_study_names(storage)) == ["classification", "regression"]
    for task in ("classification", "regression"):
        trials = study(out, task).trials
        assert len(trials) == 2 and all(1e-3 <= t.params["training.learning_rate"] <= 2e-3 for t in trials)
        for t in trials:
            report = json.loads((out / "search" / task / f"trial-{t.number:04d}" / REPORT_FILE).read_text())
            assert report["recipe"]["config"]["training"]["learning_rate"] == t.params["training.learning_rate"]  # not 0.5
    record = json.loads((out / "search.json").read_text())
    assert record["tasks"]["regression"]["metric"] == "pearson"
    summary = json.loads((out / "best" / SUMMARY_FILE).read_text())
    assert sorted(r["task"] for r in summary["runs"]) == ["classification", "regression"]
    for run in summary["runs"]:
        report = json.loads((out / "best" / f"{run['task']}-seed0" / REPORT_FILE).read_text())
        assert report["recipe"]["config"]["training"]["learning_rate"] == record["tasks"][run["task"]]["best"]["params"][
            "training.learning_rate"]


def test_a_failed_trial_is_recorded_and_the_search_goes_on(search_recipe, tmp_path, monkeypatch):
    import lowrank_runner.train.invocation as runner
    from lowrank_runner.errors import TrainingError

    calls = []

    def diverged(batch, run, run_dir, checkpoint):
        calls.append(run_dir.name)  # the run's directory exists (recipe.yaml); run_recipe removes it on failure
        raise TrainingError(f"{batch.recipe.source}: the training loss is nan at step 3")

    monkeypatch.setattr(runner, "_train", diverged)
    out = tmp_path / "out"
    result = lrr("run", search_recipe, "--output", out, "--set", "search.n_trials=2")
    assert result.exit_code == 1, result.output
    assert calls == ["trial-0000", "trial-0001"]  # a failed trial counts towards n_trials; no best point to train
    assert [t[1] for t in trial_summary(out)] == ["FAIL", "FAIL"]
    record = json.loads((out / "search.json").read_text())
    error = f"{search_recipe}: the training loss is nan at step 3"
    assert record["status"] == "failed" and record["tasks"]["classification"]["best"] is None
    assert record["tasks"]["classification"]["trials"][1]["error"] == error
    for trial in record["tasks"]["classification"]["trials"]:  # each failed trial keeps its directory, as a sweep run does
        run_dir = out / trial["dir"]
        assert (run_dir / "error.txt").read_text() == error
        report = json.loads((run_dir / REPORT_FILE).read_text())
        assert report["status"] == "failed" and report["error"] == error
        header = read_recipe_header(run_dir / RECIPE_FILE)  # what reruns the trial alone
        assert header["overrides"][:2] == ["search.n_trials=2", "~search"] and "training.seed=0" in header["overrides"]
    assert ("No trial completed: 2 trial(s) failed, so there is no best point to train. The first failure, trial 0 "
            f"(`search/classification/trial-0000/error.txt`): {error}") in (out / "search.md").read_text()


def test_a_crashed_trial_fails_alone_and_the_search_goes_on(search_recipe, tmp_path, monkeypatch):
    """Out of memory at a sampled batch size is a crash, not an LrrError: that trial fails
    (its traceback kept), the next one trains."""
    import lowrank_runner.train.invocation as runner

    train, calls = runner._train, []

    def out_of_memory_once(batch, run, run_dir, checkpoint):
        calls.append(run_dir.name)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return train(batch, run, run_dir, checkpoint)

    monkeypatch.setattr(runner, "_train", out_of_memory_once)
    out = tmp_path / "out"
    result = lrr("run", search_recipe, "--output", out, "--set", "search.n_trials=2", "--set", "training.seed=0")
    assert result.exit_code == 0, result.output
    assert [t[1] for t in trial_summary(out)] == ["FAIL", "COMPLETE"]
    assert "RuntimeError: CUDA out of memory" in (out / "search" / "classification" / "trial-0000" / "error.txt").read_text()
    assert "trial 0 failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB; the search goes on" in \
        result.output


def test_inspect_and_validate_show_the_search(search_recipe):
    shown = lrr("validate", search_recipe)
    assert shown.exit_code == 0, shown.output
    assert "search: 3 trial(s) per task, sampler tpe (seed 0)" in shown.output
    assert "training.learning_rate  log_uniform [0.05, 0.3]" in shown.output
    assert 'targets                 choices [["Wq", "Wv"], ["Wq"]]' in shown.output
    inspected = lrr("inspect", search_recipe, "--json")
    assert inspected.exit_code == 0, inspected.output
    search = json.loads(inspected.output)["search"]
    assert search["n_trials"] == 3 and search["sampler"] == "tpe"
    assert search["objectives"]["classification"] == {
        "task": "classification", "metric": "accuracy", "split": "the held-out 0.25 of train", "direction": "maximize",
        "seed": 0}
    assert "objective [classification]: maximize accuracy on the held-out 0.25 of train" in \
        lrr("inspect", search_recipe).output


def test_inspect_builds_the_model_at_each_choice_of_targets_and_method_keys(tiny_recipe):
    recipe = tiny_recipe("search:\n  n_trials: 2\n  space:\n    targets: {choices: [[Wq], [Wnope]]}\n"
                         "    method.r: {choices: [2, 400]}\n")
    assert check_recipe_file(recipe) == []  # only the model shows these
    result = lrr("inspect", recipe)
    assert result.exit_code == 1
    assert (f"{recipe}:13:31: search.space.targets.choices.1: choices: a trial would set targets to ['Wnope'], which "
            "the model of classification cannot take: targets: target pattern 'Wnope' matched no module of this bert "
            "model") in result.output
    assert (f"{recipe}:14:29: search.space.method.r.choices.1: choices: a trial would set method.r to 400, which the "
            "model of classification cannot take: method.r 400 is above the rank a module can have") in result.output
    assert "choices.0" not in result.output


def test_the_condlora_search_recipe_is_its_protocol(tmp_path):
    """CondLoRA §3.1: learning rates searched with Optuna on the held-out 10% of train,
    by each task's metric; the best rate trained with three seeds."""
    from tests.test_inspect import REPO, ROBERTA_BASE

    recipe = REPO / "recipes" / "condlora_roberta_glue_search.yaml"
    assert check_recipe_file(recipe) == []
    (tmp_path / "config.json").write_text(json.dumps(ROBERTA_BASE))
    result = lrr("inspect", recipe, "--json", "--set", f"backbone.name={tmp_path}")
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    search = found["search"]
    assert search["n_trials"] == 20 and search["sampler"] == "tpe"
    assert search["space"] == {"training.learning_rate": {"log_uniform": [1e-5, 1e-3]}}
    metrics = {t: o["metric"] for t, o in search["objectives"].items()}
    assert metrics == {"mnli": "accuracy", "sst2": "accuracy", "cola": "matthews_correlation", "qqp": "accuracy",
                       "qnli": "accuracy", "rte": "accuracy", "mrpc": "accuracy", "stsb": "pearson"}
    assert {(o["split"], o["direction"], o["seed"]) for o in search["objectives"].values()} == {
        ("the held-out 0.1 of train", "maximize", 0)}
    assert sorted({run["seed"] for run in found["runs"]}) == [0, 1, 2]
    assert {run["adapter_params"] for run in found["runs"]} == {24576}  # CondLoRA Table 4


BAD = [
    ("training.learnig_rate: {log_uniform: [1.0e-5, 1.0e-2]}", "13:5",
     "search.space.training.learnig_rate: unknown recipe key 'training.learnig_rate' (did you mean "
     "'training.learning_rate'?); a search space names dotted recipe keys, e.g. training.learning_rate or method.r"),
    ("training.learning_rate: {loguniform: [1.0e-5, 1.0e-2]}", "13:30",
     "search.space.training.learning_rate.loguniform: unknown key 'loguniform' (did you mean 'log_uniform'?)"),
    ("training.learning_rate: {log_uniform: [0, 1.0e-2]}", "13:44",
     "search.space.training.learning_rate.log_uniform.0: must be > 0; got 0"),
    ("training.learning_rate: {uniform: [1.0e-2, 1.0e-5]}", "13:39",
     "search.space.training.learning_rate.uniform: a range [LOW, HIGH] needs LOW < HIGH; got [0.01, 1e-05]"),
    ("method.r: {choices: [4, -1]}", "13:29",
     "search.space.method.r.choices.1: choices: a trial would set method.r to -1, which is not valid: must be >= 1; "
     "got -1"),
    ("training.warmup_ratio: {uniform: [0.0, 2.0]}", "13:44",
     "search.space.training.warmup_ratio.uniform.1: uniform: a trial would set training.warmup_ratio to 2.0, which "
     "is not valid: must be < 1; got 2.0"),
    ("training.batch_size: {uniform: [8, 32]}", "13:36",
     "search.space.training.batch_size.uniform: uniform: a trial would set training.batch_size to 17.1672 (inside "
     "the range), which is not valid: expected an integer, got a number (17.167184)"),
    ("method.dropout: {uniform: [0.0, 0.1], choices: [0.1]}", "13:21",
     "search.space.method.dropout: one distribution per key; got uniform and choices: keep one of log_uniform, "
     "uniform, int, choices"),
    ("training.seed: {int: [0, 3]}", "13:5",
     "search.space.training.seed: 'training.seed' cannot be searched: trials train with the recipe's first seed, "
     "the best point with every seed of training.seed"),
    ("method: {choices: [{name: lora}]}", "13:24",
     "search.space.method.choices.0: a choice cannot be a mapping: search its keys one by one (e.g. method.KEY: "
     "{choices: [...]})"),
    ("targets: {choices: [[Wq], [Wq]]}", "13:31",
     "search.space.targets.choices.1: ['Wq'] is listed twice (also item 0): each choice once"),
]


@pytest.mark.parametrize("entry, where, message", BAD, ids=[b[0].split(":")[0] for b in BAD])
def test_a_bad_search_block_is_named_at_its_line(tiny_recipe, entry, where, message):
    recipe = tiny_recipe(f"search:\n  n_trials: 2\n  space:\n    {entry}\n")
    problems = [str(p) for p in check_recipe_file(recipe)]
    assert problems == [f"{recipe}:{where}: {message}"]


def test_a_search_and_a_sweep_do_not_mix_and_n_trials_is_required(tiny_recipe):
    recipe = tiny_recipe("sweep: {method.r: [2, 4]}\nsearch:\n  space: {training.learning_rate: {uniform: [0.1, 0.2]}}\n")
    problems = [str(p) for p in check_recipe_file(recipe)]
    assert f"{recipe}:11:1: search: missing required key 'n_trials'" in problems
    assert (f"{recipe}:11:1: search: a recipe has a sweep or a search, not both: a search samples its own points; "
            "remove the sweep (or search in a recipe of its own)") in problems


def test_resume_needs_the_search_it_continues(search_recipe, tiny_recipe, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = lrr("run", search_recipe, "--output", empty, "--resume")
    assert refused.exit_code == 2
    assert f"--output {empty}: holds no search of lowrank-runner (no search.json and search.db)" in refused.output
    (empty / "search.db").touch()
    (empty / "search.json").write_text(json.dumps({"hash": "0", "source": "other.yaml", "overrides": ["method.r=2"]}))
    refused = lrr("run", search_recipe, "--output", empty, "--resume", "--set", "search.n_trials=2")
    assert refused.exit_code == 2
    assert f"resume with the recipe and overrides it started with: lrr run other.yaml --set method.r=2 --output {empty} " \
           "--resume" in refused.output
    monkeypatch.setitem(__import__("sys").modules, "optuna", None)
    missing = lrr("run", search_recipe, "--output", tmp_path / "new")
    assert missing.exit_code == 1
    assert "needs Optuna: pip install 'lowrank-runner[search]'" in missing.output


def test_a_damaged_study_database_is_named_with_the_fix(search_recipe, tmp_path):
    out = tmp_path / "out"
    stopped = lrr("run", search_recipe, "--output", out, "--stop-after-step", 2)
    assert stopped.exit_code == 0, stopped.output
    (out / "search.db").write_bytes(b"not a database " * 100)  # a disk error, a partial copy
    resumed = lrr("run", search_recipe, "--output", out, "--resume")
    assert resumed.exit_code == 1 and "internal error" not in resumed.output, resumed.output
    assert (f"error: {out / 'search.db'}: the search's study database cannot be read (file is not a database); it is "
            "damaged: restore it from a copy, or start the search again in a new directory") in resumed.output
