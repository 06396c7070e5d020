"""The attention-fusion head (models/heads/attn_fusion.py) and the full-attention helpers it reads
(analysis/attention.py): maps against a brute-force reference, probabilities against timm's unfused path,
shapes, freezing, one backbone pass, parameter counts, and a run through main.py."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import main
from config.hparams import SegmentationConfig
from config.loading import parse_config
from config.validation import validate
from models.heads import HEADS
from models.heads.attn_fusion import MAP_NAMES, attention_maps
from models.segmenters import build_segmenter
from tests.test_attention import unfused_probabilities
from tests.test_main import ckpt, column, metrics
from analysis.attention import BlockAttention, block_attentions, cls_attention

CLASSES = 21


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def seg_cfg(patch: int = 8, img: int = 32, head: str = "attn_fusion", **flags):
    args = {"task": "segmentation", "backbone.name": "vit", "backbone.depth": 2, "backbone.embed_dim": 32,
            "backbone.num_heads": 2, "backbone.patch_size": patch, "data.img_size": img,
            "segmentation.head": head, "segmentation.hidden_dim": 16, **flags}
    return parse_config([f"--{k}={v}" for k, v in args.items()])


def segmenter(patch: int = 8, img: int = 32, head: str = "attn_fusion", **flags):
    torch.manual_seed(0)
    return build_segmenter(seg_cfg(patch, img, head, **flags))


def head_inputs(model, x):
    """What the segmenter hands to its head, captured by a hook of the test's own."""
    seen = {}
    handle = model.head.register_forward_pre_hook(lambda module, args: seen.setdefault("args", args))
    model(x)
    handle.remove()
    return seen["args"]


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------ the attention maps
def reference_maps(probs: torch.Tensor, prefix: int, rows: int, cols: int) -> torch.Tensor:
    """The seven maps per head, one query patch at a time, in float64, straight from their definitions."""
    probs = probs.double()
    batch, heads = probs.shape[:2]
    n = rows * cols
    pos = [((r + 0.5) / rows, (c + 0.5) / cols) for r in range(rows) for c in range(cols)]
    out = torch.zeros(batch, heads, len(MAP_NAMES), n, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            cls = [n * probs[b, h, 0, prefix + j].item() for j in range(n)]
            for i in range(n):
                row = probs[b, h, prefix + i]
                to_patches = [row[prefix + j].item() for j in range(n)]
                total = sum(to_patches)
                p = [v / total for v in to_patches]
                cy = sum(pj * y for pj, (y, _) in zip(p, pos))
                cx = sum(pj * x for pj, (_, x) in zip(p, pos))
                variance = sum(pj * ((y - cy) ** 2 + (x - cx) ** 2) for pj, (y, x) in zip(p, pos))
                entropy = -sum(pj * math.log(pj) for pj in p if pj > 0) / math.log(n) if n > 1 else 0.0
                out[b, h, :, i] = torch.tensor([
                    math.log1p(cls[i]), row[:prefix].sum().item(), entropy, cy - pos[i][0], cx - pos[i][1],
                    math.sqrt(variance), math.log1p(sum(pj * c for pj, c in zip(p, cls))),
                ])
    return out.reshape(batch, heads * len(MAP_NAMES), rows, cols)


@pytest.mark.parametrize("prefix,rows,cols", [(1, 3, 4), (3, 2, 2), (1, 1, 1)])
def test_attention_maps_match_their_definitions(prefix, rows, cols):
    g = torch.Generator().manual_seed(rows * 10 + cols)
    tokens = prefix + rows * cols
    probs = (3 * torch.randn(2, 3, tokens, tokens, generator=g)).softmax(dim=-1)
    got = attention_maps(BlockAttention(probs, prefix, (rows, cols)))
    assert got.shape == (2, 3 * 7, rows, cols) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference_maps(probs, prefix, rows, cols), atol=1e-5, rtol=1e-4)


