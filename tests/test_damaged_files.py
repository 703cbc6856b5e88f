"""Every file lrr reads back from a run directory, a recipe's or a search's root, or an
export, damaged (empty, cut short, binary garbage, valid JSON of the wrong shape, a
directory in its place) and read by the command that reads it: one ``error:`` line naming
the file, what is wrong and how to repair it; never a traceback, an internal error, or a
run trained over. The runs train once (module-scoped); each case damages a copy."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.rundir.status import mark_interrupted
from tests.conftest import tiny_recipe_text

SETTINGS = ["--set", "training.epochs=1", "--set", "training.checkpoint_every=2", "--set", "training.checkpoints_kept=2"]
GARBAGE = bytes((i * 37 + 11) % 256 for i in range(700))  # not UTF-8 from byte 4 on


def lrr(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_bert, sentiment_data) -> Path:
    """done: a completed run; stopped: stopped at step 4 with checkpoints at steps 2 and 4;
    interrupted: the same marked interrupted (report.json); multi: two seeds under one
    root (summary.json); bundle, merged: exports of done."""
    root = tmp_path_factory.mktemp("made")
    recipe = root / "recipe.yaml"
    recipe.write_text(tiny_recipe_text(tiny_bert, sentiment_data))
    for name, extra in (("done", []), ("stopped", ["--stop-after-step", 4]),
                        ("multi", ["--set", "training.seed=[0, 1]"])):
        result = lrr("run", recipe, "--output", root / name, *SETTINGS, *extra)
        assert result.exit_code == 0, result.output
    shutil.copytree(root / "stopped", root / "interrupted")
    mark_interrupted(root / "interrupted", f"lrr run {recipe} --output {root / 'interrupted'} --resume")
    for name, kind in (("bundle", "--adapter"), ("merged", "--merge")):
        result = lrr("export", root / "done", kind, "--out", root / name)
        assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def search_made(made, tiny_bert, sentiment_data) -> Path:
    """search-stopped: a search stopped in its first trial."""
    pytest.importorskip("optuna")
    train, validation = sentiment_data
    recipe = made / "search.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: tiny-search
        backbone: {{name: {tiny_bert}}}
        targets: [Wq, Wv]
        method: {{name: lora, r: 4, alpha: 8}}
        task:
          name: classification
          data: {{train: {train}, validation: {validation}}}
          labels: [negative, positive]
          max_length: 16
        training: {{learning_rate: 1e-2, epochs: 1, batch_size: 16, seed: 0, log_every: 2, checkpoint_every: 2}}
        search:
          n_trials: 2
          space:
            training.learning_rate: {{log_uniform: [5.0e-2, 3.0e-1]}}
        """))
    result = lrr("run", recipe, "--output", made / "search-stopped", "--stop-after-step", 2)
    assert result.exit_code == 0, result.output
    return made


def damage(path: Path, attack: str) -> None:
    if attack == "dir":
        path.unlink()
        path.mkdir()
        return
    data = path.read_bytes()
    path.write_bytes({
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "cut": data[: data.find(b"\ntraining:") + 1],  # recipe.yaml ending at a line: valid YAML, sections gone
        "garbage": GARBAGE,
        "list": b"[]\n",  # valid JSON, or YAML, of the wrong shape
        "keys": b'{"unrelated": 1}\n',  # an object without the keys lrr wrote
        "types": json.dumps({k: 5 for k in json.loads(data)}).encode() if path.suffix == ".json" else b"",
    }[attack])


COMMANDS = {
    "resume": lambda made, d: ["run", made / "recipe.yaml", "--output", d, "--resume"],  # --set: the recorded ones
    "search-resume": lambda made, d: ["run", made / "search.yaml", "--output", d, "--resume"],
    "report": lambda made, d: ["report", d],
    "render": lambda made, d: ["report", d, "--render"],
    "table": lambda made, d: ["report", "--table", d],
    "merge": lambda made, d: ["export", d, "--merge", "--out", d.parent / "out"],
    "peft": lambda made, d: ["export", d, "--peft", "--out", d.parent / "out"],
    "push": lambda made, d: ["push", d, "me/tiny"],
}

