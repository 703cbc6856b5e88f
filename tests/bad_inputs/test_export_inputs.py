"""Bad inputs to ``lrr export`` and ``load_adapted``: every damaged or missing file of a
run directory or bundle, bad backbones, bad ``--out`` paths and bad option values give
one clear line naming the file and the fix, a non-zero exit, no traceback, and nothing
written. One tiny run is trained per session; each case breaks a copy of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.bad_inputs.harness import assert_clean_error, lrr, snapshot


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def edit_tensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def fix_run(run: Path) -> str:
    return f"restore it from a copy, or train the run again (lrr run {run / 'recipe.yaml'} --output NEW_DIR)"


def adapter_config(run: Path) -> Path:
    return run / "adapter" / "adapter_config.json"


def set_key(key, value):
    return lambda run: edit_json(adapter_config(run), lambda d: d.__setitem__(key, value))


def wrong_shape(run: Path) -> None:
    import torch

    def edit(state):
        state["bert.encoder.layer.0.attention.self.query.lrr_adapter.lora_A"] = torch.zeros(3, 3)
    edit_tensors(run / "adapter" / "adapter.safetensors", edit)


def wrong_name(run: Path) -> None:
    def edit(state):
        state["bert.encoder.layer.9.attention.self.query.lrr_adapter.lora_A"] = state.pop(
            "bert.encoder.layer.0.attention.self.query.lrr_adapter.lora_A")
    edit_tensors(run / "adapter" / "adapter.safetensors", edit)


def head_shape(run: Path) -> None:
    import torch

    edit_tensors(run / "adapter" / "head.safetensors", lambda s: s.__setitem__("classifier.weight", torch.zeros(5, 5)))


def head_lacks(run: Path) -> None:
    edit_tensors(run / "adapter" / "head.safetensors", lambda s: s.pop("classifier.bias"))


def truncate(name: str):
    def edit(run: Path) -> None:
        path = run / "adapter" / name
        path.write_bytes(path.read_bytes()[:200])
    return edit


def moved_backbone(run: Path) -> None:
    recipe = run / "recipe.yaml"
    name = json.loads(adapter_config(run).read_text())["backbone"]["name"]
    recipe.write_text(recipe.read_text().replace(name, "/nonexistent/tiny-bert"))


def edited_recipe_method(run: Path) -> None:
    recipe = run / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("  r: 4\n", "  r: 8\n"))


def unfinished(run: Path) -> None:
    shutil.rmtree(run / "adapter")
    (run / "report.json").unlink()
    (run / "checkpoints" / "step-3").mkdir(parents=True)


def failed(run: Path) -> None:
    shutil.rmtree(run / "adapter")
    (run / "report.json").write_text(json.dumps({"status": "failed", "error": "RuntimeError: out of memory"}))


# id: (break the run copy, extra arguments, the expected error line (format: run=, out=), exit code)
CASES = {
    "head file deleted": (
        lambda run: (run / "adapter" / "head.safetensors").unlink(), (),
        "{run}/adapter/head.safetensors: missing: the run trained a task head (classifier.weight, classifier.bias) and "
        "without it the export would carry an untrained head; {fix}", 1),
    "head lacks a tensor": (
        head_lacks, (),
        "{run}/adapter/head.safetensors: lacks classifier.bias (adapter_config.json 'head': classifier.weight, "
        "classifier.bias); {fix}", 1),
    "head of another shape": (
        head_shape, (),
        "{run}: the saved task head does not fit the rebuilt model: size mismatch for classifier.weight: copying a param "
        "with shape torch.Size([5, 5]) from checkpoint, the shape in current model is torch.Size([2, 16]); was it "
        "trained on another backbone? (--backbone)", 1),
    "adapter_config.json not JSON": (
        lambda run: adapter_config(run).write_text('{"format": "lowrank-runner-adapter",\n  method: 1}'), (),
        "{run}/adapter/adapter_config.json:2:3: not valid JSON (Expecting property name enclosed in double quotes); the "
        "adapter config is damaged: {fix}", 1),
    "adapter_config.json a list": (
        lambda run: adapter_config(run).write_text("[]"), (),
        "{run}/adapter/adapter_config.json: (top level): [] is not of type 'object'; the file is damaged: {fix}", 1),
    "adapter_config.json nested too deeply": (
        lambda run: adapter_config(run).write_text("[" * 100_000 + "]" * 100_000), (),
        "{run}/adapter/adapter_config.json: not valid JSON (nested too deeply); the adapter config is damaged: {fix}", 1),
    "adapter_config.json not text": (
        lambda run: adapter_config(run).write_bytes(b"\xff\xfe{}"), (),
        "{run}/adapter/adapter_config.json: not UTF-8 text (binary data at byte 0); the adapter config is damaged: "
        "{fix}", 1),
    "adapter_config.json labels disagree": (
        lambda run: edit_json(adapter_config(run), lambda d: d["task"].__setitem__("num_labels", 3)), (),
        "{run}/adapter/adapter_config.json: task.num_labels is 3 but task.id2label names 2 labels; the file is "
        "damaged: {fix}", 1),
    "adapter_config.json without method": (
        lambda run: edit_json(adapter_config(run), lambda d: d.pop("method")), (),
        "{run}/adapter/adapter_config.json: (top level): 'method' is a required property; the file is damaged: {fix}", 1),
    "adapter_config.json head not a list": (
        set_key("head", "classifier"), (),
        "{run}/adapter/adapter_config.json: head: 'classifier' is not of type 'array'; the file is damaged: {fix}", 1),
    "adapter_config.json unknown method": (
        set_key("method", {"name": "superlora", "r": 4, "alpha": 8, "dropout": 0, "rslora": False}), (),
        "{run}/adapter/adapter_config.json: method.name: 'superlora' is not a registered method (registered: "
        "{registered}); install the package that provides it, or the file is damaged: {fix}", 1),
    "adapter_config.json from a newer version": (
        set_key("format_version", 7), (),
        "{run}/adapter/adapter_config.json: format_version 7 was written by a newer lowrank-runner (this one, {version}, "
        "reads format_version 1); upgrade: pip install -U lowrank-runner", 1),
    "adapter_config.json unknown format_version": (
        set_key("format_version", 0), (),
        "{run}/adapter/adapter_config.json: format_version: 0 is not a format_version this lowrank-runner reads (1); "
        "the file is damaged: {fix}", 1),
    "adapter_config.json model class not a model": (
        lambda run: edit_json(adapter_config(run), lambda d: d["task"].__setitem__("model_class", "Trainer")), (),
        "adapter_config.json: task.model_class 'Trainer' is not a transformers model class this transformers "
        "({transformers}) has (e.g. AutoModelForSequenceClassification)", 1),
    "recipe.yaml and adapter_config.json disagree": (
        edited_recipe_method, (),
        "{run}/recipe.yaml and {run}/adapter/adapter_config.json disagree on 'method' "
        '({{"name": "lora", "r": 8, "alpha": 8, "dropout": 0, "rslora": false}} vs {{"name": "lora", "r": 4, '
        '"alpha": 8, "dropout": 0, "rslora": false}}): one of them was edited; {fix}', 1),
    "recipe.yaml deleted": (
        lambda run: (run / "recipe.yaml").unlink(), (),
        "{run}/recipe.yaml: missing: the resolved recipe is what rebuilds the model; restore it from a copy (the run's "
        "report.json holds the same config under recipe.config), or train the run again from its recipe", 1),
    "recipe.yaml not YAML": (
        lambda run: (run / "recipe.yaml").write_text("name: tiny\nbackbone: [\n"), (),
        "{run}/recipe.yaml:3:1: (recipe): invalid YAML: expected the node content, but found '<stream end>'; the run's "
        "resolved recipe is damaged: {fix}", 1),
    "recipe.yaml a list": (
        lambda run: (run / "recipe.yaml").write_text("- name\n"), (),
        "{run}/recipe.yaml:1:1: (recipe): expected a mapping, got a list; the run's resolved recipe is damaged: {fix}", 1),
    "adapter truncated": (
        truncate("adapter.safetensors"), (),
        "{run}/adapter/adapter.safetensors: not a readable safetensors file (truncated or corrupted); {fix}", 1),
    "head truncated": (
        truncate("head.safetensors"), (),
        "{run}/adapter/head.safetensors: not a readable safetensors file (truncated or corrupted); {fix}", 1),
    "adapter deleted": (
        lambda run: (run / "adapter" / "adapter.safetensors").unlink(), (),
        "{run}/adapter/adapter.safetensors: missing; {fix}", 1),
    "adapter of another shape": (
        wrong_shape, (),
        "{run}: the saved adapter does not fit the rebuilt model: size mismatch for "
        "bert.encoder.layer.0.attention.self.query.lrr_adapter.lora_A: copying a param with shape torch.Size([3, 3]) "
        "from checkpoint, the shape in current model is torch.Size([4, 16]); was it trained on another backbone? "
        "(--backbone)", 1),
    "adapter tensor for a module the backbone lacks": (
        wrong_name, (),
        "{run}: saved weights do not fit the rebuilt model (e.g. "
        "['bert.encoder.layer.9.attention.self.query.lrr_adapter.lora_A']); was it trained on another backbone? "
        "(--backbone)", 1),
    "--backbone that does not exist": (
        lambda run: None, ("--backbone", "/nonexistent"),
        "--backbone /nonexistent: no such directory; give the backbone's local directory (with config.json) or a hub id", 1),
    "--backbone a file": (
        lambda run: None, ("--backbone", "{run}/recipe.yaml"),
        "--backbone {run}/recipe.yaml: not a directory; give the backbone's model directory (with config.json)", 1),
    "--backbone a directory without config.json": (
        lambda run: None, ("--backbone", "{run}/adapter"),
        "--backbone {run}/adapter: the directory holds no config.json; give a model directory written by "
        "save_pretrained", 1),
    "backbone moved away": (
        moved_backbone, (),
        "{run}: the run's backbone /nonexistent/tiny-bert (backbone.name in {run}/recipe.yaml) no longer exists; if it "
        "moved, point at it: lrr export ... --backbone PATH (or load_adapted(..., backbone=PATH))", 1),
    "--out inside the run": (
        lambda run: None, ("--out", "{run}/merged"),
        "--out {run}/merged: inside the exported source {run}; choose a directory outside it", 2),
    "--out the run itself": (
        lambda run: None, ("--out", "{run}"),
        "--out {run}: inside the exported source {run}; choose a directory outside it", 2),
    "--out not empty": (
        lambda run: (run.parent / "out").mkdir() or (run.parent / "out" / "keep.txt").write_text("x"), (),
        "--out {out}: exists and is not an empty directory; choose a new path or remove it", 2),
    "--out under a file": (
        lambda run: None, ("--out", "{run}/recipe.yaml/merged"),
        "--out {run}/recipe.yaml/merged: inside the exported source {run}; choose a directory outside it", 2),
    "--out under a file outside the run": (
        lambda run: (run.parent / "notes.txt").write_text("x"), ("--out", "{run}/../notes.txt/merged"),
        "--out {run}/../notes.txt/merged: {parent}/notes.txt is a file, not a directory; choose another location", 2),
    "--out where nothing can be created": (
        lambda run: None, ("--out", "/proc/lrr-test/merged"),
        "--out /proc/lrr-test/merged: cannot write in /proc (No such file or directory); choose a writable location", 2),
    "unfinished run": (
        unfinished, (),
        "{run}: the run has not finished (latest checkpoint: checkpoints/step-3): its adapter is saved in adapter/ when "
        "training ends. Continue it with: lrr run RECIPE --output RUN_DIR --resume, then export it", 2),
    "failed run": (
        failed, (),
        "{run}: the run failed (RuntimeError: out of memory), so it has no trained adapter to export; fix the cause and "
        "train it again (the traceback is in {run}/error.txt)", 2),
    "adapter directory deleted from a completed run": (
        lambda run: shutil.rmtree(run / "adapter"), (),
        "{run}/adapter: missing: the run completed, but its trained adapter is gone; {fix}", 1),
    "not a run": (
        lambda run: [shutil.rmtree(run / "adapter"), *(p.unlink() for p in run.iterdir() if p.is_file())], (),
        "{run}: not a run directory written by 'lrr run' (no adapter/adapter_config.json) nor an adapter bundle written "
        "by 'lrr export --adapter'", 2),
    "a file instead of a run": (
        lambda run: None, ("SOURCE={run}/recipe.yaml",),
        "{run}/recipe.yaml: not a directory; give a run directory written by 'lrr run' or an adapter bundle written by "
        "'lrr export --adapter'", 2),
    "no such run": (
        lambda run: None, ("SOURCE={run}-typo",),
        "{run}-typo: no such run directory", 2),
    "--tolerance nan": (lambda run: None, ("--tolerance", "nan"),
                        "--tolerance nan: give a finite number ≥ 0 (the largest allowed difference, e.g. 1e-3)", 2),
    "--tolerance negative": (lambda run: None, ("--tolerance", "-1e-3"),
                             "--tolerance -0.001: give a finite number ≥ 0 (the largest allowed difference, e.g. 1e-3)", 2),
    "--tolerance inf": (lambda run: None, ("--tolerance", "inf"),
                        "--tolerance inf: give a finite number ≥ 0 (the largest allowed difference, e.g. 1e-3)", 2),
    "--cast-tolerance nan": (lambda run: None, ("--dtype", "float16", "--cast-tolerance", "nan"),
                             "--cast-tolerance nan: give a finite number ≥ 0 (the largest allowed difference, e.g. 1e-3)", 2),
    "--max-shard-size garbage": (lambda run: None, ("--max-shard-size", "infGB"),
                                 "--max-shard-size infGB: give a size such as 5GB, 500MB (decimals too: 1.5GB; units B, "
                                 "KB, MB, GB, TB, KiB, MiB, GiB, TiB) or a number of bytes", 2),
    "--max-shard-size zero": (lambda run: None, ("--max-shard-size", "0"),
                              "--max-shard-size 0: must be more than 0 bytes; give a size such as 5GB, 500MB", 2),
    "--dtype garbage": (lambda run: None, ("--dtype", "int8"), "--dtype int8: choose one of float32, bfloat16, float16", 2),
}


def _command(run: Path, out: Path, fmt: str, extra: tuple, values: dict) -> list[str]:
    source, args = str(run), []
    for arg in extra:
        arg = arg.format(**values)
        if arg.startswith("SOURCE="):
            source = arg[len("SOURCE="):]
        else:
            args.append(arg)
    if "--out" not in args:
        args += ["--out", str(out)]
    return ["export", source, fmt, *args]


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_export_input(case, run_copy, tmp_path):
    import transformers

    import lowrank_runner
    from lowrank_runner.methods.registry import method_specs

    breaker, extra, message, code = CASES[case]
    breaker(run_copy)
    out = tmp_path / "out"
    values = {"run": run_copy, "out": out, "parent": tmp_path, "fix": fix_run(run_copy),
              "version": lowrank_runner.__version__, "registered": ", ".join(sorted(method_specs())), "transformers": transformers.__version__}
    before = snapshot(tmp_path)
    result = lrr(*_command(run_copy, out, "--merge", extra, values))
    assert_clean_error(result, message.format(**values), code=code)
    assert snapshot(tmp_path) == before  # nothing written, no staging directory left


@pytest.mark.parametrize("fmt", ["--adapter", "--peft"])
def test_every_export_format_refuses_a_run_without_its_head(fmt, run_copy, tmp_path):
    (run_copy / "adapter" / "head.safetensors").unlink()
    before = snapshot(tmp_path)
    result = lrr("export", run_copy, fmt, "--out", tmp_path / "out")
    assert_clean_error(result, f"{run_copy}/adapter/head.safetensors: missing: the run trained a task head "
                               "(classifier.weight, classifier.bias) and without it the export would carry an untrained "
                               f"head; {fix_run(run_copy)}", code=1)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("fmt", ["--adapter", "--peft"])
def test_every_export_format_refuses_a_nan_tolerance(fmt, run_copy, tmp_path):
    result = lrr("export", run_copy, fmt, "--tolerance", "nan", "--out", tmp_path / "out")
    assert_clean_error(result, "--tolerance nan: give a finite number ≥ 0 (the largest allowed difference, e.g. 1e-3)",
                       code=2)


def test_a_relative_backbone_is_found_from_the_directory_the_run_started_in(run_copy, tmp_path, tiny_bert):
    """recipe.yaml names the backbone as the recipe did (relative to the run's working
    directory, report.json 'cwd'): the export finds it from anywhere."""
    shutil.copytree(tiny_bert, tmp_path / "models" / "bert")
    recipe = run_copy / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace(str(tiny_bert), "models/bert"))
    edit_json(run_copy / "report.json", lambda r: r.__setitem__("cwd", str(tmp_path)))
    result = lrr("export", run_copy, "--merge", "--out", tmp_path / "out", cwd=run_copy / "adapter")
    assert result.code == 0, result.output
    assert (tmp_path / "out" / "config.json").is_file()

    shutil.rmtree(tmp_path / "models")  # gone: the message names where it was
    result = lrr("export", run_copy, "--merge", "--out", tmp_path / "out2")
    assert_clean_error(result, f"{run_copy}: the run's backbone {tmp_path}/models/bert (backbone.name in {recipe}) no "
                               "longer exists; if it moved, point at it: lrr export ... --backbone PATH (or "
                               "load_adapted(..., backbone=PATH))", code=1)


def test_load_adapted_raises_a_clear_error_for_a_bad_bundle(run_copy, tmp_path):
    import lowrank_runner
    from lowrank_runner.errors import LrrError

    result = lrr("export", run_copy, "--adapter", "--out", tmp_path / "bundle")
    assert result.code == 0, result.output
    bundle = tmp_path / "bundle"
    (bundle / "adapter.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(LrrError) as info:
        lowrank_runner.load_adapted(bundle)
    assert str(info.value) == (
        f"{bundle}/adapter.safetensors: not a readable safetensors file (truncated or corrupted); restore it from a "
        "copy, or export the bundle again from its run (lrr export RUN_DIR --adapter --out DIR)")
    with pytest.raises(LrrError, match="no such run directory"):
        lowrank_runner.load_adapted(tmp_path / "missing")
    with pytest.raises(LrrError, match=r"--backbone /nonexistent: no such directory"):
        lowrank_runner.load_adapted(run_copy, backbone="/nonexistent")
    with pytest.raises(LrrError, match=r"load_adapted\(dtype='int8'\): choose one of float32, bfloat16, float16"):
        lowrank_runner.load_adapted(run_copy, dtype="int8")


def test_an_export_is_not_a_source(run_copy, tmp_path):
    assert lrr("export", run_copy, "--merge", "--out", tmp_path / "merged").code == 0
    result = lrr("export", tmp_path / "merged", "--merge", "--out", tmp_path / "again")
    assert_clean_error(result, f"{tmp_path}/merged: an export of format merged-transformers (lrr_export.json), not a "
                               "run or an adapter bundle; export its source run instead (lrr_export.json 'source_run'), "
                               "or load it with transformers' from_pretrained", code=2)
    assert not (tmp_path / "again").exists()


FORMATS = ["--merge", "--adapter", "--peft"]


def _warnings(result) -> list[str]:
    return [line for line in result.error_lines() if line.startswith("warning: ")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_export_records_and_checks_the_backbone_it_loaded(fmt, run_copy, tmp_path, tiny_bert):
    """--backbone: lrr_export.json records the directory actually loaded; a moved copy
    of the run's backbone passes quietly, another model (same shapes, other weights) is
    exported with a warning naming both fingerprints."""
    from lowrank_runner.train.fingerprint import directory_fingerprint
    from tests.conftest import save_tiny_backbone

    moved = Path(shutil.copytree(tiny_bert, tmp_path / "moved-bert"))
    result = lrr("export", run_copy, fmt, "--backbone", moved, "--out", tmp_path / "out")
    assert result.code == 0, result.output
    assert _warnings(result) == []
    recorded = json.loads((tmp_path / "out" / "lrr_export.json").read_text())["backbone"]
    # a local path is recorded by its last component (no local paths in exports: docs/export.md)
    assert (recorded["resolved"], recorded["override"], recorded["same_as_run"]) == (moved.name, moved.name, True)
    assert recorded["run_resolved"] == tiny_bert.name

    other = save_tiny_backbone(tmp_path / "other-bert", seed=1)
    result = lrr("export", run_copy, fmt, "--backbone", other, "--out", tmp_path / "out2")
    assert result.code == 0, result.output
    trained = json.loads((run_copy / "report.json").read_text())["backbone"]
    assert _warnings(result) == [
        f"warning: the export is of a different backbone than the run trained on: {other} (fingerprint "
        f"{directory_fingerprint(other)['fingerprint'][:12]}) is not the backbone recorded in {run_copy}/report.json "
        f"({trained['location']}, fingerprint {trained['fingerprint'][:12]}); check that --backbone {other} is the "
        "model the run was trained on"]
    recorded = json.loads((tmp_path / "out2" / "lrr_export.json").read_text())["backbone"]
    assert (recorded["resolved"], recorded["same_as_run"]) == (other.name, False)
    assert "warning" not in recorded  # the sentence names local paths; same_as_run records the finding


def test_a_bundle_carries_the_backbone_fingerprint_a_later_merge_checks(run_copy, tmp_path, tiny_bert):
    from tests.conftest import save_tiny_backbone

    assert lrr("export", run_copy, "--adapter", "--out", tmp_path / "bundle").code == 0
    other = save_tiny_backbone(tmp_path / "other-bert", seed=1)
    result = lrr("export", tmp_path / "bundle", "--merge", "--backbone", other, "--out", tmp_path / "merged")
    assert result.code == 0, result.output
    [warning] = _warnings(result)
    assert f"is not the backbone recorded in {tmp_path}/bundle/adapter_config.json ({tiny_bert}, fingerprint " in warning


def zero_adapter(run: Path) -> None:
    edit_tensors(run / "adapter" / "adapter.safetensors",
                 lambda state: [v.zero_() for k, v in state.items() if k.endswith("lora_B")])


def nan_adapter(run: Path) -> None:
    def edit(state):
        state["bert.encoder.layer.0.attention.self.query.lrr_adapter.lora_B"][0, 0] = float("nan")
    edit_tensors(run / "adapter" / "adapter.safetensors", edit)


ADAPTERS = {
    "all-zero adapter": (
        zero_adapter, "{run}: every adapted module's update ΔW is exactly zero ({n} modules): the adapter leaves the "
                      "backbone's weights as they are, so the export would change nothing. Was the adapter trained "
                      "(learning rate, steps) and saved? nothing written"),
    "NaN adapter": (
        nan_adapter, "{run}: bert.encoder.layer.0.attention.self.query: the adapter's update ΔW holds NaN/Inf (a "
                     "corrupted or diverged adapter); nothing written"),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", ADAPTERS, ids=list(ADAPTERS))
def test_every_export_refuses_an_adapter_that_changes_nothing_or_is_not_finite(case, fmt, run_copy, tmp_path):
    breaker, message = ADAPTERS[case]
    breaker(run_copy)
    modules = len(json.loads(adapter_config(run_copy).read_text())["modules"])
    before = snapshot(tmp_path)
    result = lrr("export", run_copy, fmt, "--out", tmp_path / "out")
    assert_clean_error(result, message.format(run=run_copy, n=modules), code=1)
    assert snapshot(tmp_path) == before


def test_a_backbone_changed_in_place_is_warned_about(run_copy, tmp_path, tiny_bert):
    from lowrank_runner.train.fingerprint import directory_fingerprint

    edit_json(run_copy / "report.json", lambda r: r["backbone"].__setitem__("fingerprint", "0" * 64))
    result = lrr("export", run_copy, "--adapter", "--out", tmp_path / "out")
    assert result.code == 0, result.output
    assert _warnings(result) == [
        f"warning: the export is of a different backbone than the run trained on: {tiny_bert} (fingerprint "
        f"{directory_fingerprint(tiny_bert)['fingerprint'][:12]}) is not the backbone recorded in {run_copy}/report.json "
        f"({tiny_bert}, fingerprint 000000000000); its files changed after the run trained on it"]
