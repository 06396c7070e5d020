"""Segmentation scores from a confusion matrix (rows: target class, columns: predicted class).

Accumulated on the device by torchmetrics' MulticlassConfusionMatrix (label 255 ignored, summed over
the epoch and across processes), then turned into the scores here — one matrix, every score consistent.
Classes absent from both target and prediction get NaN IoU/F1 and are left out of the means, as
torchmetrics' ``average='macro'`` does. ``mIoU_fg`` leaves out class 0 (background), which weak
features can "win" by predicting background everywhere.
"""
from __future__ import annotations

import torch
from torch import Tensor


def scores_from_confusion(confusion: Tensor) -> dict[str, Tensor]:
    cm = confusion.double()
    tp = cm.diagonal()
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    union = tp + fp + fn
    present = union > 0
    nan = torch.full_like(tp, float("nan"))
    iou = torch.where(present, tp / union.clamp(min=1), nan)
    f1 = torch.where(present, 2 * tp / (2 * tp + fp + fn).clamp(min=1), nan)
    total = cm.sum()
    foreground = present.clone()
    foreground[0] = False  # class 0 is background
    return {
        "mIoU": iou[present].mean() if present.any() else torch.tensor(float("nan"), dtype=cm.dtype),
        "mIoU_fg": iou[foreground].mean() if foreground.any() else torch.tensor(float("nan"), dtype=cm.dtype),
        "per_class_iou": iou,
        "f1": f1[present].mean() if present.any() else torch.tensor(float("nan"), dtype=cm.dtype),
        "pixel_acc": tp.sum() / total if total > 0 else torch.tensor(float("nan"), dtype=cm.dtype),
    }
