"""Token-level losses (task ``chat``, the data-to-text tasks) are normalised by the label
tokens of the whole optimizer step (``Task.loss_items``, ``num_items``), so a run that
splits ``training.batch_size`` into accumulation steps trains and logs exactly as the
full-batch run (transformers' ``num_items_in_batch``)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.tasks.base import shifted_label_count, shifted_token_loss
from tests.test_chat import OWN_TEMPLATE, save_tiny_llama, write_jsonl

IGNORE = -100


def test_micro_batch_shares_of_uneven_token_counts_add_up_to_the_full_batch_mean():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 11)
    labels = torch.randint(0, 11, (4, 6))
    labels[0, :5] = IGNORE  # 1 scored token in row 0, 5 in the others
    labels[:, 0] = IGNORE
    micro = [slice(0, 1), slice(1, 4)]  # 1 and 15 scored tokens
    total = sum(shifted_label_count(labels[m]) for m in micro)
    assert total == shifted_label_count(labels) == 16
    full = shifted_token_loss(logits, labels, None)
    shares = sum(shifted_token_loss(logits[m], labels[m], total) for m in micro)
    torch.testing.assert_close(shares, full, rtol=1e-6, atol=0)
    mean_of_means = sum(shifted_token_loss(logits[m], labels[m], None) for m in micro) / len(micro)
    assert abs(float(mean_of_means - full)) > 1e-3  # what the loop did before: not the batch's token mean
    smoothed = sum(shifted_token_loss(logits[m], labels[m], total, smoothing=0.1) for m in micro)
    torch.testing.assert_close(smoothed, shifted_token_loss(logits, labels, None, smoothing=0.1), rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def chat_recipe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("token-loss")
    llama = save_tiny_llama(tmp / "llama", OWN_TEMPLATE)
    replies = ["i loved it", "it was awful and the room was very good", "good", "the food was good and i loved it"]
    rows = [{"instruction": f"the movie {i}", "output": replies[i % 4] + " very" * (i % 3)} for i in range(8)]
    train, valid = write_jsonl(tmp / "train.jsonl", rows), write_jsonl(tmp / "valid.jsonl", rows[:2])
    recipe = tmp / "chat.yaml"
    recipe.write_text(f"""
name: tiny-chat-token-loss
backbone: {{name: {llama}, dtype: float32}}
targets: [Wq, Wv]
method: {{name: lora, r: 2, alpha: 4}}
task: {{name: chat, data: {{train: {train}, validation: {valid}}}, max_length: 32, samples: 0}}
training: {{learning_rate: 5e-2, epochs: 1, batch_size: 4, seed: 0, log_every: 1, mixed_precision: "no"}}
""")
    return recipe, tmp


def _run(recipe, out, per_device):
    result = CliRunner().invoke(app, ["run", str(recipe), "--output", str(out),
                                      "--set", f"training.per_device_batch_size={per_device}"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "lr" in line]  # the training lines
    return losses, load_file(str(out / "adapter" / "adapter.safetensors"))


def test_accumulation_steps_train_and_log_as_the_full_batch(chat_recipe):
    recipe, tmp = chat_recipe
    full_losses, full_adapter = _run(recipe, tmp / "full", 4)
    assert len(full_losses) == 2  # 8 examples, batch 4
    for per_device in (2, 1):
        losses, adapter = _run(recipe, tmp / f"split{per_device}", per_device)
        assert losses == pytest.approx(full_losses, rel=1e-5)
        assert adapter.keys() == full_adapter.keys()
        for name, tensor in full_adapter.items():  # relative to the tensor's norm (summation order differs)
            assert float((adapter[name] - tensor).norm() / tensor.norm()) < 1e-5, name
