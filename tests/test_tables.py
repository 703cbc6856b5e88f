"""Results tables in the papers' layout (Markdown, CSV, LaTeX booktabs), the sweep
figure, `output.table` in recipes, and `lrr report --table` over recipes' output
directories (real runs of the tiny BERT)."""

import json
import shutil
import textwrap

import pytest
from PIL import Image
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.recipe.compose import load_document
from lowrank_runner.recipe.load import check_recipe_file
from lowrank_runner.tables import build_table, csv_text, latex, markdown, sweep_figure, table_spec
from lowrank_runner.tables.figure import MIN_Y_SPAN, figure_how, figure_lines, sweep_axis, y_range
from lowrank_runner.tables.build import Source
from lowrank_runner.tables.formats import format_params
from lowrank_runner.recipe.output_checks import table_problems
from tests.conftest import tiny_recipe_text

cli = CliRunner()


def lrr(*args):
    result = cli.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def entry(tmp_path, task, seed, evals, metric, params=None, label="", point=None):
    """A summary entry of a completed run; with ``params`` its run directory holds a
    report.json with that adapter_params."""
    run_dir = tmp_path / f"{label or 'run'}-{task}-{seed}"
    if params is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "report.json").write_text(json.dumps({"adapter_params": params}))
    return {"task": task, "seed": seed, "status": "completed", "dir": str(run_dir), "label": label,
            "point": point or {}, "best": {"metric": metric, "value": evals[metric], "eval": evals}}


# LoRA2 Table 1 (DeBERTaV3-base): one "seed" per method, the paper's numbers.
LORA2_K1 = {"cola": {"matthews_correlation": 0.7063}, "sst2": {"accuracy": 0.9564}, "mrpc": {"accuracy": 0.9093},
            "qqp": {"accuracy": 0.9162, "f1": 0.8805}, "stsb": {"pearson": 0.9169},
            "mnli": {"accuracy": 0.9019, "accuracy_mm": 0.9038}, "qnli": {"accuracy": 0.9392},
            "rte": {"accuracy": 0.8953}}
LORA_R1 = {"cola": {"matthews_correlation": 0.6860}, "sst2": {"accuracy": 0.9495}, "mrpc": {"accuracy": 0.8824},
           "qqp": {"accuracy": 0.9120, "f1": 0.8837}, "stsb": {"pearson": 0.9141},
           "mnli": {"accuracy": 0.9009, "accuracy_mm": 0.9028}, "qnli": {"accuracy": 0.9335},
           "rte": {"accuracy": 0.8129}}
LORA2_LAYOUT = {"table": {"columns": ["cola", "sst2", "mrpc", {"task": "qqp", "metrics": ["accuracy", "f1"]}, "stsb",
                                      {"task": "mnli", "metrics": ["accuracy", "accuracy_mm"]}, "qnli", "rte"],
                          "average": "mean", "spread": "none"}}


def paper_source(tmp_path, name, numbers, params):
    entries = [entry(tmp_path / name, task, 0, evals, next(iter(evals)), params) for task, evals in numbers.items()]
    return Source(name, list(numbers), entries)


def test_lora2_table_1_average_takes_the_mean_of_each_tasks_metrics(tmp_path):
    """LoRA2 averages MNLI m/mm and QQP Acc/F1 first: its 89.06 and 87.23 come out."""
    t = build_table([paper_source(tmp_path, "LoRA2 (k=1)", LORA2_K1, 167_552),
                     paper_source(tmp_path, "LoRA (r=1)", LORA_R1, 166_656)], table_spec(LORA2_LAYOUT))
    assert [round(r.average, 2) for r in t.rows] == [89.06, 87.23]
    lines = markdown(t).splitlines()
    assert lines[0] == ("| Method | # Params | CoLA (Mcc) | SST-2 (Acc) | MRPC (Acc) | QQP (Acc/F1) | STS-B (Pearson) | "
                        "MNLI (Acc m/mm) | QNLI (Acc) | RTE (Acc) | Avg. |")
    assert lines[2] == ("| LoRA2 (k=1) | 0.17M | **70.63** | **95.64** | **90.93** | **91.62**/88.05 | **91.69** | "
                        "**90.19**/**90.38** | **93.92** | **89.53** | **89.06** |")
    assert lines[3] == ("| LoRA (r=1) | 0.17M | 68.60 | 94.95 | 88.24 | 91.20/**88.37** | 91.41 | 90.09/90.28 | 93.35 | "
                        "81.29 | 87.23 |")
    assert lines[5] == ("Metrics ×100 (NIST, MSE, perplexity as they are), n = 1: one seed per value, no spread "
                        "(seeds cola: [0]; sst2: [0]; mrpc: [0]; qqp: [0]; stsb: [0]; mnli: [0]; qnli: [0]; rte: [0]).")
    assert lines[6] == "Avg.: the mean over the columns of each column's mean over its metrics."


# TriAdaptLoRA Table I (DeBERTaV3-base), the rows lrr runs (recipes named beside them), one
# "seed" each: the paper's means. MNLI is matched accuracy, CoLA Matthews, STS-B Pearson.
TABLE_I_ORDER = ["mnli", "sst2", "cola", "qqp", "qnli", "rte", "mrpc", "stsb"]
TABLE_I = {  # row: (recipe, numbers, Avg. as printed)
    "LoRA": ("lora_deberta_glue.yaml", [89.61, 93.54, 65.64, 92.19, 92.55, 82.07, 88.64, 91.54], 86.97),
    "AdaLoRA": ("adalora_deberta_glue.yaml", [90.66, 95.75, 70.21, 92.23, 94.51, 86.88, 90.03, 91.69], 88.99),
    "IncreLoRA": ("increlora_deberta_glue.yaml", [90.62, 95.72, 70.2, 91.91, 94.36, 86.88, 90.11, 91.38], 88.9),
    "TriAdaptLoRA (Fixed-k)": ("triadaptlora_deberta_glue_fixed_k.yaml",
                               [90.5, 95.45, 71.87, 91.87, 94.43, 87.36, 89.46, 91.65], 89.07),
    "TriAdaptLoRA (Linear)": ("triadaptlora_deberta_glue.yaml",
                              [90.63, 95.3, 71.6, 92.09, 94.37, 87.84, 90.77, 91.68], 89.28),
    "TriAdaptLoRA (Non-Linear)": ("triadaptlora_deberta_glue_nonlinear.yaml",
                                  [90.64, 95.68, 71.6, 91.88, 94.25, 86.76, 90.2, 91.79], 89.1),
}
TABLE_I_METRIC = {"cola": "matthews_correlation", "stsb": "pearson"}


