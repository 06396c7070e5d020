"""ViT segmentation heads (models/heads): architectures layer by layer against the reference code (SETR's
official heads, mmseg's dropout, setr-pytorch's variants), (non)linearity, MLA aggregation, auxiliary heads
and their losses, parameter counts by hand."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from config.hparams import SegmentationConfig
from models.heads import HEADS, head_levels
from models.heads.registry import TokenLayerNorm
from utils.registry import UnknownNameError

IN_DIM, HIDDEN, CLASSES = 32, 16, 21
ALL_HEADS = ["linear", "setr_mla", "setr_naive", "setr_pup", "setr_pytorch_naive", "setr_pytorch_pup"]
FULL_RESOLUTION = ("setr_pup", "setr_pytorch_pup")  # logits at h·patch; setr_mla at 4·h; the others at h


def cfg(**kw) -> SegmentationConfig:
    return SegmentationConfig(hidden_dim=HIDDEN, num_classes=CLASSES, **kw)


def build(name: str, patch: int, depth: int = 12, in_dim: int = IN_DIM, c: SegmentationConfig | None = None):
    c = c or cfg()
    return HEADS.get(name)(in_dim, CLASSES, patch, c, num_levels=len(head_levels(name, depth, c)))


def segment(head: nn.Module, features: list[torch.Tensor], size: int) -> torch.Tensor:
    return F.interpolate(head(features), size=(size, size), mode="bilinear", align_corners=False)


def grids(n: int, h: int, batch: int = 2, dtype=torch.float32, in_dim: int = IN_DIM) -> list[torch.Tensor]:
    return [torch.randn(batch, in_dim, h, h, dtype=dtype) for _ in range(n)]


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


def layer(m: nn.Module) -> tuple:
    """A leaf module as a comparable tuple (type and the hyperparameters the architecture is made of)."""
    if isinstance(m, nn.Conv2d):
        return ("conv", m.in_channels, m.out_channels, m.kernel_size[0], m.bias is not None)
    if isinstance(m, nn.BatchNorm2d):
        return ("bn", m.num_features)
    if isinstance(m, nn.LayerNorm):
        return ("ln", m.normalized_shape[0], m.eps)
    if isinstance(m, nn.Upsample):
        return ("up", m.scale_factor, m.mode, bool(m.align_corners))
    if isinstance(m, nn.Dropout2d):
        return ("drop2d", m.p)
    return (type(m).__name__,)


def layers(module: nn.Module) -> list[tuple]:
    """Leaf modules in registration order (for nn.Sequential stacks, the order they run in); empty
    containers (a head without auxiliary heads) are not layers."""
    containers = (nn.ModuleList, nn.Sequential, nn.ModuleDict)
    return [layer(m) for m in module.modules() if not list(m.children()) and not isinstance(m, containers)]


def conv(i, o, k, bias=False):
    return ("conv", i, o, k, bias)


BN = lambda c: ("bn", c)  # noqa: E731
RELU, LN = ("ReLU",), (lambda c: ("ln", c, 1e-6))


# ------------------------------------------------------------------------------------------ registry, shapes
def test_registry_lists_every_head():
    # attn_fusion also takes the attention (tests/test_attn_fusion.py), so it is not in ALL_HEADS' generic checks
    assert HEADS.names() == sorted(ALL_HEADS + ["attn_fusion"])


@pytest.mark.parametrize("name", ALL_HEADS)
@pytest.mark.parametrize("patch", [8, 16])
def test_logits_resolution_and_upsampling_to_the_input(name, patch):
    torch.manual_seed(0)
    head = build(name, patch).eval()
    size = 14 * patch
    feats = grids(len(head_levels(name, 12, cfg())), 14)
    out = head(feats)
    side = {"setr_mla": 4 * 14, **{n: size for n in FULL_RESOLUTION}}.get(name, 14)
    assert out.shape == (2, CLASSES, side, side)
    assert segment(head, feats, size).shape == (2, CLASSES, size, size)


@pytest.mark.parametrize("name", ALL_HEADS)
@pytest.mark.parametrize("patch,size", [(16, 64), (8, 32)])
def test_end_to_end_with_a_tiny_timm_vit(name, patch, size):
    torch.manual_seed(0)
    depth = 2
    vit = timm.create_model("vit_small_patch16_224", depth=depth, embed_dim=IN_DIM, num_heads=2,
                            patch_size=patch, img_size=size, num_classes=0).eval()
    levels = head_levels(name, depth, cfg())
    head = build(name, patch, depth=depth).eval()
    x = torch.randn(2, 3, size, size)
    norm = getattr(head, "backbone_norm", True)
    feats = vit.forward_intermediates(x, indices=levels, norm=norm, output_fmt="NCHW", intermediates_only=True)
    assert len(feats) == (2 if name == "setr_mla" else 1)
    logits = segment(head, feats, size)
    assert logits.shape == (2, CLASSES, size, size) and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------ architectures, layer by layer
def test_linear_head_is_a_per_patch_affine_map():
    head = build("linear", 16)
    assert layers(head) == [conv(IN_DIM, CLASSES, 1, True)]
    x = torch.randn(2, IN_DIM, 7, 5)
    w = head.classifier.weight[:, :, 0, 0]
    expected = torch.einsum("bchw,kc->bkhw", x, w) + head.classifier.bias[None, :, None, None]
    torch.testing.assert_close(head([x]), expected)
    assert head.classifier.bias.abs().sum() == 0  # initialised to zero
    assert looks_linear(head)


def test_setr_naive_is_sets_official_naive_head_on_the_final_norm():
    # SETR VisionTransformerUpHead(num_conv=2, conv3x3_conv1x1=False): 1x1 conv → BN → ReLU → 1x1 conv
    head = build("setr_naive", 16)
    assert layers(head) == [conv(IN_DIM, HIDDEN, 1), BN(HIDDEN), RELU, conv(HIDDEN, CLASSES, 1, True)]
    assert getattr(head, "backbone_norm", True)  # the ViT's final LayerNorm stands for SETR's head norm
    assert not looks_linear(head)


@pytest.mark.parametrize("patch,stages", [(8, 3), (16, 4), (32, 5)])
def test_setr_pup_is_setr_official_pup(patch, stages):
    # SETR VisionTransformerUpHead(num_conv=4): LayerNorm, then per stage 3x3 conv → BN → ReLU → x2 bilinear
    head = build("setr_pup", patch)
    stage = lambda i: [conv(i, HIDDEN, 3), BN(HIDDEN), RELU, ("up", 2.0, "bilinear", False)]  # noqa: E731
    expected = [LN(IN_DIM)] + stage(IN_DIM) + sum((stage(HIDDEN) for _ in range(stages - 1)), [])
    assert layers(head) == expected + [("Identity",), conv(HIDDEN, CLASSES, 1, True)]
    assert head.backbone_norm is False  # raw block outputs, its own LayerNorm
    assert head([torch.randn(1, IN_DIM, 3, 5)]).shape == (1, CLASSES, 3 * patch, 5 * patch)
    assert not looks_linear(head)
    assert looks_linear(relus_removed(head).eval()) is False  # the LayerNorm keeps it nonlinear


def test_setr_pup_refuses_patch_sizes_that_are_not_powers_of_two():
    for bad in (1, 12, 14):
        with pytest.raises(ValueError, match="power of 2"):
            build("setr_pup", bad)
        with pytest.raises(ValueError, match="power of 2"):
            build("setr_pytorch_pup", bad)


def test_setr_pytorch_naive_is_setr_pytorch_layer_for_layer():
    # setr-pytorch SETR_Naive._init_decode: conv1 (D→D, 1x1, bias) → bn1 → act1 (ReLU) → conv2 (D→classes)
    head = build("setr_pytorch_naive", 16)
    assert layers(head) == [conv(IN_DIM, IN_DIM, 1, True), BN(IN_DIM), RELU, conv(IN_DIM, CLASSES, 1, True)]
    assert getattr(head, "backbone_norm", True)  # setr-pytorch's pre_head_ln is the ViT's final norm
    assert not looks_linear(head)


@pytest.mark.parametrize("patch,stages", [(16, 4), (8, 3)])
def test_setr_pytorch_pup_is_a_linear_stack_of_1x1_convs(patch, stages):
    # setr-pytorch SETR_PUP._init_decode: 1x1 convs D → D/4 → ... → classes, x2 bilinear after each hidden one
    head = build("setr_pytorch_pup", patch)
    q = IN_DIM // 4
    up = ("up", 2.0, "bilinear", False)
    expected = [conv(IN_DIM, q, 1, True), up] + [conv(q, q, 1, True), up] * (stages - 1) + [conv(q, CLASSES, 1, True)]
    assert layers(head) == expected
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU, nn.LayerNorm)) for m in head.modules())
    assert looks_linear(head)

    # 1x1 convs commute with bilinear upsampling: the head is one affine map of rank <= D/4 at patch
    # resolution followed by `stages` x2 upsamplings. Compose it by hand.
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    weight, bias = torch.eye(IN_DIM, dtype=torch.float64), torch.zeros(IN_DIM, dtype=torch.float64)
    for c in convs:
        w = c.weight[:, :, 0, 0].double()
        weight, bias = w @ weight, w @ bias + c.bias.double()
    assert torch.linalg.matrix_rank(weight) <= q
    x = torch.randn(2, IN_DIM, 3, 4, dtype=torch.float64)
    expected = torch.einsum("bchw,kc->bkhw", x, weight) + bias[None, :, None, None]
    for _ in range(stages):
        expected = F.interpolate(expected, scale_factor=2, mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(head.double()([x]), expected)


def test_setr_mla_is_setr_official_mla():
    # SETR Conv_MLA (per level LayerNorm, 1x1 conv-BN-ReLU, top-down sum, 3x3 conv-BN-ReLU) + MLAHead (per
    # level 2 x (3x3 conv-BN-ReLU), C → C/2 → C/2, x4 bilinear align_corners=True) + VIT_MLAHead.cls (3x3)
    head = build("setr_mla", 16)
    half = HIDDEN // 2
    norms = [LN(IN_DIM)] * 4
    proj = [conv(IN_DIM, HIDDEN, 1), BN(HIDDEN), RELU] * 4
    fuse = [conv(HIDDEN, HIDDEN, 3), BN(HIDDEN), RELU] * 4
    per_level = [conv(HIDDEN, half, 3), BN(half), RELU, conv(half, half, 3), BN(half), RELU,
                 ("up", 4.0, "bilinear", True)] * 4
    assert layers(head) == norms + proj + fuse + per_level + [("Identity",), conv(4 * half, CLASSES, 3, True)]
    assert head.backbone_norm is False
    assert len(head.aux) == 0


@pytest.mark.parametrize("num_levels", [4, 1])
@pytest.mark.parametrize("train", [True, False])
def test_mla_gradient_reaches_every_level(num_levels, train):
    torch.manual_seed(0)
    head = HEADS.get("setr_mla")(IN_DIM, CLASSES, 16, cfg(), num_levels=num_levels).train(train)
    feats = [f.requires_grad_() for f in grids(num_levels, 6)]
    out = head(feats)
    assert out.shape == (2, CLASSES, 24, 24)
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
    shallow = fuse_inputs([feats[0] + torch.randn_like(feats[0])] + feats[1:])
    assert [not torch.equal(a, b) for a, b in zip(base, deep)] == [True, True, True]
    assert [not torch.equal(a, b) for a, b in zip(base, shallow)] == [True, False, False]
    with torch.no_grad():
        proj = [p(n(x)) for n, p, x in zip(head.norms, head.proj, feats)]
    torch.testing.assert_close(base[2], proj[2])
    torch.testing.assert_close(base[0], proj[0] + proj[1] + proj[2])


def test_token_layer_norm_normalises_each_patch_over_channels():
    norm = TokenLayerNorm(IN_DIM)
    x = torch.randn(2, IN_DIM, 3, 4) * 5 + 2
    with torch.no_grad():
        out = norm(x)
    mean, var = x.mean(dim=1, keepdim=True), x.var(dim=1, unbiased=False, keepdim=True)
    torch.testing.assert_close(out, (x - mean) / torch.sqrt(var + 1e-6), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- dropout and auxiliary heads
@pytest.mark.parametrize("name", ["setr_pup", "setr_mla"])
def test_classifier_dropout_sits_right_before_the_classifier(name):
    head = build(name, 16, c=cfg(classifier_dropout=0.25))
    assert layers(head)[-2] == ("drop2d", 0.25)
    seen = {}
    head.dropout.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    head.classifier.register_forward_pre_hook(lambda m, args: seen.update(classified=args[0]))
    head.train()
    torch.manual_seed(0)
    head(grids(len(head_levels(name, 12, cfg())), 4, batch=8))
    x, out = seen["x"].flatten(2), seen["out"].flatten(2)
    assert seen["classified"] is seen["out"]  # nothing between the dropout and the classifier
    # Dropout2d: each (image, channel) slice is dropped whole or kept and scaled by 1 / (1 - p)
    dropped = (out == 0).all(dim=2) & (x != 0).any(dim=2)
    kept = torch.isclose(out, x / 0.75).all(dim=2)
    assert (dropped | kept).all() and dropped.any() and kept.any()


def test_pup_aux_blocks_default_to_setrs_choice_scaled_to_the_depth():
    on = cfg(aux_loss=True)
    assert head_levels("setr_pup", 24, on) == [9, 14, 19, 23]  # SETR-PUP's ViT-L auxiliary heads
    assert head_levels("setr_pup", 12, on) == [4, 6, 9, 11]
    assert head_levels("setr_pup", 2, on) == [0, 1]
    assert head_levels("setr_pup", 1, on) == [0]
    assert head_levels("setr_pup", 12, cfg()) == [11]
    assert head_levels("setr_pup", 12, cfg(aux_loss=True, aux_blocks="3, 7")) == [3, 7, 11]  # + the last
    for spec, why in [("3,12", "out of range"), ("x", "not an integer"), ("-1", "out of range")]:
        with pytest.raises(ValueError, match=why) as err:
            head_levels("setr_pup", 12, cfg(aux_loss=True, aux_blocks=spec))
        assert "--segmentation.aux_blocks" in str(err.value)


def test_pup_aux_heads_are_setrs_and_only_run_in_training():
    c = cfg(aux_loss=True)
    head = build("setr_pup", 16, c=c)
    assert len(head.aux) == 4
    # SETR VisionTransformerUpHead(num_conv=2, num_upsampe_layer=2): LN, 3x3 conv-BN-ReLU, x4 bilinear, 1x1 classifier
    for aux in head.aux:
        assert layers(aux) == [LN(IN_DIM), conv(IN_DIM, HIDDEN, 3), BN(HIDDEN), RELU, ("up", 4.0, "bilinear", False),
                               conv(HIDDEN, CLASSES, 1, True)]
    feats = grids(4, 5)
    logits, aux = head.train()(feats)
    assert logits.shape == (2, CLASSES, 80, 80) and [a.shape for a in aux] == [(2, CLASSES, 20, 20)] * 4
    with torch.no_grad():
        torch.testing.assert_close(aux[1], head.aux[1](feats[1]))
    assert isinstance(head.eval()(feats), torch.Tensor)


def test_mla_aux_heads_classify_each_mla_output():
    head = build("setr_mla", 16, c=cfg(aux_loss=True))
    assert [layers(a) for a in head.aux] == [[conv(HIDDEN, CLASSES, 1, False)]] * 4  # VIT_MLA_AUXIHead: no bias
    outputs: list[torch.Tensor] = []
    for fuse in head.fuse:
        fuse.register_forward_hook(lambda m, args, out: outputs.append(out))
    logits, aux = head.train()(grids(4, 5))
    assert logits.shape == (2, CLASSES, 20, 20) and len(aux) == 4
    for a, conv_, out in zip(aux, head.aux, outputs):
        torch.testing.assert_close(a, torch.einsum("bchw,kc->bkhw", out, conv_.weight[:, :, 0, 0]))


def segmenter_cfg(head: str, **seg):
    from config.loading import parse_config

    flags = ["--task=segmentation", "--backbone.name=vit", "--backbone.depth=4", "--backbone.embed_dim=32",
             "--backbone.num_heads=2", "--backbone.patch_size=8", "--data.img_size=32",
             f"--segmentation.head={head}", f"--segmentation.hidden_dim={HIDDEN}"]
    return parse_config(flags + [f"--segmentation.{k}={v}" for k, v in seg.items()])


@pytest.mark.parametrize("head", ["setr_pup", "setr_mla"])
def test_module_loss_adds_each_auxiliary_loss_with_its_weight(head):
    from config.loading import to_dict
    from lightningmodules.segmentation import SegmentationModule

    module = SegmentationModule(to_dict(segmenter_cfg(head, aux_loss="true", aux_weight=0.25)))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    y = torch.randint(0, CLASSES, (2, 32, 32))
    y[:, :3] = 255
    module.train()
    out = module.model(x)
    assert len(out["aux"]) == 4 and all(a.shape == (2, CLASSES, 32, 32) for a in out["aux"])
    ce = lambda logits: F.cross_entropy(logits, y, ignore_index=255)  # noqa: E731
    expected = ce(out["out"]) + 0.25 * sum(ce(a) for a in out["aux"])
    torch.testing.assert_close(module.loss(out, y), expected)
    assert "aux" not in module.model.eval()(x)


def test_setr_heads_read_raw_block_outputs_and_the_others_the_final_norm():
    from models.segmenters import build_segmenter

    x = torch.randn(1, 3, 32, 32)
    for head, norm in [("setr_pup", False), ("setr_mla", False), ("setr_naive", True), ("setr_pytorch_pup", True)]:
        seg = build_segmenter(segmenter_cfg(head))
        vit = seg.backbone.vit
        with torch.no_grad():
            want = vit.forward_intermediates(x, indices=seg.levels, norm=norm, output_fmt="NCHW", intermediates_only=True)
            got = seg.features(x)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), head


# ------------------------------------------------------------------------------------------------- levels
def test_head_levels_defaults():
    c = cfg()
    for name in ("linear", "setr_naive", "setr_pup", "setr_pytorch_naive", "setr_pytorch_pup"):
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
    for name in ("linear", "setr_naive", "setr_pytorch_naive", "setr_pytorch_pup"):
        with pytest.raises(ValueError, match="one ViT block"):
            HEADS.get(name)(IN_DIM, CLASSES, 16, cfg(), num_levels=4)
        with pytest.raises(ValueError, match="list of one"):
            build(name, 16)(grids(2, 4))
    with pytest.raises(ValueError, match="one ViT block"):
        HEADS.get("setr_pup")(IN_DIM, CLASSES, 16, cfg(), num_levels=4)  # several levels need aux_loss
    with pytest.raises(ValueError, match="built for 1 feature grid"):
        build("setr_pup", 16)(grids(2, 4))


# ---------------------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("in_dim,hidden,c,patch",
                         [(IN_DIM, HIDDEN, CLASSES, 16), (384, 256, 21, 16), (384, 256, 21, 8)])  # last two: ViT-S
def test_parameter_counts(in_dim, hidden, c, patch):
    seg = SegmentationConfig(hidden_dim=hidden, num_classes=c)
    count = {name: n_params(HEADS.get(name)(in_dim, c, patch, seg, num_levels=4 if name == "setr_mla" else 1))
             for name in ALL_HEADS}
    bn, ln = 2 * hidden, 2 * in_dim  # BatchNorm / LayerNorm weight + bias; convs before a BatchNorm have no bias
    stages, q, half = patch.bit_length() - 1, in_dim // 4, hidden // 2
    assert count["linear"] == in_dim * c + c
    assert count["setr_naive"] == in_dim * hidden + bn + hidden * c + c
    assert count["setr_pup"] == ln + (9 * in_dim * hidden + bn) + (stages - 1) * (9 * hidden * hidden + bn) + hidden * c + c
    assert count["setr_mla"] == (4 * ln + 4 * (in_dim * hidden + bn) + 4 * (9 * hidden * hidden + bn)
                                 + 4 * (9 * hidden * half + hidden + 9 * half * half + hidden) + 9 * 4 * half * c + c)
    assert count["setr_pytorch_naive"] == in_dim * in_dim + in_dim + 2 * in_dim + in_dim * c + c
    assert count["setr_pytorch_pup"] == (in_dim * q + q) + (stages - 1) * (q * q + q) + q * c + c
    aux = SegmentationConfig(hidden_dim=hidden, num_classes=c, aux_loss=True)
    assert n_params(HEADS.get("setr_pup")(in_dim, c, patch, aux, num_levels=4)) == \
        count["setr_pup"] + 4 * (ln + 9 * in_dim * hidden + bn + hidden * c + c)
    assert n_params(HEADS.get("setr_mla")(in_dim, c, patch, aux, num_levels=4)) == count["setr_mla"] + 4 * hidden * c


def test_vit_s_parameter_counts_of_docs_heads_md():
    """The numbers docs/heads.md quotes (ViT-S: 384 channels, 21 classes, hidden 256, 12 blocks)."""
    seg = SegmentationConfig()
    counts = {(name, patch): n_params(build(name, patch, in_dim=384, c=seg)) for name in ALL_HEADS for patch in (16, 8)}
    assert counts[("setr_pytorch_pup", 16)] == 66_933 and counts[("setr_pytorch_pup", 8)] == 57_621
    assert counts[("setr_pytorch_naive", 16)] == counts[("setr_pytorch_naive", 8)] == 156_693
    assert counts[("setr_naive", 8)] == 104_213 and counts[("linear", 8)] == 8_085
    assert counts[("setr_pup", 16)] == 2_662_421 and counts[("setr_pup", 8)] == 2_072_085
    assert counts[("setr_mla", 16)] == counts[("setr_mla", 8)] == 4_627_989


@pytest.mark.parametrize("flags, message", [
    (["--segmentation.head=setr_naive", "--segmentation.aux_loss=true"],
     r"--segmentation.aux_loss applies to --segmentation.head=deeplabv3, setr_pup, setr_mla only \(their auxiliary "
     r"heads\), not setr_naive"),
    (["--segmentation.head=setr_pytorch_pup", "--segmentation.aux_loss=true"], "not setr_pytorch_pup"),
    (["--segmentation.head=setr_pup", "--segmentation.aux_blocks=3"], "aux_blocks places setr_pup's auxiliary heads"),
    (["--segmentation.head=setr_mla", "--segmentation.aux_loss=true", "--segmentation.aux_blocks=3"], "aux_blocks"),
    (["--segmentation.head=setr_pup", "--segmentation.aux_loss=true", "--segmentation.aux_blocks=3,99"],
     "--segmentation.aux_blocks='3,99': block 99 is out of range for a 12-block ViT"),
    (["--segmentation.head=setr_pup", "--segmentation.classifier_dropout=1"], r"classifier_dropout must be in \[0, 1\)"),
    (["--segmentation.head=setr_naive", "--segmentation.classifier_dropout=0.1"],
     "classifier_dropout applies to --segmentation.head=setr_pup, setr_mla only, not setr_naive"),
])
def test_config_errors_of_the_new_head_options(flags, message):
    from config.loading import ConfigError, parse_config
    from config.validation import validate

    with pytest.raises(ConfigError, match=message):
        validate(parse_config(["--task=segmentation", "--data.dataset=synthetic", *flags]))


def test_valid_head_options_pass_validation(tmp_path):
    from config.loading import parse_config
    from config.validation import validate

    for flags in (["--segmentation.head=setr_pup", "--segmentation.aux_loss=true", "--segmentation.aux_blocks=3,7",
                   "--segmentation.classifier_dropout=0.1"],
                  ["--segmentation.head=setr_mla", "--segmentation.aux_loss=true"],
                  ["--segmentation.head=setr_pytorch_pup"]):
        validate(parse_config(["--task=segmentation", "--data.dataset=synthetic", f"--data.root={tmp_path}", *flags]))


@pytest.mark.parametrize("head", ["setr_mla", "setr_pytorch_pup"])
def test_tiny_segmentation_run_trains_the_new_heads(tiny, tmp_path, head):
    import main

    extra = {"segmentation__aux_loss": "true", "segmentation__classifier_dropout": 0.1} if head == "setr_mla" else {}
    args = tiny("seg", task="segmentation", segmentation__head=head, segmentation__hidden_dim=8, data__batch_size=4,
                trainer__max_steps=2, trainer__limit_val_batches=1, callbacks__predictions="false",
                log__wandb_mode="disabled", **extra)
    assert main.main(args) == 0
    assert (tmp_path / "runs" / "seg" / "checkpoints" / "last.ckpt").is_file()
