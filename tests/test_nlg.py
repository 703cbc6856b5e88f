"""Data-to-text generation (E2E, DART, WebNLG): linearisation, label masking, reference
grouping, multi-reference scores against sacrebleu, label smoothing, and a tiny
end-to-end `lrr run` on a random GPT-2 with beam search; the MTLoRA/LoRA NLG recipes
against MTLoRA's Tables 5-6."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.recipe.schema import fill_defaults, recipe_schema
from lowrank_runner.tasks.base import build_task
from lowrank_runner.tasks.nlg import group_references, linearise, target_texts
from lowrank_runner.tasks.text_metrics import generation_scores
from tests.conftest import tiny_config
from tests.test_inspect import inspect_recipe

REPO = Path(__file__).resolve().parent.parent
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]  # ids 0-3: tiny_config("gpt2")'s pad, -, bos, eos
WORDS = ("name food area eatType near : | . , is a an the in of serves and located it restaurant pub coffee shop "
         "riverside city centre Italian French Chinese English Alimentum Aromi Bibimbap Cotto Fitzbillies Giraffe "
         "Loch Fyne Strada Wildwood").split()
NAMES = ["Alimentum", "Aromi", "Bibimbap", "Cotto", "Fitzbillies", "Giraffe", "Strada", "Wildwood"]
FOODS = ["Italian", "French", "Chinese", "English"]


def resolved_task(task: dict):
    """A task built from its section as the recipe loader resolves it (defaults filled)."""
    return build_task(fill_defaults({"task": task}, recipe_schema())["task"])


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A random GPT-2 LM (tied lm_head) with a word-level tokenizer, saved as a model directory."""
    import transformers

    d = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    # initializer_range 0.5: the frozen tied embeddings are large enough for sharp outputs
    transformers.GPT2LMHeadModel(tiny_config("gpt2", vocab_size=len(tokenizer), initializer_range=0.5)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def e2e_rows(n_sources: int, refs_per_source: int, offset: int = 0):
    rows = []
    for i in range(offset, offset + n_sources):
        name, food = NAMES[i % len(NAMES)], FOODS[i % len(FOODS)]
        area = "riverside" if i % 2 else "city centre"
        mr = f"name[{name}], food[{food}], area[{area}]"
        refs = [f"{name} serves {food} food in the {area} .", f"{name} is a {food} restaurant in the {area} .",
                f"in the {area} , {name} serves {food} food ."]
        rows += [(mr, ref) for ref in refs[:refs_per_source]]
    return rows


def write_e2e_csv(path: Path, rows) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:  # E2E's official layout: header mr,ref
        writer = csv.writer(f)
        writer.writerow(["mr", "ref"])
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------- data and tokens


def test_linearisation_of_e2e_mrs_and_triples():
    assert linearise("name[The Vaults], eatType[pub], priceRange[more than £30]") == \
        "name : The Vaults | eatType : pub | priceRange : more than £30"
    assert linearise("name : The Vaults | Type : pub") == "name : The Vaults | Type : pub"  # already linearised
    assert linearise([["Mars Hill", "JOINED", "SAC"], ["Mars Hill", "city", "NC"]], lower_predicate=True) == \
        "Mars Hill : joined : SAC | Mars Hill : city : NC"  # DART, predicates lower-cased as LoRA's converter
    assert linearise(["Aarhus | leader | Jacob", "Aarhus | country | Denmark"]) == \
        "Aarhus : leader : Jacob | Aarhus : country : Denmark"  # GEM-style triple strings
    assert linearise({"mtriple_set": [["A | b | C"]]}) == "A : b : C"  # WebNLG 2017 on the hub
    with pytest.raises(ValueError):
        linearise([["only", "two"]])
    assert target_texts({"comment": ["good", "bad", "good"], "text": ["x", "y", "z"]}) == ["x", "z"]  # WebNLG lex
    assert target_texts({"source": ["wiki", "wiki"], "text": ["t1", "t2"]}) == ["t1", "t2"]  # DART annotations


def test_references_are_grouped_per_source_in_order():
    sources, refs = group_references(["a", "b", "a", "c", "b"], ["x", "y", "z", "w", "y"], [["x", "v"], [], [], [], []])
    assert sources == ["a", "b", "c"]
    assert refs == [["x", "v", "z"], ["y"], ["w"]]


def test_label_masking_keeps_the_loss_on_the_target_only(tmp_path):
    tokenizer = tiny_tokenizer()
    train = write_e2e_csv(tmp_path / "train.csv", [("name[Aromi], food[French]", "Aromi serves French food .")])
    valid = write_e2e_csv(tmp_path / "valid.csv", e2e_rows(2, 3))
    task = resolved_task({"name": "e2e", "data": {"train": str(train), "validation": str(valid)}, "max_length": 32})
    tokenized = task.tokenize(task.load_splits(), tokenizer)
    ex = tokenized["train"][0]
    words = "name : Aromi | food : French".split()
    target = "Aromi serves French food .".split()
    ids = tokenizer.convert_tokens_to_ids
    assert ex["input_ids"] == ids(words) + [2] + ids(target) + [3]  # source <s> target </s>
    assert ex["labels"] == [-100] * (len(words) + 1) + ids(target) + [3]
    # validation: 6 pairs for the loss, 2 distinct sources with 3 references each for generation
    assert len(tokenized["validation"]) == 6
    prompts, refs = task.eval_sets["validation"].prompts, task.eval_sets["validation"].references
    assert len(prompts) == 2 and [len(r) for r in refs] == [3, 3]
    assert prompts[0][-1] == 2 and tokenizer.decode(prompts[0][:-1]) == "name : Alimentum | food : Italian | area : city centre"
    # the collator pads labels with -100 and ids with the pad token, per batch
    batch = task.collator(tokenizer)([tokenized["validation"][i] for i in (0, 3)])
    assert batch["input_ids"].shape == batch["labels"].shape
    short = int(batch["attention_mask"].sum(1).argmin())
    n = int(batch["attention_mask"][short].sum())
    assert (batch["labels"][short, n:] == -100).all() and (batch["input_ids"][short, n:] == 0).all()


def test_label_smoothing_loss_matches_pytorch_and_zero_is_the_model_loss():
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(tiny_config("gpt2", vocab_size=20)).eval()
    ids = torch.randint(4, 20, (2, 7))
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(input_ids=ids, labels=labels)
    plain = resolved_task({"name": "data_to_text", "max_length": 16})
    assert torch.allclose(plain.loss(out, {"labels": labels}), out.loss, atol=1e-6)  # the model's own loss
    smooth = resolved_task({"name": "data_to_text", "max_length": 16, "label_smoothing": 0.1})
    logp = out.logits[:, :-1].log_softmax(-1)
    target, mask = labels[:, 1:], labels[:, 1:] != -100
    nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = ((0.9 * nll + 0.1 * -logp.mean(-1)) * mask).sum() / mask.sum()
    assert torch.allclose(smooth.loss(out, {"labels": labels}), expected, atol=1e-6)
    batch = {"input_ids": ids, "labels": labels}
    for task in (plain, smooth):  # one loss per step, the task's: the model computes none
        unlabelled = task.model_inputs(batch)
        assert "labels" not in unlabelled and model(**unlabelled).loss is None
    assert torch.allclose(smooth.loss(model(**unlabelled), batch), expected, atol=1e-6)
    assert torch.allclose(plain.loss(model(**unlabelled), batch), out.loss, atol=1e-6)


# ---------------------------------------------------------------- scores


def test_bleu_is_sacrebleus_multi_reference_bleu():
    import sacrebleu

    hyps = ["the cat sat on the mat .", "a dog barked loudly", "it is raining"]
    refs = [["the cat is on the mat .", "there is a cat on the mat ."], ["a dog barked"],
            ["it rains", "it is raining today", "rain falls"]]
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(3)]
    scores = generation_scores(hyps, refs)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score / 100)  # fractions, as the E2E script
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, streams).score / 100)
    assert scores["ter"] == pytest.approx(sacrebleu.corpus_ter(hyps, streams).score / 100)
    # more references can only help: against the first reference alone BLEU is lower
    single = generation_scores(hyps, [r[:1] for r in refs])
    assert scores["bleu"] > single["bleu"]
    assert 0 < scores["rougeL"] < 1 and scores["nist"] > 0


