"""Less padding: ``training.group_by_length`` (transformers Trainer's length-grouped
training order, drawn from the run's data generator: a resumed run replays it exactly)
and evaluation in length-sorted batches, longest first, whose scores are those of the
dataset order (classification, SQuAD, data-to-text), on one process and on several."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.tasks.evaluation import LengthSortedOrder, evaluation_order, in_dataset_order
from lowrank_runner.train.batching import LengthGroupedSampler, example_lengths, length_grouped_order
from tests.conftest import WORDS, write_sentiment_data
from tests.test_squad import squad_dir  # noqa: F401  (a fixture: the tiny SQuAD 2.0 files)

pytestmark = pytest.mark.usefixtures("one_thread")


def lrr(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


# ---------------------------------------------------------------- the orders


@pytest.mark.parametrize(("n", "batch_size"), [(1000, 8), (37, 4), (5, 16), (500, 3), (64, 16)])
def test_the_training_order_is_transformers_group_by_length(n, batch_size):
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = np.random.default_rng(n).integers(1, 40, n).tolist()  # many ties
    ours = length_grouped_order(lengths, batch_size, torch.Generator().manual_seed(7))
    theirs = get_length_grouped_indices(lengths, batch_size, generator=torch.Generator().manual_seed(7))
    assert ours == theirs
    assert sorted(ours) == list(range(n)) and lengths[ours[0]] == max(lengths)


def test_the_training_order_groups_lengths_and_differs_each_epoch():
    lengths = np.random.default_rng(0).integers(1, 100, 2000)
    generator = torch.Generator().manual_seed(0)
    sampler = LengthGroupedSampler(lengths, 8, generator)
    first, second = list(sampler), list(sampler)
    assert len(sampler) == 2000 and sorted(first) == sorted(second) == list(range(2000)) and first != second
    # Within a mega-batch (50 x 8) the lengths only fall: consecutive batches pad little.
    for start in range(0, 2000, 400):
        group = lengths[first[start:start + 400]]
        assert (np.diff(group[1:]) <= 0).all()
    padded = sum(lengths[first[i:i + 8]].max() * 8 for i in range(0, 2000, 8))
    shuffled = torch.randperm(2000, generator=torch.Generator().manual_seed(0)).numpy()
    assert padded < 0.7 * sum(lengths[shuffled[i:i + 8]].max() * 8 for i in range(0, 2000, 8))
    # the generator's state gives the order back (what the loop's resume relies on)
    generator.manual_seed(3)
    state = generator.get_state()
    once = list(sampler)
    generator.set_state(state)
    assert list(sampler) == once


def test_lengths_are_read_from_the_arrow_column_after_a_selection():
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[1] * i for i in range(1, 11)], "label": list(range(10))})
    assert example_lengths(ds).tolist() == list(range(1, 11))
    assert example_lengths(ds.select([7, 2, 4]).with_format("torch")).tolist() == [8, 3, 5]
    assert example_lengths([{"input_ids": [1, 2]}, {"input_ids": [3]}]).tolist() == [2, 1]
    assert example_lengths(ds.remove_columns("input_ids")) is None


def test_evaluation_runs_longest_first_and_outputs_go_back_to_dataset_order():
    lengths = [3, 9, 1, 9, 5]
    order = LengthSortedOrder(lengths)
    assert list(order) == [1, 3, 4, 0, 2]  # ties in dataset order
    loader = DataLoader(list(range(5)), batch_size=2, sampler=order)
    gathered = [i for batch in loader for i in batch.tolist()]
    assert gathered == [1, 3, 4, 0, 2]
    assert in_dataset_order(gathered, loader) == [0, 1, 2, 3, 4]
    assert in_dataset_order(np.array(gathered) * 10, loader).tolist() == [0, 10, 20, 30, 40]
    assert in_dataset_order(torch.tensor(gathered), loader).tolist() == [0, 1, 2, 3, 4]
    plain = DataLoader(list(range(5)), batch_size=2)
    assert evaluation_order(plain) is None and in_dataset_order([4, 2], plain) == [4, 2]
    with pytest.raises(RuntimeError, match="gathered 4 outputs for 5 examples"):
        in_dataset_order(gathered[:4], loader)


@pytest.mark.parametrize("processes", [2, 3])
def test_several_processes_gather_in_the_sorted_order(processes):
    """Accelerate's sharding of both orders, as each process prepares its DataLoader
    (``prepare_data_loader`` with its index): the evaluation batches, gathered step by step
    in process order and cut to the dataset (``gather_for_metrics``), are the sorted order
    that every process's loader knows; the training batches of the processes, from the
    same generator state, are the grouped order's batches dealt out in turn."""
    from accelerate.data_loader import prepare_data_loader

    n, lengths = 23, np.random.default_rng(1).integers(1, 30, 23)
    shards, loaders = [], []
    for rank in range(processes):
        loader = prepare_data_loader(DataLoader(list(range(n)), batch_size=3, sampler=LengthSortedOrder(lengths)),
                                     num_processes=processes, process_index=rank, put_on_device=False)
        loaders.append(loader)
        shards.append([b.tolist() for b in loader])
    assert len({len(s) for s in shards}) == 1  # even batches: the same number of steps everywhere
    gathered = [i for step in zip(*shards) for batch in step for i in batch][:n]
    assert gathered == LengthSortedOrder(lengths).order
    for loader in loaders:
        assert in_dataset_order(gathered, loader) == list(range(n))

    train = []
    for rank in range(processes):
        generator = torch.Generator().manual_seed(5)
        dl = DataLoader(list(range(n)), batch_size=2, sampler=LengthGroupedSampler(lengths, 2, generator),
                        generator=generator)
        train.append([b.tolist() for b in prepare_data_loader(dl, num_processes=processes, process_index=rank,
                                                              put_on_device=False)])
    generator = torch.Generator().manual_seed(5)
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's base seed comes first
    expected = length_grouped_order(lengths, 2, generator)
    dealt = [i for step in zip(*train) for batch in step for i in batch]
    assert dealt[:n] == expected