def test_triadaptlora_table_i_from_the_runnable_recipes_layouts(tmp_path):
    """Every runnable row of TriAdaptLoRA's Table I has a recipe whose output.table asks for
    Table I's columns; with the paper's numbers as runs, lrr's table gives the printed Avg."""
    from tests.test_inspect import REPO

    specs = set()
    sources = []
    for row, (recipe, numbers, _) in TABLE_I.items():
        output = load_document(REPO / "recipes" / recipe).data["output"]
        assert output["table"]["columns"] == TABLE_I_ORDER, recipe
        specs.add(json.dumps(output["table"], sort_keys=True))
        entries = [entry(tmp_path / row, task, 0, {TABLE_I_METRIC.get(task, "accuracy"): v / 100},
                         TABLE_I_METRIC.get(task, "accuracy")) for task, v in zip(TABLE_I_ORDER, numbers)]
        sources.append(Source(row, TABLE_I_ORDER, entries))
    assert len(specs) == 1  # one layout: the runs of all six recipes go in one lrr report --table
    t = build_table(sources, table_spec({"table": json.loads(specs.pop()), "aggregate": "mean"}))
    assert [r.method for r in t.rows] == list(TABLE_I)
    for r, (_, numbers, avg) in zip(t.rows, TABLE_I.values()):
        assert r.average == pytest.approx(sum(numbers) / 8) and abs(r.average - avg) <= 0.005 + 1e-9
    header = markdown(t).splitlines()[0]
    assert header.startswith("| Method | # Params | MNLI (Acc) | SST-2 (Acc) | CoLA (Mcc) | QQP (Acc) |")
    assert "**71.87**" in markdown(t)  # Fixed-k's CoLA, the column's best, as Table I bolds it


# TriAdaptLoRA Table I's HAdapter row (quoted from AdaLoRA Table 1): its printed Avg. 88.12 is
# not the mean of its eight printed numbers (88.28); lrr's table gives the mean.
HADAPTER_TABLE_I = [90.13, 95.53, 68.64, 91.91, 94.11, 84.48, 89.95, 91.48]


def test_triadaptlora_table_i_hadapter_row_from_its_recipe_in_the_same_layout(tmp_path):
    from tests.test_inspect import REPO

    rows = {**TABLE_I, "HAdapter": ("houlsby_deberta_glue.yaml", HADAPTER_TABLE_I, 88.12)}
    specs, sources = set(), []
    for row, (recipe, numbers, _) in rows.items():
        output = load_document(REPO / "recipes" / recipe).data["output"]
        specs.add(json.dumps(output["table"], sort_keys=True))
        entries = [entry(tmp_path / row, task, 0, {TABLE_I_METRIC.get(task, "accuracy"): v / 100},
                         TABLE_I_METRIC.get(task, "accuracy")) for task, v in zip(TABLE_I_ORDER, numbers)]
        sources.append(Source(row, TABLE_I_ORDER, entries))
    assert len(specs) == 1  # the HAdapter runs join the six recipes' lrr report --table
    t = build_table(sources, table_spec({"table": json.loads(specs.pop()), "aggregate": "mean"}))
    hadapter = t.rows[-1]
    assert hadapter.method == "HAdapter" and round(hadapter.average, 2) == 88.28  # the paper prints 88.12
    line = markdown(t).splitlines()[2 + len(TABLE_I)]
    assert line.startswith("| HAdapter | – | 90.13 | 95.53 | 68.64 | 91.91 | 94.11 | 84.48 | 89.95 | 91.48 | 88.28")


# TriAdaptLoRA Table IV (SQuAD 2.0): the HAdapter row beside TriAdaptLoRA (Linear) and IncreLoRA.
TABLE_IV = {"HAdapter": ("houlsby_deberta_squad2.yaml", 85.4, 88.3),
            "IncreLoRA": ("increlora_deberta_squad2.yaml", 85.56, 88.66),
            "TriAdaptLoRA (Linear)": ("triadaptlora_deberta_squad2.yaml", 85.82, 88.9)}


def test_triadaptlora_table_iv_hadapter_row_from_its_recipe(tmp_path):
    from tests.test_inspect import REPO

    specs, sources = set(), []
    for row, (recipe, em, f1) in TABLE_IV.items():
        specs.add(json.dumps(load_document(REPO / "recipes" / recipe).data["output"]["table"], sort_keys=True))
        sources.append(Source(row, ["squad_v2"], [entry(tmp_path / row, "squad_v2", 0,
                                                        {"exact": em / 100, "f1": f1 / 100}, "f1")]))
    assert len(specs) == 1
    t = build_table(sources, table_spec({"table": json.loads(specs.pop())}))
    lines = markdown(t).splitlines()
    assert lines[0] == "| Method | # Params | SQuAD 2.0 (EM) | SQuAD 2.0 (F1) |"
    assert lines[2] == "| HAdapter | – | 85.40 | 88.30 |"


# MTLoRA Table 1 (RoBERTa-base): the Adapter row (LoRA Table 2's AdptD 0.9M) and the LoRA row of the
# runnable recipes, the paper's medians as one "seed" each; the printed Avg. to one decimal.
MTLORA_TABLE_1 = {
    "Adapter": ("pfeiffer_roberta_glue.yaml", [87.3, 94.7, 62.6, 90.6, 93.0, 75.9, 88.4, 90.3], 85.4),
    "LoRA": ("lora_roberta_glue.yaml", [87.37, 94.38, 61.57, 90.37, 92.6, 84.12, 88.24, 91.27], 86.24),
    "MTLORA-SHIM": ("mtlora_roberta_glue.yaml", [87.49, 94.5, 62.86, 91.24, 92.6, 87.73, 89.71, 91.37], 87.18),
}


def test_mtlora_table_1_adapter_row_from_its_recipe_in_the_same_layout(tmp_path):
    from tests.test_inspect import REPO

    specs, sources = set(), []
    for row, (recipe, numbers, _) in MTLORA_TABLE_1.items():
        output = load_document(REPO / "recipes" / recipe).data["output"]
        assert output["table"]["columns"] == TABLE_I_ORDER and output["aggregate"] == "median", recipe
        specs.add(json.dumps(output["table"], sort_keys=True))
        entries = [entry(tmp_path / row, task, 0, {TABLE_I_METRIC.get(task, "accuracy"): v / 100},
                         TABLE_I_METRIC.get(task, "accuracy")) for task, v in zip(TABLE_I_ORDER, numbers)]
        sources.append(Source(row, TABLE_I_ORDER, entries))
    assert len(specs) == 1
    t = build_table(sources, table_spec({"table": json.loads(specs.pop()), "aggregate": "median"}))
    assert [r.method for r in t.rows] == list(MTLORA_TABLE_1)
    for r, (_, numbers, avg) in zip(t.rows, MTLORA_TABLE_1.values()):
        assert abs(r.average - avg) <= 0.05 + 1e-9
    assert markdown(t).splitlines()[2] == ("| Adapter | – | 87.30 | **94.70** | 62.60 | 90.60 | **93.00** | 75.90 | 88.40 | "
                                           "90.30 | 85.35 |")  # Table 1 prints Avg. 85.4


# MTLoRA Table 2 (GPT-2 Medium, BLEU): the Adapter and Prefix rows (Li & Liang's ADAPTER and
# PREFIX 0.1%) beside LoRA.
MTLORA_TABLE_2 = {"Adapter": ("pfeiffer_gpt2_nlg.yaml", {"e2e": 66.3, "dart": 42.4, "webnlg": 50.2}),
                  "Prefix": ("prefix_gpt2_nlg.yaml", {"e2e": 69.7, "dart": 46.4, "webnlg": 55.1}),
                  "LoRA": ("lora_gpt2_nlg.yaml", {"e2e": 70.4, "dart": 47.1, "webnlg": 55.3})}


