"""Barlow Twins loss against references built by hand (explicit loops, closed forms)."""
from __future__ import annotations

import math

import pytest
import torch

from models.losses import barlow_twins_loss, cross_correlation_terms, standardize

EPS = 1e-5  # the standardisation eps the loss documents (BatchNorm1d's default)


def loop_standardize(z: list[list[float]]) -> list[list[float]]:
    """Per-feature (column) standardisation over the batch with the biased variance, in plain Python."""
    n, d = len(z), len(z[0])
    out = [[0.0] * d for _ in range(n)]
    for j in range(d):
        mean = sum(z[i][j] for i in range(n)) / n
        var = sum((z[i][j] - mean) ** 2 for i in range(n)) / n
        for i in range(n):
            out[i][j] = (z[i][j] - mean) / math.sqrt(var + EPS)
    return out


def loop_reference(z1: torch.Tensor, z2: torch.Tensor, lambd: float):
    """(loss, C, on, off) from explicit loops over samples and feature pairs, in float64 Python."""
    a, b = loop_standardize(z1.double().tolist()), loop_standardize(z2.double().tolist())
    n, d = len(a), len(a[0])
    c = [[sum(a[k][i] * b[k][j] for k in range(n)) / n for j in range(d)] for i in range(d)]
    on = sum((1.0 - c[i][i]) ** 2 for i in range(d))
    off = sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    return on + lambd * off, c, on, off


