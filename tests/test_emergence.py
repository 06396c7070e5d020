"""The emergence Jaccard (DINO's attention masks vs ground-truth objects) and its callback.

Expected values are worked out by hand from planted attention maps and masks; the end-to-end check
recomputes the logged number from the final checkpoint with a plain-loop reference written here.
"""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

import main
from callbacks.emergence import EmergenceCallback, emergence_ids, label_path, load_emergence_set
from config.loading import ConfigError, parse_config
from config.validation import validate
from tests.test_main import ckpt, column, metrics
from tests.wandb_records import logged, run_file
from utils.emergence import emergence_jaccard, image_jaccard, jaccard_per_head, object_masks, upsample_masks


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


def test_planted_attention_threshold_masks_are_the_planted_patches():
    from utils.attention import mass_threshold_masks

    for k in range(1, 9):
        grid = torch.zeros(4, 4, dtype=torch.bool)
        grid.view(-1)[torch.tensor([1, 6, 11, 12, 0, 15, 3, 9][:k])] = True
        assert torch.equal(mass_threshold_masks(planted_attention(grid), 0.6), grid), k


# -- the Jaccard on planted pairs ---------------------------------------------------------------------------
def test_exact_cover_is_one_and_disjoint_is_zero():
    # 4x4 patch grid over an 8x8 label map: each patch is a 2x2 pixel block
    labels = torch.zeros(8, 8, dtype=torch.uint8)
    labels[0:4, 0:4] = 1  # the object: patches (0,0), (0,1), (1,0), (1,1)
    cover = box(4, 4, slice(0, 2), slice(0, 2))
    disjoint = box(4, 4, slice(2, 4), slice(2, 4))
    attn = torch.stack([planted_attention(cover), planted_attention(disjoint)])[None]  # (1, 2 heads, 4, 4)
    score = emergence_jaccard(attn, [labels])
    assert score.jaccard == pytest.approx(1.0)
    assert score.per_head.tolist() == pytest.approx([1.0, 0.0])
    assert (score.images, score.objects) == (1, 1)
    only_disjoint = emergence_jaccard(attn[:, 1:], [labels])
    assert only_disjoint.jaccard == 0.0


def test_partial_overlap_by_hand():
    # head: rows 0-2, cols 0-3 (12 px); object: rows 1-4, cols 2-5 (16 px); overlap rows 1-2, cols 2-3 (4 px)
    head = box(6, 6, slice(0, 3), slice(0, 4))[None]
    obj = box(6, 6, slice(1, 5), slice(2, 6))[None]
    valid = torch.ones(6, 6, dtype=torch.bool)
    assert jaccard_per_head(head, obj, valid).item() == pytest.approx(4 / (12 + 16 - 4))


def test_best_head_per_object_then_mean_over_objects():
    labels = torch.zeros(8, 8, dtype=torch.uint8)
    labels[0:4, 0:4] = 7  # object A: patches rows 0-1, cols 0-1
    labels[4:8, 4:8] = 9  # object B: patches rows 2-3, cols 2-3
    head_a = box(4, 4, slice(0, 2), slice(0, 2))  # A exactly
    head_b_half = box(4, 4, slice(2, 4), slice(2, 3))  # half of B: IoU 8 / 16
    head_a_b = box(4, 4, slice(0, 1), slice(0, 2)) | box(4, 4, slice(2, 3), slice(2, 4))  # half of A, half of B
    attn = torch.stack([planted_attention(g) for g in (head_a, head_b_half, head_a_b)])[None]
    # IoU (pixels): head_a: A 1, B 0; head_b_half: A 0, B 8/16; head_a_b: A 8/(16+16-8) = 1/3, B 1/3
    matrix = image_jaccard(torch.stack([head_a, head_b_half, head_a_b]), labels)
    assert matrix.flatten().tolist() == pytest.approx([1, 0, 1 / 3, 0, 0.5, 1 / 3])
    score = emergence_jaccard(attn, [labels])
    assert score.jaccard == pytest.approx((1 + 0.5) / 2)  # A: head 0; B: head 1
    assert score.per_head.tolist() == pytest.approx([0.5, 0.25, 1 / 3])


def test_mean_over_objects_then_over_images():
    one = torch.zeros(8, 8, dtype=torch.uint8)
    one[0:4, 0:4] = 1
    one[4:8, 4:8] = 2  # image 1: two objects, the only head covers the first → (1 + 0) / 2
    two = torch.zeros(8, 8, dtype=torch.uint8)
    two[0:4, 0:4] = 5  # image 2: one object, covered → 1
    empty = torch.zeros(8, 8, dtype=torch.uint8)  # image 3: background only → left out
    head = planted_attention(box(4, 4, slice(0, 2), slice(0, 2)))
    attn = head.expand(3, 1, 4, 4)
    score = emergence_jaccard(attn, [one, two, empty])
    assert score.jaccard == pytest.approx((0.5 + 1.0) / 2)  # not the object mean 2/3
    assert (score.images, score.objects) == (2, 3)
    nothing = emergence_jaccard(attn[2:], [empty])
    assert nothing.images == 0 and np.isnan(nothing.jaccard)


