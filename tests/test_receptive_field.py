"""Effective receptive fields: exact supports on small CNNs, ViT token layouts, layer specs, the callback."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from torch import nn

import main
from config.hparams import Hparams
from analysis.receptive_field import centre_patch_box, effective_receptive_field, erf_model, resolve_layers
from callbacks.checks import check_erf_layers

SIZE = 17  # odd: the centre unit sits at pixel (8, 8)
C = SIZE // 2


def support(erf: torch.Tensor) -> tuple[slice, slice]:
    """The bounding box of the nonzero entries, asserting it is filled (nonzero exactly on a rectangle)."""
    rows, cols = torch.nonzero(erf, as_tuple=True)
    box = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
    inside = torch.zeros_like(erf, dtype=torch.bool)
    inside[box] = True
    assert torch.equal(erf != 0, inside)
    return box


def positive_conv(k: int, channels_in: int = 3, channels_out: int = 4, dilation: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(channels_in, channels_out, k, padding=dilation * (k // 2), dilation=dilation)
    with torch.no_grad():
        conv.weight.uniform_(0.1, 1.0)
        conv.bias.zero_()
    return conv


@pytest.mark.parametrize("k", [3, 5])
def test_single_conv_is_exactly_its_kernel_window(k):
    conv = positive_conv(k)
    erf = effective_receptive_field(conv, torch.randn(2, 3, SIZE, SIZE), conv)
    assert erf.shape == (SIZE, SIZE)
    assert support(erf) == (slice(C - k // 2, C + k // 2 + 1),) * 2
    assert erf.max() == pytest.approx(1.0)


def test_support_grows_with_depth():
    layers = [positive_conv(3, 3 if i == 0 else 4) for i in range(3)]
    net = nn.Sequential(*[m for conv in layers for m in (conv, nn.ReLU())])
    images = torch.rand(2, 3, SIZE, SIZE) + 0.1  # positive everywhere: every ReLU passes
    for depth in (1, 2, 3):
        erf = effective_receptive_field(net, images, net[2 * depth - 1])  # the ReLU after conv `depth`
        r = depth  # 3×3, 5×5, 7×7
        assert support(erf) == (slice(C - r, C + r + 1),) * 2, depth
    # a dilated 3×3 (dilation 2) touches every other pixel of a 5×5 window
    dilated = positive_conv(3, dilation=2)
    erf = effective_receptive_field(dilated, images, dilated)
    assert torch.equal(torch.nonzero(erf), torch.tensor([[C + i, C + j] for i in (-2, 0, 2) for j in (-2, 0, 2)]))


def test_layer_by_name_dict_outputs_and_unused_layer():
    net = nn.Sequential(positive_conv(3), nn.ReLU(), positive_conv(3, 4))
    images = torch.rand(1, 3, SIZE, SIZE) + 0.1
    assert torch.equal(effective_receptive_field(net, images, "2"), effective_receptive_field(net, images, net[2]))
    with pytest.raises(RuntimeError, match="not called"):
        effective_receptive_field(net, images, nn.Conv2d(3, 3, 1))


def tiny_vit(**kwargs) -> nn.Module:
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                             depth=2, embed_dim=32, num_heads=2, dynamic_img_size=True, **kwargs).eval()


def test_vit_block0_is_global_and_identity_blocks_see_only_the_centre_patch():
    torch.manual_seed(0)
    vit = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    erf = effective_receptive_field(vit, images, vit.blocks[0])
    assert erf.shape == (32, 32) and torch.isfinite(erf).all()
    assert erf.max() == pytest.approx(1.0)
    assert (erf > 0).all()  # global attention: every pixel reaches the centre token
    # Blocks whose residual branches output zero are the identity: the centre token is its own patch only.
    for block in vit.blocks:
        nn.init.zeros_(block.attn.proj.weight), nn.init.zeros_(block.attn.proj.bias)
        nn.init.zeros_(block.mlp.fc2.weight), nn.init.zeros_(block.mlp.fc2.bias)
    # 4×4 grid of 8-px patches: the centre patch (2, 2) covers pixels 16..23; a 32×48 input: 4×6, patch (2, 3)
    assert support(effective_receptive_field(vit, images, "blocks.1")) == (slice(16, 24), slice(16, 24))
    wide = effective_receptive_field(vit, torch.randn(2, 3, 32, 48), vit.blocks[1])
    assert wide.shape == (32, 48) and support(wide) == (slice(16, 24), slice(24, 32))


def test_chunks_give_the_same_map():
    torch.manual_seed(0)
    vit = tiny_vit()
    images = torch.randn(7, 3, 32, 32)
    whole = effective_receptive_field(vit, images, vit.blocks[1])
    # by hand: the per-image gradient magnitudes, averaged over images and channels, peak-normalised
    grads = []
    for image in images:
        x = image[None].clone().requires_grad_(True)
        tokens = vit.blocks[1](vit.blocks[0](vit._pos_embed(vit.patch_embed(x))))
        (grad,) = torch.autograd.grad(tokens[:, 1 + 2 * 4 + 2].sum(), x)  # centre patch (2, 2) of the 4×4 grid
        grads.append(grad.abs().mean(dim=(0, 1)))
    by_hand = torch.stack(grads).mean(0)
    assert torch.allclose(whole, by_hand / by_hand.max(), atol=1e-5)
    with torch.inference_mode():
        chunked = effective_receptive_field(vit, images, vit.blocks[1], chunk_size=3)  # 3 + 3 + 1
    assert torch.allclose(chunked, whole, atol=1e-6)


def test_parameter_grads_stay_clean_and_inference_mode_is_left():
    vit = tiny_vit()
    with torch.inference_mode():
        images = torch.randn(2, 3, 32, 32)  # an inference tensor, as in Lightning's validation loop
        erf = effective_receptive_field(vit, images, vit.blocks[-1])
        assert torch.is_inference_mode_enabled()
    assert erf.shape == (32, 32) and erf.max() == pytest.approx(1.0)
    assert all(p.grad is None for p in vit.parameters())
    conv = positive_conv(3)
    with torch.no_grad():
        effective_receptive_field(conv, torch.randn(1, 3, SIZE, SIZE), conv)
    assert conv.weight.grad is None and conv.bias.grad is None


def test_resolve_layers_vit():
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            depth=12, embed_dim=32, num_heads=2)
    backbone = nn.Module()
    backbone.vit = vit  # like ViTBackbone
    assert erf_model(backbone) is vit
    assert [n for n, _ in resolve_layers(backbone, "")] == ["blocks.0", "blocks.4", "blocks.7", "blocks.11"]
    layers = resolve_layers(vit, " 0, 3,-1 ")
    assert [n for n, _ in layers] == ["blocks.0", "blocks.3", "blocks.11"]
    assert layers[2][1] is vit.blocks[11]
    assert [n for n, _ in resolve_layers(tiny_vit(), "")] == ["blocks.0", "blocks.1"]  # depth 2: both
    with pytest.raises(ValueError, match=r"--callbacks\.erf_layers.*out of range.*0\.\.11"):
        resolve_layers(vit, "0,12")
    with pytest.raises(ValueError, match=r"--callbacks\.erf_layers.*'layer1'.*0\.\.11"):
        resolve_layers(vit, "layer1")


def test_resolve_layers_resnet():
    import torchvision
    from torchvision.models.segmentation import deeplabv3_resnet50

    from models.backbones.resnet import ResNetBackbone

    backbone = ResNetBackbone(torchvision.models.resnet50(weights=None))
    assert erf_model(backbone) is backbone.model
    layers = resolve_layers(backbone, "")
    assert [n for n, _ in layers] == ["layer1", "layer2", "layer3", "layer4"]
    assert layers[3][1] is backbone.model.layer4
    assert [n for n, _ in resolve_layers(backbone, "conv1,layer4")] == ["conv1", "layer4"]
    with pytest.raises(ValueError, match=r"--callbacks\.erf_layers.*'layer5'.*conv1, layer1, layer2, layer3, layer4"):
        resolve_layers(backbone, "layer1,layer5")
    with pytest.raises(ValueError, match="ViT or ResNet"):
        erf_model(nn.Linear(2, 2))
    # DeepLab's trunk returns a dict: it is run as it is and the layer hooked
    trunk = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21).backbone.eval()
    images = torch.randn(1, 3, 32, 32)
    small, large = (effective_receptive_field(trunk, images, layer) for _, layer in resolve_layers(trunk, "layer1,layer4"))
    assert small.shape == large.shape == (32, 32)
    assert (small > 0.01).sum() < (large > 0.01).sum()


def test_check_erf_layers():
    cfg = Hparams()
    cfg.callbacks.erf_layers = "0,99"
    assert check_erf_layers(cfg) is None  # erf off: not checked
    cfg.callbacks.erf = True
    cfg.backbone.name, cfg.backbone.depth = "vit", 4
    message = check_erf_layers(cfg)
    assert "--callbacks.erf_layers" in message and "0..3" in message
    cfg.callbacks.erf_layers = "-4,3"
    assert check_erf_layers(cfg) is None
    cfg.backbone.depth = 0  # the named architecture's depth: vit_small_patch16_224 has 12 blocks
    cfg.callbacks.erf_layers = "11"
    assert check_erf_layers(cfg) is None
    cfg.backbone.name = "resnet50"
    assert "layer4" in check_erf_layers(cfg)
    cfg.callbacks.erf_layers = "layer2, layer4"
    assert check_erf_layers(cfg) is None
    cfg.backbone.name = "no_such_backbone"  # reported by the backbone check, not here
    assert check_erf_layers(cfg) is None


def assert_png(path: Path) -> None:
    assert path.is_file(), sorted(p.name for p in path.parent.glob("*"))
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG"


def test_callback_writes_png_in_tiny_vit_run(tiny, tmp_path):
    args = tiny("erf", callbacks__erf="true", callbacks__attention="false", callbacks__every_n_epochs=1,
                trainer__max_epochs=1)
    assert main.main(args) == 0
    assert_png(tmp_path / "runs" / "erf" / "media" / "erf_e000.png")


def test_callback_writes_png_in_tiny_resnet_run(tiny, tmp_path):
    args = tiny("erf_resnet", backbone__name="resnet50", backbone__depth=0, backbone__embed_dim=0,
                backbone__num_heads=0, backbone__patch_size=0, trainer__max_epochs=1, trainer__max_steps=2,
                trainer__limit_val_batches=1, callbacks__erf="true", callbacks__attention="false",
                callbacks__erf_layers="conv1,layer2,layer4", callbacks__every_n_epochs=1)
    assert main.main(args) == 0
    assert_png(tmp_path / "runs" / "erf_resnet" / "media" / "erf_e000.png")


def test_callback_disables_itself_on_a_bad_spec():
    from callbacks.receptive_field import ReceptiveFieldCallback

    callback = ReceptiveFieldCallback(layers="7")
    module = nn.Module()
    module.backbone = nn.Module()
    module.backbone.vit = tiny_vit()
    problem = callback.check(None, module)
    assert "--callbacks.erf_layers" in problem and "0..1" in problem
    assert ReceptiveFieldCallback(layers="-1").check(None, module) is None


def test_callback_in_frozen_backbone_segmentation_run(tiny, tmp_path):
    args = tiny("erf_seg", task="segmentation", segmentation__hidden_dim=16, data__batch_size=4, trainer__max_epochs=1,
                trainer__limit_train_batches=2, trainer__limit_val_batches=1, callbacks__erf="true",
                callbacks__attention="false", callbacks__predictions="false", callbacks__erf_layers="-1",
                callbacks__every_n_epochs=1)
    assert main.main(args) == 0
    assert_png(tmp_path / "runs" / "erf_seg" / "media" / "erf_e000.png")


def test_log_scale_plot(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from callbacks.receptive_field import plot_receptive_fields

    maps = {f"layer{i}": torch.rand(16, 16) for i in range(5)}  # 5 maps: two rows of up to 4
    maps["layer0"].zero_()  # zeros are clamped to the bottom of the log scale
    fig = plot_receptive_fields(maps, "title", log_scale=True)
    fig.savefig(tmp_path / "erf.png")
    plt.close(fig)
    assert_png(tmp_path / "erf.png")


def test_centre_patch_box():
    vit = tiny_vit()  # patch 8: a 4×4 grid at 32 px, the centre token is patch (2, 2)
    assert centre_patch_box(vit, (32, 32)) == (16, 24, 16, 24)
    assert centre_patch_box(vit, (32, 48)) == (16, 24, 24, 32)  # 4×6 grid: patch (2, 3)
    assert centre_patch_box(nn.Sequential(positive_conv(3)), (32, 32)) is None  # a CNN has no patches


def test_vit_panels_show_patch_means_on_the_scale_of_the_other_patches():
    import matplotlib

    matplotlib.use("Agg")
    from callbacks.receptive_field import plot_receptive_fields

    # Two 64×64 "ViT" maps, patch 8, centre patch (4, 4) = pixels 32..39 at 1000× the rest (peak 1):
    # "local" falls off with the distance to the centre patch, "flat" is the same everywhere outside it.
    torch.manual_seed(0)
    texture = torch.rand(8, 8) + 0.5  # a pixel pattern repeated in every patch, like a patch embedding's
    distance = torch.tensor([[max(abs(i - 4), abs(j - 4)) for j in range(8)] for i in range(8)], dtype=torch.float)
    maps = {}
    for name, level in {"local": 1.0 / (1 + distance), "flat": torch.ones(8, 8)}.items():
        erf = torch.kron(level, texture) * 1e-3
        erf[32:40, 32:40] = texture * (1.0 / texture.max())
        maps[name] = erf
    box = (32, 40, 32, 40)
    fig = plot_receptive_fields(maps, "t", boxes={name: box for name in maps})
    for ax, (name, erf) in zip(fig.axes, maps.items()):
        shown = torch.as_tensor(ax.get_images()[0].get_array())
        means = torch.tensor([[erf[8 * i:8 * i + 8, 8 * j:8 * j + 8].mean().item() for j in range(8)] for i in range(8)])
        outside = [means[i, j].item() for i in range(8) for j in range(8) if (i, j) != (4, 4)]
        expected = means / max(outside)
        for i, j in [(0, 0), (3, 4), (7, 2), (5, 5), (4, 4)]:  # every pixel of a patch shows its patch's mean
            assert torch.allclose(shown[8 * i:8 * i + 8, 8 * j:8 * j + 8], torch.full((8, 8), expected[i, j].item()))
        assert shown[32:40, 32:40].min() > 1  # the centre patch saturates
        share = erf[32:40, 32:40].sum() / erf.sum()
        assert ax.get_title() == f"{name}: {share:.0%} in its own patch"
    local, flat = (torch.as_tensor(ax.get_images()[0].get_array()) for ax in fig.axes[:2])
    # the difference between the layers is visible: the local map spans the colour scale, the flat one is uniform
    assert local[0, 0] == pytest.approx(0.4, abs=1e-5) and local[24, 24] == pytest.approx(1.0)  # (1/5) / (1/2)
    assert torch.allclose(flat[0:32], torch.ones(32, 64))
    # which a peak-normalised picture hides: outside the centre patch everything is below 1 % of the peak
    assert max(float(m[:32].max()) for m in maps.values()) < 0.01


def test_erf_callback_uses_its_own_image_count():
    from callbacks import visualisation_callbacks
    from callbacks.receptive_field import ReceptiveFieldCallback

    cfg = Hparams()
    cfg.callbacks.erf, cfg.callbacks.erf_images, cfg.callbacks.num_images = True, 48, 4
    erf = next(c for c in visualisation_callbacks(cfg) if isinstance(c, ReceptiveFieldCallback))
    assert erf.num_images == 48 and Hparams().callbacks.erf_images == 64