# ---------------------------------------------------------------- the same scores in sorted batches


@pytest.fixture
def varied_recipe(tmp_path, tiny_bert):
    train, validation = write_sentiment_data(tmp_path, 64, 40, neutral_words=(0, 11))  # rows of 1 to 12 words

    def make(training: str = "") -> str:
        path = tmp_path / "varied.yaml"
        path.write_text(textwrap.dedent(f"""
            name: varied
            backbone: {{name: {tiny_bert}}}
            targets: [Wq, Wv]
            method: {{name: lora, r: 4, alpha: 8, dropout: 0.1}}
            task:
              name: classification
              data: {{train: {train}, validation: {validation}}}
              max_length: 16
            training: {{learning_rate: 1e-2, epochs: 3, batch_size: 4, seed: 0, log_every: 1, eval_every: 5,
                        checkpoint_every: 4{training}}}
            """).lstrip())
        return path

    return make


def scores_both_ways(recipe, model_class=None, batch_size: int = 3):
    """``task.evaluate`` of the run's untrained model on each evaluation split through the
    run's DataLoader (length-sorted) and through one in dataset order, both prepared by
    Accelerate: (metrics, outputs) of each."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from lowrank_runner.recipe.load import load_recipe
    from lowrank_runner.train.data import build_dataloaders, clear_data_cache, prepared_data

    run = load_recipe(recipe, [f"training.eval_batch_size={batch_size}"]).runs[0]
    cfg = run.config
    tokenizer = AutoTokenizer.from_pretrained(cfg["backbone"]["name"])
    clear_data_cache()
    task, _, tokenized = prepared_data(cfg, tokenizer)
    model = (model_class or task.model_class).from_pretrained(cfg["backbone"]["name"], **task.model_config_kwargs())
    splits = task.eval_splits()
    _, sorted_dls, _ = build_dataloaders(tokenized, tokenizer, task, cfg["training"], run.seed, "no", splits)
    plain_dls = {s: DataLoader(tokenized[s], batch_size=batch_size, collate_fn=task.collator(tokenizer)) for s in splits}
    accelerator = Accelerator(cpu=True)
    out = []
    for dls in (sorted_dls, plain_dls):
        prepared = {split: accelerator.prepare(dl) for split, dl in dls.items()}
        metrics = {split: task.evaluate(model, dl, accelerator, split) for split, dl in prepared.items()}
        out.append((metrics, json.loads(json.dumps(task.outputs()))))
        if dls is sorted_dls:
            order = evaluation_order(next(iter(prepared.values())))
            assert order is not None and order != sorted(order)  # the sorted batches do reorder the split
    return out


def assert_same_scores(a, b, rel=1e-5):
    assert a.keys() == b.keys()
    for split in a:
        assert a[split].keys() == b[split].keys()
        for key, value in a[split].items():
            if key == "loss" or key == "perplexity":  # sums of floats in another grouping
                assert value == pytest.approx(b[split][key], rel=rel), key
            else:
                assert value == b[split][key], key


def test_classification_scores_the_same_in_sorted_batches(varied_recipe):
    (sorted_scores, _), (plain_scores, _) = scores_both_ways(varied_recipe())
    assert_same_scores(sorted_scores, plain_scores)
    assert 0 < sorted_scores["validation"]["accuracy"] < 1


def test_evaluate_logits_scores_in_dataset_order(varied_recipe, monkeypatch):
    """The labels (and predictions) reach ``compute_metrics`` in dataset order."""
    from lowrank_runner.tasks.local_files import Classification

    seen = []
    original = Classification.compute_metrics

    def spy(self, predictions, labels):
        seen.append(labels.tolist())
        return original(self, predictions, labels)

    monkeypatch.setattr(Classification, "compute_metrics", spy)
    scores_both_ways(varied_recipe())
    assert len(seen) == 2 and seen[0] == seen[1]


def test_squad_scores_the_same_in_sorted_batches(tmp_path, tiny_bert, squad_dir):
    root = squad_dir
    recipe = tmp_path / "squad.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: squad-tiny
        backbone: {{name: {tiny_bert}}}
        targets: [Wq, Wv]
        method: {{name: lora, r: 2, alpha: 4}}
        task: {{name: squad_v2, data_dir: {root}, max_length: 32, doc_stride: 8}}
        training: {{epochs: 1, batch_size: 4, learning_rate: 1e-2}}
        """).lstrip())
    (sorted_scores, sorted_rows), (plain_scores, plain_rows) = scores_both_ways(recipe, batch_size=2)
    assert_same_scores(sorted_scores, plain_scores)
    a, b = sorted_rows["validation"], plain_rows["validation"]
    assert [(r["id"], r["prediction"], r["best_span"]) for r in a] == [(r["id"], r["prediction"], r["best_span"])
                                                                        for r in b]
    assert [r["null_score_diff"] for r in a] == pytest.approx([r["null_score_diff"] for r in b], abs=1e-4)