def test_void_pixels_are_ignored():
    labels = torch.full((8, 8), 255, dtype=torch.uint8)
    labels[0:4, 0:4] = 1  # object: 16 px; the head's other 16 px (rows 0-3, cols 4-7) are void
    labels[4:8] = 0
    head = planted_attention(box(4, 4, slice(0, 2), slice(0, 4)))  # rows 0-3, cols 0-7 in pixels
    assert emergence_jaccard(head[None, None], [labels]).jaccard == pytest.approx(1.0)
    labels[0:4, 4:8] = 0  # the same pixels as background count against the head: 16 / 32
    assert emergence_jaccard(head[None, None], [labels]).jaccard == pytest.approx(0.5)


def test_head_masks_are_upsampled_to_the_mask_resolution():
    # a 2x2 grid on a 4x6 label map (non-square, not the image size): patch (0, 0) covers rows 0-1, cols 0-2
    labels = torch.zeros(4, 6, dtype=torch.uint8)
    labels[0:2, 0:3] = 4
    grid = torch.tensor([[True, False], [False, False]])
    assert image_jaccard(grid[None], labels).item() == pytest.approx(1.0)


# -- masks on disk: instances first, class masks as the fallback -------------------------------------------
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


@pytest.mark.parametrize("with_objects", [True, False])
def test_objects_come_from_segmentation_object_else_from_classes(tmp_path, with_objects):
    write_voc(tmp_path, with_objects)
    folder = "SegmentationObject" if with_objects else "SegmentationClass"
    assert label_path(tmp_path, "a").parent.name == folder
    ids = emergence_ids(tmp_path, 1)
    assert ids == ["a"]
    images, labels = load_emergence_set(tmp_path, ids, img_size=16)
    assert images.shape == (1, 3, 16, 16) and labels[0].shape == (8, 8)
    head = planted_attention(box(4, 4, slice(0, 2), slice(0, 4)))  # rows 0-3 of the 8x8 mask: both people
    score = emergence_jaccard(head[None, None], labels)
    # instances: each person is half the head's mask → 16 / 32 each; classes: one region, covered exactly
    assert score.jaccard == pytest.approx(0.5 if with_objects else 1.0)
    assert score.objects == (2 if with_objects else 1)


# -- the callback ------------------------------------------------------------------------------------------
def test_callback_turns_itself_off_without_a_vit(caplog):
    callback = EmergenceCallback(num_images=2)
    resnet_module = SimpleNamespace(backbone=SimpleNamespace(model=None))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(root="x"))
    with caplog.at_level(logging.WARNING):
        callback.setup(trainer, resnet_module, "fit")
    assert not callback.enabled and "ViT" in caplog.text


@pytest.mark.parametrize("flag, value", [("emergence_images", 0), ("emergence_every_n_epochs", 0),
                                         ("online_probe_every_n_epochs", -1), ("online_probe_lr", 0),
                                         ("online_probe_batch_size", 0)])
def test_validation_rejects_non_positive_values(flag, value):
    with pytest.raises(ConfigError, match=f"--callbacks.{flag} must be > 0"):
        validate(parse_config([f"--callbacks.{flag}={value}", "--data.dataset=synthetic"]))


def reference_jaccard(attn: np.ndarray, labels: list[np.ndarray], keep: float) -> float:
    """Plain loops, DINO's own thresholding (``cum_val > 1 - threshold`` on ascending sorted, normalised
    values) and nearest upsampling by index arithmetic: the number the callback must log."""
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


def test_tiny_run_logs_attn_jaccard_to_csv_and_wandb(tiny, tmp_path, data_cache):
    args = tiny("emerge", callbacks__attention="false", callbacks__cross_correlation="false",
                callbacks__emergence_images=4, callbacks__emergence_every_n_epochs=1)
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
    assert wandb_values == pytest.approx(logged_csv)

    # the last value, recomputed independently from the final weights on the same 4 images
    from datamodules.transforms import segmentation_eval_transform
    from lightningmodules.barlow_twins import BarlowTwinsModule
    from utils.attention import cls_attention

    state = ckpt(run / "checkpoints" / "last.ckpt")
    module = BarlowTwinsModule(state["hyper_parameters"]["config"])
    module.load_state_dict(state["state_dict"])
    voc = next(data_cache.glob("*/VOCdevkit/VOC2012"))
    val = (voc / "ImageSets/Segmentation/val.txt").read_text().split()
    ids = [val[i] for i in (0, 4, 8, 12)]  # 4 evenly spaced out of 16
    transform = segmentation_eval_transform(32)
    images = torch.stack([transform(decode_image(str(voc / "JPEGImages" / f"{i}.jpg"), mode=ImageReadMode.RGB))
                          for i in ids])
    labels = [np.array(Image.open(voc / "SegmentationObject" / f"{i}.png")) for i in ids]
    attn = cls_attention(module.backbone.vit.eval(), images).numpy()
    assert logged_csv[-1][1] == pytest.approx(reference_jaccard(attn, labels, keep=0.6), abs=1e-6)