def test_mtlora_table_2_adapter_and_prefix_rows_from_their_recipes_in_the_same_layout(tmp_path):
    from tests.test_inspect import REPO

    specs, sources = set(), []
    for row, (recipe, numbers) in MTLORA_TABLE_2.items():
        data = load_document(REPO / "recipes" / recipe).data
        assert list(data["tasks"]) == ["e2e", "dart", "webnlg"], recipe  # Table 2's column order
        specs.add(json.dumps(data["output"]["table"], sort_keys=True))
        sources.append(Source(row, list(numbers), [entry(tmp_path / row, task, 0, {"bleu": v / 100}, "bleu")
                                                   for task, v in numbers.items()]))
    assert len(specs) == 1
    t = build_table(sources, table_spec({"table": json.loads(specs.pop()), "aggregate": "mean"}))
    lines = markdown(t).splitlines()
    assert lines[0] == "| Method | # Params | E2E (BLEU) | DART (BLEU) | WebNLG (BLEU) |"
    assert lines[2] == "| Adapter | – | 66.30 | 42.40 | 50.20 |"
    assert lines[3] == "| Prefix | – | 69.70 | 46.40 | 55.10 |"


def small_table(tmp_path):
    a = [entry(tmp_path, "mnli", s, {"accuracy": 0.90 + s / 100, "accuracy_mm": 0.91}, "accuracy", 1_327_104)
         for s in range(2)] + [entry(tmp_path, "rte", s, {"accuracy": 0.85 + s / 50}, "accuracy", 1_327_104)
                               for s in range(2)]
    b = [entry(tmp_path, "mnli", 0, {"accuracy": 0.89, "accuracy_mm": 0.90}, "accuracy", 37_440, label="b"),
         {"task": "rte", "seed": 0, "status": "failed", "error": "boom", "dir": str(tmp_path / "x"), "label": "b"}]
    spec = table_spec({"table": {"columns": [{"task": "mnli", "metrics": ["accuracy", "accuracy_mm"]}, "rte"]}})
    return build_table([Source("lora_{r=8}", ["mnli", "rte"], a), Source("lora2 & co", ["mnli", "rte"], b,
                                                                          {"b": {}})], spec)


def test_markdown_layout(tmp_path):
    assert markdown(small_table(tmp_path)) == textwrap.dedent("""\
        | Method | # Params | MNLI (Acc m/mm) | RTE (Acc) | Avg. |
        |---|---|---|---|---|
        | lora_{r=8} | 1.33M | **90.50±0.71**/**91.00±0.00** | 86.00±1.41 | 88.25 |
        | lora2 & co (b) | 37.4k | 89.00/90.00 | – | 89.00* |

        Metrics ×100 (NIST, MSE, perplexity as they are), mean ± std over seeds mnli: [0, 1]; rte: [0, 1].
        Avg.: the mean over the columns of each column's first metric.
        The # Params column: trainable adapter parameters (report.json adapter_params; the mean over a row's runs where they differ).
        * or –: some runs of this task failed, did not finish or were not run by that recipe (see its summary.json); an Avg. with * is over the columns that have a value.
        """)


def test_latex_is_a_booktabs_tabular_with_pm_and_escaped_names(tmp_path):
    assert latex(small_table(tmp_path)) == textwrap.dedent(r"""
        % Metrics x100 (NIST, MSE, perplexity as they are), mean +/- std over seeds mnli: [0, 1]; rte: [0, 1].
        % Avg.: the mean over the columns of each column's first metric.
        % The # Params column: trainable adapter parameters (report.json adapter_params; the mean over a row's runs where they differ).
        % * or -: some runs of this task failed, did not finish or were not run by that recipe (see its summary.json); an Avg. with * is over the columns that have a value.
        % needs \usepackage{booktabs}
        \begin{tabular}{lrrrr}
        \toprule
        Method & \# Params & MNLI (Acc m/mm) & RTE (Acc) & Avg. \\
        \midrule
        lora\_\{r=8\} & 1.33M & $\mathbf{90.50} \pm 0.71$/$\mathbf{91.00} \pm 0.00$ & $86.00 \pm 1.41$ & 88.25 \\
        lora2 \& co (b) & 37.4k & $89.00$/$90.00$ & -- & 89.00$^*$ \\
        \bottomrule
        \end{tabular}
        """).lstrip()


def test_csv_is_the_long_form_with_every_number(tmp_path):
    assert csv_text(small_table(tmp_path)) == textwrap.dedent("""\
        method,task,metric,value,std,n,seeds,n_missing,missing_seeds,point,column,params
        lora_{r=8},mnli,accuracy,90.5,0.707107,2,0 1,0,,,MNLI (Acc m/mm),1327104
        lora_{r=8},mnli,accuracy_mm,91.0,0.0,2,0 1,0,,,MNLI (Acc m/mm),1327104
        lora_{r=8},rte,accuracy,86.0,1.414214,2,0 1,0,,,RTE (Acc),1327104
        lora_{r=8},Avg.,,88.25,,,,,,,Avg.,1327104
        lora2 & co,mnli,accuracy,89.0,,1,0,0,,b,MNLI (Acc m/mm),37440
        lora2 & co,mnli,accuracy_mm,90.0,,1,0,0,,b,MNLI (Acc m/mm),37440
        lora2 & co,rte,accuracy,,,0,,1,0,b,RTE (Acc),37440
        lora2 & co,Avg.,,89.0,,,,,,b,Avg.,37440
        """)


def test_parameter_counts_as_the_papers_print_them():
    assert [format_params(n) for n in (None, 512, 37_440, 167_552, 1_327_104, 24_576, 184_420_000)] == [
        "–", "512", "37.4k", "0.17M", "1.33M", "24.6k", "184M"]


def sweep_sources(tmp_path):
    """A sweep over the target sets (categories) of two methods on RTE and CoLA, 2 seeds."""
    out = []
    for name, shift in (("lora", 0.0), ("lora2", 0.02)):
        entries, points = [], {}
        for i, targets in enumerate((["Wq", "Wv"], ["Wq", "Wk", "Wv"], "all")):
            label = f"targets={json.dumps(targets, separators=(',', ':'))}"
            points[label] = {"targets": targets}
            for task, metric in (("rte", "accuracy"), ("cola", "matthews_correlation")):
                entries += [entry(tmp_path / name, task, s, {metric: 0.6 + i / 20 + shift + s / 100}, metric,
                                  label=label, point=points[label]) for s in range(2)]
        out.append(Source(name, ["rte", "cola"], entries, points))
    return out


