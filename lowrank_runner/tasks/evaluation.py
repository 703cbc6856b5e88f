"""Evaluation loops shared by tasks (the training loop calls ``Task.evaluate``)."""

from __future__ import annotations

import torch


def evaluate_logits(task, model, dataloader, accelerator) -> dict[str, float]:
    """Classification/regression scoring: gather logits and labels from every process,
    turn logits into predictions, compute the task's metrics, add the mean loss."""
    model.eval()
    logits_all, labels_all, loss_sum, n = [], [], 0.0, 0
    with torch.no_grad():
        for batch in dataloader:
            out = model(**batch)
            loss_sum += out.loss.float().item() * batch["labels"].shape[0]
            n += batch["labels"].shape[0]
            logits, labels = accelerator.gather_for_metrics((out.logits.float(), batch["labels"]))
            logits_all.append(logits.cpu())
            labels_all.append(labels.cpu())
    model.train()
    logits = torch.cat(logits_all).numpy()
    labels = torch.cat(labels_all).numpy()
    metrics = task.compute_metrics(task.predictions(logits), labels)
    metrics["loss"] = loss_sum / max(n, 1)
    return metrics