def test_identical_outputs_score_1():
    refs = [["name serves food in the riverside ."], ["the pub is near the city centre ."]]
    scores = generation_scores([r[0] for r in refs], refs)
    assert scores["bleu"] == pytest.approx(1.0) and scores["chrf"] == pytest.approx(1.0)
    assert scores["ter"] == pytest.approx(0.0) and scores["rougeL"] == pytest.approx(1.0)
    cased, lower = ["The Pub is near The Bakers ."], [["the pub is near the bakers ."]]
    assert generation_scores(cased, lower, lowercase=True)["bleu"] == pytest.approx(1.0)
    assert generation_scores(cased, lower)["bleu"] < 1.0


def test_lm_head_is_not_a_trainable_head():
    import transformers

    from lowrank_runner.methods.inject import head_parameter_names

    tied = transformers.GPT2LMHeadModel(tiny_config("gpt2"))
    untied = transformers.GPT2LMHeadModel(tiny_config("gpt2", tie_word_embeddings=False))
    assert head_parameter_names(tied) == [] and head_parameter_names(untied) == []
    classifier = transformers.AutoModelForSequenceClassification.from_config(tiny_config("gpt2", num_labels=2))
    assert head_parameter_names(classifier) == ["score.weight"]


# ---------------------------------------------------------------- end to end


