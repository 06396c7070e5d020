"""Projector, backbones and weight loading, with tiny models and nothing from the network."""
from __future__ import annotations

import logging
import re

import pytest
import timm
import torch
import torchvision
from torch import nn

from config.hparams import BackboneConfig
from models.backbones import build_backbone, check_backbone_name, is_vit, resolve_architecture
from models.backbones.vit import timm_vit_names
from models.projector import Projector
from models.weights import WeightLoadingError, load_into, read_state_dict, strip_common_prefix
from utils.registry import UnknownNameError

TINY = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8)


def tiny_cfg(**kw) -> BackboneConfig:
    return BackboneConfig(name="vit", **{**TINY, **kw})


def tiny_timm_vit(seed: int, img_size: int = 32, num_classes: int = 0, **kw) -> nn.Module:
    """A tiny ViT made by timm directly (independent of build_backbone), with a fixed seed."""
    torch.manual_seed(seed)
    arch = {**TINY, **kw}
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=img_size,
                             num_classes=num_classes, **arch)


def assert_state_equal(actual: dict, expected: dict, keys=None):
    keys = list(expected) if keys is None else keys
    assert keys
    for k in keys:
        assert torch.equal(actual[k], expected[k]), k


# ----------------------------------------------------------------------------------------------- projector

@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_projector_layer_structure(num_layers):
    proj = Projector(16, 24, num_layers)
    layers = list(proj)
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    assert len(linears) == num_layers
    assert all(m.bias is None for m in linears)
    assert linears[0].in_features == 16
    assert all(m.out_features == 24 for m in linears)
    assert all(m.in_features == 24 for m in linears[1:])
    expected_types = [nn.Linear, nn.BatchNorm1d, nn.ReLU] * (num_layers - 1) + [nn.Linear]
    assert [type(m) for m in layers] == expected_types
    assert all(m.num_features == 24 for m in layers if isinstance(m, nn.BatchNorm1d))
    assert isinstance(layers[-1], nn.Linear)  # nothing after the last layer
    assert proj(torch.randn(5, 16)).shape == (5, 24)
    assert proj.out_dim == 24


