"""Dense Barlow Twins: correspondences land on the same image point in both views, the weighted loss,
and the dense term's wiring into the module (off = the global loss exactly)."""
from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from config.loading import parse_config
from lightningmodules.barlow_twins import BarlowTwinsModule
from models.dense import read_at, sample_correspondences
from models.losses import barlow_twins_loss


def coordinate_image(size: int = 96) -> torch.Tensor:
    """(3, H, W) float image whose channels are the pixel centre's y and x in [0, 1] (and a constant): a
    linear pattern, which bilinear resampling reproduces exactly away from the borders."""
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([y, x, torch.full_like(x, 0.5)]).float()


def crop_view(image: torch.Tensor, box: tuple[int, int, int, int], flip: bool, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A view cut with torchvision (top, left, height, width in pixels) and its geometry row."""
    top, left, h, w = box
    view = TF.resized_crop(image, top, left, h, w, [out, out], antialias=False)
    if flip:
        view = TF.horizontal_flip(view)
    size = image.shape[-1]
    geometry = torch.tensor([top / size, left / size, (top + h) / size, (left + w) / size, float(flip)])
    return view, geometry


@pytest.mark.parametrize("flip1,flip2", [(False, False), (True, False), (False, True), (True, True)])
def test_correspondences_read_the_same_image_point_in_both_views(flip1, flip2):
    image = coordinate_image()
    v1, g1 = crop_view(image, (10, 5, 60, 70), flip1, 32)
    v2, g2 = crop_view(image, (30, 20, 50, 40), flip2, 48)
    grid1, grid2, weight = sample_correspondences(g1[None], g2[None], num_points=200,
                                                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(weight, torch.ones(1, 200))
    a, b = read_at(v1[None], grid1)[0], read_at(v2[None], grid2)[0]  # (K, 3): (y, x, 0.5) of the point
    torch.testing.assert_close(a, b, atol=0.01, rtol=0)
    # and every point lies in the overlap of the two boxes (y 30..70, x 20..60 of 96 px)
    assert (a[:, 0] > 30 / 96 - 0.01).all() and (a[:, 0] < 70 / 96 + 0.01).all()
    assert (a[:, 1] > 20 / 96 - 0.01).all() and (a[:, 1] < 60 / 96 + 0.01).all()
    assert a[:, 0].max() - a[:, 0].min() > 0.25  # spread over the overlap, not one point


def test_disjoint_crops_get_zero_weight():
    g1 = torch.tensor([[0.0, 0.0, 0.4, 0.4, 0.0], [0.0, 0.0, 1.0, 1.0, 0.0]])
    g2 = torch.tensor([[0.5, 0.5, 1.0, 1.0, 0.0], [0.2, 0.2, 0.6, 0.6, 1.0]])
    _, _, weight = sample_correspondences(g1, g2, num_points=4)
    assert weight.tolist() == [[0.0] * 4, [1.0] * 4]


def test_weighted_loss_with_unit_weights_is_barlow_twins_and_ignores_zero_weight_rows():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(24, 16, generator=g), torch.randn(24, 16, generator=g)
    loss, c = barlow_twins_loss(z1, z2, 0.01, weight=torch.ones(24))
    expected, expected_c = barlow_twins_loss(z1, z2, 0.01)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c, expected_c, rtol=1e-5, atol=1e-6)
    # rows of weight 0 do not count: the loss equals the unweighted loss of the other rows
    weight = torch.ones(24)
    weight[16:] = 0
    noisy1, noisy2 = z1.clone(), z2.clone()
    noisy1[16:] = 1e3 * torch.randn(8, 16, generator=g)
    loss_w, _ = barlow_twins_loss(noisy1, noisy2, 0.01, weight=weight)
    torch.testing.assert_close(loss_w, barlow_twins_loss(z1[:16], z2[:16], 0.01)[0], rtol=1e-5, atol=1e-5)


TINY = ["--backbone.name=vit", "--backbone.depth=2", "--backbone.embed_dim=32", "--backbone.num_heads=2",
        "--backbone.patch_size=8", "--data.img_size=32", "--barlow.proj_dim=64", "--barlow.dense_proj_dim=32"]


def batch_with_geometry(n: int = 6):
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, 3, 32, 32, generator=g)
    lo = torch.rand(n, 2, generator=g) * 0.3
    box = torch.cat([lo, lo + 0.6, torch.zeros(n, 1)], dim=1)
    return x1, x2, box, box.clone()


def module(*flags: str) -> BarlowTwinsModule:
    torch.manual_seed(0)
    return BarlowTwinsModule.from_hparams(parse_config([*TINY, *flags]))


def test_dense_weight_zero_is_the_global_loss_exactly():
    x1, x2, g1, g2 = batch_with_geometry()
    m = module("--barlow.dense_weight=0")
    assert m.dense is None
    loss, c, dense_c = m.shared_step((x1, x2, g1, g2), "train")
    f1, f2 = m.backbone(torch.cat([x1, x2])).chunk(2)
    expected, _ = barlow_twins_loss(m.projector(f1), m.projector(f2), m.cfg.barlow.lambd)
    assert dense_c is None
    assert torch.equal(loss, expected)


def test_dense_term_adds_its_weighted_loss_and_reaches_the_patch_tokens():
    x1, x2, g1, g2 = batch_with_geometry()
    m = module("--barlow.dense_weight=0.5", "--barlow.dense_points=8")
    torch.manual_seed(7)
    loss, c, dense_c = m.shared_step((x1, x2, g1, g2), "train")
    assert dense_c.shape == (32, 32)
    # the same computation by hand: global loss + 0.5 × dense loss on the same sampled points
    torch.manual_seed(7)
    (f1, p1), (f2, p2) = m.features(x1, x2)
    points = m.dense.point_features(p1, p2, g1, g2)
    dense_loss, _ = m.dense.loss(*points)
    global_loss, _ = barlow_twins_loss(m.projector(f1), m.projector(f2), m.cfg.barlow.lambd)
    torch.testing.assert_close(loss, global_loss + 0.5 * dense_loss)
    loss.backward()
    assert m.dense.projector[0].weight.grad is not None
    # patch tokens get gradient only through the dense term (global pool = CLS token): the last block's
    # MLP output for patch tokens matters for the dense term only
    assert m.backbone.vit.norm.weight.grad.abs().sum() > 0


def test_dense_with_micro_batching_matches_unchunked_gradients():
    from tests.test_barlow_twins import assert_grads_close, well_posed

    x1, x2, g1, g2 = batch_with_geometry(8)
    grads = []
    for micro in (0, 4):
        m = module("--barlow.dense_weight=1", "--barlow.dense_points=4", f"--barlow.micro_batch_size={micro}")
        torch.manual_seed(11)
        m.shared_step((x1, x2, g1, g2), "train")[0].backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, expected in grads[0].items():
        assert_grads_close(name, well_posed(name, grads[1][name]), well_posed(name, expected))


def test_dense_needs_geometry_in_the_batch():
    m = module("--barlow.dense_weight=1")
    x1, x2, _, _ = batch_with_geometry()
    with pytest.raises(ValueError, match="geometry"):
        m.shared_step((x1, x2), "train")


def test_correspondences_from_the_datamodules_own_crops_match():
    """End to end with the augmentation's own crop + flip (bilinear resampling, 64 px views of a 96 px
    coordinate image, several seeds): both views read the same original point at every sampled pair."""
    from config.hparams import AugmentConfig
    from datamodules.transforms import CropFlip

    crop = CropFlip(AugmentConfig(crop_scale_min=0.3, crop_interpolation="bilinear"), 64)
    image = (coordinate_image() * 255).round().to(torch.uint8)
    checked = 0
    for seed in range(8):
        torch.manual_seed(seed)
        (v1, g1), (v2, g2) = crop(image), crop(image)
        grid1, grid2, weight = sample_correspondences(g1[None], g2[None], num_points=64)
        if weight.sum() == 0:
            continue  # disjoint crops: nothing to match
        a = read_at(v1[None].float() / 255, grid1)[0]
        b = read_at(v2[None].float() / 255, grid2)[0]
        torch.testing.assert_close(a[:, :2], b[:, :2], atol=0.02, rtol=0)  # within ~2 px of 96
        checked += 1
    assert checked >= 4
