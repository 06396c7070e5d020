"""Dense Barlow Twins: a Barlow Twins loss between patch tokens of the two views that see the same
image region.

Global (image-level) Barlow Twins gives the patch tokens no direct signal. The dense term samples points
in the part of the original image that both views' crops cover, reads both views' patch-token grids
there (bilinear interpolation), projects them with their own projector and applies the Barlow Twins loss
over all sampled points of the batch: a token must agree with the token of the other view at the same
image location, and the dimensions must stay decorrelated.

Geometry convention (datamodules.transforms.crop_geometry): per view a float (5,) row
``(y0, x0, y1, x1, flipped)``, the crop box in the original image's coordinates normalised to [0, 1]
and whether the crop was flipped horizontally afterwards. A view's normalised position (u, v) ∈ [0, 1]²
shows the original point y = y0 + u (y1 − y0), x = x0 + v' (x1 − x0) with v' = 1 − v when flipped.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.losses import barlow_twins_terms
from models.projector import Projector


def overlap_boxes(g1: Tensor, g2: Tensor) -> tuple[Tensor, Tensor]:
    """The intersection (B, 4) of the two crop boxes as (y0, x0, y1, x1), and whether it is non-empty (B,)."""
    lo = torch.maximum(g1[:, :2], g2[:, :2])
    hi = torch.minimum(g1[:, 2:4], g2[:, 2:4])
    return torch.cat([lo, hi], dim=1), (hi > lo).all(dim=1)


def original_to_view(points: Tensor, geometry: Tensor) -> Tensor:
    """Original-image points (B, K, 2) as (y, x) in [0, 1] → ``grid_sample`` coordinates (B, K, 2) of one
    view, ordered (x, y) in [−1, 1] (align_corners=False: −1 and 1 are the outer pixel edges)."""
    y0, x0, y1, x1, flipped = (geometry[:, i, None] for i in range(5))
    u = (points[..., 0] - y0) / (y1 - y0).clamp_min(1e-6)
    v = (points[..., 1] - x0) / (x1 - x0).clamp_min(1e-6)
    v = torch.where(flipped > 0.5, 1 - v, v)
    return torch.stack([2 * v - 1, 2 * u - 1], dim=-1)


def sample_correspondences(g1: Tensor, g2: Tensor, num_points: int,
                           generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
    """``num_points`` points per image, uniform in the region both views cover.

    Returns each view's sampling grid (B, K, 2) for :func:`read_at`, and a weight (B, K) that is 1 where the
    crops overlap and 0 where they do not (those images' points are sampled in view 1's box and ignored by
    the loss: no host sync to drop them).
    """
    box, valid = overlap_boxes(g1, g2)
    box = torch.where(valid[:, None], box, g1[:, :4])
    t = torch.rand(g1.shape[0], num_points, 2, device=g1.device, dtype=g1.dtype, generator=generator)
    points = box[:, None, :2] + t * (box[:, None, 2:] - box[:, None, :2])
    weight = valid[:, None].to(g1.dtype).expand(-1, num_points)
    return original_to_view(points, g1), original_to_view(points, g2), weight


def read_at(grid_map: Tensor, grid: Tensor) -> Tensor:
    """Bilinear read of a (B, C, h, w) map at (B, K, 2) grid points → (B, K, C). The map may be a patch-token
    grid or an image: a token sits at its patch centre, as a pixel at its pixel centre."""
    out = F.grid_sample(grid_map, grid[:, :, None, :].to(grid_map.dtype), mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out[..., 0].transpose(1, 2)


class DenseBarlowTwins(nn.Module):
    """The dense term: own projector, correspondence sampling, weighted Barlow Twins loss over points."""

    def __init__(self, in_dim: int, proj_dim: int, proj_layers: int, num_points: int, lambd: float):
        super().__init__()
        self.projector = Projector(in_dim, proj_dim, proj_layers)
        self.num_points = num_points
        self.lambd = lambd

    def point_features(self, patches1: Tensor, patches2: Tensor, g1: Tensor, g2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Both views' token features at matching points, flattened to (B·K, D), and their weights (B·K,)."""
        grid1, grid2, weight = sample_correspondences(g1.float(), g2.float(), self.num_points)
        p1, p2 = read_at(patches1, grid1), read_at(patches2, grid2)
        return p1.flatten(0, 1), p2.flatten(0, 1), weight.flatten()

    def loss(self, p1: Tensor, p2: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        """Barlow Twins loss and cross-correlation of the projected point features; rows weighted."""
        loss, c, _, _ = self.terms(p1, p2, weight)
        return loss, c

    def terms(self, p1: Tensor, p2: Tensor, weight: Tensor,
              check_weight: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`loss` with its two sums, (loss, C, on-diagonal sum, off-diagonal sum), as
        :func:`models.losses.barlow_twins_terms` returns them (what training runs and logs); ``check_weight``
        as there (a host sync: a training step checks its first batch only)."""
        return barlow_twins_terms(self.projector(p1), self.projector(p2), self.lambd, weight, check_weight)