def test_projector_forward_matches_hand_computation():
    torch.manual_seed(0)
    proj = Projector(6, 5, num_layers=2).train()
    x = torch.randn(7, 6)
    w1, w2 = proj[0].weight, proj[3].weight
    h = x @ w1.T
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)  # BN train mode, weight 1, bias 0
    ref = h.clamp(min=0) @ w2.T
    torch.testing.assert_close(proj(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_layers, dim", [(0, 8), (-1, 8), (2, 0)])
def test_projector_rejects_bad_sizes(num_layers, dim):
    with pytest.raises(ValueError):
        Projector(16, dim, num_layers)


# ------------------------------------------------------------------------------------------------ backbones

def test_resolve_architecture():
    assert resolve_architecture(tiny_cfg()) == {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8}
    # Generic 'vit' without overrides is ViT-S/16: 12 blocks, 384 wide, 6 heads.
    assert resolve_architecture(BackboneConfig(name="vit")) == {
        "depth": 12, "embed_dim": 384, "num_heads": 6, "patch_size": 16}
    # ViT-Ti/16 is 12 blocks of width 192 with 3 heads; depth override keeps the rest.
    assert resolve_architecture(BackboneConfig(name="vit_tiny_patch16_224", depth=1)) == {
        "depth": 1, "embed_dim": 192, "num_heads": 3, "patch_size": 16}
    assert resolve_architecture(BackboneConfig(name="vit_small_patch8_224.dino", depth=3)) == {
        "depth": 3, "embed_dim": 384, "num_heads": 6, "patch_size": 8}


def check_vit_architecture(bb, depth, embed_dim, num_heads, patch_size, img_size):
    vit = bb.vit
    assert len(vit.blocks) == depth
    assert vit.embed_dim == embed_dim and bb.num_features == embed_dim
    assert all(blk.attn.num_heads == num_heads for blk in vit.blocks)
    assert all(blk.attn.head_dim == embed_dim // num_heads for blk in vit.blocks)
    assert all(blk.attn.qkv.weight.shape == (3 * embed_dim, embed_dim) for blk in vit.blocks)
    assert vit.patch_embed.proj.weight.shape == (embed_dim, 3, patch_size, patch_size)
    grid = img_size // patch_size
    assert tuple(vit.patch_embed.grid_size) == (grid, grid)
    assert vit.pos_embed.shape == (1, grid * grid + 1, embed_dim)
    assert all(blk.attn.fused_attn for blk in vit.blocks)
    assert bb.batch_coupled is False


@pytest.mark.parametrize("img_size", [32, 64])
def test_generic_vit_with_overrides(img_size):
    bb = build_backbone(tiny_cfg(), img_size)
    check_vit_architecture(bb, 2, 32, 2, 8, img_size)
    assert bb(torch.randn(2, 3, img_size, img_size)).shape == (2, 32)


@pytest.mark.parametrize("img_size", [224, 256])
def test_timm_name_with_depth_override_keeps_other_dims(img_size):
    bb = build_backbone(BackboneConfig(name="vit_tiny_patch16_224", depth=1), img_size)
    check_vit_architecture(bb, 1, 192, 3, 16, img_size)
    with torch.no_grad():
        assert bb(torch.randn(1, 3, img_size, img_size)).shape == (1, 192)


def test_generic_vit_patch8_at_256():
    bb = build_backbone(tiny_cfg(depth=1), 256)
    check_vit_architecture(bb, 1, 32, 2, 8, 256)
    with torch.no_grad():
        assert bb(torch.randn(1, 3, 256, 256)).shape == (1, 32)


def test_global_pool_token_and_avg():
    torch.manual_seed(0)
    bb_token = build_backbone(tiny_cfg(global_pool="token"), 32).eval()
    bb_avg = build_backbone(tiny_cfg(global_pool="avg"), 32).eval()
    bb_avg.load_state_dict(bb_token.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = bb_token.vit.forward_features(x)
        num_patches = (32 // 8) ** 2
        assert tokens.shape == (3, num_patches + 1, 32)
        out_token, out_avg = bb_token(x), bb_avg(x)
    assert out_token.shape == out_avg.shape == (3, 32)
    torch.testing.assert_close(out_token, tokens[:, 0])
    torch.testing.assert_close(out_avg, tokens[:, -num_patches:].mean(dim=1))
    assert not torch.allclose(out_token, out_avg)
    with pytest.raises(ValueError):
        build_backbone(tiny_cfg(global_pool="max"), 32)


def test_resnet50_output_and_batch_coupling():
    bb = build_backbone(BackboneConfig(name="resnet50"), 32)
    assert bb.batch_coupled is True and bb.num_features == 2048
    assert bb(torch.randn(2, 3, 32, 32)).shape == (2, 2048)


def test_names():
    assert is_vit("vit") and is_vit("vit_small_patch16_224") and is_vit("vit_small_patch16_224.dino")
    assert not is_vit("resnet50")
    assert "vit_small_patch8_224" in timm_vit_names() and "vit_small_patch16_224.dino" in timm_vit_names()
    assert "resnet50" not in timm_vit_names()
    for name in ("vit", "resnet50", "vit_tiny_patch16_224", "vit_small_patch16_224.dino"):
        check_backbone_name(name)
    with pytest.raises(UnknownNameError) as info:
        check_backbone_name("resnet51")
    message = str(info.value)
    assert "resnet51" in message and "resnet50" in message and "vit" in message
    assert "resnet50" in info.value.valid and "vit" in info.value.valid
    with pytest.raises(UnknownNameError):
        build_backbone(BackboneConfig(name="vit_nonexistent_patch16"), 32)


# ------------------------------------------------------------------------------------------ weight loading

@pytest.fixture(scope="module")
def source_vit():
    """timm-format weights of a tiny ViT (img 32, patch 8), with a classifier head to be dropped."""
    return tiny_timm_vit(seed=123, num_classes=10)


def backbone_keys(src_state: dict) -> list[str]:
    return [k for k in src_state if not k.startswith("head.")]


def test_fresh_model_differs_from_source(source_vit):
    torch.manual_seed(0)
    bb = build_backbone(tiny_cfg(), 32)
    assert not torch.equal(bb.vit.blocks[0].attn.qkv.weight, source_vit.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict_loads(source_vit, tmp_path, suffix, caplog):
    src = {k: v.clone().contiguous() for k, v in source_vit.state_dict().items()}
    assert "head.weight" in src
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(src, str(path))
    else:
        torch.save(src, path)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="models.weights"):
        bb = build_backbone(tiny_cfg(weights=str(path), strict_weights=True), 32)
    assert_state_equal(bb.vit.state_dict(), src, backbone_keys(src))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # Loaded weights give the source model's features.
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bb.eval()(x), source_vit.eval().forward_features(x)[:, 0])


@pytest.mark.parametrize("layout", ["lightning", "module"])
def test_prefixed_state_dict_loads(source_vit, tmp_path, layout):
    src = source_vit.state_dict()
    if layout == "lightning":
        state = {f"backbone.vit.{k}": v for k, v in src.items() if not k.startswith("head.")}
        state["projector.0.weight"] = torch.randn(64, 32)  # other modules of the LightningModule
        state["projector.1.running_mean"] = torch.randn(64)
        obj = {"state_dict": state, "epoch": 3, "global_step": 10}
    else:
        obj = {f"module.{k}": v for k, v in src.items()}
    path = tmp_path / "prefixed.ckpt"
    torch.save(obj, path)
    loaded = read_state_dict(path)
    stripped, prefix = strip_common_prefix(loaded, set(source_vit.state_dict()))
    assert prefix == ("backbone.vit." if layout == "lightning" else "module.")
    assert set(backbone_keys(src)) <= set(stripped)
    bb = build_backbone(tiny_cfg(weights=str(path), strict_weights=True), 32)
    assert_state_equal(bb.vit.state_dict(), src, backbone_keys(src))


def test_pos_embed_resized_to_larger_image(tmp_path):
    src_model = tiny_timm_vit(seed=7, img_size=32)
    src = src_model.state_dict()
    # A spatially constant grid part must stay that constant after any interpolation.
    const = torch.randn(1, 1, 32)
    src["pos_embed"] = torch.cat([src["pos_embed"][:, :1], const.expand(1, 16, 32)], dim=1).clone()
    path = tmp_path / "vit32.pth"
    torch.save(src, path)
    bb = build_backbone(tiny_cfg(weights=str(path), strict_weights=True), 64)
    pos = bb.vit.pos_embed.detach()
    assert pos.shape == (1, 1 + (64 // 8) ** 2, 32)
    torch.testing.assert_close(pos[:, :1], src["pos_embed"][:, :1])  # class token's position kept
    torch.testing.assert_close(pos[:, 1:], const.expand(1, 64, 32), rtol=1e-5, atol=1e-5)
    assert_state_equal(bb.vit.state_dict(), src, [k for k in src if k != "pos_embed"])


def test_patch16_file_into_patch8_model_raises(tmp_path):
    src = tiny_timm_vit(seed=1, img_size=32, patch_size=16).state_dict()
    path = tmp_path / "vit_p16.pth"
    torch.save(src, path)
    with pytest.raises(WeightLoadingError, match="patch size 16") as info:
        build_backbone(tiny_cfg(weights=str(path)), 32)
    assert "vit_p16.pth" in str(info.value) and "8" in str(info.value)


def test_missing_and_unexpected_keys_warn_and_strict_raises(source_vit, tmp_path, caplog):
    src = dict(source_vit.state_dict())
    del src["norm.weight"]
    del src["blocks.1.mlp.fc2.bias"]
    src["extra_adapter.weight"] = torch.randn(3, 3)
    path = tmp_path / "partial.pth"
    torch.save(src, path)
    torch.manual_seed(0)
    fresh = build_backbone(tiny_cfg(), 32)
    with caplog.at_level(logging.WARNING, logger="models.weights"):
        torch.manual_seed(0)
        bb = build_backbone(tiny_cfg(weights=str(path)), 32)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0]
    assert "2 missing" in text and "norm.weight" in text and "blocks.1.mlp.fc2.bias" in text
    assert "1 unexpected" in text and "extra_adapter.weight" in text
    assert "partial.pth" in text
    # Loaded tensors equal the file; missing ones keep their init.
    assert_state_equal(bb.vit.state_dict(), src, [k for k in backbone_keys(src) if k != "extra_adapter.weight"])
    assert torch.equal(bb.vit.norm.weight, fresh.vit.norm.weight)

    with pytest.raises(WeightLoadingError, match="missing"):
        build_backbone(tiny_cfg(weights=str(path), strict_weights=True), 32)


def test_file_without_matching_keys_raises(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.layer.weight": torch.randn(4, 4), "decoder.bias": torch.randn(4)}, path)
    with pytest.raises(WeightLoadingError, match="other.pth"):
        build_backbone(tiny_cfg(weights=str(path)), 32)


def test_missing_and_corrupt_files_raise_naming_the_file(tmp_path):
    with pytest.raises(WeightLoadingError, match="does_not_exist.pth"):
        build_backbone(tiny_cfg(weights=str(tmp_path / "does_not_exist.pth")), 32)
    for name in ("corrupt.pth", "corrupt.safetensors"):
        path = tmp_path / name
        path.write_bytes(b"this is not a weight file\x00\x01\x02" * 10)
        with pytest.raises(WeightLoadingError, match=re.escape(name)):
            build_backbone(tiny_cfg(weights=str(path)), 32)
    path = tmp_path / "not_tensors.pth"
    torch.save({"a": 1, "b": "text"}, path)
    with pytest.raises(WeightLoadingError, match="not_tensors.pth"):
        read_state_dict(path)


def test_shape_mismatch_raises_naming_the_tensor(tmp_path):
    src = tiny_timm_vit(seed=2, embed_dim=48).state_dict()
    path = tmp_path / "wide.pth"
    torch.save(src, path)
    with pytest.raises(WeightLoadingError) as info:
        build_backbone(tiny_cfg(weights=str(path)), 32)
    message = str(info.value)
    assert "wide.pth" in message
    named = re.search(r"tensor '([^']+)'", message)
    assert named, message
    key = named.group(1)
    target = build_backbone(tiny_cfg(), 32).vit.state_dict()
    assert key in src and key in target and src[key].shape != target[key].shape
    assert str(tuple(src[key].shape)) in message


@pytest.fixture(scope="module")
def torchvision_resnet_state():
    torch.manual_seed(11)
    return torchvision.models.resnet50(weights=None).state_dict()


def check_resnet_loaded(bb, src):
    keys = [k for k in src if not k.startswith("fc.")]
    state = bb.model.state_dict()
    assert not any(k.startswith("fc.") for k in state)
    assert_state_equal(state, src, keys)


def test_torchvision_resnet50_state_dict_loads(torchvision_resnet_state, tmp_path, caplog):
    src = torchvision_resnet_state
    assert "fc.weight" in src and "fc.bias" in src
    path = tmp_path / "resnet50_tv.pth"
    torch.save(src, path)
    with caplog.at_level(logging.INFO, logger="models.weights"):
        bb = build_backbone(BackboneConfig(name="resnet50", weights=str(path)), 32)
    check_resnet_loaded(bb, src)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("2 classifier-head tensors dropped" in r.getMessage() for r in caplog.records)


def test_official_barlow_twins_resnet50_format_loads_cleanly(torchvision_resnet_state, tmp_path, caplog):
    # The official file (facebookresearch/barlowtwins resnet50.pth) is a torchvision state dict without fc.
    src = {k: v for k, v in torchvision_resnet_state.items() if not k.startswith("fc.")}
    path = tmp_path / "resnet50.pth"
    torch.save(src, path)
    with caplog.at_level(logging.INFO, logger="models.weights"):
        bb = build_backbone(BackboneConfig(name="resnet50", weights=str(path), strict_weights=True), 32)
    check_resnet_loaded(bb, src)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "missing" not in messages and "unexpected" not in messages
    # load_into's own report on the backbone's torchvision module agrees.
    report = load_into(bb.model, path, strict=True)
    assert report.loaded == len(src) and not report.missing and not report.unexpected


def test_pixels_backbone_tokens_are_the_raw_patches():
    """backbone.name=pixels: each patch token is the patch's pixels (channel-major), through the same
    forward_intermediates call the segmenter makes; no trainable parameters."""
    from models.backbones import build_backbone, is_vit
    from models.backbones import resolve_architecture

    cfg = BackboneConfig(name="pixels", patch_size=4)
    assert is_vit("pixels") and resolve_architecture(cfg) == {"depth": 1, "embed_dim": 48, "num_heads": 1, "patch_size": 4}
    bb = build_backbone(cfg, 16)
    x = torch.randn(2, 3, 16, 12)
    (grid,) = bb.vit.forward_intermediates(x, indices=[0], norm=True, stop_early=True, output_fmt="NCHW",
                                           intermediates_only=True)
    assert grid.shape == (2, 48, 4, 3)
    for i in range(4):
        for j in range(3):
            expected = x[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(2, 48)
            assert torch.equal(grid[:, :, i, j], expected)
    assert not any(p.requires_grad for p in bb.parameters())
