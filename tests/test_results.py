"""The papers' results table: tasks as columns, seeds combined, Avg."""

import csv

import pytest

from lowrank_runner.results import results_table, row, write_results


def run(task, seed, value, status="completed", metric="accuracy"):
    return {"task": task, "seed": seed, "status": status, "best": {"metric": metric, "value": value}}


RUNS = [run("cola", 0, 0.60, metric="matthews_correlation"), run("cola", 1, 0.64, metric="matthews_correlation"),
        run("cola", 2, 0.62, metric="matthews_correlation"),
        run("rte", 0, 0.80), run("rte", 1, 0.70), run("rte", 2, 0.90)]


def test_mean_and_std_per_task_and_the_average():
    table = results_table(RUNS, ["cola", "rte"], "mean")
    cola, rte = table["columns"]
    assert cola["value"] == pytest.approx(62.0) and cola["spread"] == pytest.approx(2.0)  # sample std
    assert rte["value"] == pytest.approx(80.0) and rte["spread"] == pytest.approx(10.0)
    assert table["average"] == pytest.approx(71.0) and table["complete"]
    assert row(table) == ["62.00±2.00", "80.00±10.00", "71.00"]


def test_median_as_mtlora_reports_it():
    table = results_table(RUNS, ["rte", "cola"], "median")  # the recipe's task order is kept
    assert row(table) == ["80.00", "62.00", "71.00"]


def test_failed_runs_are_marked_and_the_rest_still_counts(tmp_path):
    runs = RUNS[:2] + [{"task": "cola", "seed": 2, "status": "crashed", "error": "boom"}] + [
        {"task": "rte", "seed": s, "status": "failed", "error": "x"} for s in range(3)]
    table = results_table(runs, ["cola", "rte"], "mean")
    assert row(table) == ["62.00±2.83*", "–", "62.00"] and not table["complete"]
    write_results(tmp_path, "lora2", table)
    md = (tmp_path / "results.md").read_text()
    assert "| lora2 | 62.00±2.83* | – | 62.00 |" in md and "did not finish" in md
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert rows[0]["seeds"] == "0 1" and rows[0]["missing_seeds"] == "2" and rows[-1]["task"] == "Avg."