def test_a_sweep_gives_one_row_per_point_and_its_figure(tmp_path):
    t = build_table(sweep_sources(tmp_path), table_spec({}))
    assert [r.title for r in t.rows] == ['lora (targets=["Wq","Wv"])', 'lora (targets=["Wq","Wk","Wv"])',
                                         'lora (targets="all")', 'lora2 (targets=["Wq","Wv"])',
                                         'lora2 (targets=["Wq","Wk","Wv"])', 'lora2 (targets="all")']
    assert [r.params for r in t.rows] == [None] * 6  # no report.json: the column says "–"
    path = sweep_figure(t, tmp_path / "sweep.png", "targets")
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (768, 504)  # 6.4 x 4.2 in at 120 dpi
    assert len(image.convert("RGB").getcolors(1 << 16)) > 50  # lines, markers, labels: not a blank canvas
    numeric = [Source("s", ["rte"], [entry(tmp_path, "rte", 0, {"accuracy": a}, "accuracy", label=f"r={r}",
                                           point={"method.r": r}) for r, a in ((2, 0.7), (8, 0.8), (32, 0.75))])]
    assert sweep_figure(build_table(numeric, table_spec({})), tmp_path / "r.png", "r").is_file()
    plain = [Source("s", ["rte"], [entry(tmp_path, "rte", 0, {"accuracy": 0.7}, "accuracy")])]
    assert sweep_figure(build_table(plain, table_spec({})), tmp_path / "none.png", "x") is None


def test_two_methods_sweeping_differently_named_keys_share_one_figure(tmp_path):
    """TriAdaptLoRA Figure 3: TriAdaptLoRA's t_init and IncreLoRA's init_warmup, each zipped
    with the learning-rate warm-up, one line per method (the zipped key is not a line of
    its own), placed by each recipe's own first key; a grid's second key still splits lines."""
    def source(name, key, shift, values=(50, 100, 200)):
        entries, points = [], {}
        for i, v in enumerate(values):
            label = f"{key.split('.')[-1]}={v}"
            points[label] = {key: v, "training.warmup_steps": v}
            entries += [entry(tmp_path / name, "rte", s, {"accuracy": 0.8 + i / 100 + shift + s / 200}, "accuracy",
                              label=label, point=points[label]) for s in range(3)]
        return Source(name, ["rte"], entries, points)

    t = build_table([source("triadaptlora-rte-t-init", "method.t_init", 0.0),
                     source("increlora-rte-t-init", "method.init_warmup", -0.02, (50, 100, 200, 400))],
                    table_spec({}))
    lines = figure_lines(t)
    assert sorted(lines) == ["increlora-rte-t-init · RTE (Acc)", "triadaptlora-rte-t-init · RTE (Acc)"]
    assert [x for x, _, _ in lines["triadaptlora-rte-t-init · RTE (Acc)"]] == [50, 100, 200]
    assert [x for x, _, _ in lines["increlora-rte-t-init · RTE (Acc)"]] == [50, 100, 200, 400]
    assert lines["increlora-rte-t-init · RTE (Acc)"][0][1] == pytest.approx(78.5)  # mean of 3 seeds, x100
    assert sweep_axis(t) == "t_init / init_warmup"
    image = Image.open(sweep_figure(t, tmp_path / "fig3.png", "RTE"))
    assert image.format == "PNG" and len(image.convert("RGB").getcolors(1 << 16)) > 50
    grid = [Source("g", ["rte"], [entry(tmp_path, "rte", 0, {"accuracy": 0.7 + r / 100 + lr}, "accuracy",
                                        label=f"r={r},lr={lr}", point={"method.r": r, "training.learning_rate": lr})
                                  for r in (2, 4) for lr in (0.001, 0.01)])]
    assert sorted(figure_lines(build_table(grid, table_spec({})))) == [
        "RTE (Acc) · learning_rate=0.001", "RTE (Acc) · learning_rate=0.01"]


def test_output_table_in_a_recipe_defaults_and_errors(tmp_path, tiny_bert, sentiment_data):
    assert table_spec({}) == table_spec({"aggregate": "mean", "table": {}})  # the schema's defaults
    spec = table_spec({"aggregate": "median", "table": {"average": "none", "precision": 1, "params": False}})
    assert (spec.aggregate, spec.average, spec.precision, spec.params, spec.spread) == ("median", "none", 1, False, "std")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe_text(tiny_bert, sentiment_data) + textwrap.dedent("""\
        output:
          table:
            columns: [classification, {task: clasification, metrics: [acuracy]}, {task: classification, metrics: [f1]}]
            average: median
        """))
    problems = [str(p) for p in check_recipe_file(recipe)]
    assert any(p.startswith(f"{recipe}:14:14:") and "output.table.average" in p and "median" in p for p in problems)
    doc = load_document(recipe, ["output.table.average=mean"])
    found = [str(p) for p in table_problems(doc, ["classification"])]
    assert found == [
        f"{recipe}:13:38: output.table.columns.1.task: the recipe runs no task 'clasification' (did you mean "
        "'classification'?); its tasks: classification",
        f"{recipe}:13:107: output.table.columns.2.metrics.0: task 'classification' reports no metric 'f1'; it reports "
        "accuracy, f1_macro, matthews_correlation, loss"]
    twice = load_document(recipe, ["output.table.columns=[classification, classification, "
                                   "{task: classification, metrics: [accuracy, accuracy]}]"])
    assert [p.message for p in table_problems(twice, ["classification"])] == [
        "this column is listed twice (also item 0): the average would count it twice; give each column once",
        "a metric is listed twice: give each once"]


# ------------------------------------------------------------------ real runs, lrr run / lrr report --table


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_bert, sentiment_data):
    """Three recipes run by `lrr run`: lora (2 seeds), lora-sweep (method.r 2, 4; 1 seed; its baseline r=2),
    single (one run)."""
    root = tmp_path_factory.mktemp("tables")
    base = tiny_recipe_text(tiny_bert, sentiment_data).replace("epochs: 2", "epochs: 1")
    recipes = {"lora": base.replace("seed: 0", "seed: [0, 1]"),
               "lora-sweep": base + "sweep: {method.r: [2, 4]}\noutput: {table: {baseline: r=2}}\n", "single": base}
    for name, text in recipes.items():
        path = root / f"{name}.yaml"
        path.write_text(text.replace("name: tiny", f"name: {name}"))
        code, out, err = lrr("run", path, "--output", root / name)
        assert code == 0, out + err
    return root


def test_lrr_run_writes_the_table_and_the_sweep_figure(outputs):
    sweep = outputs / "lora-sweep"
    assert {"results.md", "results.csv", "results.tex", "sweep.png", "summary.json"} <= {p.name for p in sweep.iterdir()}
    md = (sweep / "results.md").read_text()
    assert "| lora-sweep (r=2) | 256 |" in md and "| lora-sweep (r=4) | 512 |" in md  # adapter params of r=2, r=4
    assert Image.open(sweep / "sweep.png").size == (768, 504)
    assert "![metric against the swept value](sweep.png)" in (sweep / "report.md").read_text()
    assert "[classification/r=2/seed0](classification/r=2/seed0/report.md)" in (sweep / "report.md").read_text()
    single = outputs / "single"
    assert (single / "report.json").is_file() and "| single (lora) | 512 |" in (single / "results.md").read_text()
    code, out, err = lrr("report", sweep, "--json")  # the runs of a sweep are found under their points
    assert code == 0 and [r["label"] for r in json.loads(out)["runs"]] == [
        f"{sweep}/classification/r=2/seed0", f"{sweep}/classification/r=4/seed0"]


