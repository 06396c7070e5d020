"""Losses: Barlow Twins, VICReg and DINO (pure functions) and the segmentation losses (small modules)."""
from __future__ import annotations

from typing import Optional, Sequence

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
                      weight: Optional[Tensor] = None, check_weight: bool = True) -> tuple[Tensor, Tensor]:
    """Barlow Twins loss (Zbontar et al., 2021) and the cross-correlation matrix it is computed from.

    Each view's embeddings (N, D) are standardised over the batch, C = z1ᵀ z2 / N (D, D), and
    loss = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij². Always computed in float32, also under autocast, because
    the D² sum of squares loses the diagonal's signal in bf16.

    ``weight`` (N,): non-negative per-sample weights for the standardisation and the mean over the batch (the
    dense term gives points of non-overlapping crops weight 0). Fewer than 2 samples of positive weight
    raise ValueError, as a batch of fewer than 2 samples does: nothing can be standardised, and the loss
    would be D whatever the embeddings (C = 0), with no gradient. Checking costs one host sync:
    ``check_weight=False`` skips it (a training step that checked its first batch; such a batch then
    contributes the constant D, no gradient, instead of stopping the run).
    """
    loss, c, _, _ = barlow_twins_terms(z1, z2, lambd, weight, check_weight)
    return loss, c