def test_loss_matches_explicit_loops():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 4, generator=g) * torch.tensor([1.0, 3.0, 0.5, 2.0]) + torch.tensor([0.0, 1.0, -2.0, 5.0])
    z2 = 0.6 * z1 + 0.8 * torch.randn(6, 4, generator=g)
    lambd = 0.37  # not the default, so a hard-coded λ would be caught
    loss, c = barlow_twins_loss(z1, z2, lambd)
    ref_loss, ref_c, ref_on, ref_off = loop_reference(z1, z2, lambd)

    assert c.shape == (4, 4)
    torch.testing.assert_close(c.double(), torch.tensor(ref_c, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    on, off = cross_correlation_terms(c)
    assert on.item() == pytest.approx(ref_on, rel=1e-5)
    assert off.item() == pytest.approx(ref_off, rel=1e-5)
    # The views are strongly but not perfectly correlated: both terms are far from zero.
    assert ref_on > 1e-2 and ref_off > 1e-2


def test_standardize_matches_loops():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 4, generator=g) * 4 + 2
    ref = torch.tensor(loop_standardize(z.double().tolist()), dtype=torch.float64)
    torch.testing.assert_close(standardize(z).double(), ref, rtol=1e-5, atol=1e-6)


def test_cross_correlation_terms_by_loops_including_non_contiguous():
    g = torch.Generator().manual_seed(2)
    for d in (1, 2, 3, 5):
        c = torch.randn(d, d, generator=g, dtype=torch.float64)
        on_ref = sum((1.0 - c[i, i].item()) ** 2 for i in range(d))
        off_ref = sum(c[i, j].item() ** 2 for i in range(d) for j in range(d) if i != j)
        for m in (c, c.T):  # c.T is a non-contiguous view
            on, off = cross_correlation_terms(m)
            assert on.item() == pytest.approx(on_ref, rel=1e-12)
            assert off.item() == pytest.approx(off_ref, rel=1e-12, abs=1e-15)


def decorrelated(n: int, d: int, seed: int) -> torch.Tensor:
    """Zero-mean features with identity (biased) covariance: z = sqrt(N)·Q from QR of centred noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(dim=0))  # columns orthonormal and orthogonal to the ones vector
    z = q * math.sqrt(n)
    torch.testing.assert_close(z.mean(dim=0), torch.zeros(d, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(z.T @ z / n, torch.eye(d, dtype=torch.float64), atol=1e-12, rtol=0)
    return z


def test_identical_decorrelated_views_give_only_the_eps_term():
    n, d = 16, 8
    z = decorrelated(n, d, seed=3).float()
    loss, c = barlow_twins_loss(z, z.clone(), lambd=0.0051)
    # Standardising unit-variance features divides by sqrt(1 + eps): C = I / (1 + eps), so the loss is
    # D·(eps / (1 + eps))² ≈ 8e-10 and the off-diagonal term vanishes.
    expected = d * (EPS / (1 + EPS)) ** 2
    torch.testing.assert_close(c.double(), torch.eye(d, dtype=torch.float64) / (1 + EPS), atol=2e-7, rtol=0)
    assert loss.item() == pytest.approx(expected, rel=0.25, abs=1e-11)
    assert loss.item() < 1e-8

    # With a small feature variance s² the eps term becomes large and exactly predictable:
    # C_ii = s² / (s² + eps).
    s2 = 1e-4
    z_small = (z.double() * math.sqrt(s2)).float()
    loss_small, c_small = barlow_twins_loss(z_small, z_small.clone(), lambd=0.0051)
    diag = s2 / (s2 + EPS)
    torch.testing.assert_close(torch.diagonal(c_small).double(), torch.full((d,), diag, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    assert loss_small.item() == pytest.approx(d * (1 - diag) ** 2, rel=1e-3)


def correlated_views(seed: int, n: int = 32, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g)
    z2 = z1 + 0.3 * torch.randn(n, d, generator=g)
    return z1, z2


def test_invariant_to_per_feature_positive_affine_rescaling():
    z1, z2 = correlated_views(4)
    loss, c = barlow_twins_loss(z1, z2)
    scale = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.25, 7.0])
    shift = torch.tensor([1.0, -3.0, 0.0, 10.0, 2.0, -0.5])
    loss_scaled, c_scaled = barlow_twins_loss(z1, z2 * scale + shift)
    # Only the eps term can differ: each C_ij moves by about C_ij·eps/(2·var) ≤ 1e-4 (var ≥ 0.06 after the
    # 0.25 scale), so the loss (≈ 0.015, and > 1 once a feature is permuted) moves by far less than 5e-5.
    assert loss_scaled.item() == pytest.approx(loss.item(), rel=0, abs=5e-5)
    assert not torch.equal(z2 * scale + shift, z2)
    torch.testing.assert_close(c_scaled, c, atol=1e-4, rtol=0)


def test_changes_when_a_feature_is_permuted_in_one_view():
    z1, z2 = correlated_views(5)
    loss, _ = barlow_twins_loss(z1, z2)
    assert loss.item() < 1.0  # correlated views: diagonal near 1
    # Swap two feature columns of one view: two diagonal entries drop to ~0.
    z2_swapped = z2[:, [1, 0, 2, 3, 4, 5]]
    loss_swapped, c_swapped = barlow_twins_loss(z1, z2_swapped)
    assert loss_swapped.item() > loss.item() + 1.0
    assert c_swapped[0, 1].item() > 0.8 and abs(c_swapped[0, 0].item()) < 0.5
    # Shuffle the samples of one feature of one view: that feature decorrelates.
    z2_shuffled = z2.clone()
    z2_shuffled[:, 2] = z2[torch.randperm(z2.shape[0], generator=torch.Generator().manual_seed(0)), 2]
    loss_shuffled, _ = barlow_twins_loss(z1, z2_shuffled)
    assert loss_shuffled.item() > loss.item() + 0.3


def test_bf16_autocast_gradient_is_finite_float32_and_close_to_float32_gradient():
    torch.manual_seed(6)
    layer = torch.nn.Linear(16, 8)
    x1, x2 = torch.randn(64, 16), torch.randn(64, 16)
    x2 = 0.7 * x1 + 0.7 * x2

    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = layer(x1), layer(x2)
        assert z1.dtype == torch.bfloat16
        loss_bf16, c_bf16 = barlow_twins_loss(z1, z2)
    assert loss_bf16.dtype == torch.float32 and c_bf16.dtype == torch.float32
    (grad_bf16,) = torch.autograd.grad(loss_bf16, layer.weight)

    loss_fp32, _ = barlow_twins_loss(layer(x1), layer(x2))
    (grad_fp32,) = torch.autograd.grad(loss_fp32, layer.weight)

    assert torch.isfinite(grad_bf16).all()
    assert grad_fp32.norm() > 1e-3
    rel = (grad_bf16 - grad_fp32).norm() / grad_fp32.norm()
    assert rel < 0.05, rel
    assert loss_bf16.item() == pytest.approx(loss_fp32.item(), rel=0.02)


@pytest.mark.parametrize(
    "shape1, shape2",
    [((6, 4), (6, 5)), ((6, 4), (5, 4)), ((6,), (6,)), ((2, 3, 4), (2, 3, 4))],
)
def test_mismatched_or_non_2d_shapes_raise(shape1, shape2):
    with pytest.raises(ValueError):
        barlow_twins_loss(torch.randn(*shape1), torch.randn(*shape2))


def test_batch_of_one_raises():
    with pytest.raises(ValueError, match="at least 2"):
        barlow_twins_loss(torch.randn(1, 4), torch.randn(1, 4))
    loss, _ = barlow_twins_loss(torch.randn(2, 4), torch.randn(2, 4))  # 2 is the minimum that works
    assert torch.isfinite(loss)


def test_weights_select_samples_and_fewer_than_two_positive_weights_raise():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    # weight 0 drops a sample: the loss of the weighted batch is the plain loss of the kept rows
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    rows = keep.bool()
    loss, c = barlow_twins_loss(z1, z2, 0.01, weight=keep)
    want, want_c, _, _ = loop_reference(z1[rows], z2[rows], 0.01)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(c.double(), torch.tensor(want_c, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    # all weights 0 used to return D (= 4, C = 0) whatever the embeddings: now an error, as a batch of one is
    for weight, positive in ((torch.zeros(6), 0), (torch.tensor([0.0, 0, 0, 2, 0, 0]), 1)):
        with pytest.raises(ValueError, match=f"at least 2 samples of positive weight.*{positive} of the 6 weights"):
            barlow_twins_loss(z1, z2, weight=weight)
    with pytest.raises(ValueError, match=r"weight must be \(6,\)"):
        barlow_twins_loss(z1, z2, weight=torch.ones(5))
