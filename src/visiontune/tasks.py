"""Single-label and multi-label classification: each one's loss, class weights and metrics.

Single-label: softmax, cross-entropy, accuracy, and from a confusion matrix balanced accuracy,
macro F1 and per-class precision/recall/F1. Multi-label (a CSV with data.label_delim): sigmoid
outputs, BCE, mean average precision (the best epoch's score) and micro/macro F1 at a threshold.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import torch
from torch import nn

log = logging.getLogger("visiontune")

THRESHOLD = 0.5  # predict.threshold's default: a label is predicted where its probability passes it


class MultiLabelLoss(nn.BCEWithLogitsLoss):
    """BCE per label, carrying the threshold above which a label counts as predicted (for F1)."""

    def __init__(self, pos_weight: torch.Tensor | None, threshold: float):
        super().__init__(pos_weight=pos_weight)
        self.threshold = threshold


def criterion(
    multilabel: bool, label_smoothing: float, weights: torch.Tensor | None, threshold: float = THRESHOLD
) -> nn.Module:
    """The training loss: cross-entropy over classes, or BCE per label (weights: each label's pos_weight)."""
    if multilabel:
        return MultiLabelLoss(weights, threshold)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)


def class_weights(labels: Sequence, num_classes: int, multilabel: bool = False) -> torch.Tensor:
    """loss.class_weights=auto from the training split's labels. Single-label: inverse frequency,
    scaled so that a balanced split weighs each class 1 (n / (classes * count), scikit-learn's
    "balanced"). Multi-label: each label's negatives over its positives (BCE's pos_weight)."""
    if multilabel:
        positives = torch.zeros(num_classes)
        for label in labels:
            positives[list(label)] += 1
        return (len(labels) - positives) / positives.clamp(min=1)
    counts = torch.bincount(torch.as_tensor(labels), minlength=num_classes).double()
    return (len(labels) / (num_classes * counts.clamp(min=1))).float()


def confusion(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(classes x classes) counts, rows the true class, columns the predicted one."""
    index = labels.long() * num_classes + logits.argmax(dim=1)
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def confusion_metrics(counts: torch.Tensor, classes: Sequence[str]) -> dict[str, float]:
    """acc, balanced_acc (mean recall over classes with images), macro_f1, and per class precision,
    recall and f1 (classes without images or predictions left out of what is undefined)."""
    counts = counts.double()
    hits, true, predicted = counts.diag(), counts.sum(dim=1), counts.sum(dim=0)
    recall = hits / true.clamp(min=1)
    precision = hits / predicted.clamp(min=1)
    f1 = 2 * hits / (true + predicted).clamp(min=1)
    present = true > 0
    metrics = {
        "acc": float(hits.sum() / counts.sum().clamp(min=1)),
        "balanced_acc": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
    }
    for i, name in enumerate(re.sub(r"[^\w\-./ ]", "_", name) for name in classes):  # MLflow's key characters
        if present[i]:
            metrics |= {f"recall_{name}": float(recall[i]), f"f1_{name}": float(f1[i])}
        if predicted[i] > 0:
            metrics[f"precision_{name}"] = float(precision[i])
    return metrics


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each label's average precision (scikit-learn's, without interpolation); nan where a label
    has no positives."""
    order = scores.argsort(dim=0, descending=True)
    hits = targets.gather(0, order).double()
    precision_at = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.double).unsqueeze(1)
    positives = hits.sum(0)
    return torch.where(positives > 0, (precision_at * hits).sum(0) / positives.clamp(min=1), torch.nan)


def multilabel_metrics(scores: torch.Tensor, targets: torch.Tensor, threshold: float) -> dict[str, float]:
    """mAP over the labels with positives, and micro and macro F1 of the labels above `threshold`."""
    ap = average_precision(scores, targets)
    predicted = (scores >= threshold).double()
    targets = targets.double()
    tp, fp, fn = (
        (predicted * targets).sum(0),
        (predicted * (1 - targets)).sum(0),
        ((1 - predicted) * targets).sum(0),
    )
    micro = 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp(min=1)
    macro = (2 * tp / (2 * tp + fp + fn).clamp(min=1))[targets.sum(0) > 0]
    return {
        "mAP": float(ap[~ap.isnan()].mean()) if (~ap.isnan()).any() else 0.0,
        "micro_f1": float(micro),
        "macro_f1": float(macro.mean()) if len(macro) else 0.0,
    }


@torch.inference_mode()
def score(module: nn.Module, loader, loss_fn: nn.Module, runtime, classes: Sequence[str], multilabel=False):
    """One pass over a held-out split with `module` as it is (the best weights, at the end of a run):
    (metrics: loss, acc or mAP, ...; the confusion matrix, None for multi-label). In float32, without
    autocast: as the logged model predicts, so visiontune-evaluate on the same files agrees."""
    from visiontune import distributed

    module.eval()
    n = len(classes)
    counts = torch.zeros(n, n, dtype=torch.int64)
    loss, images, kept = 0.0, 0, []
    for batch, labels in loader:
        batch, labels = runtime.inputs(batch, labels)
        logits = module(batch).float()
        loss += float(loss_fn(logits, labels)) * labels.shape[0]
        images += labels.shape[0]
        if multilabel:
            kept.append((torch.sigmoid(logits.float()).cpu(), labels.cpu()))
        else:
            counts += confusion(logits.float(), labels, n).cpu()
    totals = distributed.sum_over_ranks([loss, images, *counts.flatten().tolist()], runtime.device)
    loss, images = totals[0] / max(totals[1], 1), totals[1]
    if multilabel:
        scores, targets = (torch.cat(part) for part in zip(*kept, strict=True))
        metrics = multilabel_metrics(scores, targets, getattr(loss_fn, "threshold", THRESHOLD))
        return {"loss": loss, "images": images} | metrics, None
    counts = torch.tensor(totals[2:], dtype=torch.int64).reshape(n, n)
    return {"loss": loss, "images": images} | confusion_metrics(counts, classes), counts
