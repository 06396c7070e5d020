"""ViT segmentation heads (models/heads): shapes, (non)linearity, structure, MLA levels, parameter counts."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from config.hparams import SegmentationConfig
from models.heads import HEADS, head_levels
from utils.registry import UnknownNameError

IN_DIM, HIDDEN, CLASSES = 32, 16, 21
ALL_HEADS = ["linear", "setr_mla", "setr_naive", "setr_pup"]


def cfg(**kw) -> SegmentationConfig:
    return SegmentationConfig(hidden_dim=HIDDEN, num_classes=CLASSES, **kw)


def build(name: str, patch: int, depth: int = 12, in_dim: int = IN_DIM, c: SegmentationConfig | None = None):
    c = c or cfg()
    return HEADS.get(name)(in_dim, CLASSES, patch, c, num_levels=len(head_levels(name, depth, c)))


def segment(head: nn.Module, features: list[torch.Tensor], size: int) -> torch.Tensor:
    return F.interpolate(head(features), size=(size, size), mode="bilinear", align_corners=False)


def grids(n: int, h: int, batch: int = 2, dtype=torch.float32) -> list[torch.Tensor]:
    return [torch.randn(batch, IN_DIM, h, h, dtype=dtype) for _ in range(n)]


def additivity_gap(f, x: torch.Tensor, y: torch.Tensor) -> float:
    """max |f(x+y) - f(x) - f(y) + f(0)|, relative to the output scale: ~0 iff f is affine on these inputs."""
    with torch.no_grad():
        fx, fy, fxy, f0 = f(x), f(y), f(x + y), f(torch.zeros_like(x))
        return ((fxy - fx - fy + f0).abs().max() / fxy.abs().max()).item()


def looks_linear(head: nn.Module, h: int = 4) -> bool:
    head = head.double().eval()  # eval: BatchNorm is a fixed affine map
    torch.manual_seed(1)
    x, y = torch.randn(2, IN_DIM, h, h, dtype=torch.float64), torch.randn(2, IN_DIM, h, h, dtype=torch.float64)
    return additivity_gap(lambda t: head([t]), x, y) < 1e-9


def relus_removed(module: nn.Module) -> nn.Module:
    for parent in list(module.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, child_name, nn.Identity())
    assert not any(isinstance(m, nn.ReLU) for m in module.modules())
    return module


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registry_lists_every_head():
    # attn_fusion also takes the attention (tests/test_attn_fusion.py), so it is not in ALL_HEADS' generic checks
    assert HEADS.names() == sorted(ALL_HEADS + ["attn_fusion"])


@pytest.mark.parametrize("name", ALL_HEADS)
@pytest.mark.parametrize("patch", [8, 16])
@pytest.mark.parametrize("size", [224, 256])
def test_logits_upsample_to_input_size(name, patch, size):
    torch.manual_seed(0)
    head = build(name, patch)
    h = size // patch
    feats = grids(head.num_levels, h)
    out = head(feats)
    expected = (size, size) if name == "setr_pup" else (h, h)
    assert out.shape == (2, CLASSES, *expected)
    assert segment(head, feats, size).shape == (2, CLASSES, size, size)


@pytest.mark.parametrize("name", ALL_HEADS)
@pytest.mark.parametrize("patch,size", [(16, 224), (8, 256)])
def test_end_to_end_with_a_tiny_timm_vit(name, patch, size):
    torch.manual_seed(0)
    depth = 2
    vit = timm.create_model("vit_small_patch16_224", depth=depth, embed_dim=IN_DIM, num_heads=2,
                            patch_size=patch, img_size=size, num_classes=0).eval()
    levels = head_levels(name, depth, cfg())
    head = build(name, patch, depth=depth)
    x = torch.randn(2, 3, size, size)
    feats = vit.forward_intermediates(x, indices=levels, output_fmt="NCHW", intermediates_only=True)
    assert len(feats) == head.num_levels == (2 if name == "setr_mla" else 1)
    logits = segment(head, feats, size)
    assert logits.shape == (2, CLASSES, size, size) and torch.isfinite(logits).all()


def test_pup_upsamples_to_pixels_and_stages_follow_the_patch_size():
    for patch, stages in [(8, 3), (16, 4), (32, 5)]:
        head = build("setr_pup", patch)
        assert len(head.stages) == stages
        assert head([torch.randn(1, IN_DIM, 3, 5)]).shape == (1, CLASSES, 3 * patch, 5 * patch)
    for bad in (1, 12, 14):
        with pytest.raises(ValueError, match="power of 2"):
            build("setr_pup", bad)


def test_pup_is_not_linear_and_the_check_would_catch_missing_relus():
    head = build("setr_pup", 8)
    assert not looks_linear(head)
    assert looks_linear(relus_removed(head))  # the report's ReLU-less version is one affine map


def test_linear_head_is_a_per_patch_affine_map():
    head = build("linear", 16)
    assert [type(m) for m in head.modules()][1:] == [nn.Conv2d]
    x = torch.randn(2, IN_DIM, 7, 5)
    w = head.classifier.weight[:, :, 0, 0]
    expected = torch.einsum("bchw,kc->bkhw", x, w) + head.classifier.bias[None, :, None, None]
    torch.testing.assert_close(head([x]), expected)
    assert head.classifier.bias.abs().sum() == 0  # initialised to zero
    assert looks_linear(head)


def test_naive_head_has_one_hidden_layer_with_norm_and_relu():
    head = build("setr_naive", 16)
    layers = [m for m in head.modules() if not list(m.children())]
    assert [type(m) for m in layers] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    hidden, _, _, cls = layers
    assert hidden.kernel_size == cls.kernel_size == (1, 1)
    assert (hidden.in_channels, hidden.out_channels, hidden.bias) == (IN_DIM, HIDDEN, None)  # BN has the bias
    assert (cls.in_channels, cls.out_channels) == (HIDDEN, CLASSES) and cls.bias is not None
    assert not looks_linear(head)


@pytest.mark.parametrize("num_levels", [4, 1])
@pytest.mark.parametrize("train", [True, False])
def test_mla_gradient_reaches_every_level(num_levels, train):
    torch.manual_seed(0)
    head = HEADS.get("setr_mla")(IN_DIM, CLASSES, 16, cfg(), num_levels=num_levels).train(train)
    feats = [f.requires_grad_() for f in grids(num_levels, 6)]
    out = head(feats)
    assert out.shape == (2, CLASSES, 6, 6)
    out.sum().backward()
    for f in feats:
        assert f.grad is not None and f.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=f"built for {num_levels} levels"):
        head(grids(num_levels + 1, 6))


def test_mla_aggregates_top_down():
    # agg[i] = proj[i] + agg[i+1]: the deepest level reaches every fused conv, the shallowest only its own.
    torch.manual_seed(0)
    head = HEADS.get("setr_mla")(IN_DIM, CLASSES, 16, cfg(), num_levels=3).eval()
    seen: list[torch.Tensor] = []
    for fuse in head.fuse:
        fuse.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))

    def fuse_inputs(feats):
        seen.clear()
        with torch.no_grad():
            head(feats)
        return list(seen)

    feats = grids(3, 4)
    base = fuse_inputs(feats)
    deep = fuse_inputs(feats[:2] + [feats[2] + 1])
    shallow = fuse_inputs([feats[0] + 1] + feats[1:])
    assert [not torch.equal(a, b) for a, b in zip(base, deep)] == [True, True, True]
    assert [not torch.equal(a, b) for a, b in zip(base, shallow)] == [True, False, False]
    with torch.no_grad():
        proj = [p(x) for p, x in zip(head.proj, feats)]
    torch.testing.assert_close(base[2], proj[2])
    torch.testing.assert_close(base[0], proj[0] + proj[1] + proj[2])
    assert not looks_linear_mla(head, 3)


def looks_linear_mla(head: nn.Module, n: int) -> bool:
    head = head.double().eval()
    xs = [torch.randn(1, IN_DIM, 4, 4, dtype=torch.float64) for _ in range(n)]
    ys = [torch.randn(1, IN_DIM, 4, 4, dtype=torch.float64) for _ in range(n)]
    with torch.no_grad():
        gap = head([x + y for x, y in zip(xs, ys)]) - head(xs) - head(ys) + head([torch.zeros_like(x) for x in xs])
        return (gap.abs().max() / head(xs).abs().max()).item() < 1e-9


def test_head_levels_defaults():
    c = cfg()
    for name in ("linear", "setr_naive", "setr_pup"):
        assert head_levels(name, 12, c) == [11]
        assert head_levels(name, 1, c) == [0]
    assert head_levels("setr_mla", 12, c) == [2, 5, 8, 11]
    assert head_levels("setr_mla", 24, c) == [5, 11, 17, 23]
    assert head_levels("setr_mla", 4, c) == [0, 1, 2, 3]
    assert head_levels("setr_mla", 2, c) == [0, 1]
    assert head_levels("setr_mla", 1, c) == [0]
    for depth in range(1, 40):
        levels = head_levels("setr_mla", depth, c)
        assert levels == sorted(set(levels)) and levels[-1] == depth - 1 and len(levels) == min(4, depth)


def test_head_levels_parses_mla_blocks():
    assert head_levels("setr_mla", 12, cfg(mla_blocks="2,5,8,11")) == [2, 5, 8, 11]
    assert head_levels("setr_mla", 12, cfg(mla_blocks=" 11, 3 ")) == [3, 11]
    assert head_levels("setr_mla", 6, cfg(mla_blocks="5")) == [5]
    assert head_levels("setr_naive", 12, cfg(mla_blocks="1,2")) == [11]  # only setr_mla reads it
    for spec, why in [("2,5,8,12", "out of range"), ("-1,3", "out of range"), ("2,x", "not an integer"),
                      ("2,,5", "not an integer"), ("2.5", "not an integer"), ("3,3", "twice")]:
        with pytest.raises(ValueError, match=why) as err:
            head_levels("setr_mla", 12, cfg(mla_blocks=spec))
        assert "--segmentation.mla_blocks" in str(err.value)


def test_unknown_head_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        HEADS.get("setr_foo")
    with pytest.raises(UnknownNameError):
        head_levels("setr_foo", 12, cfg())
    for name in ALL_HEADS:
        assert name in str(err.value)


def test_single_level_heads_refuse_several_levels():
    for name in ("linear", "setr_naive", "setr_pup"):
        with pytest.raises(ValueError, match="one ViT block"):
            HEADS.get(name)(IN_DIM, CLASSES, 16, cfg(), num_levels=4)
        with pytest.raises(ValueError, match="list of one"):
            build(name, 16)(grids(2, 4))


@pytest.mark.parametrize("in_dim,hidden,c,patch",
                         [(IN_DIM, HIDDEN, CLASSES, 16), (384, 256, 21, 16), (384, 256, 21, 8)])  # last two: ViT-S
def test_parameter_counts(in_dim, hidden, c, patch):
    seg = SegmentationConfig(hidden_dim=hidden, num_classes=c)
    count = {name: n_params(HEADS.get(name)(in_dim, c, patch, seg, num_levels=4 if name == "setr_mla" else 1))
             for name in ALL_HEADS}
    bn = 2 * hidden  # BatchNorm weight + bias; convs before a BatchNorm have no bias
    stages = patch.bit_length() - 1
    assert count["linear"] == in_dim * c + c
    assert count["setr_naive"] == in_dim * hidden + bn + hidden * c + c
    assert count["setr_pup"] == (9 * in_dim * hidden + bn) + (stages - 1) * (9 * hidden * hidden + bn) + hidden * c + c
    assert count["setr_mla"] == 4 * (in_dim * hidden + bn) + 4 * (9 * hidden * hidden + bn) + 4 * hidden * c + c