def test_report_table_over_several_recipes_output_directories(outputs, tmp_path):
    moved = shutil.copytree(outputs / "lora", tmp_path / "moved-lora")  # summary.json's paths are the old ones
    dirs = [moved, outputs / "lora-sweep", outputs / "single"]
    code, out, err = lrr("report", "--table", *dirs)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "| Method | # Params | classification (Acc) | Avg. |"
    assert [line.split(" | ")[0:2] for line in lines[2:6]] == [
        ["| lora", "512"], ["| lora-sweep (r=2)", "256"], ["| lora-sweep (r=4)", "512"], ["| single (lora)", "512"]]
    assert "classification: [0, 1]." in out
    code, _, err = lrr("report", "--table", *dirs, "--out", tmp_path / "t.tex", "--figure", tmp_path / "f.png")
    assert code == 0 and f"table written to {tmp_path / 't.tex'}" in err
    tex = (tmp_path / "t.tex").read_text()
    assert "\\toprule\nMethod & \\# Params & classification (Acc) & Avg. \\\\\n\\midrule\nlora & 512 & $" in tex
    assert Image.open(tmp_path / "f.png").size == (768, 504)
    code, out, _ = lrr("report", "--table", *dirs, "--format", "csv")
    assert code == 0 and out.splitlines()[0].startswith("method,task,metric,value,std") and len(out.splitlines()) == 9
    code, out, _ = lrr("report", "--table", *dirs, "--json")
    assert code == 0 and [r["label"] for r in json.loads(out)["rows"]] == ["", "r=2", "r=4", ""]
    code, again, err = lrr("report", "--table", *dirs, moved, tmp_path / ".." / tmp_path.name / "moved-lora")
    assert code == 0 and again == lrr("report", "--table", *dirs)[1]  # each row once, no bold copies
    assert err.splitlines() == [f"{d}: the same output directory as {moved}, read once"
                                for d in (moved, tmp_path / ".." / tmp_path.name / "moved-lora")]


def test_report_table_refuses_what_it_cannot_tabulate(outputs, tmp_path):
    code, _, err = lrr("report", "--table", outputs / "lora", tmp_path)
    assert code == 2 and err.strip() == (
        f"error: {tmp_path}: not a recipe's output directory: no summary.json (written by a recipe with several runs) "
        "and no report.json (a single run); give the directories 'lrr run' wrote (its --output), one per recipe")
    other = shutil.copytree(outputs / "single", tmp_path / "stsb")  # the same run, said to be STS-B
    report = json.loads((other / "report.json").read_text())
    report["run"]["task"] = report["recipe"]["resolved"]["task"]["name"] = "stsb"
    (other / "report.json").write_text(json.dumps(report))
    code, _, err = lrr("report", "--table", outputs / "lora", other)
    assert code == 2 and err.strip() == (
        f"error: {other}: its recipe 'single' runs stsb, which {outputs / 'lora'} ('lora': classification) does not: "
        "a table compares methods on the same tasks; give the directories of one comparison, or build one table per "
        "task set")
    code, _, err = lrr("report", "--table", outputs / "lora", "--out", tmp_path / "t.txt")
    assert code == 2 and "give a file ending in .md, .csv or .tex" in err
    code, _, err = lrr("report", outputs / "lora", "--out", tmp_path / "t.md")
    assert code == 2 and "--out, --format and --figure go with --table" in err
    code, _, err = lrr("report", "--table", outputs / "lora", "--figure", tmp_path / "f.png")
    assert code == 2 and "no sweep point" in err


# ------------------------------------------------------------- found by a tester


def test_an_average_of_errors_is_best_lowest_and_a_mixed_one_has_no_best(tmp_path):
    rows = [Source(f"m{i}", ["regression"], [entry(tmp_path / f"m{i}", "regression", 0, {"mse": mse}, "mse")])
            for i, mse in enumerate((1.66, 2.69))]
    spec = table_spec({"table": {"columns": [{"task": "regression", "metrics": ["mse"]}]}})
    t = build_table(rows, spec)
    assert [r.average_best for r in t.rows] == [True, False]  # it bolded 2.69
    mixed = table_spec({"table": {"columns": [{"task": "regression", "metrics": ["mse", "pearson"]}], "average": "mean"}})
    rows = [Source(f"m{i}", ["regression"], [entry(tmp_path / f"x{i}", "regression", 0, {"mse": m, "pearson": p}, "mse")])
            for i, (m, p) in enumerate(((1.0, 0.5), (2.0, 0.9)))]
    assert [r.average_best for r in build_table(rows, mixed).rows] == [False, False]


def test_headers_are_escaped_and_drawn_as_text(tmp_path):
    spec = table_spec({"table": {"columns": [{"task": "rte", "header": "Acc $\\foo{x}$ | 50%"}]}})
    sources = [Source("s", ["rte"], [entry(tmp_path, "rte", 0, {"accuracy": a}, "accuracy", label=f"lr={lr}",
                                           point={"training.learning_rate": lr})
                                     for lr, a in ((1e-4, 0.6), (1e-2, 0.7), (0.5, 0.5))])]
    t = build_table(sources, spec)
    assert markdown(t).splitlines()[0] == "| Method | # Params | Acc $\\foo{x}$ \\| 50% | Avg. |"
    assert "Acc \\$\\textbackslash{}foo\\{x\\}\\$ \\textbar{} 50\\%" in latex(t)
    assert Image.open(sweep_figure(t, tmp_path / "lr.png", "lr")).format == "PNG"  # a "$" crashed mathtext
    methods = [Source("s", ["rte"], [entry(tmp_path, "rte", 0, {"accuracy": 0.6 + i / 10}, "accuracy", label=f"m{i}",
                                           point={"method": {"name": name, "r": 4}})
                                     for i, name in enumerate(("lora", "adalora"))])]
    assert sweep_figure(build_table(methods, table_spec({})), tmp_path / "m.png", "m").is_file()


def test_report_table_refuses_bad_places_to_write(outputs, tmp_path):
    (tmp_path / "dir.md").mkdir()
    cases = {
        ("--out", tmp_path / "nodir" / "t.md"): f"--out {tmp_path / 'nodir' / 't.md'}: {tmp_path / 'nodir'} is not a "
                                                "directory; create it first, or write somewhere else",
        ("--out", tmp_path / "dir.md"): f"--out {tmp_path / 'dir.md'}: is a directory; give a file name in it, e.g. "
                                        f"{tmp_path / 'dir.md' / 'table.md'}",
        ("--out", tmp_path / "t.tex", "--format", "csv"): f"--out {tmp_path / 't.tex'} is a .tex file but --format says "
                                                          "csv: give --out a name ending in .csv, or drop --format",
        ("--out", tmp_path / "t.latex"): f"--out {tmp_path / 't.latex'}: give a file ending in .md, .csv or .tex (the "
                                         "format follows the suffix)",
        ("--figure", tmp_path / "f.txt"): f"--figure {tmp_path / 'f.txt'}: give a file ending in .png",
        ("--out", outputs / "lora" / "t.md"): f"--out {outputs / 'lora' / 't.md'}: {outputs / 'lora'} is a run directory "
                                              "written by lrr run; write the table somewhere else (its own results.* "
                                              "are written there already)",
    }
    for args, message in cases.items():
        code, _, err = lrr("report", "--table", outputs / "lora", *args)
        assert (code, err.strip()) == (2, f"error: {message}"), args
    assert not (outputs / "lora" / "t.md").exists()


