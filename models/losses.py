"""Losses: Barlow Twins (a pure function) and the segmentation losses (small modules)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def standardize(z: Tensor, eps: float = 1e-5, weight: Optional[Tensor] = None) -> Tensor:
    """Zero mean, unit (biased) variance per feature over the batch — BatchNorm1d(affine=False) in train mode.
    ``weight`` (N,): a weighted mean and variance, rows of weight 0 do not count."""
    if weight is None:
        mean = z.mean(dim=0)
        var = z.var(dim=0, unbiased=False)
    else:
        w = weight[:, None] / weight.sum().clamp_min(1e-12)
        mean = (w * z).sum(dim=0)
        var = (w * (z - mean).pow(2)).sum(dim=0)
    return (z - mean) / torch.sqrt(var + eps)


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float = 0.0051,
                      weight: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Barlow Twins loss (Zbontar et al., 2021) and the cross-correlation matrix it is computed from.

    Each view's embeddings (N, D) are standardised over the batch, C = z1ᵀ z2 / N (D, D), and
    loss = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij². Always computed in float32, also under autocast, because
    the D² sum of squares loses the diagonal's signal in bf16.

    ``weight`` (N,): non-negative per-sample weights for the standardisation and the mean over the batch (the
    dense term gives points of non-overlapping crops weight 0). Fewer than 2 samples of positive weight
    raise ValueError, as a batch of fewer than 2 samples does: nothing can be standardised, and the loss
    would be D whatever the embeddings (C = 0), with no gradient. Checking costs one host sync.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"expected two (N, D) embeddings of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError("Barlow Twins needs at least 2 samples per batch to standardise over the batch")
    if weight is not None:
        if weight.shape != (z1.shape[0],):
            raise ValueError(f"weight must be ({z1.shape[0]},), one per sample, got {tuple(weight.shape)}")
        positive = int((weight > 0).sum())
        if positive < 2:
            raise ValueError(f"Barlow Twins needs at least 2 samples of positive weight to standardise over the "
                             f"batch; {positive} of the {z1.shape[0]} weights are > 0")
    with torch.autocast(device_type=z1.device.type, enabled=False):
        if weight is None:
            c = standardize(z1.float()).T @ standardize(z2.float()) / z1.shape[0]
        else:
            w = weight.float()
            a, b = standardize(z1.float(), weight=w), standardize(z2.float(), weight=w)
            c = (a * (w / w.sum().clamp_min(1e-12))[:, None]).T @ b
        on_diag, off_diag = cross_correlation_terms(c)
        loss = on_diag + lambd * off_diag
    return loss, c


def cross_correlation_terms(c: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_i (1 − C_ii)², Σ_{i≠j} C_ij²) of a square cross-correlation matrix.

    The off-diagonal entries are read through a strided view (no D² mask, and no cancellation error from
    subtracting the diagonal from the full sum)."""
    d = c.shape[0]
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.flatten()[:-1].view(d - 1, d + 1)[:, 1:].pow(2).sum()
    return on_diag, off_diag


# ----------------------------------------------------------------------------------------- segmentation
class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): cross-entropy scaled by (1 − p_t)^γ, averaged over labelled pixels."""

    def __init__(self, gamma: float = 2.0, ignore_index: int = 255, weight: Tensor | None = None):
        super().__init__()
        self.gamma, self.ignore_index = gamma, ignore_index
        self.register_buffer("weight", weight)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        ce = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="none")
        valid = target != self.ignore_index
        pt = torch.exp(-ce)  # probability of the true class (unweighted)
        focal = (1 - pt).pow(self.gamma) * ce
        if self.weight is None:
            return focal[valid].sum() / valid.sum().clamp(min=1)
        w = self.weight[target.masked_fill(~valid, 0)] * valid
        return (w * focal).sum() / w.sum().clamp(min=1e-12)


class DiceLoss(nn.Module):
    """Soft multiclass Dice loss: 1 − mean over classes of (2|P∩G| + s) / (|P| + |G| + s), on softmax
    probabilities, ignored pixels excluded from every sum."""

    def __init__(self, num_classes: int, ignore_index: int = 255, smooth: float = 1.0):
        super().__init__()
        self.num_classes, self.ignore_index, self.smooth = num_classes, ignore_index, smooth

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        probs = logits.float().softmax(dim=1)
        valid = (target != self.ignore_index).unsqueeze(1)
        onehot = F.one_hot(target.masked_fill(~valid.squeeze(1), 0), self.num_classes).permute(0, 3, 1, 2)
        probs, onehot = probs * valid, onehot * valid
        dims = (0, 2, 3)
        intersection = (probs * onehot).sum(dims)
        total = probs.sum(dims) + onehot.sum(dims)
        return 1 - ((2 * intersection + self.smooth) / (total + self.smooth)).mean()


def segmentation_loss(name: str, num_classes: int, ignore_index: int = 255, focal_gamma: float = 2.0,
                      weight: Tensor | None = None) -> nn.Module:
    """``weight``: per-class weights (cross-entropy and focal; Dice is balanced by construction)."""
    if name == "ce":
        return nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)
    if name == "dice":
        return DiceLoss(num_classes, ignore_index)
    if name == "focal":
        return FocalLoss(focal_gamma, ignore_index, weight)
    raise ValueError(f"unknown segmentation loss {name!r}; valid: ce, dice, focal")


def median_frequency_weights(pixel_counts: Tensor) -> Tensor:
    """Median frequency balancing (Eigen & Fergus, 2015): w_c = median(f) / f_c over classes present;
    absent classes get weight 0 (they never appear as a target)."""
    freq = pixel_counts.double() / pixel_counts.sum().clamp(min=1)
    present = freq > 0
    weights = torch.zeros_like(freq)
    weights[present] = freq[present].median() / freq[present]
    return weights.float()
