"""Evaluation loops shared by tasks (the training loop calls ``Task.evaluate``)."""

from __future__ import annotations

import torch


def evaluate_logits(task, model, dataloader, accelerator) -> dict[str, float]:
    """Classification/regression scoring: gather logits and labels from every process,
    turn logits into predictions, compute the task's metrics, add the mean loss over
    every process's examples (each example weighted by its batch's mean loss, gathered
    like the logits, so the padding Accelerate adds to the last batches is dropped)."""
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
    logits = torch.cat(logits_all).numpy()
    labels = torch.cat(labels_all).numpy()
    metrics = task.compute_metrics(task.predictions(logits), labels)
    losses = torch.cat(losses_all)
    metrics["loss"] = float(losses.mean()) if losses.numel() else 0.0
    return metrics