def test_report_table_keeps_the_recipes_layout_when_no_run_completed(tmp_path, tiny_bert, sentiment_data):
    text = tiny_recipe_text(tiny_bert, sentiment_data).replace("seed: 0", "seed: [0, 1]")
    path = tmp_path / "stopped.yaml"
    path.write_text(text + "output: {table: {columns: [{task: classification, header: Sentiment}], average: none}}\n")
    code, out, err = lrr("run", path, "--output", tmp_path / "out", "--stop-after-step", 1)
    assert code == 0, out + err
    code, out, err = lrr("report", "--table", tmp_path / "out")
    assert code == 0, err
    assert out.splitlines()[0] == "| Method | # Params | Sentiment |"  # not the default "classification (Acc) | Avg."


# ------------------------------------------------------------- differences to a baseline row (issue 25)


def seeded_source(tmp_path, name, mnli, rte):
    """A method's runs: ``mnli``/``rte`` map seed -> accuracy (a fraction)."""
    entries = [entry(tmp_path / name, "mnli", s, {"accuracy": a, "accuracy_mm": a - 0.01}, "accuracy")
               for s, a in mnli.items()]
    entries += [entry(tmp_path / name, "rte", s, {"accuracy": a}, "accuracy") for s, a in rte.items()]
    return Source(name, ["mnli", "rte"], entries)


BASE_MNLI = {0: 0.900, 1: 0.912, 2: 0.905, 3: 0.897, 4: 0.909}
BASE_RTE = {0: 0.80, 1: 0.83, 2: 0.79, 3: 0.82, 4: 0.81}
PAIRED_MNLI = {0: 0.915, 1: 0.925, 2: 0.921, 3: 0.910, 4: 0.926}  # +1.4 to +1.7 points, every seed
PAIRED_RTE = {0: 0.81, 1: 0.82, 2: 0.80, 3: 0.84, 4: 0.80}  # +0.4 on average, noisy
WELCH_MNLI = {5: 0.903, 6: 0.915, 7: 0.899, 8: 0.911}  # other seeds: unpaired
WELCH_RTE = {5: 0.82, 6: 0.80, 7: 0.85, 8: 0.81}


def baseline_table(tmp_path, baseline="lora", **table):
    spec = table_spec({"table": {"columns": [{"task": "mnli", "metrics": ["accuracy", "accuracy_mm"]}, "rte"],
                                 "params": False, "baseline": baseline, **table}})
    return build_table([seeded_source(tmp_path, "lora", BASE_MNLI, BASE_RTE),
                        seeded_source(tmp_path, "paired", PAIRED_MNLI, PAIRED_RTE),
                        seeded_source(tmp_path, "welch", WELCH_MNLI, WELCH_RTE),
                        seeded_source(tmp_path, "one", {0: 0.95}, {0: 0.9})], spec)


def x100(values: dict) -> list[float]:
    return [100 * values[s] for s in sorted(values)]


def scipy_paired(a: dict, b: dict):
    from scipy import stats

    diffs = [x - y for x, y in zip(x100(a), x100(b))]
    half = stats.t.ppf(0.975, len(diffs) - 1) * stats.tstd(diffs) / len(diffs) ** 0.5
    mean = sum(diffs) / len(diffs)
    return mean, mean - half, mean + half, stats.ttest_rel(x100(a), x100(b)).pvalue


def scipy_welch(a: dict, b: dict):
    from scipy import stats

    result = stats.ttest_ind(x100(a), x100(b), equal_var=False)
    va, vb = stats.tvar(x100(a)) / len(a), stats.tvar(x100(b)) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    mean = sum(x100(a)) / len(a) - sum(x100(b)) / len(b)
    half = stats.t.ppf(0.975, df) * (va + vb) ** 0.5
    assert result.df == pytest.approx(df)
    return mean, mean - half, mean + half, result.pvalue


def test_differences_to_the_baseline_are_scipys_paired_and_welch_tests(tmp_path):
    t = baseline_table(tmp_path)
    lora, paired, welch, one = t.rows
    assert t.baseline is lora and lora.differences == [] and lora.average_difference is None
    cases = [(paired.differences[0], "paired", scipy_paired(PAIRED_MNLI, BASE_MNLI)),
             (paired.differences[1], "paired", scipy_paired(PAIRED_RTE, BASE_RTE)),
             (welch.differences[0], "welch", scipy_welch(WELCH_MNLI, BASE_MNLI)),
             (welch.differences[1], "welch", scipy_welch(WELCH_RTE, BASE_RTE))]
    for d, test, expected in cases:
        assert d.test == test
        assert (d.diff, d.low, d.high, d.p_value) == pytest.approx(expected, rel=1e-9)
    assert paired.differences[0].significant and not paired.differences[1].significant
    assert not welch.differences[0].significant
    # the CI also agrees with scipy's own interval of each test
    from scipy import stats
    ci = stats.ttest_rel(x100(PAIRED_MNLI), x100(BASE_MNLI)).confidence_interval(0.95)
    assert (paired.differences[0].low, paired.differences[0].high) == pytest.approx((ci.low, ci.high))
    ci = stats.ttest_ind(x100(WELCH_RTE), x100(BASE_RTE), equal_var=False).confidence_interval(0.95)
    assert (welch.differences[1].low, welch.differences[1].high) == pytest.approx((ci.low, ci.high))
    # Avg. (each column's first metric) per seed: paired over the shared seeds; Welch across other seeds
    avg = {s: (PAIRED_MNLI[s] + PAIRED_RTE[s]) / 2 for s in PAIRED_MNLI}
    base_avg = {s: (BASE_MNLI[s] + BASE_RTE[s]) / 2 for s in BASE_MNLI}
    assert (paired.average_difference.diff, paired.average_difference.low, paired.average_difference.high,
            paired.average_difference.p_value) == pytest.approx(scipy_paired(avg, base_avg))
    assert paired.average_difference.diff == pytest.approx(paired.average - lora.average)
    welch_avg = {s: (WELCH_MNLI[s] + WELCH_RTE[s]) / 2 for s in WELCH_MNLI}
    assert welch.average_difference.p_value == pytest.approx(scipy_welch(welch_avg, base_avg)[3])
    # one seed: the difference, no interval, no test
    d = one.differences[0]
    assert (d.diff, d.low, d.high, d.p_value, d.test, d.n, d.n_baseline) == (
        pytest.approx(95.0 - 100 * sum(BASE_MNLI.values()) / 5), None, None, None, "", 1, 5)


