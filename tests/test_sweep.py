"""Sweeps: a recipe's ``sweep:`` block (and ``--sweep``) as points beside tasks × seeds."""

from __future__ import annotations

import json
import re

import pytest

from lowrank_runner.recipe.load import check_recipe_file, load_recipe
from lowrank_runner.recipe.sweep import sweep_override
from tests.bad_inputs.harness import assert_clean_error, lrr, snapshot

SWEEP = """
sweep:
  method.r: [2, 4]
  zip:
    training.learning_rate: [1.0e-2, 5.0e-3]
    method.alpha: [4, 8]
"""


def messages(path, overrides=()):
    return [str(p) for p in check_recipe_file(path, overrides)]


def test_grid_times_zip_times_seeds_in_task_point_seed_order(tiny_recipe):
    recipe = load_recipe(tiny_recipe(SWEEP), ["training.seed=[0, 1]"])
    slugs = [run.slug for run in recipe.runs]
    assert slugs == [
        "classification/r=2,learning_rate=0.01,alpha=4/seed0", "classification/r=2,learning_rate=0.01,alpha=4/seed1",
        "classification/r=2,learning_rate=0.005,alpha=8/seed0", "classification/r=2,learning_rate=0.005,alpha=8/seed1",
        "classification/r=4,learning_rate=0.01,alpha=4/seed0", "classification/r=4,learning_rate=0.01,alpha=4/seed1",
        "classification/r=4,learning_rate=0.005,alpha=8/seed0", "classification/r=4,learning_rate=0.005,alpha=8/seed1",
    ]
    last = recipe.runs[-1]
    assert last.point == {"method.r": 4, "training.learning_rate": 0.005, "method.alpha": 8}
    assert (last.config["method"]["r"], last.config["method"]["alpha"], last.config["training"]["learning_rate"]) == (4, 8, 0.005)
    assert "sweep" not in last.config and len({run.config_hash for run in recipe.runs}) == 8


def test_a_point_wins_over_a_per_task_value_and_a_mapping_replaces(make_recipe, tiny_recipe):
    path = tiny_recipe("""
        sweep:
          method: [{name: lora, r: 2}, {name: mtlora, r: 2, structure: shim}]
        """)
    recipe = load_recipe(path)
    assert [run.label for run in recipe.runs] == ["method=lora", "method=mtlora"]  # the names tell them apart
    assert recipe.runs[0].config["method"] == {"name": "lora", "r": 2, "alpha": 16, "dropout": 0, "rslora": False}
    assert recipe.runs[1].config["method"]["name"] == "mtlora"


def test_labels_are_directory_names_and_fall_back_to_indexes_when_values_read_the_same(tiny_recipe):
    path = tiny_recipe("""
        sweep:
          targets: [[Wq], [Wq, Wv]]
          task.data.train: ["a b/c.jsonl", "a b?c.jsonl"]
        """)
    from lowrank_runner.recipe.compose import load_document
    from lowrank_runner.recipe.expand import expand_runs

    labels = [run.point.label for run in expand_runs(load_document(path))]
    assert labels == ["targets=Wq,train=0-a_b_c.jsonl", "targets=Wq,train=1-a_b_c.jsonl",
                      "targets=Wq+Wv,train=0-a_b_c.jsonl", "targets=Wq+Wv,train=1-a_b_c.jsonl"]
    cased = tiny_recipe("sweep: {method.name: [lora, LORA]}\n", name="cased.yaml")
    assert [run.point.label for run in expand_runs(load_document(cased))] == ["name=0-lora", "name=1-LORA"]  # macOS


def test_every_point_is_validated_at_the_line_of_its_value(tiny_recipe):
    path = tiny_recipe("""
        sweep:
          method.r: [4, 0]
          targets: [[Wq], [Wq, Wx]]
        """)
    assert messages(path) == [
        f"{path}:12:17: sweep.method.r.1: must be >= 1; got 0",
        f"{path}:13:24: sweep.targets.1.1: unknown target symbol 'Wx'; symbols: Wq, Wk, Wv, Wa, Wm, Wo, Wf "
        "(or write a module pattern)",
    ]


