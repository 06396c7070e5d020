"""The device-resident data path (``--aug.device gpu_full``), on the CPU (the same code path as on a GPU).

References are independent of datamodules/device_decode.py: torchvision pipelines written out here (decode
with ``decode_image``, ``v2.RandomResizedCrop`` + ``v2.RandomHorizontalFlip`` under the item's seed), and the
other augmentation modes of the same seed.

Tolerance for crops: the device path reproduces torchvision's uint8 CPU resampling kernel (int16 fixed-point
weights, horizontal pass, rounding, vertical pass) with float32 matrix products; a float32 sum that lands on
a rounding tie can come out one level apart. Measured: 3 pixels in 7.2 million (500 × 375 crops resized to
32–224 px, bicubic and bilinear alike). The tests allow one level on at most 0.1% of the pixels (their
batches are small: a single tie must not fail them), and nothing more.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

import main
from config.hparams import AugmentConfig, DataConfig, DinoConfig, SegmentationConfig
from config.loading import ConfigError, parse_config
from config.validation import validate
from datamodules.barlow_twins import BarlowTwinsDataModule
from datamodules.device_decode import (EncodedMultiCropTransform, EncodedSegmentationTransform,
                                       EncodedTwoViewTransform, augment_mode, collate_encoded, read_encoded)
from datamodules.errors import DataError
from datamodules.gpu_augment import DeviceAugmentTransform
from datamodules.multicrop import DeviceMultiCropTransform
from datamodules.sampling import seeded
from datamodules.segmentation import SegmentationDataModule

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
NO_PHOTOMETRIC = dict(jitter_prob=0.0, grayscale_prob=0.0, blur_prob_1=0.0, blur_prob_2=0.0,
                      solarize_prob_1=0.0, solarize_prob_2=0.0)
# (height, width) of the test pictures: several sizes in one batch, shrunk 2–8× by the 32 px views.
SIZES = [(96, 128), (150, 200), (256, 160), (64, 64), (120, 90), (200, 256)]


def picture(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth-plus-texture RGB picture (uint8 H × W × 3): gradients, a disc, noise."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([x, y, 0.5 + 0.5 * np.sin(20 * x + 13 * y)], axis=-1)
    image[(y - 0.4) ** 2 + (x - 0.5) ** 2 < 0.05] = (0.9, 0.2, 0.1)
    image = image + 0.08 * g.standard_normal(image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    """JPEGs (4:2:0 and 4:4:4) of several sizes, one PNG and one grey JPEG."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (h, w) in enumerate(SIZES):
        path = folder / f"{i}.jpg"
        Image.fromarray(picture(h, w, i)).save(path, quality=90, subsampling=2 if i % 2 else 0)
        paths.append(path)
    Image.fromarray(picture(80, 100, 10)).save(folder / "png.png")
    Image.fromarray(picture(90, 70, 11)[..., 0]).save(folder / "grey.jpg", quality=90)
    return paths + [folder / "png.png", folder / "grey.jpg"]