def test_the_markdown_marks_only_significant_differences_and_names_the_tests(tmp_path):
    lines = markdown(baseline_table(tmp_path)).splitlines()
    paired_mnli = scipy_paired(PAIRED_MNLI, BASE_MNLI)
    assert lines[2] == "| lora | 90.46±0.62/89.46±0.62 | 81.00±1.58 | 85.73 |"
    assert lines[3].startswith(f"| paired | 91.94±0.68/90.94±0.68 (+{paired_mnli[0]:.2f} "
                               f"[+{paired_mnli[1]:.2f}, +{paired_mnli[2]:.2f}]†) | ")
    assert lines[3].count("†") == 2  # MNLI and Avg.; not RTE
    assert "†" not in lines[4] and "†" not in lines[5]
    assert lines[5] == "| one | **95.00**/**94.00** (+4.54) | **90.00** (+9.00) | **92.50** (+6.77) |"
    notes = "\n".join(lines[7:])
    assert "the difference to the baseline lora (row - baseline, of the means over seeds, in the table's units) " \
           "[95% CI]; †: p < 0.05, two-sided. Paired t-test (by seed)" in notes
    assert "Welch's t-test (unequal variances, Welch-Satterthwaite df)" in notes
    assert lines[-3:] == ["paired vs lora: paired t, n=5 (every column and Avg.).",
                          "welch vs lora: Welch t, n=4 vs 5 (every column and Avg.).",
                          "one vs lora: n=1: no interval (every column and Avg.)."]
    plain = markdown(baseline_table(tmp_path, baseline=None))
    assert "†" not in plain and "(+" not in plain and "baseline" not in plain


def test_latex_and_csv_carry_the_differences(tmp_path):
    t = baseline_table(tmp_path, average="none")
    tex = latex(t)
    assert "% paired vs lora: paired t, n=5 (every column)." in tex
    assert "\\dagger: p < 0.05" in tex and "†" not in tex
    row = next(line for line in tex.splitlines() if line.startswith("paired &"))
    assert row.count("^{\\dagger}$)") == 1 and "($+" in row and "\\ [+" in row
    lines = csv_text(t).splitlines()
    assert lines[0] == ("method,task,metric,value,std,n,seeds,n_missing,missing_seeds,point,column,params,"
                        "baseline,diff,diff_low,diff_high,ci_level,p_value,test,n_baseline")
    fields = lines[0].split(",")
    rows = [dict(zip(fields, line.split(","))) for line in lines[1:]]
    assert [r["test"] for r in rows] == ["", "", "", "paired", "", "paired", "welch", "", "welch",
                                         "n=1: no interval", "", "n=1: no interval"]
    assert {r["baseline"] for r in rows} == {"lora"}
    mean, low, high, p_value = scipy_welch(WELCH_RTE, BASE_RTE)
    welch_rte = rows[8]
    assert (float(welch_rte["diff"]), float(welch_rte["diff_low"]), float(welch_rte["diff_high"]),
            float(welch_rte["p_value"])) == pytest.approx((mean, low, high, p_value), abs=1e-5)
    assert (welch_rte["ci_level"], welch_rte["n"], welch_rte["n_baseline"]) == ("0.95", "4", "5")
    assert csv_text(baseline_table(tmp_path, baseline=None)).splitlines()[0].endswith(",params")


def test_the_baseline_is_found_by_title_label_or_method(tmp_path):
    from lowrank_runner.tables.significance import BaselineError

    sources = sweep_sources(tmp_path)
    t = build_table(sources, table_spec({"table": {"baseline": 'lora (targets="all")'}}))
    assert t.baseline.title == 'lora (targets="all")'
    d = t.rows[3].differences[0]  # lora2 (targets=["Wq","Wv"]) vs lora (all): the same seeds, paired
    assert d.test == "" and d.diff == pytest.approx(-8.0)  # a constant shift: no spread, no interval
    assert "no spread over n=2 vs 2: no interval" in markdown(t)
    single = build_table(sources[:1], table_spec({"table": {"baseline": "targets=\"all\""}}))
    assert single.baseline.label == 'targets="all"'
    with pytest.raises(BaselineError, match=r"baseline 'targets=\"all\"' names 2 rows \(lora \(targets=\"all\"\), "
                                            r"lora2 \(targets=\"all\"\)\)"):
        build_table(sources, table_spec({"table": {"baseline": 'targets="all"'}}))
    with pytest.raises(BaselineError, match="baseline 'lora' names 3 rows"):
        build_table(sources, table_spec({"table": {"baseline": "lora"}}))
    with pytest.raises(BaselineError, match=r"baseline 'nope' names no row of the table; its rows: lora \(targets="):
        build_table(sources, table_spec({"table": {"baseline": "nope"}}))


def test_a_recipe_names_its_baseline_and_lrr_run_warns_where_it_names_no_row(tmp_path, tiny_bert, sentiment_data,
                                                                             capsys):
    from types import SimpleNamespace

    from lowrank_runner.tables import write_recipe_tables

    assert table_spec({"table": {"baseline": "lora"}}).baseline == "lora" and table_spec({}).baseline is None
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe_text(tiny_bert, sentiment_data) + "output: {table: {baseline: lora}}\n")
    assert [p for p in check_recipe_file(recipe) if p.severity == "error"] == []
    recipe.write_text(tiny_recipe_text(tiny_bert, sentiment_data) + "output: {table: {baseline: 3}}\n")
    assert any("output.table.baseline" in str(p) for p in check_recipe_file(recipe))
    runs = [SimpleNamespace(task="mnli", label="", point={}), SimpleNamespace(task="rte", label="", point={})]
    entries = seeded_source(tmp_path, "x", BASE_MNLI, BASE_RTE).entries
    fake = SimpleNamespace(name="x", runs=runs, resolved={"output": {"table": {"baseline": "other-method"}}})
    table = write_recipe_tables(tmp_path, fake, entries)
    assert table.baseline is None and "baseline" not in (tmp_path / "results.md").read_text()
    assert ("warning: output.table.baseline: baseline 'other-method' names no row of the table; its rows: x"
            in capsys.readouterr().err)


def shifted_copy(source, target, name, shift):
    """A copy of a recipe's output directory, renamed, each seed's accuracy moved by
    ``shift[seed]`` (a fraction): another method with the same seeds."""
    shutil.copytree(source, target)
    summary = json.loads((target / "summary.json").read_text())
    summary["recipe"] = name
    for run in summary["runs"]:
        best = run["best"]
        best["eval"]["accuracy"] += shift[run["seed"]]
        if best["metric"] == "accuracy":
            best["value"] = best["eval"]["accuracy"]
    (target / "summary.json").write_text(json.dumps(summary))
    return target, {run["seed"]: run["best"]["eval"]["accuracy"] for run in summary["runs"]}