def test_attention_maps_by_hand_on_a_two_patch_grid():
    # 1 x 2 grid, CLS + 2 patches, one head. Patch 0 looks only at patch 1; patch 1 splits 0.5/0.5.
    probs = torch.tensor([[[[0.2, 0.3, 0.5],     # CLS row
                            [0.0, 0.0, 1.0],     # patch 0
                            [0.5, 0.25, 0.25]]]])  # patch 1: half to CLS
    maps = attention_maps(BlockAttention(probs, 1, (1, 2)))[0, :, 0]  # (7, 2)
    cls, prefix, entropy, dy, dx, spread, attended = maps
    torch.testing.assert_close(cls, torch.tensor([math.log1p(0.6), math.log1p(1.0)]))
    torch.testing.assert_close(prefix, torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(entropy, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(dy, torch.zeros(2))
    torch.testing.assert_close(dx, torch.tensor([0.5, -0.25]))  # x centres 0.25 and 0.75; patch 1 looks at 0.5
    torch.testing.assert_close(spread, torch.tensor([0.0, 0.25]))
    torch.testing.assert_close(attended, torch.tensor([math.log1p(1.0), math.log1p(0.8)]))


# ----------------------------------------------------------------- the probabilities the head reads
def test_full_attention_is_what_timm_computes_unfused():
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", num_classes=0, img_size=32, dynamic_img_size=True,
                            patch_size=8, depth=3, embed_dim=48, num_heads=3, reg_tokens=2).eval()
    for blk in vit.blocks:
        blk.attn.fused_attn = True
    images = torch.randn(2, 3, 40, 24)
    probs = unfused_probabilities(vit, images)
    vit.train()
    got = block_attentions(vit, images, [0, -1])
    assert vit.training and all(blk.attn.fused_attn for blk in vit.blocks)
    assert sorted(got) == [0, 2]
    for i, att in got.items():
        assert att.num_prefix_tokens == 3 and att.grid == (5, 3) and not att.probs.requires_grad
        torch.testing.assert_close(att.probs, probs[i], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(att.cls, cls_attention(vit, images, i), atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(att.patches, probs[i][:, :, 3:, 3:], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("patch", [8, 16])
def test_head_receives_the_last_blocks_tokens_and_cls_attention(patch):
    model = segmenter(patch, img=64).eval()
    x = torch.randn(2, 3, 64, 48)
    features, attentions = head_inputs(model, x)
    vit = model.backbone.vit
    with torch.no_grad():
        want = vit.forward_intermediates(x, indices=[1], norm=True, output_fmt="NCHW", intermediates_only=True)
    assert len(features) == len(attentions) == 1
    torch.testing.assert_close(features[0], want[0])
    att = attentions[0]
    assert att.grid == (64 // patch, 48 // patch) and att.probs.shape[:2] == (2, 2)
    torch.testing.assert_close(att.cls, cls_attention(vit, x, -1), atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(att.probs.sum(-1), torch.ones(att.probs.shape[:3]))


# ------------------------------------------------------------------------------------ shapes, grads
@pytest.mark.parametrize("patch", [8, 16])
@pytest.mark.parametrize("height,width", [(32, 32), (64, 64), (48, 80)])
def test_logits_at_input_size_for_patch_8_and_16(patch, height, width):
    model = segmenter(patch, img=32).eval()
    x = torch.randn(2, 3, height, width)
    features, attentions = head_inputs(model, x)
    with torch.no_grad():
        assert model.head(features, attentions).shape == (2, CLASSES, height // patch, width // patch)
        out = model(x)["out"]
    assert out.shape == (2, CLASSES, height, width) and torch.isfinite(out).all()


def test_frozen_backbone_gets_no_gradient_and_every_head_parameter_does():
    model = segmenter(8, img=32).train()
    assert not model.backbone.training  # a frozen backbone stays in eval mode
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    target = torch.randint(0, CLASSES, (4, 32, 32))
    _, attentions = head_inputs(model, x)
    assert not attentions[0].probs.requires_grad  # computed under no_grad
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x)["out"], target).backward()
        for name, p in model.head.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    assert all(torch.equal(v, backbone_before[k]) for k, v in model.backbone.state_dict().items())


def test_one_backbone_pass_per_forward_and_no_attention_for_other_heads(monkeypatch):
    model = segmenter(8).eval()
    calls = []
    model.backbone.vit.blocks[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert len(calls) == 1
    import models.segmenters as segmenters

    def refuse(*args, **kwargs):
        raise AssertionError("attention recorded for a head that does not need it")

    monkeypatch.setattr(segmenters, "recorded_attention_inputs", refuse)
    monkeypatch.setattr(segmenters, "block_attention", refuse)
    naive = segmenter(8, head="setr_naive").eval()
    assert not naive.needs_attention
    with torch.no_grad():
        assert naive(torch.randn(2, 3, 32, 32))["out"].shape == (2, CLASSES, 32, 32)


def test_attention_changes_the_prediction_and_without_it_the_head_is_setr_naive():
    torch.manual_seed(0)
    seg = SegmentationConfig(hidden_dim=16)
    head = HEADS.get("attn_fusion")(32, CLASSES, 8, seg, num_heads=2)
    naive = HEADS.get("setr_naive")(32, CLASSES, 8, seg)
    for module in (head, naive):  # non-trivial BatchNorm statistics and affine parameters
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2)
    head.eval(), naive.eval()
    tokens = torch.randn(2, 32, 3, 4)
    a1, a2 = (BlockAttention(torch.randn(2, 2, 13, 13).softmax(-1), 1, (3, 4)) for _ in range(2))
    with torch.no_grad():
        assert not torch.allclose(head([tokens], [a1]), head([tokens], [a2]))
        head.hidden[0].weight[:, 32:] = 0  # no weight on the 14 attention channels
        naive.hidden.load_state_dict(head.hidden.state_dict() | {"0.weight": head.hidden[0].weight[:, :32]})
        naive.classifier.load_state_dict(head.classifier.state_dict())
        torch.testing.assert_close(head([tokens], [a1]), naive([tokens]))
        torch.testing.assert_close(head([tokens], [a2]), naive([tokens]))


def test_bf16_autocast_keeps_float32_probabilities():
    model = segmenter(8).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features, attentions = head_inputs(model, x)
        with torch.no_grad():
            out = model(x)["out"]
    assert attentions[0].probs.dtype == torch.float32
    torch.testing.assert_close(attentions[0].probs.sum(-1), torch.ones(attentions[0].probs.shape[:3]))
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------- protocol, errors
def test_factory_and_forward_refuse_what_they_cannot_use():
    seg = SegmentationConfig(hidden_dim=16)
    with pytest.raises(ValueError, match="num_heads"):
        HEADS.get("attn_fusion")(32, CLASSES, 8, seg)
    with pytest.raises(ValueError, match="one ViT block"):
        HEADS.get("attn_fusion")(32, CLASSES, 8, seg, num_levels=2, num_heads=2)
    head = HEADS.get("attn_fusion")(32, CLASSES, 8, seg, num_heads=2)
    tokens = torch.randn(1, 32, 2, 2)
    with pytest.raises(ValueError, match="built for 2 attention heads"):
        head([tokens], [BlockAttention(torch.rand(1, 3, 5, 5).softmax(-1), 1, (2, 2))])
    with pytest.raises(ValueError, match="differs from the feature grid"):
        head([tokens], [BlockAttention(torch.rand(1, 2, 7, 7).softmax(-1), 1, (2, 3))])
    with pytest.raises(ValueError, match="no class token"):
        build_segmenter(seg_cfg(16, **{"backbone.name": "vit_medium_patch16_gap_256"}))


@pytest.mark.parametrize("in_dim,heads,hidden", [(32, 2, 16), (128, 4, 128), (384, 6, 256)])  # tiny, quickstart, ViT-S
def test_parameter_counts(in_dim, heads, hidden):
    seg = SegmentationConfig(hidden_dim=hidden)
    fusion = n_params(HEADS.get("attn_fusion")(in_dim, CLASSES, 16, seg, num_heads=heads))
    naive = n_params(HEADS.get("setr_naive")(in_dim, CLASSES, 16, seg))
    maps = 7 * heads
    # BatchNorm on the maps (weight + bias), 1x1 conv without bias, BatchNorm, classifier with bias
    assert fusion == 2 * maps + (in_dim + maps) * hidden + 2 * hidden + hidden * CLASSES + CLASSES
    assert fusion - naive == maps * hidden + 2 * maps
    print(f"attn_fusion D={in_dim} heads={heads} hidden={hidden}: {fusion} parameters (setr_naive {naive})")


# -------------------------------------------------------------------------------------- end to end
def test_selected_by_flag_end_to_end(tiny, tmp_path):
    args = tiny("fusion", task="segmentation", segmentation__head="attn_fusion", segmentation__hidden_dim=8,
                data__batch_size=4, trainer__max_epochs=1, trainer__limit_train_batches=3, trainer__limit_val_batches=2,
                trainer__precision="32-true")
    assert validate(parse_config(args)).segmentation.head == "attn_fusion"
    assert main.main(args) == 0
    run = tmp_path / "runs" / "fusion"
    state = ckpt(run / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 3
    head_keys = {k for k in state["state_dict"] if k.startswith("model.head.")}
    assert {"model.head.attn_norm.running_mean", "model.head.hidden.0.weight"} <= head_keys
    assert state["state_dict"]["model.head.hidden.0.weight"].shape == (8, 32 + 2 * 7, 1, 1)
    assert len(column(metrics(run), "val/mIoU")) == 1
