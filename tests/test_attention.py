"""CLS attention with fused attention on, DINO's mass-threshold masks, and the attention-map callback."""
from __future__ import annotations

import copy
import functools
import logging
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import main
from callbacks.attention_maps import AttentionMapCallback
from analysis.attention import cls_attention, cls_attentions, mass_threshold_masks


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small_vit(patch: int, reg_tokens: int = 0, dynamic: bool = True, img_size: int = 32, **kwargs):
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=img_size,
                            dynamic_img_size=dynamic, patch_size=patch, depth=3, embed_dim=48, num_heads=3,
                            reg_tokens=reg_tokens, **kwargs)
    for blk in vit.blocks:
        blk.attn.fused_attn = True  # what training uses (timm's default where SDPA exists)
    return vit.eval()


@functools.lru_cache(maxsize=None)
def cached_vit(patch: int, reg_tokens: int):
    return small_vit(patch, reg_tokens)


def block_input(vit, images, index: int):
    """The input of ``vit.blocks[index]``, captured by a hook of the test's own."""
    seen = {}
    handle = vit.blocks[index].register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        vit.forward_features(images)
    handle.remove()
    return seen["x"]


def manual_attention(vit, images, index: int) -> torch.Tensor:
    """Full softmax(q·kᵀ/√d) of block ``index`` from its own weights: (B, heads, N, N), float64."""
    blk = vit.blocks[index]
    x = blk.norm1(block_input(vit, images, index)).double()
    B, N, _ = x.shape
    heads = blk.attn.num_heads
    qkv = F.linear(x, blk.attn.qkv.weight.double(), blk.attn.qkv.bias.double())
    q, k, _ = qkv.reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(dim=-1)


CASES = [(8, 32, 32), (8, 48, 48), (16, 32, 32), (16, 64, 64), (8, 48, 32)]  # patch, height, width


@pytest.mark.parametrize("reg_tokens", [0, 4])
@pytest.mark.parametrize("block", [-1, 0])
@pytest.mark.parametrize("patch,height,width", CASES)
def test_cls_attention_matches_manual_softmax_with_fused_attention_on(patch, height, width, block, reg_tokens):
    vit = cached_vit(patch, reg_tokens)
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height * width + block))
    assert all(blk.attn.fused_attn for blk in vit.blocks)
    vit.train()  # cls_attention works in eval mode and puts the modes back
    got = cls_attention(vit, images, block)
    assert vit.training and all(m.training for m in vit.modules())
    assert all(blk.attn.fused_attn for blk in vit.blocks)  # never switched off
    vit.eval()

    prefix = 1 + reg_tokens
    assert vit.num_prefix_tokens == prefix
    full = manual_attention(vit, images, block % len(vit.blocks))
    want = full[:, :, 0, prefix:].reshape(2, 3, height // patch, width // patch)
    assert got.shape == want.shape and got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-4)
    # not renormalised: CLS→patches plus CLS→prefix tokens is the full softmax row
    total = got.double().sum(dim=(-2, -1)) + full[:, :, 0, :prefix].sum(dim=-1)
    torch.testing.assert_close(total, torch.ones_like(total))
    assert (got.sum(dim=(-2, -1)) < 1).all()  # the CLS and register columns hold the rest


def unfused_probabilities(vit, images) -> dict[int, torch.Tensor]:
    """Block index → the attention probabilities timm's own unfused code path feeds to attn_drop, computed
    on a copy of ``vit`` with fused attention off: the independent reference for recomputed attention."""
    unfused = copy.deepcopy(vit)
    probs = {}
    for i, blk in enumerate(unfused.blocks):
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda m, args, out, i=i: probs.__setitem__(i, out))
    with torch.no_grad():
        unfused.forward_features(images)
    return probs


def test_cls_attention_is_what_timm_computes_unfused():
    """The probabilities timm's own unfused path feeds to attn_drop, on a copy with fused attention off."""
    vit = small_vit(8, reg_tokens=2)
    images = torch.randn(2, 3, 40, 24)
    probs = unfused_probabilities(vit, images)
    maps = cls_attentions(vit, images, [0, 1, -1])
    assert sorted(maps) == [0, 1, 2]
    for i in range(3):
        want = probs[i][:, :, 0, vit.num_prefix_tokens:].reshape(2, 3, 5, 3)
        torch.testing.assert_close(maps[i], want, atol=1e-6, rtol=1e-4)
    assert all(blk.attn.fused_attn for blk in vit.blocks)


def test_cls_attention_input_checks():
    vit = small_vit(8)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        cls_attention(vit, torch.randn(1, 3, 36, 32))
    with pytest.raises(IndexError, match=r"valid: 0\.\.2"):
        cls_attention(vit, torch.randn(1, 3, 32, 32), block=3)
    assert cls_attention(vit, torch.randn(1, 3, 32, 32), block=-3).shape == (1, 3, 4, 4)

    fixed = small_vit(8, dynamic=False)
    assert cls_attention(fixed, torch.randn(1, 3, 32, 32)).shape == (1, 3, 4, 4)  # its own size works
    with pytest.raises(ValueError, match="dynamic_img_size"):
        cls_attention(fixed, torch.randn(1, 3, 48, 48))

    no_cls = small_vit(8, class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="class token"):
        cls_attention(no_cls, torch.randn(1, 3, 32, 32))