def test_report_table_baseline_end_to_end(outputs, tmp_path):
    from scipy import stats

    base = {run["seed"]: run["best"]["eval"]["accuracy"]
            for run in json.loads((outputs / "lora" / "summary.json").read_text())["runs"]}
    other, moved = shifted_copy(outputs / "lora", tmp_path / "lora-b", "lora-b", {0: 0.01, 1: 0.03})
    dirs = [outputs / "lora", other, outputs / "single"]
    code, out, err = lrr("report", "--table", *dirs, "--baseline", "lora")
    assert code == 0, err
    assert out.splitlines()[3].startswith("| lora-b | 512 | ")
    assert "lora-b vs lora: paired t, n=2 (every column and Avg.)." in out
    assert "single (lora) vs lora: n=1: no interval (every column and Avg.)." in out
    code, out, err = lrr("report", "--table", *dirs, "--baseline", "lora", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert (data["baseline"], data["ci_level"]) == ("lora", 0.95)
    d = data["rows"][1]["differences"][0]
    expected = stats.ttest_rel(x100(moved), x100(base))
    ci = expected.confidence_interval(0.95)
    assert (d["test"], d["n"], d["n_baseline"], d["significant"]) == ("paired", 2, 2, False)
    assert (d["diff"], d["low"], d["high"], d["p_value"]) == pytest.approx((2.0, ci.low, ci.high, expected.pvalue))
    assert "differences" not in data["rows"][0] and data["rows"][2]["differences"][0]["test"] == ""
    code, out, _ = lrr("report", "--table", *dirs, "--baseline", "lora", "--format", "csv")
    assert code == 0 and out.splitlines()[0].endswith(",baseline,diff,diff_low,diff_high,ci_level,p_value,test,n_baseline")
    code, _, err = lrr("report", "--table", *dirs, "--baseline", "nope")
    assert code == 2 and err.strip() == (
        "error: --baseline: baseline 'nope' names no row of the table; its rows: lora, lora-b, single (lora) (give a row as "
        "the table prints it, or a sweep point's label)")
    code, _, err = lrr("report", outputs / "lora", "--baseline", "lora")
    assert code == 2 and "--baseline goes with --table" in err


def test_lrr_run_compares_with_the_recipes_baseline(outputs):
    md = (outputs / "lora-sweep" / "results.md").read_text()
    assert "the difference to the baseline lora-sweep (r=2)" in md
    assert "lora-sweep (r=4) vs lora-sweep (r=2): n=1: no interval (every column and Avg.)." in md


# ------------------------------------------------------------- issue 26: tables that tell the truth


def test_the_method_column_names_the_method_where_the_recipes_name_does_not(tmp_path):
    def source(name, method, label="", point=None):
        return Source(name, ["rte"], [entry(tmp_path / name, "rte", 0, {"accuracy": 0.7}, "accuracy", label=label,
                                            point=point)], method=method)

    t = build_table([source("quickstart", "triadaptlora"), source("lora2-glue", "lora2"),
                     source("lora2_deberta", "lora"), source("LoRA", "lora"),
                     source("methods", "lora", "name=sora", {"method.name": "sora"})], table_spec({}))
    assert [r.title for r in t.rows] == ["quickstart (triadaptlora)", "lora2-glue", "lora2_deberta (lora)", "LoRA",
                                         "methods (name=sora)"]
    assert t.rows[0].method == "quickstart (triadaptlora)" and t.rows[0].recipe == "quickstart"
    assert csv_text(t).splitlines()[1].startswith("quickstart (triadaptlora),rte,accuracy,")
    assert build_table([source("quickstart", "triadaptlora"), source("lora", "lora")],
                       table_spec({"table": {"baseline": "quickstart"}})).baseline.title == "quickstart (triadaptlora)"


def test_one_seed_is_called_n_1_and_drawn_without_error_bars(tmp_path):
    from io import StringIO

    from rich.console import Console

    from lowrank_runner.tables import print_table

    one = [Source("lora", ["rte"], [entry(tmp_path, "rte", 0, {"accuracy": a}, "accuracy", label=f"r={r}",
                                          point={"method.r": r}) for r, a in ((2, 0.701), (4, 0.712), (8, 0.705))])]
    t = build_table(one, table_spec({}))
    assert "± std" not in markdown(t) and "n = 1: one seed per value, no spread (seeds rte: [0])." in markdown(t)
    console = Console(file=StringIO(), width=200)
    print_table(console, t, "lora")
    assert "lora: one seed (n = 1), ×100" in console.file.getvalue() and "±" not in console.file.getvalue()
    assert figure_how(t, bars=False) == "one seed per point (n = 1)"
    low, high = y_range(figure_lines(t))  # 70.1 .. 71.2: not stretched over the whole height
    assert high - low == pytest.approx(MIN_Y_SPAN) and low < 70.1 and high > 71.2
    assert y_range({"a": [(1, 50.0, None), (2, 80.0, None)]}) is None
    assert sweep_figure(t, tmp_path / "one.png", "lora").is_file()
    two = build_table(sweep_sources(tmp_path), table_spec({}))
    assert figure_how(two, bars=True) == "mean ± std over seeds (n = 2)"
    console = Console(file=StringIO(), width=200)
    print_table(console, two, "targets")
    assert "targets: mean ± std over seeds (n = 2), ×100" in console.file.getvalue()


def test_latex_has_one_bold_macro_and_ends_with_a_newline(tmp_path):
    rows = [Source(f"m{i}", ["rte"], [entry(tmp_path / f"m{i}", "rte", 0, {"accuracy": a}, "accuracy")])
            for i, a in enumerate((0.7, 0.8))]
    tex = latex(build_table(rows, table_spec({})))
    assert "\\textbf" not in tex and "m1 & -- & $\\mathbf{80.00}$ & $\\mathbf{80.00}$ \\\\" in tex
    assert tex.endswith("\\end{tabular}\n") and not tex.endswith("\n\n")


def edited_copy(source, target, name, **training):
    """A copy of a single run's directory whose report says it was recipe ``name`` with
    these training settings (as --set would have made it)."""
    shutil.copytree(source, target)
    report = json.loads((target / "report.json").read_text())
    report["recipe"]["name"] = report["recipe"]["resolved"]["name"] = name
    report["recipe"]["resolved"]["training"].update(training)
    (target / "report.json").write_text(json.dumps(report))
    return target


def test_report_table_warns_where_the_joined_recipes_trained_differently(outputs, tmp_path):
    four = edited_copy(outputs / "single", tmp_path / "four", "four-epochs", epochs=4, learning_rate=0.05)
    code, out, err = lrr("report", "--table", outputs / "single", four)
    assert code == 0, err
    assert err.splitlines() == [
        "warning: the recipes joined in this table trained with different settings, so their rows differ by more than "
        "the method:", "  training.epochs: single 1; four-epochs 4", "  training.learning_rate: single 0.01; four-epochs 0.05"]
    assert "- training.epochs: single 1; four-epochs 4" in out
    code, out, err = lrr("report", "--table", outputs / "single", outputs / "lora-sweep")  # method.r is swept
    assert code == 0 and err == ""


def test_report_table_tells_rows_of_one_recipe_apart_by_what_was_switched(outputs, tmp_path):
    switched = edited_copy(outputs / "single", tmp_path / "switched", "single", epochs=4)
    report = json.loads((switched / "report.json").read_text())
    report["recipe"]["resolved"]["method"] = {"name": "triadaptlora", "r": 2}
    (switched / "report.json").write_text(json.dumps(report))
    code, out, err = lrr("report", "--table", outputs / "single", switched, "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [r["method"] for r in rows] == ["single (lora, epochs=1)", "single (triadaptlora, epochs=4)"]
    assert "  training.epochs: single (epochs=1) 1; single (epochs=4) 4" in err.splitlines()
    again = shutil.copytree(outputs / "single", tmp_path / "again")
    code, out, _ = lrr("report", "--table", outputs / "single", again, "--json")
    assert code == 0 and [r["method"] for r in json.loads(out)["rows"]] == ["single (lora, single)", "single (lora, again)"]
