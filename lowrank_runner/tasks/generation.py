"""Evaluation of a generation task: loss and perplexity over every (source, target) pair
of a split, then one output per distinct source, scored against all its references.

Under several processes: each process scores its share of the pair batches (gathered with
``accelerator.gather_for_metrics``, which drops the samples repeated to even out the last
batch) and decodes every ``num_processes``-th source (under FSDP with the same number of
``generate`` calls on every process and ``synced_gpus``: see :func:`generate`); the
outputs are gathered on every process (``accelerate.utils.gather_object``) and put back
in source order, so every process computes the same scores from the same complete list.
"""

from __future__ import annotations

import math

import torch

from lowrank_runner.tasks.base import IGNORE
from lowrank_runner.tasks.holdout import TEST_PREFIX
from lowrank_runner.tasks.text_metrics import generation_scores


def pair_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed negative log-likelihood of its target tokens, and their count."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return (nll * mask).sum(dim=1), mask.sum(dim=1)


def generation_config(settings: dict, tokenizer, eos_token_id=None):
    """Decoding settings; ``eos_token_id`` (one id or several) stops a sequence, default the tokenizer's eos."""
    from transformers import GenerationConfig

    beams = settings["num_beams"]
    return GenerationConfig(
        max_new_tokens=settings["max_new_tokens"], num_beams=beams, do_sample=False,
        no_repeat_ngram_size=settings["no_repeat_ngram_size"],
        **({"length_penalty": settings["length_penalty"], "early_stopping": True} if beams > 1 else {}),
        pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_token_id or tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )


def is_sharded(model, accelerator) -> bool:
    """Whether the model's parameters are sharded over the processes (FSDP2: Accelerate's
    state says FSDP, or the model is a ``fully_shard`` module): then every forward is a
    collective that every process must run."""
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FSDPModule

    return accelerator.distributed_type == DistributedType.FSDP or isinstance(model, FSDPModule)


def share(prompts: list[list[int]], rank: int, world: int, even: bool) -> list[int | None]:
    """This process's prompt indices: every ``world``-th, shortest first (tight left-padded
    batches); ``even``: padded with ``None`` to the same count on every process (a repeat
    of a prompt, its output dropped), so every process makes the same ``generate`` calls."""
    mine: list[int | None] = sorted(range(rank, len(prompts), world), key=lambda i: len(prompts[i]))
    if even:
        mine += [None] * (-(-len(prompts) // world) - len(mine))
    return mine


def generate(model, prompts: list[list[int]], tokenizer, settings: dict, accelerator, eos_token_id=None) -> list[str]:
    """Decode this process's share of ``prompts``; return every prompt's output, in order
    (``eos_token_id``: the stop tokens, default the tokenizer's eos).

    A sharded model (FSDP) generates through the prepared model itself (its forward
    all-gathers the shards) with ``synced_gpus``: every process makes the same calls and
    keeps running forwards until every process's sequences have stopped."""
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    sharded = world > 1 and is_sharded(model, accelerator)
    mine = share(prompts, rank, world, even=sharded)
    stand_in = next((i for i in mine if i is not None), 0)  # what a padding row decodes
    config = generation_config(settings, tokenizer, eos_token_id)
    decoder = model if sharded else accelerator.unwrap_model(model)
    pad = tokenizer.pad_token_id
    results = []
    for start in range(0, len(mine), settings["batch_size"]):
        chunk = mine[start:start + settings["batch_size"]]
        rows = [prompts[stand_in if i is None else i] for i in chunk]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, prompt in enumerate(rows):  # left padding: every prompt ends where generation starts
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        with torch.no_grad(), accelerator.autocast():
            out = decoder.generate(input_ids=ids.to(accelerator.device), attention_mask=mask.to(accelerator.device),
                                   generation_config=config, synced_gpus=sharded)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        results += [(i, text.strip()) for i, text in zip(chunk, texts) if i is not None]
    gathered = gather_object(results) if world > 1 else results
    by_index = dict(gathered)
    return [by_index[i] for i in range(len(prompts))]


def evaluate_generation(task, model, dataloader, accelerator, split: str) -> dict[str, float]:
    """Loss and perplexity over the split's target tokens (the pairs' sums added exactly,
    so the order the batches ran in does not matter: they run longest first), then the
    outputs of the split's sources in source order, scored against their references."""
    model.eval()
    pair_sums, token_total = [], 0
    with torch.no_grad():
        for batch in dataloader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll, count = accelerator.gather_for_metrics(pair_nll(logits, batch["labels"]))
            pair_sums += nll.tolist()
            token_total += int(count.sum())
    nll_total = math.fsum(pair_sums)
    settings = task.config["generation"]
    # max_sources keeps the evaluations during training cheap; a test set is scored whole
    chosen, n = task.eval_sets[split], None if split.startswith(TEST_PREFIX) else settings.get("max_sources")
    sources, prompts, references = chosen.sources[:n], chosen.prompts[:n], chosen.references[:n]
    outputs = generate(model, prompts, task.tokenizer, settings, accelerator)
    task.latest_outputs[split] = [{"source": s, "output": o, "references": r}
                                  for s, o, r in zip(sources, outputs, references)]
    model.train()
    scoring = task.config["scoring"]
    metrics = generation_scores(outputs, references, tokenize=scoring["tokenize"], lowercase=scoring["lowercase"])
    loss = nll_total / max(token_total, 1)
    metrics.update(loss=loss, perplexity=math.exp(min(loss, 50.0)))
    return metrics