def tiny_nlg_recipe(tiny_gpt2, tmp_path) -> Path:
    train = write_e2e_csv(tmp_path / "train.csv", e2e_rows(8, 3))
    valid = write_e2e_csv(tmp_path / "devset.csv", e2e_rows(5, 3, offset=8))
    recipe = tmp_path / "tiny-nlg.yaml"
    recipe.write_text(f"""
name: tiny-nlg
backbone: {{name: {tiny_gpt2}}}
targets: [Wq, Wv]
method: {{name: lora, r: 2, alpha: 4, dropout: 0.1}}
task:
  name: e2e
  data: {{train: {train}, validation: {valid}}}
  max_length: 48
  label_smoothing: 0.1
  generation: {{num_beams: 2, length_penalty: 0.9, no_repeat_ngram_size: 4, max_new_tokens: 16, batch_size: 3}}
training: {{learning_rate: 2e-2, epochs: 2, batch_size: 8, seed: 0, log_every: 1, mixed_precision: "no"}}
""")
    return recipe


@pytest.mark.slow
def test_tiny_e2e_run_with_beam_search(tiny_gpt2, tmp_path):
    recipe = tiny_nlg_recipe(tiny_gpt2, tmp_path)
    result = CliRunner().invoke(app, ["run", str(recipe), "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["metric"] == "bleu"
    final = metrics["last"]["eval"]
    assert set(final) >= {"bleu", "chrf", "ter", "nist", "rougeL", "loss", "perplexity"}
    assert 0.0 <= final["bleu"] <= 1.0 and final["perplexity"] == pytest.approx(math.exp(final["loss"]))
    outputs = [json.loads(ln) for ln in (run_dir / "outputs_validation.jsonl").read_text().splitlines()]
    assert [o["source"] for o in outputs] == [linearise(mr) for mr, _ in e2e_rows(5, 1, offset=8)]
    assert all(len(o["references"]) == 3 and isinstance(o["output"], str) for o in outputs)
    evals = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    assert [e["step"] for e in evals] == [3, 6]
    assert metrics["best"]["value"] == max(e["eval"]["bleu"] for e in evals)
    from lowrank_runner.tasks.text_metrics import generation_scores

    rescored = generation_scores([o["output"] for o in outputs], [o["references"] for o in outputs])
    assert rescored["bleu"] == pytest.approx(metrics["best"]["value"])  # the selected checkpoint's outputs
    assert evals[1]["eval"]["loss"] < evals[0]["eval"]["loss"]  # it learns
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "completed" and report["train_examples"] == 24 and report["eval_examples"] == 15
    assert report["trainable_params"] == report["adapter_params"] == 2 * (2 * 2 * 16 + 2 * 16 * 2)  # q,v groups, 2 layers
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["task"]["model_class"] == "AutoModelForCausalLM" and config["head"] == []
    assert report["steps"]["total"] == 6  # 24 pairs / 8 per batch x 2 epochs


@pytest.mark.slow
def test_two_processes_score_like_one(tiny_gpt2, tmp_path):
    """Under torchrun (2 gloo processes) the pair losses are gathered without the padding
    duplicates and each process decodes half of the 5 sources: with a learning rate too
    small to move the weights, the scores equal one process's."""
    recipe = tiny_nlg_recipe(tiny_gpt2, tmp_path)
    sets = ["--set", "training.learning_rate=1e-12", "--set", "training.max_steps=1", "--set", "training.warmup_steps=0"]
    one = CliRunner().invoke(app, ["run", str(recipe), "--output", str(tmp_path / "one"), *sets])
    assert one.exit_code == 0, one.output
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lowrank_runner",
                           "run", str(recipe), "--output", str(tmp_path / "two"), *sets],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text())["last"]["eval"] for d in ("one", "two"))
    assert json.loads((tmp_path / "two" / "report.json").read_text())["environment"]["hardware"]["num_processes"] == 2
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for key in ("bleu", "chrf", "ter", "nist", "rougeL"):
        assert a[key] == pytest.approx(b[key], abs=1e-9), key


