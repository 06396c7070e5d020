"""Self-supervised losses as pure functions."""
from __future__ import annotations

import torch
from torch import Tensor


def standardize(z: Tensor, eps: float = 1e-5) -> Tensor:
    """Zero mean, unit (biased) variance per feature over the batch — BatchNorm1d(affine=False) in train mode."""
    mean = z.mean(dim=0)
    var = z.var(dim=0, unbiased=False)
    return (z - mean) / torch.sqrt(var + eps)


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float = 0.0051) -> tuple[Tensor, Tensor]:
    """Barlow Twins loss (Zbontar et al., 2021) and the cross-correlation matrix it is computed from.

    Each view's embeddings (N, D) are standardised over the batch, C = z1ᵀ z2 / N (D, D), and
    loss = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij². Always computed in float32, also under autocast, because
    the D² sum of squares loses the diagonal's signal in bf16.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"expected two (N, D) embeddings of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError("Barlow Twins needs at least 2 samples per batch to standardise over the batch")
    with torch.autocast(device_type=z1.device.type, enabled=False):
        n = z1.shape[0]
        c = standardize(z1.float()).T @ standardize(z2.float()) / n
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
