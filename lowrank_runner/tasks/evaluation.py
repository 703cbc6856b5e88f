"""Evaluation loops shared by tasks (the training loop calls ``Task.evaluate``), and the
evaluation order: every split is read in length-sorted batches, longest first
(:class:`LengthSortedOrder`: less padding), and a task whose scoring needs its outputs in
dataset order puts them back with :func:`in_dataset_order`."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler


class LengthSortedOrder(Sampler[int]):
    """An evaluation split's order: its examples by length, longest first (ties in
    dataset order), so each batch pads to lengths close to its own and the largest batch
    comes first. ``order`` is the dataset index of each position.

    Under several processes Accelerate deals the batches out to the processes in turn and
    ``accelerator.gather_for_metrics`` concatenates one step's batches in process order
    (dropping the examples repeated to even out the last step), so the gathered outputs
    come back in this order on every process: :func:`in_dataset_order` undoes it."""

    def __init__(self, lengths):
        lengths = np.asarray(lengths)
        self.order: list[int] = np.argsort(-lengths, kind="stable").tolist()

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        return iter(self.order)


def evaluation_order(dataloader) -> list[int] | None:
    """The dataset index of each output of ``dataloader`` as gathered (its
    :class:`LengthSortedOrder`, found through Accelerate's wrappers), or None when the
    loader reads the dataset in order."""
    pending, seen = [dataloader], set()
    while pending:
        obj = pending.pop(0)
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, LengthSortedOrder):
            return obj.order
        pending += [getattr(obj, name, None) for name in ("batch_sampler", "sampler", "base_dataloader")]
    return None


def in_dataset_order(outputs, dataloader):
    """``outputs`` (a list, a NumPy array or a tensor: one entry per example, as gathered
    from ``dataloader``) in dataset order; unchanged when the loader reads the dataset in
    order. Raises when their number is not the dataset's (a gathering that kept or lost
    examples)."""
    order = evaluation_order(dataloader)
    if order is None:
        return outputs
    if len(outputs) != len(order):
        raise RuntimeError(f"evaluation gathered {len(outputs)} outputs for {len(order)} examples")
    if isinstance(outputs, (np.ndarray, torch.Tensor)):
        inverse = np.empty(len(order), dtype=np.int64)
        inverse[order] = np.arange(len(order))
        return outputs[torch.from_numpy(inverse)] if isinstance(outputs, torch.Tensor) else outputs[inverse]
    restored = [None] * len(order)
    for position, index in enumerate(order):
        restored[index] = outputs[position]
    return restored


def evaluate_logits(task, model, dataloader, accelerator) -> dict[str, float]:
    """Classification/regression scoring: gather logits and labels from every process,
    turn logits into predictions, compute the task's metrics, add the mean loss over
    every process's examples (each example weighted by its batch's mean loss, gathered
    like the logits, so the padding Accelerate adds to the last batches is dropped).
    Predictions and labels are scored in dataset order, whatever order the batches ran in."""
    model.eval()
    logits_all, labels_all, losses_all = [], [], []
    with torch.no_grad():
        for batch in dataloader:
            out = model(**batch)
            per_example = out.loss.float().detach().expand(batch["labels"].shape[0])
            logits, labels, losses = accelerator.gather_for_metrics((out.logits.float(), batch["labels"], per_example))
            logits_all.append(logits.cpu())
            labels_all.append(labels.cpu())
            losses_all.append(losses.cpu())
    model.train()
    logits = in_dataset_order(torch.cat(logits_all).numpy(), dataloader)
    labels = in_dataset_order(torch.cat(labels_all).numpy(), dataloader)
    metrics = task.compute_metrics(task.predictions(logits), labels)
    losses = in_dataset_order(torch.cat(losses_all), dataloader)
    metrics["loss"] = float(losses.mean()) if losses.numel() else 0.0
    return metrics