@pytest.mark.slow
def test_selected_checkpoint_is_scored_once_on_the_test_file(tiny_gpt2, tmp_path):
    """task.data.test (the papers' protocol): selection on validation as before, then the
    selected checkpoint scored once on the test file; metrics.json, its outputs, report.json,
    summary.json and the results table carry that test score."""
    recipe = tiny_nlg_recipe(tiny_gpt2, tmp_path)
    test_file = write_e2e_csv(tmp_path / "testset.csv", e2e_rows(4, 2, offset=3))
    text = recipe.read_text().replace("validation: ", f"test: {test_file}, validation: ")
    text = text.replace("batch_size: 3}", "batch_size: 3, max_sources: 2}")  # the test set: decoded whole
    recipe.write_text(text.replace("epochs: 2", "epochs: 1, eval_every: 1").replace("seed: 0", "seed: [0, 1]"))
    result = CliRunner().invoke(app, ["run", str(recipe), "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    runs = summary["runs"] if isinstance(summary, dict) else summary
    assert [r["status"] for r in runs] == ["completed", "completed"]
    for entry in runs:
        run_dir = Path(entry["dir"])
        metrics = json.loads((run_dir / "metrics.json").read_text())
        test = metrics["test"]
        assert set(test) >= {"bleu", "chrf", "ter", "nist", "rougeL", "loss", "perplexity"}
        evals = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
        assert len(evals) == 3 and all("bleu" in e["eval"] for e in evals)  # selection: validation, every step
        assert metrics["best"]["value"] == max(e["eval"]["bleu"] for e in evals)
        outputs = [json.loads(ln) for ln in (run_dir / "outputs_test_test.jsonl").read_text().splitlines()]
        assert [o["source"] for o in outputs] == [linearise(mr) for mr, _ in e2e_rows(4, 1, offset=3)]
        assert all(len(o["references"]) == 2 for o in outputs)
        rescored = generation_scores([o["output"] for o in outputs], [o["references"] for o in outputs])
        assert rescored["bleu"] == pytest.approx(test["bleu"])  # the test outputs are the scored ones
        valid = [json.loads(ln) for ln in (run_dir / "outputs_validation.jsonl").read_text().splitlines()]
        assert len(valid) == 2  # task.generation.max_sources
        assert generation_scores([o["output"] for o in valid],
                                 [o["references"] for o in valid])["bleu"] == pytest.approx(metrics["best"]["value"])
        report = json.loads((run_dir / "report.json").read_text())
        assert report["test"] == test and report["test_examples"] == {"test": 8} and report["holdout"] is None
        assert report["eval_examples"] == 15 and report["train_examples"] == 24
        assert "scored once on the test set" in (run_dir / "report.md").read_text()
        assert entry["test"] == test
    results = (tmp_path / "run" / "results.csv").read_text().splitlines()
    value = float(next(r for r in results if r.startswith("tiny-nlg (lora),e2e,")).split(",")[3])
    assert value == pytest.approx(100 * sum(r["test"]["bleu"] for r in runs) / 2, abs=1e-3)


def test_test_split_options_are_checked(tmp_path):
    from lowrank_runner.recipe.load import check_recipe_file

    train = write_e2e_csv(tmp_path / "train.csv", e2e_rows(2, 1))
    head = "name: r\nbackbone: {name: gpt2}\ntargets: [Wq]\nmethod: {name: lora}\n"
    recipe = tmp_path / "r.yaml"

    def problems(task: str) -> list[str]:
        recipe.write_text(head + task)
        return [str(p) for p in check_recipe_file(recipe)]

    assert problems("task: {name: e2e, test_split: test}\n") == []  # hub data: the split's name
    assert problems(f"task: {{name: e2e, test_split: test, data: {{train: {train}, validation: {train}, "
                    f"test: {train}}}}}\n") == []
    assert problems(f"task:\n  name: e2e\n  test_split: test\n  data: {{train: {train}, validation: {train}}}\n") == [
        f"{recipe}:7:15: task.test_split: task.test_split ('test') names a hub split, and this task reads your files: "
        "set task.data.test to the test file (or task.test_split: null to score no test set)"]
    assert problems("task:\n  name: e2e\n  holdout_fraction: 0.1\n  test_split: test\n") == [
        f"{recipe}:8:15: task.test_split: task.holdout_fraction already makes the evaluation split the test set; "
        "remove the test set (task.test_split: null, no task.data.test) or the holdout"]
    assert problems(f"task:\n  name: classification\n  text_column: mr\n  label_column: ref\n  data:\n"
                    f"    train: {train}\n    validation: {train}\n    test: {train}\n") == [
        f"{recipe}:12:5: task.data.test: task.data.test applies to e2e, dart, webnlg, data_to_text only, not to task "
        "'classification'; remove it (task.holdout_fraction makes a test set of the evaluation split)"]
    assert any("test_split applies to e2e" in m for m in problems("task: {name: sst2, test_split: test}\n"))


def test_test_split_is_loaded_as_a_test_split_and_limited(tmp_path):
    train = write_e2e_csv(tmp_path / "train.csv", e2e_rows(3, 2))
    test = write_e2e_csv(tmp_path / "test.csv", e2e_rows(4, 3, offset=3))
    data = {"train": str(train), "validation": str(train), "test": str(test)}
    task = resolved_task({"name": "e2e", "data": data, "max_length": 32, "max_eval_samples": 5})
    assert task.test_splits() == {"test__test": ""}
    splits = task.load_splits()
    assert sorted(splits) == ["test__test", "train", "validation"] and len(splits["test__test"]) == 5
    no_test = resolved_task({"name": "e2e", "data": {k: data[k] for k in ("train", "validation")}, "max_length": 32})
    assert no_test.test_splits() == {} and sorted(no_test.load_splits()) == ["train", "validation"]
    hub = resolved_task({"name": "e2e", "max_length": 32, "test_split": "test"})
    assert hub.test_splits() == {"test__test": ""}
    assert resolved_task({"name": "e2e", "max_length": 32}).test_splits() == {}


# ---------------------------------------------------------------- the papers' recipes

GPT2_MEDIUM = {
    "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 1024, "n_layer": 24, "n_head": 16,
    "n_positions": 1024, "n_ctx": 1024, "vocab_size": 50257, "bos_token_id": 50256, "eos_token_id": 50256,
}


def test_nlg_recipes_validate():
    for recipe in ("mtlora_gpt2_nlg.yaml", "lora_gpt2_nlg.yaml"):
        result = CliRunner().invoke(app, ["validate", str(REPO / "recipes" / recipe)])
        assert result.exit_code == 0, result.output


def test_nlg_recipes_match_mtlora_tables_5_and_6(tmp_path):
    d = tmp_path / "gpt2-medium"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(GPT2_MEDIUM))
    mtlora = inspect_recipe("mtlora_gpt2_nlg.yaml", f"backbone.name={d}")
    assert list(mtlora) == ["e2e", "dart", "webnlg"]
    # Table 5 (training) and Table 6 (inference), columns E2E | DART | WebNLG
    table5 = {"weight_decay": (0.01, 0.0, 0.01), "dropout": (0.1, 0.0, 0.1), "label_smoothing": (0.1, 0.0, 0.1)}
    table6 = {"num_beams": (10, 10, 10), "length_penalty": (0.9, 0.8, 0.8), "no_repeat_ngram_size": (4, 4, 4)}
    for i, task in enumerate(mtlora):
        run = mtlora[task]
        assert (run["training"]["batch_size"], run["training"]["learning_rate"], run["training"]["epochs"]) == (8, 2e-4, 5)
        assert run["training"]["warmup_steps"] == 500 and run["training"]["lr_scheduler"] == "linear"
        assert (run["method"]["name"], run["method"]["r"], run["method"]["alpha"]) == ("mtlora", 4, 32)
        assert run["training"]["weight_decay"] == table5["weight_decay"][i]
        assert run["method"]["dropout"] == table5["dropout"][i]
        assert run["task_config"]["label_smoothing"] == table5["label_smoothing"][i]
        for key, values in table6.items():
            assert run["task_config"]["generation"][key] == values[i]
        assert run["adapter_params"] == 1_085_184  # {Wq,Wk,Wv,Wf}, r 4: one 12x12 T over the fused c_attn
        assert run["trainable_params"] == run["adapter_params"] and run["head"] == []
        assert run["targets"]["Wq"][0] == "transformer.h.0.attn.c_attn"
    # LoRA's pair counts, batch 8, 5 epochs: LoRA's checkpoints model.26289 (E2E) and model.11270 (WebNLG)
    assert mtlora["e2e"]["steps"] == 5 * math.ceil(42_061 / 8) == 26_290
    assert mtlora["webnlg"]["steps"] == 5 * math.ceil(18_025 / 8) == 11_270
    lora = inspect_recipe("lora_gpt2_nlg.yaml", f"backbone.name={d}")
    assert all(run["method"]["name"] == "lora" for run in lora.values())
    # {Wq, Wv} on the fused c_attn, r 4: 24 x (2 x 4 x 1024 + 2 x 1024 x 4)
    assert lora["dart"]["adapter_params"] == 393_216
    assert lora["dart"]["task_config"]["generation"]["length_penalty"] == 0.8
    # the papers report the test sets: the selected checkpoint is scored once on them
    assert all(run["task_config"]["test_split"] == "test" for r in (mtlora, lora) for run in r.values())


def test_bad_nlg_data_gets_a_clear_error(tmp_path):
    from lowrank_runner.errors import DataError
    from lowrank_runner.recipe.load import check_recipe_file

    bad = tmp_path / "train.jsonl"
    bad.write_text(json.dumps({"input_text": "x", "output_text": "y"}) + "\n")
    task = resolved_task({"name": "e2e", "data": {"train": str(bad), "validation": str(bad)}, "max_length": 32})
    with pytest.raises(DataError, match=r"train.jsonl: none of the columns source, meaning_representation.*"
                                        r"columns: input_text, output_text\); set task.source_column"):
        task.load_splits()
    named = resolved_task({"name": "data_to_text", "data": {"train": str(bad), "validation": str(bad)}, "max_length": 32,
                        "source_column": "input_text", "target_column": "output_text"})
    assert named.load_splits()["train"][0] == {"source": "x", "target": "y", "references": []}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nbackbone: {name: gpt2}\ntargets: [Wq]\nmethod: {name: lora}\ntask: {name: data_to_text}\n")
    messages = [p.message for p in check_recipe_file(recipe)]
    assert any("set task.data.train" in m for m in messages)
    recipe.write_text("name: r\nbackbone: {name: gpt2}\ntargets: [Wq]\nmethod: {name: lora}\ntask: {name: dart}\n")
    assert check_recipe_file(recipe) == []  # the hub by default; task.data optional


def decoder_model(tokenizer):
    """A tiny GPT-2 of the tokenizer's vocabulary, seeded."""
    import transformers

    torch.manual_seed(1)
    return transformers.GPT2LMHeadModel(tiny_config("gpt2", vocab_size=len(tokenizer))).eval()


def decoded_together_and_alone(model, tokenizer) -> tuple[list[str], list[str]]:
    """lrr's decoding (beam search) of three prompts of different lengths: together in one
    left-padded batch, and each alone."""
    from accelerate import Accelerator

    from lowrank_runner.tasks.generation import generate

    prompts = [[5, 9, 11, 2], [6, 7, 8, 9, 10, 12, 13, 2], [14, 2]]
    settings = {"num_beams": 2, "length_penalty": 0.9, "no_repeat_ngram_size": 4, "max_new_tokens": 8, "batch_size": 3}
    accelerator = Accelerator(cpu=True)
    together = generate(model, prompts, tokenizer, settings, accelerator)
    return together, [generate(model, [p], tokenizer, settings, accelerator)[0] for p in prompts]


def test_batched_left_padded_generation_equals_one_by_one():
    """Prompts of different lengths decoded together (left-padded) give the outputs each
    gives alone: positions follow the attention mask."""
    tokenizer = tiny_tokenizer()
    together, alone = decoded_together_and_alone(decoder_model(tokenizer), tokenizer)
    assert together == alone and any(together)


def test_hub_layouts_of_webnlg_and_dart_become_pairs(tmp_path):
    """The hub's nested records (a directory load_dataset reads offline): WebNLG 2017's
    modified triple sets and lexicalisations (only 'good' ones kept), DART's triple sets and
    annotations; every reference kept for evaluation."""
    webnlg = tmp_path / "webnlg"
    webnlg.mkdir()
    entry = {"category": "Airport", "modified_triple_sets": {"mtriple_set": [["Aarhus_Airport | cityServed | Aarhus"]]},
             "lex": {"comment": ["good", "bad", "good"], "lid": ["Id1", "Id2", "Id3"],
                     "text": ["Aarhus Airport serves Aarhus.", "bad text", "Aarhus is served by Aarhus Airport."],
                     "lang": ["", "", ""]}}
    for split in ("train", "dev"):
        (webnlg / f"{split}.jsonl").write_text(json.dumps(entry) + "\n")
    task = resolved_task({"name": "webnlg", "dataset": str(webnlg), "max_length": 32})
    splits = task.load_splits()
    assert splits["train"]["source"] == ["Aarhus_Airport : cityServed : Aarhus"] * 2
    assert splits["train"]["target"] == ["Aarhus Airport serves Aarhus.", "Aarhus is served by Aarhus Airport."]
    dart = tmp_path / "dart"
    dart.mkdir()
    row = {"tripleset": [["Mars Hill", "JOINED", "SAC"]], "subtree_was_extended": False,
           "annotations": {"source": ["wiki", "wiki"], "text": ["Mars Hill joined SAC.", "SAC was joined by Mars Hill."]}}
    for split in ("train", "validation", "test"):
        (dart / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    task = resolved_task({"name": "dart", "dataset": str(dart), "max_length": 32, "eval_split": "test"})
    tokenized = task.tokenize(task.load_splits(), tiny_tokenizer())
    assert len(tokenized["train"]) == 2 and task.count_train_examples() == 2
    (refs,) = task.eval_sets["validation"].references
    assert refs == ["Mars Hill joined SAC.", "SAC was joined by Mars Hill."]
    with pytest.raises(Exception, match="no nope split"):
        resolved_task({"name": "dart", "dataset": str(dart), "max_length": 32, "eval_split": "nope"}).load_splits()


def test_bad_rows_of_nlg_files_name_the_line(tmp_path, capsys):
    """Rows of your files are named by line (blank lines counted); a row with no reference
    text gives no pairs and a warning."""
    from lowrank_runner.errors import DataError

    rows = [{"source": "name[A]", "target": "A."}, {"source": "name[B]", "target": None},
            {"source": None, "target": "C."}]
    bad = tmp_path / "train.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n")
    task = resolved_task({"name": "data_to_text", "data": {"train": str(bad), "validation": str(bad)}, "max_length": 32})
    with pytest.raises(DataError, match=r"train.jsonl:4: column 'source': null; every row needs its source"):
        task.load_splits()
    bad.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    task = resolved_task({"name": "data_to_text", "data": {"train": str(bad), "validation": str(bad)}, "max_length": 32})
    assert task.load_splits()["train"]["target"] == ["A."]
    assert "train.jsonl:3: column 'target': no reference text (1 row of 2); these rows give no pairs" in capsys.readouterr().err