# -- mass-threshold masks ---------------------------------------------------------------------------
def check_minimal(attn: torch.Tensor, mask: torch.Tensor, keep: float) -> None:
    flat, kept = attn.double().flatten(-2), mask.flatten(-2)
    total = flat.sum(-1)
    mass = (flat * kept).sum(-1)
    smallest = torch.where(kept, flat, torch.full_like(flat, float("inf"))).amin(-1)
    assert (mass >= keep * total).all()                      # holds the fraction
    assert (mass - smallest < keep * total).all()            # minimal: without its smallest patch it does not
    largest_dropped = torch.where(kept, torch.full_like(flat, -1.0), flat).amax(-1)
    assert (largest_dropped <= smallest).all()               # the top patches (no smaller set can do it)


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.6, 0.9, 0.999])
def test_mass_threshold_masks_keep_the_fraction_minimally(keep):
    torch.manual_seed(1)
    attn = torch.rand(3, 5, 7, 9) ** 4  # peaky, like attention
    attn = attn / attn.sum(dim=(-2, -1), keepdim=True) * 0.8
    mask = mass_threshold_masks(attn, keep)
    assert mask.shape == attn.shape and mask.dtype == torch.bool
    check_minimal(attn, mask, keep)
    # float32 input, 2-D input: same definition
    assert torch.equal(mass_threshold_masks(attn[1, 2], keep), mask[1, 2])


def test_mass_threshold_masks_by_hand():
    a = torch.tensor([[4.0, 1.0], [3.0, 2.0]])  # total 10
    assert mass_threshold_masks(a, 0.4).tolist() == [[True, False], [False, False]]
    assert mass_threshold_masks(a, 0.41).tolist() == [[True, False], [True, False]]
    assert mass_threshold_masks(a, 0.7).tolist() == [[True, False], [True, False]]  # 4 + 3 = 7 is enough
    assert mass_threshold_masks(a, 0.71).tolist() == [[True, False], [True, True]]
    assert mass_threshold_masks(a, 0.0).sum() == 0
    # ties: the first in row-major order wins, every time
    ties = torch.ones(2, 2)
    assert mass_threshold_masks(ties, 0.5).tolist() == [[True, True], [False, False]]
    assert mass_threshold_masks(ties, 0.51).tolist() == [[True, True], [True, False]]
    # keep=1.0: exactly the patches with mass; an all-zero map keeps nothing
    z = torch.tensor([[0.0, 5.0, 1e-30], [5.0, 0.0, 0.0]])
    assert mass_threshold_masks(z, 1.0).tolist() == [[False, True, True], [True, False, False]]
    assert mass_threshold_masks(torch.zeros(3, 3), 0.6).sum() == 0
    with pytest.raises(ValueError):
        mass_threshold_masks(a, 1.5)


def test_mass_threshold_masks_keep_one_keeps_everything_with_mass():
    torch.manual_seed(2)
    attn = torch.rand(2, 4, 6, 6)
    attn[attn < 0.3] = 0
    assert torch.equal(mass_threshold_masks(attn, 1.0), attn > 0)
    assert mass_threshold_masks(torch.rand(4, 4) + 0.1, 1.0).all()


# -- the callback -----------------------------------------------------------------------------------
def fake_module(vit):
    return SimpleNamespace(backbone=SimpleNamespace(vit=vit))


def test_check_messages():
    vit = small_vit(8)  # 3 blocks
    assert AttentionMapCallback(blocks=[0, -3, 2]).check(None, fake_module(vit)) is None
    message = AttentionMapCallback(blocks=[0, 3]).check(None, fake_module(vit))
    assert "--callbacks.attention_blocks" in message and "0..2" in message and "3" in message
    assert "ViT" in AttentionMapCallback().check(None, SimpleNamespace(backbone=SimpleNamespace(model=object())))
    callback = AttentionMapCallback(blocks=[-1, 2, 0, -3])
    assert callback.block_indices(3) == [2, 0]
    assert [callback.stem(b, 3, "e003") for b in (2, 0)] == ["attention_e003", "attention_b00_e003"]


def pngs(run):
    return sorted(p.name for p in (run / "media").glob("attention*.png"))


def check_png(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] > 200 and image.size[1] > 100
        assert image.size[0] < 4000 and image.size[1] < 4000


def test_tiny_run_writes_attention_maps(tiny, tmp_path):
    assert main.main(tiny("att", callbacks__attention="true", callbacks__attention_blocks="0",
                          callbacks__every_n_epochs=1, trainer__max_epochs=2)) == 0
    run = tmp_path / "runs" / "att"
    # the last block (block 1 of the 2-block tiny ViT) unprefixed, the extra block 0 as b00, every epoch
    assert pngs(run) == ["attention_b00_e000.png", "attention_b00_e001.png", "attention_e000.png", "attention_e001.png"]
    for name in pngs(run):
        check_png(run / "media" / name)


def test_resnet_run_turns_attention_maps_off(tiny, tmp_path, caplog):
    args = tiny("resnet", backbone__name="resnet50", backbone__depth=0, backbone__embed_dim=0,
                backbone__num_heads=0, backbone__patch_size=0, trainer__max_epochs=1, trainer__max_steps=1,
                trainer__limit_val_batches=1, callbacks__attention="true", callbacks__every_n_epochs=1)
    with caplog.at_level(logging.WARNING):
        assert main.main(args) == 0
    assert any("attention pictures are off" in r.getMessage() and "ViT" in r.getMessage() for r in caplog.records)
    assert pngs(tmp_path / "runs" / "resnet") == []
