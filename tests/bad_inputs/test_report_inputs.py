"""Bad inputs to ``lrr report``: damaged or missing files of a run directory or of a
multi-run recipe's summary, runs that failed or stopped, and paths rich would read as
markup. One tiny run is trained per session; each case breaks a copy of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.bad_inputs.harness import assert_clean_error, lrr, snapshot


def edit_report(edit):
    def apply(run: Path) -> None:
        path = run / "report.json"
        data = json.loads(path.read_text())
        path.write_text(json.dumps(edit(data)))
    return apply


def interrupted(checkpoint: bool):
    """What ``lrr run`` leaves when SIGINT/SIGTERM stops a run (train/run_dirs.py
    mark_interrupted): no adapter or metrics yet, report.json with status interrupted."""
    def apply(run: Path) -> None:
        from lowrank_runner.recipe.load import load_recipe
        from lowrank_runner.train.run_dirs import mark_interrupted

        for name in ("report.json", "metrics.json"):
            (run / name).unlink()
        shutil.rmtree(run / "adapter")
        if checkpoint:
            (run / "checkpoints" / "step-000004").mkdir(parents=True)
        mark_interrupted(load_recipe(run / "recipe.yaml"), run, "lrr run tiny.yaml --output runs/tiny --resume")
    return apply


def still_training(run: Path) -> None:
    for name in ("report.json", "metrics.json"):
        (run / name).unlink()
    shutil.rmtree(run / "adapter")


def stopped(run: Path) -> None:
    (run / "report.json").unlink()
    (run / "checkpoints" / "step-000004").mkdir(parents=True)


FIX = "restore it from a copy, or train the run again (lrr run {run}/recipe.yaml --output NEW_DIR)"
# id: (break the run copy, extra arguments, expected error line (format: run=, fix=), exit code)
CASES = {
    "report.json mostly gone": (
        edit_report(lambda r: {"status": r["status"], "recipe": r["recipe"]}), (),
        "{run}/report.json: an incomplete run report: missing format, format_version, command, run, seeds, backbone, "
        "data, method, targets, modules, trainable_params, total_params, steps, best, final_eval, environment, files "
        "(17 fields); the file is damaged: {fix}", 1),
    "report.json mostly gone, --render": (
        edit_report(lambda r: {"status": r["status"]}), ("--render",),
        "{run}/report.json: an incomplete run report: missing format, format_version, recipe, command, run, seeds, "
        "backbone, data, method, targets, modules, trainable_params, total_params, steps, best, final_eval, "
        "environment, files (18 fields); the file is damaged: {fix}", 1),
    "report.json not JSON": (
        lambda run: (run / "report.json").write_text('{"status": "completed",\n'), (),
        "{run}/report.json:2:1: not valid JSON (Expecting property name enclosed in double quotes); the run report is "
        "damaged: {fix}", 1),
    "report.json nested too deeply": (
        lambda run: (run / "report.json").write_text("[" * 100_000 + "]" * 100_000), (),
        "{run}/report.json: not valid JSON (nested too deeply); the run report is damaged: {fix}", 1),
    "report.json not an object": (
        lambda run: (run / "report.json").write_text("[1, 2]"), (),
        "{run}/report.json: (top level): [1, 2] is not of type 'object'; the run report is damaged: {fix}", 1),
    "report.json with an unknown status": (
        edit_report(lambda r: {**r, "status": "done"}), (),
        "{run}/report.json: status: 'done' is not one of ['completed', 'failed', 'interrupted']; the run report is "
        "damaged: {fix}", 1),
    "report.json with a field of the wrong type": (
        edit_report(lambda r: {**r, "best": "0.9"}), (),
        "{run}/report.json: best: '0.9' is not of type 'object', 'null'; the run report is damaged: {fix}", 1),
    "report.json with a nested field of the wrong type": (
        edit_report(lambda r: {**r, "steps": {**r["steps"], "per_epoch": "six"}}), ("--render",),
        "{run}/report.json: steps.per_epoch: 'six' is not of type 'integer', 'null'; the run report is damaged: {fix}", 1),
    "metrics.json not an object": (
        lambda run: (run / "metrics.json").write_text('"best"'), (),
        "{run}/metrics.json: (top level): 'best' is not of type 'object'; the metrics file is damaged: {fix}", 1),
    "metrics.jsonl gone, --render": (
        lambda run: (run / "metrics.jsonl").unlink(), ("--render",),
        "{run}/metrics.jsonl: missing: --render redraws the plots from the run's training history, which is gone; "
        "restore the file from a copy (the report.md and plots the run wrote are untouched)", 1),
    "metrics.jsonl with a broken line, --render": (
        lambda run: (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "loss"\n'), ("--render",),
        "{run}/metrics.jsonl:2:19: not a JSON line (Expecting ':' delimiter); the file is damaged: restore it from a "
        "copy, or delete the line", 1),
    "metrics.jsonl with a line that is no step, --render": (
        lambda run: (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n[2, 0.6]\n'), ("--render",),
        "{run}/metrics.jsonl:2: not a logged step (a JSON object with an integer 'step'); the file is damaged: restore "
        "it from a copy, or delete the line", 1),
    "failed run": (
        lambda run: ((run / "report.json").write_text(json.dumps({"status": "failed", "error": "ValueError: bad data"})),
                     (run / "error.txt").write_text("Traceback ...\nValueError: bad data")), (),
        "{run}: the run failed: ValueError: bad data; the traceback is in {run}/error.txt; fix the cause and train it "
        "again", 1),
    "stopped run": (
        stopped, (),
        "{run}: the run has not finished: it stopped at step 4 (checkpoints/step-000004) and can be resumed; it has no "
        "report.json until it completes. Continue it with: lrr run RECIPE --output RUN_DIR --resume", 1),
    "interrupted run": (
        interrupted(checkpoint=True), (),
        "{run}: the run was interrupted (SIGINT/SIGTERM) before it finished; it resumes from its checkpoint at step 4, "
        "from the directory it was started in, with: lrr run tiny.yaml --output runs/tiny --resume", 1),
    "interrupted run before its first checkpoint": (
        interrupted(checkpoint=False), (),
        "{run}: the run was interrupted (SIGINT/SIGTERM) before it finished; it resumes from the start (no checkpoint "
        "yet), from the directory it was started in, with: lrr run tiny.yaml --output runs/tiny --resume", 1),
    "interrupted run without its reason": (
        lambda run: (run / "report.json").write_text('{"status": "interrupted"}'), (),
        "{run}: the run was interrupted (SIGINT/SIGTERM) before it finished; it can be resumed: lrr run RECIPE "
        "--output RUN_DIR --resume", 1),
    "report.json deleted from a completed run": (
        lambda run: (run / "report.json").unlink(), (),
        "{run}/report.json: missing from a run that completed (its metrics.json and adapter/ are there): the report "
        "is written once, when the run ends, and cannot be rebuilt from the other files; {fix}. The adapter can "
        "still be exported: lrr export RUN_DIR --merge --out DIR", 1),
    "run still training": (
        still_training, (),
        "{run}: the run has not finished: it is still training, or was interrupted before its first checkpoint; it has "
        "no report.json until it completes. Continue it with: lrr run RECIPE --output RUN_DIR --resume", 1),
    "not a run": (
        lambda run: [p.unlink() for p in run.iterdir() if p.is_file()], (),
        "{run}: not a run directory: no report.json (written by 'lrr run' when a run ends) and no summary.json "
        "(written by a recipe with several runs)", 2),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_report_input(case, run_copy, tmp_path):
    breaker, extra, message, code = CASES[case]
    breaker(run_copy)
    before = snapshot(tmp_path)
    result = lrr("report", run_copy, *extra)
    assert_clean_error(result, message.format(run=run_copy, fix=FIX.format(run=run_copy)), code=code)
    assert snapshot(tmp_path) == before  # --render redrew nothing


def test_a_file_or_nothing_instead_of_a_run(run_copy):
    assert_clean_error(lrr("report", run_copy / "recipe.yaml"),
                       f"{run_copy}/recipe.yaml: not a directory (give a run directory written by 'lrr run')", code=2)
    assert_clean_error(lrr("report", run_copy / "typo"), f"{run_copy}/typo: no such run directory", code=2)


def test_a_run_without_its_history_says_so(run_copy):
    (run_copy / "metrics.jsonl").unlink()
    result = lrr("report", run_copy)
    assert result.code == 0, result.output
    assert "Run report: tiny" in result.stdout
    assert (f"warning: {run_copy}/metrics.jsonl: missing: the run's training history is gone (the report keeps its "
            "per-epoch rows; --render cannot redraw the plots)") in result.error_lines()


@pytest.fixture
def multi(run_copy, tmp_path) -> Path:
    """A multi-run directory: summary.json and one run beside it."""
    root = tmp_path / "multi"
    root.mkdir()
    shutil.move(run_copy, root / "classification-seed0")
    (root / "summary.json").write_text(json.dumps({"recipe": "tiny", "runs": [
        {"task": "classification", "seed": 0, "dir": str(root / "classification-seed0"), "status": "completed"}]}))
    return root


SUMMARY_FIX = "restore it from a copy, or give the run directories themselves"
SUMMARIES = {
    "not JSON": ("{runs: []}", "{root}/summary.json:1:2: not valid JSON (Expecting property name enclosed in double "
                               f"quotes); the recipe summary is damaged: {SUMMARY_FIX}"),
    "no runs": ('{"recipe": "tiny"}', "{root}/summary.json: an incomplete recipe summary: missing runs (1 field); the "
                                      f"file is damaged: {SUMMARY_FIX}"),
    "a run without its directory": ('{"runs": [{"status": "completed"}]}',
                                    "{root}/summary.json: runs.0: 'dir' is a required property; the recipe summary is "
                                    f"damaged: {SUMMARY_FIX}"),
    "a run that is not an object": ('{"runs": [3]}', "{root}/summary.json: runs.0: 3 is not of type 'object'; the "
                                                     f"recipe summary is damaged: {SUMMARY_FIX}"),
    "an empty list of runs": ('{"runs": []}', f"{{root}}/summary.json: lists no runs; {SUMMARY_FIX}"),
    "a completed run that is gone": (
        '{"runs": [{"dir": "classification-seed1", "status": "completed"}]}',
        "{root}/classification-seed1: {root}/summary.json lists this run as completed, but its report.json is gone "
        "(deleted or moved?); restore the run directory, or compare the others by naming their directories"),
}


@pytest.mark.parametrize("case", SUMMARIES, ids=list(SUMMARIES))
def test_bad_summary(case, multi):
    text, message = SUMMARIES[case]
    (multi / "summary.json").write_text(text)
    assert_clean_error(lrr("report", multi), message.format(root=multi), code=1)
    assert_clean_error(lrr("report", multi, "--render"), message.format(root=multi), code=1)


def test_a_comparison_names_the_broken_run(tiny_run, run_copy):
    (run_copy / "report.json").write_text('{"status": "completed"')
    result = lrr("report", tiny_run, run_copy)
    assert_clean_error(result, f"{run_copy}/report.json:1:23: not valid JSON (Expecting ',' delimiter); the run report "
                               f"is damaged: {FIX.format(run=run_copy)}", code=1)


def test_a_comparison_marks_a_failed_run(multi):
    (multi / "summary.json").write_text(json.dumps({"runs": [
        {"dir": "classification-seed0", "status": "completed"},
        {"dir": "classification-seed1", "status": "failed", "error": "DataError: no rows", "task": "classification",
         "seed": 1}]}))
    result = lrr("report", multi, env={"COLUMNS": "400"})
    assert result.code == 0, result.output
    assert f"{multi}/classification-seed1: failed — DataError: no rows" in result.stdout


def test_brackets_in_paths_are_shown_not_read_as_markup(run_copy, tmp_path):
    odd = Path(shutil.copytree(run_copy, tmp_path / "lr[1e-3]" / "[bold]run"))
    result = lrr("report", odd, env={"COLUMNS": "400"})
    assert result.code == 0, result.output
    assert f"`{odd / 'loss_curve.png'}`" in result.stdout  # the plot's path as it is, brackets and all
    result = lrr("report", odd, run_copy, env={"COLUMNS": "400"})
    assert result.code == 0, result.output
    assert str(odd) in result.stdout