# (source, damaged file, attack, command, what the error line says: {path} the damaged
# file, {dir} the damaged copy of the source). All but the last block failed before
# (a traceback, an internal error, a run trained over, a misleading or fix-less message).
CASES = [
    ("done", "report.json", "keys", "resume",  # was: trained the completed run over
     ["error: {path}: not a run report with a status (completed, failed, interrupted); the file is damaged: restore it "
      "from a copy, or start a new run in a new directory (the run is not resumed: a completed run is never trained "
      "over)"]),
    ("done", "report.json", "garbage", "resume",
     ["error: {path}: not UTF-8 text (binary data at byte 4); the run report is damaged: restore it from a copy"]),
    ("done", "report.json", "garbage", "report",
     ["error: {path}: not UTF-8 text (binary data at byte 4); the run report is damaged: restore it from a copy, or "
      "train the run again (lrr run {dir}/recipe.yaml --output NEW_DIR)"]),
    ("done", "report.json", "dir", "table", ["error: {path}: a directory, not the run report; restore it from a copy"]),
    ("done", "metrics.json", "dir", "report", ["error: {path}: a directory, not the metrics file; restore it from a copy"]),
    ("done", "metrics.json", "list", "resume",
     ["error: {path}: no best checkpoint recorded ('best'), yet report.json says the run completed; the metrics file "
      "is damaged: restore it from a copy"]),
    ("done", "recipe.yaml", "cut", "merge",  # was: KeyError (internal error)
     ["error: {path}: training (and 1 more) missing, which every run's resolved recipe has (defaults filled), and the file is not the "
      "config its header's hash names: it was truncated or edited; restore it from a copy, or train the run again"]),
    ("done", "recipe.yaml", "garbage", "resume",
     ["error: {path}: no run header, not the resolved recipe 'lrr run' writes", "the file is damaged: restore it from "
      "a copy, or start the run again in a new directory"]),
    ("stopped", "recipe.yaml", "dir", "resume", ["error: {path}: a directory, not the resolved recipe 'lrr run' writes"]),
    ("interrupted", "report.json", "dir", "resume",  # was: IsADirectoryError after training (internal error)
     ["error: {path}: a directory, not the run report; delete it to resume from its checkpoint at step 4, or restore "
      "it from a copy"]),
    ("interrupted", "report.json", "empty", "resume",
     ["error: {path}: empty; the run report is damaged: delete it to resume from its checkpoint at step 4"]),
    ("done", ".lrr-owner.json", "dir", "resume",  # was: internal error
     ["error: Is a directory ({path}): a directory stands where lrr keeps one of its files: move it away"]),
    ("multi", "summary.json", "dir", "resume", ["error: Is a directory ({path}): a directory stands where lrr keeps"]),
    ("multi", "summary.json", "dir", "table", ["error: {path}: a directory, not the recipe summary; restore it"]),
    ("multi", "classification-seed0/report.json", "dir", "report",  # was: the moved root's original run read (a bug)
     ["error: {dir}/classification-seed0: {dir}/summary.json lists this run as completed, but its report.json is gone"]),
    ("bundle", "adapter_config.json", "dir", "merge",  # was: "not a run or an adapter bundle"
     ["error: {path}: a directory, not the adapter config; restore it from a copy, or export the bundle again from "
      "its run (lrr export RUN_DIR --adapter --out DIR)"]),
    ("bundle", "tokenizer.json", "keys", "merge",
     ["; the tokenizer saved in the adapter bundle {dir} cannot be loaded: restore it from a copy, or export the "
      "bundle again"]),
    ("merged", "lrr_export.json", "truncated", "push",  # was: uploaded as it was
     ["error: {path}:", "not valid JSON", "the export's metadata is damaged: restore it from a copy, or export again "
      "from the run (lrr export RUN_DIR --merge|--adapter|--peft --out NEW_DIR)"]),
    ("merged", "lrr_export.json", "list", "push",
     ["error: {path}: not the metadata 'lrr export' writes (an object with the export's 'format')"]),
    ("merged", "README.md", "garbage", "push",
     ["error: {path}: not UTF-8 text (binary data at byte 4); the model card is damaged: restore it from a copy"]),
    ("search-stopped", "search.json", "garbage", "search-resume",  # was: "started by a different recipe"
     ["error: {path}: not UTF-8 text (binary data at byte 4); the search record is damaged: restore it from a copy, "
      "or start the search again in a new directory"]),
    ("search-stopped", "search.json", "list", "search-resume",
     ["error: {path}: not the search record lrr writes (its recipe 'hash', 'source' and 'overrides')"]),
    # handled before, kept so
    ("stopped", "checkpoints/step-000004/state.json", "truncated", "resume",
     ["error: {path}: not a complete checkpoint state (truncated or edited); this checkpoint cannot be resumed; the "
      "older checkpoint {dir}/checkpoints/step-000002 looks complete: remove {dir}/checkpoints/step-000004 to resume "
      "from it"]),
    ("stopped", "checkpoints/step-000004/trainable.safetensors", "garbage", "resume",
     ["error: {path}: damaged (its size or SHA-256 differs from {dir}/checkpoints/step-000004/state.json)"]),
    ("stopped", "metrics.jsonl", "garbage", "resume", ["error: {path}: cannot read (", "restore the file from a copy"]),
    ("done", "adapter/adapter.safetensors", "truncated", "merge",
     ["error: {path}: not a readable safetensors file (truncated or corrupted); restore it from a copy"]),
    ("done", "adapter/adapter_config.json", "list", "peft",
     ["error: {path}: (top level): [] is not of type 'object'; the file is damaged: restore it from a copy"]),
    ("done", "metrics.jsonl", "truncated", "render", ["error: {path}:", "not a JSON line", "restore it from a copy"]),
    ("multi", "summary.json", "truncated", "report",
     ["error: {path}:", "not valid JSON", "the recipe summary is damaged: restore it from a copy"]),
]