def test_a_point_is_checked_against_the_schema_of_the_sections_it_changes(tiny_recipe):
    """A point's values are checked in their own sections (the document was checked whole
    once): a bad value under training or task is located at its sweep line."""
    path = tiny_recipe("""
        sweep:
          training.learning_rate: [1.0e-3, -1]
          task.max_length: [64, 0]
        """)
    found = messages(path)
    assert any(m.startswith(f"{path}:12:36: sweep.training.learning_rate.1: must be") for m in found), found
    assert any(m.startswith(f"{path}:13:25: sweep.task.max_length.1: must be >= 8; got 0") for m in found), found


@pytest.mark.parametrize("block,message", [
    ("method.rr: [4, 8]", "11:3: sweep.method.rr: unknown recipe key 'method.rr' (did you mean 'method.r'?); a sweep "
                          "names dotted recipe keys, e.g. method.r or training.learning_rate"),
    ("training.seed: [1, 2]", "11:3: sweep.training.seed: 'training.seed' cannot be swept: list the seeds in "
                              "training.seed: each point runs every seed"),
    ("task.name: [sst2, rte]", "11:3: sweep.task.name: 'task.name' cannot be swept: list the tasks in tasks:, each "
                               "point runs every task"),
    ("method.r: [4, 4]", "11:17: sweep.method.r.1: 4 is listed twice for method.r (also item 0): each point runs once"),
    ("zip: {method.r: [4, 8], method.alpha: [8]}", "11:8: sweep.zip: zipped keys move together, so their lists need "
                                                   "the same length (method.r: 2, method.alpha: 1)"),
    ("method: [{name: lora}]\n  method.r: [4]", "12:3: sweep.method.r: 'method.r' is inside 'method', which is swept "
                                                 "too: sweep one of them"),
    ("method.r: []", "11:13: sweep.method.r: must have at least 1 item(s); got 0"),
    ("method.r: 4", "11:13: sweep.method.r: expected a list, got an integer (4)"),
])
def test_bad_sweeps_are_located_errors(tiny_recipe, block, message):
    path = tiny_recipe(f"sweep:\n  {block}\n")
    found = messages(path)
    assert f"{path}:{message}" in found, found


def test_the_command_line_axis_is_the_override_it_stands_for(tiny_recipe):
    assert sweep_override("method.r=2,4") == "sweep={method.r: [2, 4]}"
    assert sweep_override("targets=[Wq,Wv],[Wq]") == "sweep={targets: [[Wq, Wv], [Wq]]}"
    result = lrr("inspect", tiny_recipe(), "--sweep", "method.r=2,0")
    assert_clean_error(result, "sweep.method.r.1: must be >= 1; got 0", code=1)
    assert_clean_error(lrr("validate", tiny_recipe(), "--sweep", "method.r"),
                       "--sweep 'method.r': expected dotted.key=VALUE,VALUE,..., e.g. --sweep method.r=4,8,16", code=2)


def test_inspect_lists_every_point_with_its_parameters_and_steps(tiny_recipe):
    result = lrr("inspect", tiny_recipe(), "--sweep", "method.r=2,4", "--sweep", "targets=[Wq],[Wq,Wv]", "--json")
    assert result.code == 0, result.output
    runs = json.loads(result.stdout)["runs"]
    assert [(r["label"], r["adapter_params"]) for r in runs] == [
        # r (in + out) per module, hidden size 16, 2 layers: 2 x 32 x 2 for r=2 on Wq
        ("r=2,targets=Wq", 128), ("r=2,targets=Wq+Wv", 256), ("r=4,targets=Wq", 256), ("r=4,targets=Wq+Wv", 512),
    ]
    assert all(r["steps"] == runs[0]["steps"] > 0 for r in runs)
    text = lrr("inspect", tiny_recipe(), "--sweep", "method.r=2,4")
    assert "sweep points" in text.output and "r=4" in text.output