def test_squad_feature_losses_leave_the_padding_out(tiny_bert):
    """Each feature's loss is the model's own loss on that feature alone (no padding),
    whatever it is batched with."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from lowrank_runner.tasks.squad import QACollator, feature_span_losses

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    torch.manual_seed(0)
    model = AutoModelForQuestionAnswering.from_pretrained(tiny_bert).eval()
    features = [{"input_ids": tokenizer(" ".join(WORDS[:k]))["input_ids"], "start_positions": 2, "end_positions": 3}
                for k in (9, 3, 6)]
    for f in features:
        f["attention_mask"] = [1] * len(f["input_ids"])
    collate = QACollator(tokenizer)
    with torch.no_grad():
        alone = [model(**collate([f])).loss.item() for f in features]
        batch = collate(features)
        out = model(**batch)
        together = feature_span_losses(out.start_logits, out.end_logits, batch)
    assert together.tolist() == pytest.approx(alone, rel=1e-5)
    assert out.loss.item() != pytest.approx(sum(alone) / 3, rel=1e-4)  # the model's own: the padding counts


def test_data_to_text_scores_the_same_in_sorted_batches(tmp_path):
    import transformers

    from tests.conftest import tiny_config
    from tests.test_nlg import tiny_nlg_recipe, tiny_tokenizer

    gpt2 = tmp_path / "tiny-gpt2"
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(tiny_config("gpt2", vocab_size=len(tokenizer), initializer_range=0.5)).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    (sorted_scores, sorted_rows), (plain_scores, plain_rows) = scores_both_ways(tiny_nlg_recipe(gpt2, tmp_path))
    assert_same_scores(sorted_scores, plain_scores)
    assert sorted_rows == plain_rows  # the generations have their own order (by source)


# ---------------------------------------------------------------- group_by_length in a run


@pytest.mark.slow
def test_group_by_length_trains_and_resumes_exactly(varied_recipe, tmp_path):
    grouped = varied_recipe(", group_by_length: true")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    code, output = lrr("run", grouped, "--output", whole)
    assert code == 0, output
    code, output = lrr("run", grouped, "--output", parts, "--stop-after-step", 21)  # in the second epoch (16 steps each)
    assert code == 0 and "stopped" in output, output
    code, output = lrr("run", grouped, "--output", parts, "--resume")
    assert code == 0 and "resuming" in output, output
    assert (parts / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
    saved, resumed = (load_file(str(d / "adapter" / "adapter.safetensors")) for d in (whole, parts))
    assert resumed.keys() == saved.keys() and all(torch.equal(resumed[k], saved[k]) for k in saved)
    # Other batches than a shuffled run's: another training.
    plain = tmp_path / "plain"
    code, output = lrr("run", varied_recipe(), "--output", plain)
    assert code == 0, output
    assert (plain / "metrics.jsonl").read_text() != (whole / "metrics.jsonl").read_text()


def test_group_by_length_is_a_boolean_without_a_default():
    from lowrank_runner.recipe.schema import recipe_schema

    prop = recipe_schema()["$defs"]["training"]["properties"]["group_by_length"]
    assert prop["type"] == "boolean" and "default" not in prop  # no default: shipped recipes keep their hashes
