"""The emergence Jaccard (attention masks vs ground truth) under its two protocols, its callback and the
one-command evaluation (tools/emergence.py).

References written here, independent of the code under test: a plain transcription of the public evaluation
code behind DINO's numbers (Naseer et al.'s ``get_attention_masks`` / ``get_per_sample_jaccard`` /
``run_eval``, its torchvision preprocessing and its position-embedding interpolation), a plain-loop
reference of the ``strict`` protocol, and answers worked out by hand on planted attention maps.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import main
from callbacks.emergence import EmergenceCallback, emergence_ids, label_path, load_emergence_set
from config.loading import ConfigError, parse_config
from config.validation import validate
from tests.test_main import ckpt, column, metrics
from tests.wandb_records import logged, run_file
from analysis.emergence import (dino_position_embedding, dino_preprocess, dino_threshold_masks, emergence_jaccard,
                             image_jaccard, jaccard_per_head, normalize, object_masks, upsample_masks)


def finished_run_file(run_dir: Path, timeout: float = 60.0) -> Path:
    return run_file(run_dir, timeout)  # waits for wandb's exit record


def box(h: int, w: int, rows: slice, cols: slice) -> torch.Tensor:
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[rows, cols] = True
    return mask


def planted_attention(grid: torch.Tensor) -> torch.Tensor:
    """A 4x4 attention map (summing to 1) whose 60% mass-threshold mask is exactly ``grid`` (k of the 16
    patches): each chosen patch holds m, the others share 1 - k·m. The chosen patches sort first
    (m > (1 - k·m) / (16 - k)) and exactly k of them are needed when (k - 1)·m < 0.6 <= k·m:
    m = 0.6 / (k - 1/2) for k >= 2 (and 0.8 for k = 1)."""
    k = int(grid.sum())
    m = 0.8 if k == 1 else 0.6 / (k - 0.5)
    rest = (1 - k * m) / (16 - k)
    assert 0 <= rest < m
    return torch.where(grid, torch.tensor(m), torch.tensor(rest)).float()


# -- the public reference code, transcribed -------------------------------------------------------------------
def reference_masks(attn: np.ndarray, keep: float, patch: int) -> np.ndarray:
    """get_attention_masks: (heads, h, w) attention → (heads, h·patch, w·patch) 0/1 masks."""
    heads, h, w = attn.shape
    flat = attn.reshape(heads, -1).astype(np.float32)
    masks = np.zeros_like(flat)
    for i in range(heads):
        idx = np.argsort(flat[i], kind="stable")
        val = flat[i][idx] / flat[i].sum()
        th = np.cumsum(val) > (1 - keep)
        masks[i][idx] = th  # th_attn[head][idx2[head]] undoes the sort
    masks = masks.reshape(heads, h, w)
    return np.kron(masks, np.ones((1, patch, patch), dtype=np.float32))  # interpolate(nearest, x patch)


def reference_per_sample_jaccard(pred: np.ndarray, target: np.ndarray) -> float:
    """get_per_sample_jaccard, line by line (its void test is on a boolean, so void pixels join the union)."""
    jac, object_count = 0.0, 0
    for mask_idx in np.unique(target):
        if mask_idx in (0, 255):
            continue
        cur_mask = target == mask_idx
        intersection = ((cur_mask * pred) * (cur_mask != 255)).sum(axis=(1, 2))
        union = (((cur_mask + pred) > 0) * (cur_mask != 255)).sum(axis=(1, 2))
        jac += (intersection / union).max()
        object_count += 1
    return jac / object_count


def reference_dino(attn: np.ndarray, labels: list[np.ndarray], keep: float, patch: int) -> float:
    """run_eval: mean over images of the per-sample Jaccard."""
    return float(np.mean([reference_per_sample_jaccard(reference_masks(a, keep, patch), t)
                          for a, t in zip(attn, labels)]))


def reference_strict(attn: np.ndarray, labels: list[np.ndarray], keep: float) -> float:
    """The strict protocol with plain loops: DINO's thresholding, nearest upsampling by index arithmetic,
    void excluded from intersection and union, best head per object, mean over objects then images."""
    scores = []
    for maps, label in zip(attn, labels):
        heads, gh, gw = maps.shape
        h, w = label.shape
        rows, cols = (np.arange(h) * gh) // h, (np.arange(w) * gw) // w
        masks = []
        for a in maps.reshape(heads, -1):
            order = np.argsort(a, kind="stable")
            cumulative = np.cumsum(a[order] / a.sum())
            kept = np.zeros(a.size, bool)
            kept[order] = cumulative > 1 - keep
            masks.append(kept.reshape(gh, gw)[rows][:, cols])
        valid = label != 255
        objects = [i for i in np.unique(label) if i not in (0, 255)]
        if not objects:
            continue
        best = []
        for i in objects:
            obj = (label == i) & valid
            best.append(max(((m & obj).sum() / ((m & valid) | obj).sum()) for m in masks))
        scores.append(np.mean(best))
    return float(np.mean(scores))


# -- building blocks ------------------------------------------------------------------------------------
def test_object_masks_ignore_background_and_void():
    labels = torch.tensor([[0, 1, 1], [255, 3, 1], [0, 3, 255]], dtype=torch.uint8)
    objects, valid = object_masks(labels)
    assert objects.shape == (2, 3, 3)
    assert objects[0].tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    assert objects[1].tolist() == [[False, False, False], [False, True, False], [False, True, False]]
    assert valid.sum() == 7


def test_upsample_masks_nearest_to_any_size():
    grid = torch.tensor([[True, False], [False, True]])
    up = upsample_masks(grid, (3, 5))
    # nearest: row i takes floor(i·2/3) = 0, 0, 1; column j takes floor(j·2/5) = 0, 0, 0, 1, 1
    expected = [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 1]]
    assert up.int().tolist() == expected
    assert upsample_masks(grid[None].expand(3, 2, 2), (4, 4)).shape == (3, 4, 4)


@pytest.mark.parametrize("threshold", ["dino", "mass"])
def test_planted_attention_threshold_masks_are_the_planted_patches(threshold):
    from analysis.attention import mass_threshold_masks

    fn = dino_threshold_masks if threshold == "dino" else mass_threshold_masks
    for k in range(1, 9):
        grid = torch.zeros(4, 4, dtype=torch.bool)
        grid.view(-1)[torch.tensor([1, 6, 11, 12, 0, 15, 3, 9][:k])] = True
        assert torch.equal(fn(planted_attention(grid), 0.6), grid), k


def test_dino_threshold_masks_equal_the_reference_on_random_maps():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(5, 3, 6, 7, generator=g) ** 4  # peaked, no ties
    for keep in (0.3, 0.6, 0.9):
        got = dino_threshold_masks(attn, keep)
        for image in range(5):
            want = reference_masks(attn[image].numpy(), keep, 1)
            assert np.array_equal(got[image].numpy(), want.astype(bool))


# -- the two protocols on planted maps, answers by hand ---------------------------------------------------
def void_ring_image():
    """8x8 label map, patch 2 (4x4 grid): object 1 at pixels 2-5 x 2-5 (16 px) inside a void ring (pixels
    1-6 x 1-6 minus the object: 20 px), as VOC draws object borders."""
    labels = torch.zeros(8, 8, dtype=torch.uint8)
    labels[1:7, 1:7] = 255
    labels[2:6, 2:6] = 1
    return labels


@pytest.mark.parametrize("patches, dino, strict", [
    ((slice(1, 3), slice(1, 3)), 1.0, 1.0),          # exactly the object
    ((slice(0, 3), slice(0, 3)), 16 / 36, 16 / 27),  # pixels 0-5 x 0-5: 9 of its 36 px are void
    ((slice(0, 4), slice(0, 4)), 16 / 64, 16 / 44),  # the whole image (uniform map, keep 1): 20 void px
])
def test_void_pixels_join_the_union_under_dino_and_are_excluded_under_strict(patches, dino, strict):
    labels = void_ring_image()
    grid = box(4, 4, *patches)
    everything = bool(grid.all())
    attn = (torch.full((4, 4), 1 / 16) if everything else planted_attention(grid))[None, None]
    keep = 1.0 if everything else 0.6
    assert emergence_jaccard(attn, [labels], keep, protocol="dino").jaccard == pytest.approx(dino)
    assert emergence_jaccard(attn, [labels], keep, protocol="strict").jaccard == pytest.approx(strict)
    assert reference_dino(attn.numpy(), [labels.numpy()], keep, 2) == pytest.approx(dino)
    assert reference_strict(attn.numpy(), [labels.numpy()], keep) == pytest.approx(strict)


def test_exact_cover_is_one_and_disjoint_is_zero():
    labels = torch.zeros(8, 8, dtype=torch.uint8)
    labels[0:4, 0:4] = 1  # the object: patches (0,0), (0,1), (1,0), (1,1) of the 4x4 grid
    cover = box(4, 4, slice(0, 2), slice(0, 2))
    disjoint = box(4, 4, slice(2, 4), slice(2, 4))
    attn = torch.stack([planted_attention(cover), planted_attention(disjoint)])[None]  # (1, 2 heads, 4, 4)
    for protocol in ("dino", "strict"):
        score = emergence_jaccard(attn, [labels], protocol=protocol)
        assert score.jaccard == pytest.approx(1.0)
        assert score.per_head.tolist() == pytest.approx([1.0, 0.0])
        assert (score.images, score.objects, score.skipped) == (1, 1, 0)
        assert emergence_jaccard(attn[:, 1:], [labels], protocol=protocol).jaccard == 0.0


def test_partial_overlap_by_hand():
    # head: rows 0-2, cols 0-3 (12 px); object: rows 1-4, cols 2-5 (16 px); overlap rows 1-2, cols 2-3 (4 px)
    head = box(6, 6, slice(0, 3), slice(0, 4))[None]
    obj = box(6, 6, slice(1, 5), slice(2, 6))[None]
    assert jaccard_per_head(head, obj).item() == pytest.approx(4 / (12 + 16 - 4))
    valid = torch.ones(6, 6, dtype=torch.bool)
    valid[0, 0] = False  # a void pixel in the head's mask: out of the union only when excluded
    assert jaccard_per_head(head, obj, valid).item() == pytest.approx(4 / (11 + 16 - 4))


@pytest.mark.parametrize("protocol", ["dino", "strict"])
def test_best_head_per_object_then_mean_over_objects(protocol):
    labels = torch.zeros(8, 8, dtype=torch.uint8)
    labels[0:4, 0:4] = 7  # object A: patches rows 0-1, cols 0-1
    labels[4:8, 4:8] = 9  # object B: patches rows 2-3, cols 2-3
    head_a = box(4, 4, slice(0, 2), slice(0, 2))  # A exactly
    head_b_half = box(4, 4, slice(2, 4), slice(2, 3))  # half of B: IoU 8 / 16
    head_a_b = box(4, 4, slice(0, 1), slice(0, 2)) | box(4, 4, slice(2, 3), slice(2, 4))  # half of A, half of B
    attn = torch.stack([planted_attention(g) for g in (head_a, head_b_half, head_a_b)])[None]
    # IoU (pixels): head_a: A 1, B 0; head_b_half: A 0, B 8/16; head_a_b: A 8/(16+16-8) = 1/3, B 1/3
    matrix = image_jaccard(torch.stack([head_a, head_b_half, head_a_b]), labels, protocol)
    assert matrix.flatten().tolist() == pytest.approx([1, 0, 1 / 3, 0, 0.5, 1 / 3])
    score = emergence_jaccard(attn, [labels], protocol=protocol)
    assert score.jaccard == pytest.approx((1 + 0.5) / 2)  # A: head 0; B: head 1
    assert score.per_head.tolist() == pytest.approx([0.5, 0.25, 1 / 3])


@pytest.mark.parametrize("protocol", ["dino", "strict"])
def test_mean_over_objects_then_over_images(protocol):
    one = torch.zeros(8, 8, dtype=torch.uint8)
    one[0:4, 0:4] = 1
    one[4:8, 4:8] = 2  # image 1: two objects, the only head covers the first → (1 + 0) / 2
    two = torch.zeros(8, 8, dtype=torch.uint8)
    two[0:4, 0:4] = 5  # image 2: one object, covered → 1
    empty = torch.zeros(8, 8, dtype=torch.uint8)  # image 3: background only → left out (the reference divides by 0)
    head = planted_attention(box(4, 4, slice(0, 2), slice(0, 2)))
    attn = head.expand(3, 1, 4, 4)
    score = emergence_jaccard(attn, [one, two, empty], protocol=protocol)
    assert score.jaccard == pytest.approx((0.5 + 1.0) / 2)  # not the object mean 2/3
    assert (score.images, score.objects, score.skipped) == (2, 3, 1)
    assert reference_dino(attn[:2].numpy(), [one.numpy(), two.numpy()], 0.6, 2) == pytest.approx(0.75)
    nothing = emergence_jaccard(attn[2:], [empty], protocol=protocol)
    assert nothing.images == 0 and nothing.skipped == 1 and np.isnan(nothing.jaccard)


def test_head_masks_are_upsampled_to_the_mask_resolution():
    # a 2x2 grid on a 4x6 label map (non-square, not the image size): patch (0, 0) covers rows 0-1, cols 0-2
    labels = torch.zeros(4, 6, dtype=torch.uint8)
    labels[0:2, 0:3] = 4
    grid = torch.tensor([[True, False], [False, False]])
    for protocol in ("dino", "strict"):
        assert image_jaccard(grid[None], labels, protocol).item() == pytest.approx(1.0)


def test_both_protocols_equal_their_references_on_random_maps_with_voids_and_instances():
    """Random attention, VOC-like label maps (objects with void borders, several instances of a class)."""
    g = torch.Generator().manual_seed(3)
    attn = torch.rand(6, 3, 4, 4, generator=g) ** 3
    classes, instances = [], []
    for i in range(6):
        cls = torch.zeros(32, 32, dtype=torch.uint8)
        inst = torch.zeros(32, 32, dtype=torch.uint8)
        for k in range(1 + i % 3):  # 1-3 objects; objects 0 and 2 share class 15
            r, c = int(torch.randint(0, 20, (1,), generator=g)), int(torch.randint(0, 20, (1,), generator=g))
            for t in (cls, inst):
                t[max(r - 1, 0):r + 11, max(c - 1, 0):c + 11] = 255  # void border
            cls[r:r + 10, c:c + 10] = 15 if k != 1 else 3
            inst[r:r + 10, c:c + 10] = k + 1
        classes.append(cls)
        instances.append(inst)
    dino = emergence_jaccard(attn, classes, protocol="dino").jaccard
    assert dino == pytest.approx(reference_dino(attn.numpy(), [t.numpy() for t in classes], 0.6, 8), abs=1e-6)
    strict = emergence_jaccard(attn, instances, protocol="strict").jaccard
    assert strict == pytest.approx(reference_strict(attn.numpy(), [t.numpy() for t in instances], 0.6), abs=1e-6)


def test_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="unknown emergence Jaccard protocol 'voc'; valid: dino, strict"):
        emergence_jaccard(torch.rand(1, 1, 4, 4), [torch.zeros(8, 8, dtype=torch.uint8)], protocol="voc")


# -- the reference's input preprocessing and position embedding -----------------------------------------------
def test_dino_preprocess_is_the_reference_torchvision_pipeline(tmp_path):
    from torchvision import transforms

    rng = np.random.default_rng(0)
    image_path, mask_path = tmp_path / "a.jpg", tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(image_path)
    ids = rng.choice([0, 3, 15, 255], size=(37, 53)).astype(np.uint8)
    palette_png(ids, mask_path)
    image, mask = dino_preprocess(image_path, mask_path, 64)
    # Naseer et al.'s get_voc_dataset transforms, applied to what VOCSegmentation opens
    data_transform = transforms.Compose([transforms.Resize((64, 64)), transforms.ToTensor(),
                                         transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    target_transform = transforms.Compose([transforms.Resize((64, 64)),
                                           transforms.Lambda(lambda m: torch.from_numpy(np.array(m)))])
    want_image = data_transform(Image.open(image_path).convert("RGB"))
    want_mask = target_transform(Image.open(mask_path))
    torch.testing.assert_close(normalize(image[None])[0], want_image, atol=1e-6, rtol=0)
    assert torch.equal(mask, want_mask)
    assert set(mask.unique().tolist()) <= {0, 3, 15, 255}  # nearest: no blended ids


def test_dino_preprocess_refuses_colour_masks_and_size_mismatches(tmp_path):
    from datamodules.images import DataError

    Image.new("RGB", (8, 6)).save(tmp_path / "a.jpg")
    Image.new("RGB", (8, 6)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="rgb.png is a RGB image"):
        dino_preprocess(tmp_path / "a.jpg", tmp_path / "rgb.png", 16)
    palette_png(np.zeros((5, 8), np.uint8), tmp_path / "small.png")
    with pytest.raises(DataError, match=r"small.png is 5x8 but its image is 6x8"):
        dino_preprocess(tmp_path / "a.jpg", tmp_path / "small.png", 16)


def reference_pos_embed(pos_embed: torch.Tensor, w0: int, h0: int) -> torch.Tensor:
    """forward_selfattention's interpolation (no distillation token)."""
    n = pos_embed.shape[1] - 1
    dim = pos_embed.shape[-1]
    patch = F.interpolate(pos_embed[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
                          scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
    return torch.cat((pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


def test_dino_position_embedding_is_the_references_and_is_put_back():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32,
                            dynamic_img_size=True, patch_size=8, depth=2, embed_dim=24, num_heads=2).eval()
    original = vit.pos_embed
    x = torch.randn(2, 3, 64, 48)
    seen = {}
    vit.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    with torch.no_grad():
        with dino_position_embedding(vit, (8, 6)):
            vit.forward_features(x)
        tokens = vit.patch_embed(x).flatten(1, 2)  # (B, 48, D)
        want = torch.cat([vit.cls_token.expand(2, -1, -1), tokens], dim=1) + reference_pos_embed(original, 8, 6)
        torch.testing.assert_close(seen["x"], want)
        vit.forward_features(x)  # timm's own resampling again: antialiased bicubic, another kernel
        assert not torch.allclose(seen["x"], want, atol=1e-4)
    assert vit.pos_embed is original and tuple(vit.patch_embed.grid_size) == (4, 4)


# -- masks on disk: the protocol decides which ---------------------------------------------------------------
def palette_png(ids: np.ndarray, path: Path) -> None:
    """A palette PNG as VOC stores masks (distinct colours, else PNG optimisation merges equal entries)."""
    image = Image.fromarray(ids, "P")
    image.putpalette([c for i in range(256) for c in (i, (7 * i) % 256, (13 * i) % 256)])
    image.save(path)


def write_voc(root: Path, with_objects: bool) -> None:
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets/Segmentation/val.txt").write_text("a\nb\n")
    for name in ("a", "b"):
        Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
    classes = np.zeros((8, 8), np.uint8)
    classes[0:4, 0:4] = 15  # two people side by side: one class region ...
    classes[0:4, 4:8] = 15
    instances = np.zeros((8, 8), np.uint8)
    instances[0:4, 0:4] = 1  # ... but two instances
    instances[0:4, 4:8] = 2
    for name in ("a", "b"):
        palette_png(classes, voc / "SegmentationClass" / f"{name}.png")
        if with_objects:
            palette_png(instances, voc / "SegmentationObject" / f"{name}.png")


@pytest.mark.parametrize("protocol, with_objects, folder, expected, objects", [
    ("dino", True, "SegmentationClass", 1.0, 1),      # one class region, covered exactly
    ("strict", True, "SegmentationObject", 0.5, 2),   # each person is half the head's mask
    ("strict", False, "SegmentationClass", 1.0, 1),   # no instance masks: the class masks
])
def test_the_protocol_chooses_the_masks(tmp_path, protocol, with_objects, folder, expected, objects):
    write_voc(tmp_path, with_objects)
    assert label_path(tmp_path, "a", protocol).parent.name == folder
    ids = emergence_ids(tmp_path, 1, protocol)
    assert ids == ["a"]
    images, labels = load_emergence_set(tmp_path, ids, img_size=16, protocol=protocol)
    assert images.shape == (1, 3, 16, 16) and images.dtype == torch.uint8
    assert labels[0].shape == ((16, 16) if protocol == "dino" else (8, 8))  # dino resizes the mask with the image
    head = planted_attention(box(4, 4, slice(0, 2), slice(0, 4)))  # the top half: both people
    score = emergence_jaccard(head[None, None], labels, protocol=protocol)
    assert score.jaccard == pytest.approx(expected) and score.objects == objects


# -- the callback ------------------------------------------------------------------------------------------
def test_callback_turns_itself_off_without_a_vit(caplog):
    callback = EmergenceCallback(num_images=2)
    resnet_module = SimpleNamespace(backbone=SimpleNamespace(model=None))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(root="x"))
    with caplog.at_level(logging.WARNING):
        callback.setup(trainer, resnet_module, "fit")
    assert not callback.enabled and "ViT" in caplog.text
    assert (callback.protocol, callback.img_size) == ("dino", 512)  # defaults without a run config


def test_callback_refuses_an_unknown_protocol():
    with pytest.raises(ValueError, match="valid: dino, strict"):
        EmergenceCallback(protocol="voc")


@pytest.mark.parametrize("flag, value", [("emergence_images", 0), ("emergence_every_n_epochs", 0),
                                         ("emergence_img_size", 0), ("online_probe_every_n_epochs", -1),
                                         ("online_probe_lr", 0), ("online_probe_batch_size", 0)])
def test_validation_rejects_non_positive_values(flag, value):
    with pytest.raises(ConfigError, match=f"--callbacks.{flag} must be > 0"):
        validate(parse_config([f"--callbacks.{flag}={value}", "--data.dataset=synthetic"]))


def test_validation_of_protocol_and_image_size(tmp_path):
    with pytest.raises(ConfigError, match="jaccard_protocol"):
        parse_config(["--callbacks.jaccard_protocol=voc"])
    with pytest.raises(ConfigError, match="--callbacks.emergence_img_size=100 is not a multiple of the patch size 16; "
                                          "e.g. 96"):
        validate(parse_config(["--callbacks.emergence_img_size=100", "--data.dataset=synthetic",
                               f"--data.root={tmp_path}"]))
    validate(parse_config(["--callbacks.emergence_img_size=100", "--callbacks.emergence=false",
                           "--data.dataset=synthetic", f"--data.root={tmp_path}"]))  # not measured: not checked


@pytest.mark.parametrize("protocol", ["dino", "strict"])
def test_tiny_run_logs_attn_jaccard_to_csv_and_wandb(tiny, tmp_path, data_cache, protocol):
    args = tiny("emerge", callbacks__attention="false", callbacks__cross_correlation="false",
                callbacks__emergence_images=4, callbacks__emergence_every_n_epochs=1,
                callbacks__jaccard_protocol=protocol, callbacks__emergence_img_size=32)
    assert main.main(args) == 0
    run = tmp_path / "runs" / "emerge"
    logged_csv = column(metrics(run), "val/attn_jaccard")
    # before training (step 0), then after each of the 2 epochs of 4 steps
    assert [s for s, _ in logged_csv] == [0, 4, 8]
    assert all(0 <= v <= 1 for _, v in logged_csv)
    heads = [column(metrics(run), f"val/attn_jaccard_head{h}") for h in range(2)]
    assert all(len(series) == 3 for series in heads)
    _, history = logged(finished_run_file(run))
    wandb_values = [(h["trainer/global_step"], h["val/attn_jaccard"]) for h in history if "val/attn_jaccard" in h]
    assert [s for s, _ in wandb_values] == [s for s, _ in logged_csv]
    assert [v for _, v in wandb_values] == pytest.approx([v for _, v in logged_csv])

    # the last value, recomputed independently from the final weights on the same 4 images
    from torchvision import transforms

    from lightningmodules.barlow_twins import BarlowTwinsModule
    from tests.test_attention import unfused_probabilities

    state = ckpt(run / "checkpoints" / "last.ckpt")
    module = BarlowTwinsModule(state["hyper_parameters"]["config"])
    module.load_state_dict(state["state_dict"])
    voc = next(data_cache.glob("*/VOCdevkit/VOC2012"))
    val = (voc / "ImageSets/Segmentation/val.txt").read_text().split()
    ids = [val[i] for i in (0, 4, 8, 12)]  # 4 evenly spaced out of 16
    to_input = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor(),
                                   transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    images = torch.stack([to_input(Image.open(voc / "JPEGImages" / f"{i}.jpg").convert("RGB")) for i in ids])
    vit = module.backbone.vit.eval()
    probs = unfused_probabilities(vit, images)[len(vit.blocks) - 1]
    attn = probs[:, :, 0, 1:].reshape(4, 2, 4, 4).numpy()
    if protocol == "dino":
        labels = [np.array(Image.open(voc / "SegmentationClass" / f"{i}.png").resize((32, 32), Image.NEAREST))
                  for i in ids]
        want = reference_dino(attn, labels, 0.6, 8)
    else:
        labels = [np.array(Image.open(voc / "SegmentationObject" / f"{i}.png")) for i in ids]
        want = reference_strict(attn, labels, 0.6)
    assert logged_csv[-1][1] == pytest.approx(want, abs=1e-6)


# -- the one-command evaluation -----------------------------------------------------------------------------
TINY_VIT = ["--backbone.name=vit", "--backbone.depth=2", "--backbone.embed_dim=32", "--backbone.num_heads=2",
            "--backbone.patch_size=8", "--data.img_size=32"]


def synthetic(data_cache: Path) -> list[str]:
    from tests.conftest import TINY_DATA

    return ["--data.dataset=synthetic", f"--data.root={data_cache}", "--data.num_workers=0",
            *(f"--data.{k}={v}" for k, v in TINY_DATA.items())]


def test_tool_scores_the_whole_split_as_the_reference_code(tmp_path, data_cache, capsys):
    import csv

    import timm

    from tools.emergence import main as emergence_main

    torch.manual_seed(5)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            depth=2, embed_dim=32, num_heads=2)
    weights = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), weights)
    args = [*TINY_VIT, f"--backbone.weights={weights}", *synthetic(data_cache), "--data.batch_size=5",
            "--callbacks.emergence_img_size=32", f"--log.output_dir={tmp_path / 'runs'}", "--log.run_name=em",
            "--metrics=jaccard", "--baseline=false"]
    assert emergence_main(args) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "em"
    with (run / "emergence.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["head"] for r in rows] == ["best", "0", "1"]
    assert {r["images"] for r in rows} == {"16"} and rows[0]["protocol"] == "dino"  # the whole val split

    voc = next(data_cache.glob("*/VOCdevkit/VOC2012"))
    ids = (voc / "ImageSets/Segmentation/val.txt").read_text().split()
    from torchvision import transforms

    from tests.test_attention import unfused_probabilities

    to_input = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor(),
                                   transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    images = torch.stack([to_input(Image.open(voc / "JPEGImages" / f"{i}.jpg").convert("RGB")) for i in ids])
    probs = unfused_probabilities(vit.eval(), images)[1]
    attn = probs[:, :, 0, 1:].reshape(16, 2, 4, 4).numpy()
    labels = [np.array(Image.open(voc / "SegmentationClass" / f"{i}.png").resize((32, 32), Image.NEAREST)) for i in ids]
    want = reference_dino(attn, labels, 0.6, 8)
    assert float(rows[0]["jaccard"]) == pytest.approx(want, abs=1e-5)
    assert f"{want:.4f}" in out and f"run directory: {run}" in out
    md = (run / "emergence.md").read_text()
    assert "16 images scored" in md and f"| {float(rows[0]['jaccard']):.4f} |" in md
    assert (run / "config.yaml").is_file() and (run / "code").is_dir()

    # --num-images: evenly spaced subset; an existing run name is never overwritten
    assert emergence_main(args + ["--num-images=4", "--callbacks.jaccard_protocol=strict"]) == 0
    with (tmp_path / "runs" / "em-1" / "emergence.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["images"] == "4" and rows[0]["protocol"] == "strict"


@pytest.mark.parametrize("flags, status, message", [
    (["--backbone.name=resnet50"], 2, "reads a ViT's CLS-token attention; --backbone.name=resnet50 has none"),
    (["--split=test"], 2, "--split: 'test' is not one of val, train, trainval"),
    (["--num-images=-1"], 2, "--num-images must be >= 0"),
    (["--callbacks.emergence_img_size=36"], 2, "emergence_img_size=36 is not a multiple of the patch size 8"),
    (["--callbacks.jaccard_protocol=voc"], 2, "jaccard_protocol"),
    (["--backbone.weights={bad}"], 1, "is not a weight file"),
])
def test_tool_errors_are_one_line_with_the_right_status(tmp_path, data_cache, capsys, flags, status, message):
    from tools.emergence import main as emergence_main

    bad = tmp_path / "bad.pth"
    bad.write_text("not weights")
    flags = [f.format(bad=bad) for f in flags]
    base = [*TINY_VIT, *synthetic(data_cache), f"--log.output_dir={tmp_path / 'runs'}"]
    if "--backbone.name=resnet50" in flags:
        base = [a for a in base if not a.startswith(("--backbone.", "--data.img_size"))]
    assert emergence_main(base + flags) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing written


def test_tool_stops_on_an_unreadable_image_and_leaves_no_run_behind(tmp_path, capsys):
    from tools.emergence import main as emergence_main

    write_voc(tmp_path / "voc", with_objects=True)
    (tmp_path / "voc" / "VOCdevkit" / "VOC2012" / "JPEGImages" / "b.jpg").write_bytes(b"not a jpeg")
    runs = tmp_path / "runs"
    args = [*TINY_VIT, f"--data.root={tmp_path / 'voc'}", "--data.num_workers=0", "--data.batch_size=2",
            "--callbacks.emergence_img_size=32", f"--log.output_dir={runs}", "--metrics=jaccard"]
    assert emergence_main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot read image") and "b.jpg" in err[0]
    assert list(runs.iterdir()) == []