@pytest.mark.slow
def test_a_sweep_trains_each_point_in_its_directory_and_resumes(tiny_recipe, tmp_path):
    path = tiny_recipe()
    out = tmp_path / "sweep"
    args = ("run", path, "--sweep", "method.r=2,4", "--set", "training.epochs=1", "--output", out)
    first = lrr(*args, "--stop-after-step", "2")
    assert first.code == 0, first.output
    dirs = sorted(str(p.parent.relative_to(out)) for p in out.rglob("recipe.yaml"))
    assert dirs == ["classification/r=2/seed0", "classification/r=4/seed0"]
    assert "--set 'sweep={method.r: [2, 4]}'" in first.output  # the continue command names the axis
    second = lrr(*args, "--resume")
    assert second.code == 0, second.output
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["label"], r["point"], r["status"]) for r in summary["runs"]] == [
        ("r=2", {"method.r": 2}, "completed"), ("r=4", {"method.r": 4}, "completed")]
    for run in summary["runs"]:
        report = json.loads((out / "classification" / run["label"] / "seed0" / "report.json").read_text())
        assert report["status"] == "completed"
        assert (report["run"]["point"], report["run"]["label"]) == (run["point"], run["label"])  # a table of run dirs
    code, table, _ = (lambda r: (r.code, r.stdout, r.stderr))(lrr("report", "--table", *sorted(out.rglob("seed0"))))
    assert code == 0 and "| tiny (lora, r=2) |" in table and "| tiny (lora, r=4) |" in table
    before = snapshot(out)
    again = lrr("run", path, "--sweep", "method.r=2,8", "--set", "training.epochs=1", "--output", out, "--resume")
    assert_clean_error(again, contains=("its runs were started by a different recipe or --set overrides",))
    assert snapshot(out) == before


# ------------------------------------------------------------- found by a tester


@pytest.mark.parametrize("block,message", [
    # a whole mapping that holds a key a sweep cannot move (the seeds were dropped, a task trained in another's dir)
    ("training: [{learning_rate: 0.01}, {learning_rate: 0.02}]",
     "11:3: sweep.training: 'training' cannot be swept as a whole: it holds training.seed, which a sweep cannot move "
     "(list the seeds in training.seed: each point runs every seed); sweep the keys inside it, e.g. "
     "training.learning_rate"),
    ("task: [{name: regression}]", "11:3: sweep.task: 'task' cannot be swept as a whole: it holds task.name, which a "
                                   "sweep cannot move (list the tasks in tasks:, each point runs every task); sweep the "
                                   "keys inside it, e.g. task.max_length"),
    # the same key twice: the last value won and runs repeated
    ("method.r: [2, 4]\n  zip: {method.r: [8, 16], method.alpha: [1, 2]}",
     "12:9: sweep.zip.method.r: 'method.r' is swept twice (also at {path}:11:3): give its values once"),
    # equal once read as a recipe reads them
    ("method.r: [2, 2.0]", "11:17: sweep.method.r.1: 2.0 is listed twice for method.r (also item 0): each point runs once"),
    ("method: [{name: lora, r: 2}, {name: lora, r: 2, alpha: 16}]",
     "10:1: sweep: points method=lora and method=lora-alpha=16 are the same run once defaults are filled: remove one"),
    ("method.r: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]\n  method.alpha: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]\n"
     "  method.dropout: [0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1]",
     "10:1: sweep: 1,331 points (11 x 11 x 11); a recipe sweeps at most 1,000: split the sweep into several recipes, "
     "or sweep fewer values"),
])
def test_sweeps_that_would_train_the_wrong_runs_are_errors(tiny_recipe, block, message):
    path = tiny_recipe(f"sweep:\n  {block}\n")
    found = messages(path)
    assert f"{path}:{message.format(path=path)}" in found, found


def test_a_big_grid_is_refused_before_any_point_expands(tiny_recipe, monkeypatch):
    """Point by point, a 10^6-point grid kept `lrr validate` busy for minutes: the count is
    checked first and no point is built."""
    import lowrank_runner.recipe.expand as expand

    applied = []
    monkeypatch.setattr(expand, "apply_point", lambda *args: applied.append(args))
    values = ", ".join(map(str, range(1, 101)))
    path = tiny_recipe(f"sweep:\n  method.r: [{values}]\n  method.alpha: [{values}]\n  training.epochs: [{values}]\n")
    assert any("1,000,000 points (100 x 100 x 100)" in m for m in messages(path))
    assert applied == []