def barlow_twins_terms(z1: Tensor, z2: Tensor, lambd: float = 0.0051, weight: Optional[Tensor] = None,
                       check_weight: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`barlow_twins_loss` with its two sums: (loss, C, Σ_i (1 − C_ii)², Σ_{i≠j} C_ij²), the sums
    being the very tensors the loss adds (a training step logs them without computing them again)."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"expected two (N, D) embeddings of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError("Barlow Twins needs at least 2 samples per batch to standardise over the batch")
    if weight is not None:
        if weight.shape != (z1.shape[0],):
            raise ValueError(f"weight must be ({z1.shape[0]},), one per sample, got {tuple(weight.shape)}")
        if check_weight:
            positive = int((weight > 0).sum())
            if positive < 2:
                raise ValueError(f"Barlow Twins needs at least 2 samples of positive weight to standardise over "
                                 f"the batch; {positive} of the {z1.shape[0]} weights are > 0")
    with torch.autocast(device_type=z1.device.type, enabled=False):
        if weight is None:
            c = standardize(z1.float()).T @ standardize(z2.float()) / z1.shape[0]
        else:
            w = weight.float()
            a, b = standardize(z1.float(), weight=w), standardize(z2.float(), weight=w)
            c = (a * (w / w.sum().clamp_min(1e-12))[:, None]).T @ b
        on_diag, off_diag = cross_correlation_terms(c)
        loss = on_diag + lambd * off_diag
    return loss, c, on_diag, off_diag


def cross_correlation_terms(c: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_i (1 − C_ii)², Σ_{i≠j} C_ij²) of a square cross-correlation matrix.

    The off-diagonal entries are read through a strided view (no D² mask, and no cancellation error from
    subtracting the diagonal from the full sum)."""
    d = c.shape[0]
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.flatten()[:-1].view(d - 1, d + 1)[:, 1:].pow(2).sum()
    return on_diag, off_diag


# ----------------------------------------------------------------------------------------------- VICReg
VICREG_VAR_EPS = 1e-4
"""The official ``torch.sqrt(x.var(dim=0) + 0.0001)``."""


def vicreg_loss(z1: Tensor, z2: Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0) -> Tensor:
    """VICReg loss (Bardes et al., 2022; facebookresearch/vicreg ``main_vicreg.py``, ``VICReg.forward``) of the
    two views' embeddings (N, D), for one process (see :func:`vicreg_terms`)."""
    return vicreg_terms(z1, z2, sim_coeff, std_coeff, cov_coeff)[0]


def vicreg_terms(z1: Tensor, z2: Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                 cov_coeff: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, invariance, variance, covariance): the loss and its three unweighted terms, the tensors the loss
    adds (a training step logs them without computing them again).

    * invariance: the mean squared difference of z1 and z2 (``F.mse_loss``);
    * variance: for each view, the mean over dimensions of relu(1 − sqrt(var + 1e-4)) (unbiased variance
      over the batch), averaged over the two views;
    * covariance: for each view, the sum of the squared off-diagonal entries of the covariance matrix
      (centred embeddings, divided by N − 1) divided by D, summed over the two views;
    * loss = sim_coeff · invariance + std_coeff · variance + cov_coeff · covariance.

    The official code computes the invariance on each process's own batch and the other two terms on the batch
    gathered from every process; called with the global batch (as lightningmodules/vicreg.py does, gathering
    with gradients) the loss is the one-process loss on the concatenated batch and the gradients are the
    official ones. Always computed in float32 (also under autocast): the D² covariance sums lose precision
    in bf16.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"expected two (N, D) embeddings of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError("VICReg needs at least 2 samples per batch for its variance and covariance terms")
    n, d = z1.shape
    with torch.autocast(device_type=z1.device.type, enabled=False):
        x, y = z1.float(), z2.float()
        invariance = F.mse_loss(x, y)
        x, y = x - x.mean(dim=0), y - y.mean(dim=0)
        std_x, std_y = torch.sqrt(x.var(dim=0) + VICREG_VAR_EPS), torch.sqrt(y.var(dim=0) + VICREG_VAR_EPS)
        variance = F.relu(1 - std_x).mean() / 2 + F.relu(1 - std_y).mean() / 2
        _, off_x = cross_correlation_terms(x.T @ x / (n - 1))
        _, off_y = cross_correlation_terms(y.T @ y / (n - 1))
        covariance = off_x / d + off_y / d
        loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return loss, invariance, variance, covariance


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


# ----------------------------------------------------------------------------------------------- DINO
def dino_teacher_probs(teacher_logits: Sequence[Tensor], center: Tensor, teacher_temp: float) -> list[Tensor]:
    """DINO's teacher targets: centred and sharpened softmax ``softmax((t − center) / teacher_temp)`` of each
    global view's logits (B, K), in float32 and detached (no gradient flows through the teacher)."""
    with torch.no_grad(), torch.autocast(device_type=center.device.type, enabled=False):
        return [F.softmax((t.float() - center.float()) / teacher_temp, dim=-1) for t in teacher_logits]


def _sum_views(probs: list[Tensor]) -> Tensor:
    return probs[0] if len(probs) == 1 else torch.stack(probs).sum(dim=0)


def dino_cross_entropy(student_logits: Sequence[Tensor], teacher_probs: Sequence[Tensor], student_temp: float) -> Tensor:
    """Mean over the (teacher view i, student view v ≠ i) pairs of the batch-mean cross-entropy
    −Σ_k q_i,k · log_softmax(s_v / student_temp)_k; views are matched by position (global views first).

    Computed as Σ_v (Σ_{i ≠ v} q_i) · log p_v: each student log-softmax is multiplied once by the sum of
    the teacher targets it is compared with, instead of once per pair (the official loop); the terms are
    the same, summed in another order (float32 rounding only)."""
    n_student, n_teacher = len(student_logits), len(teacher_probs)
    if n_teacher < 1:
        raise ValueError("DINO needs at least one teacher (global) view")
    pairs = n_teacher * n_student - min(n_teacher, n_student)
    if pairs < 1:
        raise ValueError(f"DINO needs a (teacher view, other student view) pair: got {n_teacher} teacher and "
                         f"{n_student} student views")
    shape = teacher_probs[0].shape
    for name, views in (("student_logits", student_logits), ("teacher_probs", teacher_probs)):
        for i, view in enumerate(views):
            if view.ndim != 2 or view.shape != shape:
                raise ValueError(f"dino loss: {name}[{i}] is {tuple(view.shape)}; every view must be (B, K) = "
                                 f"{tuple(shape)}")
    with torch.autocast(device_type=teacher_probs[0].device.type, enabled=False):
        all_teachers = _sum_views(list(teacher_probs))
        total = teacher_probs[0].new_zeros(())
        for v, logits in enumerate(student_logits):
            if v < n_teacher:  # summed afresh, not all_teachers − q_v: no cancellation where q_v dominates
                others = [q for i, q in enumerate(teacher_probs) if i != v]
                if not others:
                    continue
                targets = _sum_views(others)
            else:
                targets = all_teachers
            log_p = F.log_softmax(logits.float() / student_temp, dim=-1)
            total = total - (targets * log_p).sum(dim=-1).mean()
        return total / pairs


def dino_loss(student_logits: Sequence[Tensor], teacher_logits: Sequence[Tensor], center: Tensor,
              student_temp: float, teacher_temp: float, return_targets: bool = False):
    """DINO's self-distillation loss (Caron et al., 2021; facebookresearch/dino ``DINOLoss.forward``).

    ``student_logits``: one (B, K) tensor per view, the global views first; ``teacher_logits``: one (B, K)
    tensor per global view (the teacher sees those only); ``center`` (1, K) or (K,). The loss is the mean
    over all (teacher view i, student view v ≠ i) pairs of the batch-mean cross-entropy between
    softmax((t_i − center) / teacher_temp) and log_softmax(s_v / student_temp). The teacher side carries no
    gradient. Always computed in float32 (also under autocast). The center is not updated here: that is the
    caller's job, after the loss, with the teacher logits of the global batch (see lightningmodules/dino.py).
    ``return_targets=True``: (loss, the teacher targets of :func:`dino_teacher_probs`), for the caller's
    entropy diagnostics.
    """
    targets = dino_teacher_probs(teacher_logits, center, teacher_temp)
    loss = dino_cross_entropy(student_logits, targets, student_temp)
    return (loss, targets) if return_targets else loss


def dino_teacher_entropies(teacher_probs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(sum over samples of the entropy H(q) of each teacher distribution, sum over samples of q (K,)), for
    DINO's collapse monitor: the mean entropy is the first / n, the entropy of the mean output is H(second / n).
    Sums, so that they can be added up across devices before dividing. Natural logarithms."""
    q = torch.cat(list(teacher_probs))
    return torch.special.entr(q).sum(), q.sum(dim=0)
