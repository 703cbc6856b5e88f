"""Evaluation of a generation task: loss and perplexity over every (source, target) pair
of a split, then one output per distinct source, scored against all its references.

Under several processes: each process scores its share of the pair batches (gathered with
``accelerator.gather_for_metrics``, which drops the samples repeated to even out the last
batch) and decodes every ``num_processes``-th source; the outputs are gathered on every
process (``accelerate.utils.gather_object``) and put back in source order, so every
process computes the same scores from the same complete list.
"""

from __future__ import annotations

import math

import torch

from lowrank_runner.tasks.holdout import TEST_PREFIX
from lowrank_runner.tasks.nlg import IGNORE
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


def generate(model, prompts: list[list[int]], tokenizer, settings: dict, accelerator, eos_token_id=None) -> list[str]:
    """Decode this process's share of ``prompts`` (every ``num_processes``-th, shortest
    first for tight left-padded batches); return every prompt's output, in order
    (``eos_token_id``: the stop tokens, default the tokenizer's eos)."""
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    mine = sorted(range(rank, len(prompts), world), key=lambda i: len(prompts[i]))
    config = generation_config(settings, tokenizer, eos_token_id)
    unwrapped = accelerator.unwrap_model(model)
    pad = tokenizer.pad_token_id
    results = []
    for start in range(0, len(mine), settings["batch_size"]):
        chunk = mine[start:start + settings["batch_size"]]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):  # left padding: every prompt ends where generation starts
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        with torch.no_grad(), accelerator.autocast():
            out = unwrapped.generate(input_ids=ids.to(accelerator.device), attention_mask=mask.to(accelerator.device),
                                     generation_config=config)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        results += [(i, text.strip()) for i, text in zip(chunk, texts)]
    gathered = gather_object(results) if world > 1 else results
    by_index = dict(gathered)
    return [by_index[i] for i in range(len(prompts))]


def evaluate_generation(task, model, dataloader, accelerator, split: str) -> dict[str, float]:
    model.eval()
    nll_total, token_total = 0.0, 0
    with torch.no_grad():
        for batch in dataloader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll, count = accelerator.gather_for_metrics(pair_nll(logits, batch["labels"]))
            nll_total += float(nll.sum())
            token_total += int(count.sum())
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