def reference_crops(cfg: AugmentConfig, size: int, path: Path, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two uint8 views of the CPU pipeline with its photometric operations at probability 0 (they still
    draw their random-apply numbers), written out with torchvision."""
    interpolation = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}
    view = v2.Compose([
        v2.RandomResizedCrop(size, scale=(cfg.crop_scale_min, cfg.crop_scale_max),
                             interpolation=interpolation[cfg.crop_interpolation], antialias=True),
        v2.RandomHorizontalFlip(p=cfg.hflip_prob),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.0),
        v2.RandomGrayscale(p=0.0),
        v2.RandomApply([v2.GaussianBlur(13, sigma=(0.1, 2.0))], p=0.0),
        v2.RandomSolarize(threshold=128, p=0.0)])
    image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    with seeded(seed):
        return view(image), view(image)


def full_mode(transform, paths, seeds) -> tuple[torch.Tensor, ...]:
    """Worker half item by item, then the batched device half (here on the CPU)."""
    items = []
    for path, seed in zip(paths, seeds):
        with seeded(seed):
            items.append(transform(read_encoded(path)))
    return transform.finish_batch(collate_encoded(items))


def to_uint8_scale(views: torch.Tensor) -> torch.Tensor:
    return (views * STD + MEAN) * 255


def assert_round_off(ours: torch.Tensor, expected: torch.Tensor) -> None:
    """At most one uint8 level apart, on at most 0.1% of the pixels (see the module docstring)."""
    diff = (ours.float() - expected.float()).abs()
    assert diff.max() <= 1.0 + 1e-3, diff.max()
    assert (diff > 0.5).float().mean() <= 1e-3, (diff > 0.5).float().mean()


# ---------------------------------------------------------------------------- crops vs the CPU pipeline
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_crops_equal_the_cpu_pipelines_to_round_off(files, interpolation):
    cfg = AugmentConfig(crop_interpolation=interpolation, **NO_PHOTOMETRIC)
    transform = EncodedTwoViewTransform(cfg, 32)
    paths = files * 4  # every file with several seeds, all in one batch of mixed sizes and formats
    seeds = range(100, 100 + len(paths))
    x1, x2 = full_mode(transform, paths, seeds)
    expected = [reference_crops(cfg, 32, path, seed) for path, seed in zip(paths, seeds)]
    assert_round_off(to_uint8_scale(x1), torch.stack([e[0] for e in expected]).float())
    assert_round_off(to_uint8_scale(x2), torch.stack([e[1] for e in expected]).float())


def test_upscaled_and_identity_crops_too(files):
    # views larger than the crops (upsampling: no antialias widening) and a view the size of the crop
    cfg = AugmentConfig(crop_scale_min=0.9, **NO_PHOTOMETRIC)
    for size in (96, 160):  # 96: shrinks some axes, enlarges others; 160: enlarges the smaller images
        transform = EncodedTwoViewTransform(cfg, size)
        x1, _ = full_mode(transform, files[:3], range(3))
        expected = torch.stack([reference_crops(cfg, size, p, s)[0] for p, s in zip(files[:3], range(3))])
        assert_round_off(to_uint8_scale(x1), expected.float())


def test_views_equal_the_photometric_device_mode_and_stay_near_the_cpu_mode(files):
    # Same seed → same crops and photometric parameters as --aug.device gpu_photometric (whose photometric
    # operations are tested against torchvision in test_gpu_augment.py), so the views agree to crop round-off.
    cfg = AugmentConfig()
    paths, seeds = files * 3, range(len(files) * 3)
    full = full_mode(EncodedTwoViewTransform(cfg, 32), paths, seeds)
    photometric = DeviceAugmentTransform(cfg, 32)
    items = []
    for path, seed in zip(paths, seeds):
        with seeded(seed):
            items.append(photometric(decode_image(read_file(str(path)), mode=ImageReadMode.RGB)))
    expected = photometric.finish_batch(default_collate(items))
    for ours, theirs in zip(full, expected):
        # a crop pixel one level apart moves a normalised value by at most 1/255/std after the (1-Lipschitz
        # up to the jitter factors ≤ 1.4) photometric operations
        diff = (to_uint8_scale(ours) - to_uint8_scale(theirs)).abs()
        assert (diff > 1e-3).float().mean() <= 5e-3 and diff.max() < 3.0, (diff.max(), (diff > 1e-3).float().mean())


def test_shared_crop_and_geometry_are_the_cpu_modes(files):
    cfg = AugmentConfig(hflip_prob=0.5)
    for shared in (False, True):
        ours = EncodedTwoViewTransform(cfg, 32, shared_crop=shared, geometry=True)
        theirs = DeviceAugmentTransform(cfg, 32, shared_crop=shared, geometry=True)
        for seed, path in enumerate(files):
            with seeded(seed):
                item = ours(read_encoded(path))
            with seeded(seed):
                expected = theirs(decode_image(read_file(str(path)), mode=ImageReadMode.RGB))
            for k in (0, 1):
                assert torch.equal(item["views"][k]["geometry"], expected[f"geometry{k + 1}"])
                assert all(torch.equal(a, b) for a, b in zip(item["views"][k]["params"], expected[f"params{k + 1}"]))
            if shared:
                assert torch.equal(item["views"][0]["box"], item["views"][1]["box"])


def test_multicrop_views_equal_the_photometric_device_mode(files):
    aug, dino = AugmentConfig(), DinoConfig(local_crops_number=3)
    paths, seeds = files * 2, range(len(files) * 2)
    full = full_mode(EncodedMultiCropTransform(aug, 32, dino, 16), paths, seeds)
    photometric = DeviceMultiCropTransform(aug, 32, dino, 16)
    items = []
    for path, seed in zip(paths, seeds):
        with seeded(seed):
            items.append(photometric(decode_image(read_file(str(path)), mode=ImageReadMode.RGB)))
    expected = photometric.finish_batch(default_collate(items))
    assert [tuple(v.shape) for v in full] == [tuple(v.shape) for v in expected] == \
        [(len(paths), 3, 32, 32)] * 2 + [(len(paths), 3, 16, 16)] * 3
    for ours, theirs in zip(full, expected):
        diff = (to_uint8_scale(ours) - to_uint8_scale(theirs)).abs()
        assert (diff > 1e-3).float().mean() <= 5e-3 and diff.max() < 3.0


# ---------------------------------------------------------------------------- formats and damaged files
def test_png_and_cmyk_files_take_the_per_image_decoder(tmp_path, files):
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(picture(60, 80, 3)).convert("CMYK").save(cmyk, quality=95)
    png, grey = files[-2], files[-1]
    assert not read_encoded(png).batched_jpeg and not read_encoded(cmyk).batched_jpeg
    assert read_encoded(grey).batched_jpeg and read_encoded(files[0]).batched_jpeg
    cfg = AugmentConfig(**NO_PHOTOMETRIC)
    paths = [png, cmyk, files[0], grey]
    x1, _ = full_mode(EncodedTwoViewTransform(cfg, 32), paths, range(4))
    expected = torch.stack([reference_crops(cfg, 32, p, s)[0] for p, s in zip(paths, range(4))])
    assert_round_off(to_uint8_scale(x1), expected.float())


def test_garbage_file_is_named_by_the_worker(tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"<html>not an image</html>")
    with pytest.raises(DataError, match=r"^cannot decode image .*garbage\.jpg: ") as info:
        read_encoded(garbage)
    assert "\n" not in str(info.value)


def test_truncated_jpeg_is_named_by_the_device_decoder(tmp_path, files):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(files[1].read_bytes()[: len(files[1].read_bytes()) // 2])  # the header survives: the worker cannot tell
    encoded = read_encoded(truncated)
    assert (encoded.height, encoded.width) == SIZES[1]
    transform = EncodedTwoViewTransform(AugmentConfig(), 32)
    items = []
    for seed, path in enumerate([files[0], truncated, files[2]]):
        with seeded(seed):
            items.append(transform(read_encoded(path)))
    with pytest.raises(DataError, match=r"^cannot decode image .*truncated\.jpg: .*(truncated|incomplete)") as info:
        transform.finish_batch(collate_encoded(items))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------- the datamodule
def data_cfg(root, **kw) -> DataConfig:
    return DataConfig(**{"dataset": "voc", "root": str(root), "img_size": 32, "batch_size": 4, "num_workers": 0,
                         "val_max_images": 8, **kw})


def full_datamodule(voc_root, workers: int = 0, **aug) -> BarlowTwinsDataModule:
    dm = BarlowTwinsDataModule(data_cfg(voc_root, num_workers=workers), AugmentConfig(device="gpu_full", **aug),
                               seed=0, geometry=True)
    dm.setup()
    return dm


def drawn(batch: dict) -> list[torch.Tensor]:
    """Every random choice of a raw gpu_full batch, flattened."""
    out = []
    for view in batch["views"]:
        out += [view["box"], view["flip"], view["geometry"], *view["params"]]
    return out


def test_draws_do_not_depend_on_workers_and_runs_repeat(voc_root):
    first = list(full_datamodule(voc_root, workers=0).train_dataloader())
    torch.manual_seed(4321)  # the global RNG state must not matter
    second = list(full_datamodule(voc_root, workers=2).train_dataloader())
    assert len(first) == len(second) == 8
    for a, b in zip(first, second):
        assert all(torch.equal(p, q) for p, q in zip(drawn(a), drawn(b)))
        assert [e.path for e in a["encoded"].images] == [e.path for e in b["encoded"].images]
    dm = full_datamodule(voc_root)
    x = [dm.on_after_batch_transfer(batch, 0) for batch in first[:2]]
    y = [dm.on_after_batch_transfer(batch, 0) for batch in second[:2]]
    assert all(torch.equal(p, q) for u, v in zip(x, y) for p, q in zip(u, v))


def test_datamodule_draws_the_cpu_modes_crops(voc_root):
    # the CPU mode of the same seed: same geometry (boxes and flips) for every item
    cpu = BarlowTwinsDataModule(data_cfg(voc_root), AugmentConfig(), seed=0, geometry=True)
    cpu.setup()
    full = full_datamodule(voc_root)
    for batch_cpu, batch_full in zip(cpu.train_dataloader(), full.train_dataloader()):
        assert torch.equal(batch_cpu[2], batch_full["views"][0]["geometry"])
        assert torch.equal(batch_cpu[3], batch_full["views"][1]["geometry"])
    views = full.validation_views(3)  # the callbacks' helper works in this mode too
    assert len(views) == 4 and views[0].shape == (3, 3, 32, 32)


def test_segmentation_masks_are_exact_and_images_round_off(voc_root):
    seg = SegmentationConfig(crop_scale_min=0.3)
    cpu = SegmentationDataModule(data_cfg(voc_root), seg, seed=0)
    full = SegmentationDataModule(data_cfg(voc_root), seg, seed=0, augment_device="gpu_full")
    cpu.setup(), full.setup()
    assert isinstance(full.train_set.transform, EncodedSegmentationTransform)
    flips = set()
    for (images, masks), raw in zip(cpu.train_dataloader(), full.train_dataloader()):
        ours_images, ours_masks = full.on_after_batch_transfer(raw, 0)
        assert ours_masks.dtype == torch.int64 and torch.equal(ours_masks, masks)
        assert_round_off(to_uint8_scale(ours_images), to_uint8_scale(images))
        flips |= set(raw["views"][0]["flip"].tolist())
    assert flips == {False, True}
    # validation batches pass through unchanged (CPU pipeline)
    batch = next(iter(full.val_dataloader()))
    assert full.on_after_batch_transfer(batch, 0) is batch


def test_nearest_crops_of_a_palette_mask_match_torchvision(tmp_path):
    # a palette PNG of class ids with void (255) borders, as VOC's: ids survive, never colours
    from datamodules.segmentation import load_mask

    ids = np.zeros((75, 100), dtype=np.uint8)
    ids[10:40, 20:70], ids[40:60, 50:90], ids[:, :3] = 7, 15, 255
    mask_png = tmp_path / "mask.png"
    image = Image.fromarray(ids, mode="P")
    image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    image.save(mask_png)
    image_jpg = tmp_path / "image.jpg"
    Image.fromarray(picture(75, 100, 5)).save(image_jpg)
    mask = load_mask(mask_png, 21)
    transform = EncodedSegmentationTransform(24, 0.08, 0.5)
    reference = v2.Compose([v2.RandomResizedCrop(24, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip(0.5)])
    items, expected = [], []
    for seed in range(16):
        with seeded(seed):
            items.append(transform(read_encoded(image_jpg), mask))
        with seeded(seed):
            expected.append(reference(tv_tensors.Image(torch.zeros(3, 75, 100, dtype=torch.uint8)),
                                      tv_tensors.Mask(mask))[1])
    _, masks = transform.finish_batch(collate_encoded(items))
    assert torch.equal(masks, torch.stack(expected).long())
    assert set(masks.unique().tolist()) <= {0, 7, 15, 255}


# ---------------------------------------------------------------------------- config and a real run
def test_aug_gpu_is_gpu_photometric_and_contradictions_are_refused(voc_root):
    base = ["--data.dataset=voc", f"--data.root={voc_root}", "--data.img_size=32", "--backbone.name=vit",
            "--backbone.patch_size=8"]
    assert augment_mode(parse_config(base + ["--aug.gpu=true"]).aug) == "gpu_photometric"
    assert augment_mode(parse_config(base + ["--aug.device=gpu_full"]).aug) == "gpu_full"
    assert augment_mode(parse_config(base).aug) == "cpu"
    validate(parse_config(base + ["--aug.gpu=true", "--aug.device=gpu_photometric"]))
    with pytest.raises(ConfigError, match=r"^--aug.gpu=true .* contradicts --aug.device gpu_full; drop --aug.gpu$"):
        validate(parse_config(base + ["--aug.gpu=true", "--aug.device=gpu_full"]))


def test_tiny_run_with_the_full_device_path_trains(tiny, tmp_path):
    args = tiny("gpu_full", aug__device="gpu_full", trainer__max_epochs=1, callbacks__views="true",
                callbacks__every_n_epochs=1)
    assert main.main(args) == 0
    run = tmp_path / "runs" / "gpu_full"
    with (run / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses + val) and val
    assert (run / "media" / "views_e000.png").is_file()


@pytest.mark.parametrize("task, extra, metric", [
    ("segmentation", {}, "train/loss_step"),
    ("dino", {"dino__out_dim": 64, "dino__local_crops_number": 2, "dino__hidden_dim": 32,
              "dino__bottleneck_dim": 16, "optim__lr_scaling": "none"}, "train/loss_step"),
])
def test_every_task_trains_with_the_full_device_path(tiny, tmp_path, monkeypatch, task, extra, metric):
    """main.py hands --aug.device to the segmentation and DINO datamodules too (their training batches are
    decoded by the device path), and the runs train."""
    import datamodules.device_decode as device_decode

    decoded = []
    real = device_decode.decode_images
    monkeypatch.setattr(device_decode, "decode_images", lambda encoded, device: decoded.append(1) or real(encoded, device))
    name = f"gpu_full_{task}"
    args = tiny(name, task=task, aug__device="gpu_full", trainer__max_epochs=1, trainer__limit_train_batches=2,
                callbacks__emergence="false", callbacks__attention="false", **extra)
    assert main.main(args) == 0
    with (tmp_path / "runs" / name / "metrics.csv").open(newline="") as f:
        losses = [float(r[metric]) for r in csv.DictReader(f) if r.get(metric)]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert len(decoded) >= 2  # every training batch went through the device decoder