@pytest.mark.parametrize("source, name, attack, command, expected", CASES,
                         ids=[f"{c[0]}/{c[1]}-{c[2]}-{c[3]}" for c in CASES])
def test_a_damaged_file_is_named_with_the_fix(made, request, tmp_path, monkeypatch, source, name, attack, command,
                                              expected):
    if source.startswith("search"):
        request.getfixturevalue("search_made")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # lrr push: never the network
    copy = tmp_path / source
    shutil.copytree(made / source, copy, symlinks=True)
    path = copy / name
    if not path.exists():  # a file that exists while its owner runs (.lrr-owner.json)
        path.write_text("{}")
    damage(path, attack)
    result = lrr(*COMMANDS[command](made, copy))
    assert result.exit_code not in (0, 70), result.output
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    line = next((ln for ln in result.output.splitlines() if ln.startswith("error: ")), "")
    for text in expected:
        assert text.format(path=path, dir=copy) in line, result.output


def test_a_bundle_whose_export_metadata_is_damaged_still_merges(made, tmp_path):
    """lrr_export.json of a bundle only adds provenance to the merge's model card (it was
    an internal error when its source_run was not a string)."""
    copy = tmp_path / "bundle"
    shutil.copytree(made / "bundle", copy)
    damage(copy / "lrr_export.json", "types")
    result = lrr("export", copy, "--merge", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_resume_rewrites_a_damaged_recipe_yaml_below_its_header(made, tmp_path):
    """recipe.yaml cut short below its header (which --resume reads) is written again when
    the run resumes, so the export of the finished run rebuilds the model from it."""
    copy = tmp_path / "stopped"
    shutil.copytree(made / "stopped", copy)
    whole = (copy / "recipe.yaml").read_bytes()
    damage(copy / "recipe.yaml", "truncated")
    result = lrr(*COMMANDS["resume"](made, copy))
    assert result.exit_code == 0, result.output
    assert (copy / "recipe.yaml").read_bytes() == whole
    assert lrr(*COMMANDS["merge"](made, copy)).exit_code == 0