def test_mapping_points_are_labelled_by_what_differs(tiny_recipe):
    recipe = load_recipe(tiny_recipe("sweep:\n  method: [{name: lora, r: 2}, {name: lora, r: 4}, {name: mtlora, r: 2}]\n"))
    assert [run.label for run in recipe.runs] == ["method=lora-r=2", "method=lora-r=4", "method=mtlora-r=2"]


def test_the_command_line_refuses_what_it_cannot_mean(tiny_recipe):
    assert_clean_error(lrr("inspect", tiny_recipe(), "--sweep", "method.r=2,4", "--sweep", "method.r=8"),
                       "--sweep method.r is given twice: give its values once, e.g. --sweep method.r=4,8,16 (repeat "
                       "--sweep for other keys: a grid)", code=2)
    assert_clean_error(lrr("inspect", tiny_recipe(), "--set", "sweep.method.r=[2,4]"),
                       "--set sweep.method.r=[2,4]: sweep: a sweep's keys are dotted recipe keys themselves, so --set "
                       "cannot reach inside it: write --sweep KEY=V1,V2 (e.g. --sweep method.r=2,4) or --set "
                       "'sweep={method.r: [2, 4]}'", code=1)
    assert_clean_error(lrr("inspect", tiny_recipe(), "--set", "search.space.training.epochs={int: [1, 2]}"),
                       "--set search.space.training.epochs={int: [1, 2]}: search.space: the search space's keys are "
                       "dotted recipe keys themselves, so --set cannot reach inside it: write --set "
                       "'search.space={training.epochs: {int: [1, 3]}}' (it adds the key to the space)", code=1)


def test_values_beyond_a_float_s_integers_stay_floats(tiny_recipe):
    from lowrank_runner.recipe.hashing import canonical_form

    assert canonical_form({"a": 1e30, "b": 3.0}) == {"a": 1e30, "b": 3}
    assert isinstance(canonical_form(1e30), float)


def test_a_path_too_long_for_the_file_system_is_a_located_error(tiny_recipe, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)  # data/ exists, so the too-long name below it is an OSError, not "not found"
    path = tiny_recipe(f"sweep:\n  task.data.train: [data/{'x' * 300}.jsonl]\n")
    assert_clean_error(lrr("validate", path, "--json"), code=1)
    assert f"{path}:11:21: sweep.task.data.train.0: cannot be read as a path: File name too long" in messages(path)


def test_a_point_whose_directory_name_is_too_long_is_refused_by_validate_and_run(tiny_recipe, tmp_path):
    """A zip of many keys makes one directory name per point: beyond the 255 bytes a file
    name may have, `lrr run` died with "File name too long" (exit 70) after making a folder."""
    keys = ["training.learning_rate", "training.weight_decay", "training.warmup_ratio", "training.adam_epsilon",
            "method.dropout", "method.alpha", "training.max_grad_norm", "training.eval_batch_size",
            "training.log_every", "training.max_steps", "training.checkpoints_kept", "training.checkpoint_every"]
    values = {"training.eval_batch_size": [32, 64], "training.log_every": [10, 20], "training.max_steps": [100001, 100002],
              "training.checkpoints_kept": [3, 4], "training.checkpoint_every": [100001, 100002]}
    lines = "".join(f"    {k}: {values.get(k, [0.0123456789012345, 0.0223456789012345])}\n" for k in keys)
    path = tiny_recipe(f"sweep:\n  zip:\n{lines}")
    [found] = messages(path)
    assert found.startswith(f"{path}:") and re.search(r"sweep: a point's directory name would be \d{3} bytes", found) and \
        "more than the 255 a file name may have; sweep fewer keys together, or shorter values" in found
    before = snapshot(tmp_path)
    assert_clean_error(lrr("run", path, "--output", tmp_path / "runs"), code=1,
                       contains=("a point's directory name would be",))
    assert snapshot(tmp_path) == before and not (tmp_path / "runs").exists()  # nothing made
