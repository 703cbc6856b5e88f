"""The cells of the results table: seeds combined per task (mean or median, ± std), the
average column, failed seeds marked, test metrics preferred, metric scales."""

import csv

import pytest

from lowrank_runner.tables import RESULTS_CSV, RESULTS_MD, RESULTS_TEX, build_table, markdown, table_spec, write_tables
from lowrank_runner.tables.build import Source, aggregate
from lowrank_runner.tables.formats import cells


def run(task, seed, value, status="completed", metric="accuracy", **extra):
    return {"task": task, "seed": seed, "status": status, "best": {"metric": metric, "value": value}, **extra}


RUNS = [run("cola", 0, 0.60, metric="matthews_correlation"), run("cola", 1, 0.64, metric="matthews_correlation"),
        run("cola", 2, 0.62, metric="matthews_correlation"),
        run("rte", 0, 0.80), run("rte", 1, 0.70), run("rte", 2, 0.90)]


def table(runs, tasks, output=None, name="lora2"):
    return build_table([Source(name, tasks, runs)], table_spec(output or {}))


def row_cells(t):
    return cells(t.rows[0], t, "markdown")[2:]  # without the method and # Params cells


def test_mean_and_std_per_task_and_the_average():
    t = table(RUNS, ["cola", "rte"])
    cola, rte = (cell[0] for cell in t.rows[0].cells)
    assert cola.centre == pytest.approx(62.0) and cola.spread == pytest.approx(2.0)  # sample std
    assert rte.centre == pytest.approx(80.0) and rte.spread == pytest.approx(10.0)
    assert t.rows[0].average == pytest.approx(71.0) and t.complete
    assert row_cells(t) == ["62.00±2.00", "80.00±10.00", "71.00"]
    assert t.headers == ["CoLA (Mcc)", "RTE (Acc)"]


def test_median_with_std_as_mtlora_reports_it_and_the_recipe_task_order():
    t = table(RUNS, ["rte", "cola"], {"aggregate": "median"})
    assert row_cells(t) == ["80.00±10.00", "62.00±2.00", "71.00"]
    assert aggregate([1.0, 2.0, 9.0], "median") == (2.0, pytest.approx(4.3589, abs=1e-4))


def test_spread_none_and_precision_as_condlora_prints_it():
    t = table(RUNS, ["cola", "rte"], {"table": {"spread": "none", "precision": 1}})
    assert row_cells(t) == ["62.0", "80.0", "71.0"]


def test_failed_runs_are_marked_and_the_rest_still_counts(tmp_path):
    runs = RUNS[:2] + [{"task": "cola", "seed": 2, "status": "crashed", "error": "boom"}] + [
        {"task": "rte", "seed": s, "status": "failed", "error": "x"} for s in range(3)]
    t = table(runs, ["cola", "rte"])
    assert row_cells(t) == ["62.00±2.83*", "–", "62.00*"] and not t.complete  # Avg. over CoLA only
    written = write_tables(tmp_path, t, "lora2")
    assert [p.name for p in written] == [RESULTS_MD, RESULTS_CSV, RESULTS_TEX]  # no sweep, no figure
    md = (tmp_path / RESULTS_MD).read_text()
    assert "| lora2 | – | 62.00±2.83* | – | 62.00* |" in md and "did not finish" in md
    rows = list(csv.DictReader((tmp_path / RESULTS_CSV).open()))
    assert rows[0]["seeds"] == "0 1" and rows[0]["missing_seeds"] == "2" and rows[1]["missing_seeds"] == "0 1 2"
    assert (rows[0]["n"], rows[0]["n_missing"], rows[1]["n"], rows[1]["n_missing"]) == ("2", "1", "0", "3")  # no "0" read as none
    assert rows[-1]["task"] == "Avg." and rows[-1]["value"] == "62.0"
    assert "$62.00 \\pm 2.83^*$ & -- & 62.00$^*$ \\\\" in (tmp_path / RESULTS_TEX).read_text()


def test_the_test_set_score_is_reported_when_the_run_has_one():
    """task.holdout_fraction / task.test_split: the selected checkpoint's test metrics."""
    runs = [run("rte", s, 0.9, test={"accuracy": 0.7 + s / 10, "loss": 0.5}) for s in range(2)]
    assert row_cells(table(runs, ["rte"])) == ["75.00±7.07", "75.00"]


def test_every_metric_of_the_selected_checkpoint_in_the_papers_cell_layout():
    evals = [{"accuracy": 0.9019, "accuracy_mm": 0.9038}, {"accuracy": 0.9021, "accuracy_mm": 0.9040}]
    runs = [{"task": "mnli", "seed": s, "status": "completed", "best": {"metric": "accuracy", "value": e["accuracy"],
                                                                        "eval": e}} for s, e in enumerate(evals)]
    t = table(runs, ["mnli"], {"table": {"columns": [{"task": "mnli", "metrics": ["accuracy", "accuracy_mm"]}],
                                         "spread": "none"}})
    assert t.headers == ["MNLI (Acc m/mm)"] and row_cells(t) == ["90.20/90.39", "90.20"]  # Avg.: the first metric


def test_raw_scale_metrics_stay_as_they_are_and_lower_is_better_for_ter():
    def nlg(seed, bleu, nist, ter):
        return run("e2e", seed, bleu, metric="bleu", test={"bleu": bleu, "nist": nist, "ter": ter})

    spec = {"table": {"columns": [{"task": "e2e", "metrics": ["bleu", "nist", "ter"]}], "average": "none",
                      "spread": "none"}}
    a = Source("lora", ["e2e"], [nlg(0, 0.704, 8.85, 0.40)])
    b = Source("mtlora", ["e2e"], [nlg(0, 0.700, 8.90, 0.38)])
    t = build_table([a, b], table_spec(spec))
    assert [cells(r, t, "markdown")[2:] for r in t.rows] == [["**70.40**/8.85/40.00"], ["70.00/**8.90**/**38.00**"]]
    assert "Avg." not in markdown(t)
