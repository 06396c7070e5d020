"""DINO's multi-crop data: views, crop boxes and per-view probabilities against the official recipe
(facebookresearch/dino main_dino.py ``DataAugmentationDINO``, written out here with torchvision), the local
crop size rule, seeding, mid-epoch resume and the config checks."""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import default_collate
from torchvision.transforms import v2

from config.hparams import AugmentConfig, BackboneConfig, DataConfig, DinoConfig
from config.loading import task_defaults
from datamodules.dino import DinoDataModule
from datamodules.multicrop import (DeviceMultiCropTransform, MultiCropTransform, default_local_size,
                                   multicrop_problem, multicrop_views, resolve_local_size, view_crop)
from datamodules.sampling import seeded
from lightningmodules.dino import local_crop_size
from models.backbones import input_granularity

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)

def _problem(cfg):
    return multicrop_problem(cfg, input_granularity(cfg.backbone))


TINY_VIT = BackboneConfig(name="vit", depth=2, embed_dim=32, num_heads=2, patch_size=8)

# The official recipe's numbers (main_dino.py, utils.GaussianBlur / utils.Solarization), written out.
OFFICIAL = {
    "global_scale": (0.4, 1.0), "local_scale": (0.05, 0.4), "local_size_at_224": 96,
    "blur": (1.0, 0.1, 0.5), "solarize": (0.0, 0.2, 0.0),  # global 1, global 2, local
    "flip": 0.5, "jitter": (0.4, 0.4, 0.2, 0.1), "jitter_prob": 0.8, "grayscale": 0.2, "blur_radius": (0.1, 2.0),
}


def dino_aug_and_config(**dino) -> tuple[AugmentConfig, DinoConfig]:
    """The aug/dino groups ``--task=dino`` gives (TASK_DEFAULTS applied), with dino overrides."""
    cfg = task_defaults("dino")
    return cfg.aug, dataclasses.replace(cfg.dino, **dino)


def image(height: int = 48, width: int = 64, seed: int = 0) -> torch.Tensor:
    """A uint8 image with structure (gradients) and noise, so crops, flips and blurs all change pixels."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.linspace(0, 200, height).view(-1, 1).expand(height, width)
    cols = torch.linspace(0, 255, width).view(1, -1).expand(height, width)
    noise = torch.randint(0, 56, (height, width), generator=g).float()
    return torch.stack([cols, rows, noise * 4]).clamp(0, 255).to(torch.uint8)


def official_pipeline(size: int, scale: tuple[float, float], blur: float, solarize: float) -> v2.Compose:
    """One view of DataAugmentationDINO, with torchvision v2 on tensors. The official code draws blur and
    solarisation with Python's ``random``; here every step draws from torch, and every view has a solarise
    step (p=0 for global 1 and the locals: it draws a number and changes nothing) as the Barlow Twins
    building blocks do, so one seed gives one stream of draws."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=OFFICIAL["flip"]),
        v2.RandomApply([v2.ColorJitter(*OFFICIAL["jitter"])], p=OFFICIAL["jitter_prob"]),
        v2.RandomGrayscale(p=OFFICIAL["grayscale"]),
        v2.RandomApply([v2.GaussianBlur(13, sigma=OFFICIAL["blur_radius"])], p=blur),
        v2.RandomSolarize(threshold=128, p=solarize),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])


def official_views(img_size: int, local_size: int, local_number: int) -> list[v2.Compose]:
    g1 = official_pipeline(img_size, OFFICIAL["global_scale"], OFFICIAL["blur"][0], OFFICIAL["solarize"][0])
    g2 = official_pipeline(img_size, OFFICIAL["global_scale"], OFFICIAL["blur"][1], OFFICIAL["solarize"][1])
    local = official_pipeline(local_size, OFFICIAL["local_scale"], OFFICIAL["blur"][2], OFFICIAL["solarize"][2])
    return [g1, g2] + [local] * local_number


# ---------------------------------------------------------------------------- the views of one image
def test_task_defaults_give_the_official_views():
    cfg = task_defaults("dino")
    cfg.data.img_size, cfg.backbone = 224, BackboneConfig(name="vit_small_patch16_224")
    views = multicrop_views(cfg.aug, 224, cfg.dino, local_crop_size(cfg))
    assert [v.name for v in views] == ["global 1", "global 2"] + [f"local {i}" for i in range(1, 9)]
    assert [v.size for v in views] == [224, 224] + [OFFICIAL["local_size_at_224"]] * 8
    assert [v.scale for v in views] == [OFFICIAL["global_scale"]] * 2 + [OFFICIAL["local_scale"]] * 8
    assert [v.blur_prob for v in views] == [OFFICIAL["blur"][0], OFFICIAL["blur"][1]] + [OFFICIAL["blur"][2]] * 8
    assert [v.solarize_prob for v in views] == [OFFICIAL["solarize"][0], OFFICIAL["solarize"][1]] + [0.0] * 8
    a = cfg.aug
    assert (a.hflip_prob, (a.brightness, a.contrast, a.saturation, a.hue), a.jitter_prob, a.grayscale_prob,
            (a.blur_sigma_min, a.blur_sigma_max), a.crop_interpolation) == (
        OFFICIAL["flip"], OFFICIAL["jitter"], OFFICIAL["jitter_prob"], OFFICIAL["grayscale"], OFFICIAL["blur_radius"],
        "bicubic")


@pytest.mark.parametrize("local_number", [8, 3, 0])
def test_views_come_in_batch_order_with_their_sizes(local_number):
    aug, dino = dino_aug_and_config(local_crops_number=local_number)
    with seeded(0):
        views = MultiCropTransform(aug, 32, dino, 16)(image())
    assert len(views) == 2 + local_number
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * local_number
    assert all(v.dtype == torch.float32 for v in views)
    # every view is its own crop: no two equal
    assert all(not torch.equal(a, b) for i, a in enumerate(views) for b in views[i + 1:] if a.shape == b.shape)


def test_pixels_are_the_official_recipe_written_with_torchvision():
    aug, dino = dino_aug_and_config(local_crops_number=4)
    transform = MultiCropTransform(aug, 32, dino, 16)
    reference = official_views(32, 16, 4)
    picture = image()
    for seed in range(60):  # enough that every probability's distinct outcomes occur
        with seeded(seed):
            expected = [pipeline(picture) for pipeline in reference]
        with seeded(seed):
            views = transform(picture)
        assert len(views) == len(expected) and all(torch.equal(a, b) for a, b in zip(views, expected)), seed


def official_crop_box(height: int, width: int, scale: tuple[float, float],
                      ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, which the official code uses (written out): 10 tries of
    a uniform area fraction and a log-uniform aspect ratio, else the central crop."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,)).item()
            left = torch.randint(0, width - w + 1, size=(1,)).item()
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("view_index", [0, 1, 2])  # global 1, global 2, a local view
def test_crop_boxes_are_the_official_algorithms(view_index):
    aug, dino = dino_aug_and_config(local_crops_number=1)
    spec = multicrop_views(aug, 32, dino, 16)[view_index]
    crop = view_crop(aug, spec)
    height, width = 90, 150  # wide: the central-crop fallback of large scales is reached too
    picture = image(height, width)
    for seed in range(60):
        with seeded(seed):
            top, left, h, w = official_crop_box(height, width, spec.scale)
            flipped = bool(torch.rand(1) < OFFICIAL["flip"])
        with seeded(seed):
            view, geometry = crop(picture)
        expected = torch.tensor([top / height, left / width, (top + h) / height, (left + w) / width, float(flipped)])
        assert view.shape == (3, spec.size, spec.size) and torch.allclose(geometry, expected), (seed, geometry, expected)


def box_areas(aug, spec, count: int, side: int = 200) -> torch.Tensor:
    crop = view_crop(aug, dataclasses.replace(spec, size=4))  # boxes only: a tiny output keeps resizing cheap
    picture = torch.zeros(3, side, side, dtype=torch.uint8)
    areas = []
    for seed in range(count):
        with seeded(seed):
            _, (y0, x0, y1, x1, _) = crop(picture)
        areas.append(float((y1 - y0) * (x1 - x0)))
    return torch.tensor(areas)


def test_crop_areas_cover_the_scale_ranges():
    aug, dino = dino_aug_and_config(local_crops_number=1)
    global_view, _, local_view = multicrop_views(aug, 32, dino, 16)
    n, rounding = 1000, 0.01  # sides round to whole pixels of a 200 px image: area within ±1 %
    local = box_areas(aug, local_view, n)
    assert local.min() >= 0.05 - rounding and local.max() <= 0.4 + rounding
    # uniform on [0.05, 0.4] (every try fits in a square image at these scales): mean 0.225, sd 0.35/√12
    assert abs(local.mean() - 0.225) < 5 * (0.35 / math.sqrt(12)) / math.sqrt(n) + 0.002
    assert (local < 0.1).float().mean() > 0.1 and (local > 0.35).float().mean() > 0.1
    glob = box_areas(aug, global_view, n)
    assert glob.min() >= 0.4 - rounding and glob.max() <= 1.0
    # large areas often do not fit at the drawn aspect ratio (a retry follows): not uniform, but covered
    assert (glob < 0.5).float().mean() > 0.1 and glob.max() > 0.95
    # failure: the local range is not the global one
    assert (local > 0.4 + rounding).sum() == 0 and (glob < 0.4 - rounding).sum() == 0


# ---------------------------------------------------------------------------- per-view probabilities
def test_per_view_probabilities_are_the_official_ones():
    # GPU mode's items carry every photometric decision; its draws are the CPU pipeline's (next test).
    aug, dino = dino_aug_and_config(local_crops_number=4)
    transform = DeviceMultiCropTransform(aug, 16, dino, 8)
    picture = image(24, 24)
    n = 500
    items = []
    for seed in range(n):
        with seeded(seed):
            items.append(transform(picture)["params"])
    blur = torch.tensor([[bool(p.blur) for p in item] for item in items]).float()      # (n, views)
    solarize = torch.tensor([[bool(p.solarize) for p in item] for item in items]).float()
    gray = torch.tensor([[bool(p.grayscale) for p in item] for item in items]).float()
    jitter = torch.tensor([[float(p.brightness) != 1.0 for p in item] for item in items]).float()

    def close(rate: torch.Tensor, p: float) -> bool:  # every rate within 5 binomial standard errors of p
        return bool((rate - p).abs().max() <= 5 * math.sqrt(p * (1 - p) / n))

    assert blur[:, 0].min() == 1 and solarize[:, 0].max() == 0          # global 1: always blurred, never solarised
    assert close(blur[:, 1].mean(), 0.1) and close(solarize[:, 1].mean(), 0.2)  # global 2
    assert close(blur[:, 2:].mean(0), 0.5) and solarize[:, 2:].max() == 0  # locals
    assert close(gray.mean(0), 0.2) and close(jitter.mean(0), 0.8)
    # failure: the wrong probability is told apart
    assert not close(blur[:, 1].mean(), 0.2) and not close(blur[:, 2:].mean(0), 0.1)


def test_gpu_mode_draws_what_the_cpu_pipeline_draws():
    aug, dino = dino_aug_and_config(local_crops_number=3)
    cpu, gpu = MultiCropTransform(aug, 32, dino, 16), DeviceMultiCropTransform(aug, 32, dino, 16)
    picture = image()
    cpu_views, gpu_items = [], []
    for seed in range(24):
        with seeded(seed):
            cpu_views.append(cpu(picture))
        with seeded(seed):
            gpu_items.append(gpu(picture))
    cpu_batch = default_collate(cpu_views)
    gpu_batch = gpu.finish_batch(default_collate(gpu_items))
    assert [tuple(t.shape) for t in gpu_batch] == [tuple(t.shape) for t in cpu_batch]
    for a, b in zip(cpu_batch, gpu_batch):
        # same crops and parameters; the CPU rounds to uint8 after each operation, the device does not
        diff = ((a - b) * STD * 255).abs()
        assert diff.mean() < 2.0 and diff.max() < 12.0, (diff.mean(), diff.max())


# ---------------------------------------------------------------------------- local crop size
@pytest.mark.parametrize("img_size, patch, expected", [
    (224, 16, 96), (224, 8, 96),   # the official 96 px
    (224, 14, 98),                 # 6.86 patches → 7
    (32, 8, 16), (64, 8, 24),      # 13.7 px → 2 patches; 27.4 px → 3
    (28, 8, 16),                   # exactly 1.5 patches: halves round up
    (8, 8, 8), (16, 8, 8),         # at least one patch
])
def test_automatic_local_crop_size(img_size, patch, expected):
    assert default_local_size(img_size, patch) == expected


def test_local_crop_size_comes_from_the_config():
    cfg = task_defaults("dino")
    cases = [("vit_small_patch16_224", 0, 224, 0, 96), ("vit_small_patch8_224", 0, 224, 0, 96),
             ("vit", 8, 64, 0, 24), ("vit", 0, 64, 0, 32),  # generic 'vit' is patch 16: 27.4 px → 2 patches
             ("resnet50", 0, 224, 0, 96), ("resnet50", 0, 64, 0, 32), ("vit", 8, 64, 40, 40)]
    for name, patch, img_size, configured, expected in cases:
        cfg.backbone = BackboneConfig(name=name, patch_size=patch)
        cfg.data.img_size, cfg.dino.local_crop_size = img_size, configured
        assert local_crop_size(cfg) == expected, (name, patch, img_size, configured)
    with pytest.raises(ValueError, match="needs the backbone.s patch size"):
        resolve_local_size(64, DinoConfig(), None)
    assert resolve_local_size(64, DinoConfig(local_crop_size=24), None) == 24


def tiny_dino_config(**overrides):
    cfg = task_defaults("dino")
    cfg.backbone, cfg.data.img_size = TINY_VIT, 32
    for dotted, value in overrides.items():
        group, name = dotted.split("__")
        setattr(getattr(cfg, group), name, value)
    return cfg


def test_bad_multicrop_settings_are_one_line_errors():
    assert _problem(tiny_dino_config()) is None
    assert _problem(tiny_dino_config(dino__local_crop_size=24)) is None
    problem = _problem(tiny_dino_config(dino__local_crop_size=20))
    assert problem == ("--dino.local_crop_size=20 must be a multiple of the backbone's patch size (8), e.g. 16 or 24 "
                       "(or 0 = automatic: 16)")
    # reflect padding of the blur (17 px kernel: 8 px) must be less than the 8 px local crops
    problem = _problem(tiny_dino_config(dino__local_crop_size=8, aug__blur_kernel_size=17))
    assert problem.startswith("--aug.blur_kernel_size (17 px) needs 8 px of reflect padding, which must be less than "
                              "the 8 px crops of --dino.local_crop_size=8") and "\n" not in problem
    assert _problem(tiny_dino_config(dino__local_crop_size=8, aug__blur_kernel_size=15)) is None
    # never-blurred local crops, or no local crops at all, need no padding
    assert _problem(tiny_dino_config(dino__local_crop_size=8, aug__blur_kernel_size=17,
                                              dino__local_blur_prob=0.0)) is None
    assert _problem(tiny_dino_config(dino__local_crop_size=8, aug__blur_kernel_size=17,
                                              dino__local_crops_number=0)) is None
    # the automatic size is named as such; the global crops are checked too
    problem = _problem(tiny_dino_config(data__img_size=16, aug__blur_sigma_max=3.0))
    assert problem.startswith("the kernel implied by --aug.blur_sigma_max (19 px) needs 9 px of reflect padding, "
                              "which must be less than the 8 px crops of the automatic --dino.local_crop_size (8 px)")
    problem = _problem(tiny_dino_config(data__img_size=8, aug__blur_kernel_size=17))
    assert "the 8 px crops of --data.img_size" in problem


def test_the_dino_task_refuses_bad_multicrop_settings_before_any_work(voc_root):
    from config.loading import ConfigError, parse_config
    from config.validation import validate

    args = ["--task=dino", "--data.dataset=voc", f"--data.root={voc_root}", "--data.img_size=32", "--backbone.name=vit",
            "--backbone.patch_size=8"]
    with pytest.raises(ConfigError, match=r"^--dino.local_crop_size=20 must be a multiple of the backbone's patch size"):
        validate(parse_config(args + ["--dino.local_crop_size=20"]))
    validate(parse_config(args + ["--dino.local_crop_size=24"]))


# ---------------------------------------------------------------------------- the DataModule
def data_cfg(root, **kw) -> DataConfig:
    values = {"dataset": "voc", "root": str(root), "img_size": 32, "batch_size": 4, "num_workers": 0, **kw}
    return DataConfig(**values)


def datamodule(root, workers: int = 0, device: str = "cpu", seed: int = 0, local_number: int = 2, **data):
    aug, dino = dino_aug_and_config(local_crops_number=local_number)
    dm = DinoDataModule(data_cfg(root, num_workers=workers, **data), dataclasses.replace(aug, device=device), dino,
                        seed, granularity=TINY_VIT.patch_size)
    dm.setup()
    return dm


def epoch(loader, dm, epoch_index: int = 0) -> list[list[torch.Tensor]]:
    loader.sampler.set_epoch(epoch_index)
    return [[t.clone() for t in dm.on_after_batch_transfer(batch, 0)] for batch in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(len(u) == len(v) and all(torch.equal(p, q) for p, q in zip(u, v))
                                    for u, v in zip(a, b))


@pytest.mark.parametrize("device", ["cpu", "gpu_photometric", "gpu_full"])
def test_batches_are_lists_of_views_in_every_mode(voc_root, device):
    dm = datamodule(voc_root, device=device, local_number=3)
    assert dm.local_size == 16 and [v.size for v in dm.views] == [32, 32, 16, 16, 16]
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batch = dm.on_after_batch_transfer(next(iter(loader)), 0)
        assert isinstance(batch, list) and len(batch) == 5
        assert [tuple(t.shape) for t in batch] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in batch)
    # the callbacks' helper: the validation loader's first views, finished on the CPU in this process
    first = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    helper = dm.validation_views(3)
    assert len(helper) == 5 and all(torch.allclose(h, f[:3], atol=1e-6) for h, f in zip(helper, first))
    assert len(dm.val_set.image_paths) == len(dm.val_set) and dm.root is not None


def test_batches_depend_on_the_seed_only(voc_root):
    first = datamodule(voc_root)
    a = epoch(first.train_dataloader(), first)
    torch.manual_seed(1234)  # global RNG state must not matter
    dm = datamodule(voc_root)
    assert same(a, epoch(dm.train_dataloader(), dm))
    dm2 = datamodule(voc_root, workers=2)  # two worker processes → the very same batches
    assert same(a, epoch(dm2.train_dataloader(), dm2))
    assert not same(a, epoch(dm.train_dataloader(), dm, epoch_index=1))
    other = datamodule(voc_root, seed=1)
    assert not same(a, epoch(other.train_dataloader(), other))


@pytest.mark.parametrize("device", ["gpu_photometric", "gpu_full"])
def test_device_mode_batches_are_worker_independent_and_close_to_the_cpu_modes(voc_root, device):
    dm0, dm2 = datamodule(voc_root, device=device), datamodule(voc_root, device=device, workers=2)
    batches = epoch(dm0.train_dataloader(), dm0)
    assert same(batches, epoch(dm2.train_dataloader(), dm2))
    cpu = datamodule(voc_root)
    for a, b in zip(epoch(cpu.train_dataloader(), cpu), batches):  # same seeds: same crops and parameters
        for u, v in zip(a, b):
            diff = ((u - v) * STD * 255).abs()
            assert diff.mean() < 2.0 and diff.max() < 12.0, (diff.mean(), diff.max())


def test_validation_views_are_the_same_every_epoch(voc_root):
    dm = datamodule(voc_root, val_max_images=8)
    loader = dm.val_dataloader()
    assert same(epoch(loader, dm, 0), epoch(loader, dm, 5))
    train = dm.train_dataloader()
    assert not same(epoch(train, dm, 0), epoch(train, dm, 5))


def test_a_run_resumed_mid_epoch_gets_the_rest_of_that_epochs_batches(voc_root):
    dm = datamodule(voc_root)
    full = epoch(dm.train_dataloader(), dm, 1)
    assert len(full) == 8  # 32 images, batch 4
    resumed = datamodule(voc_root)
    # what resume_mid_epoch reads from a trainer restored from a checkpoint of step 8 + 3 (epoch 1, batch 3)
    resumed.trainer = SimpleNamespace(ckpt_path="last.ckpt", num_training_batches=8, global_step=11)
    loader = resumed.train_dataloader()
    assert len(loader) == 8  # the trainer's count of batches per epoch does not change
    rest = epoch(loader, resumed, 1)
    assert same(rest, full[3:])
    assert same(epoch(loader, resumed, 2), epoch(dm.train_dataloader(), dm, 2))  # later epochs whole


# ---------------------------------------------------------------------------- the views picture
def test_views_picture_shows_every_crop_at_its_relative_size(voc_root, tmp_path):
    from callbacks.views import ViewPairsCallback, multicrop_figure
    from callbacks.visual import wait_for_pictures

    dm = datamodule(voc_root, local_number=3)
    views = list(dm.validation_views(2))
    figure = multicrop_figure(views, [v.name for v in dm.views])
    axes = figure.axes
    assert len(axes) == 2 * 5  # 2 images × (2 global + 3 local)
    assert [ax.get_title() for ax in axes[:5]] == ["global 1\n32 px", "global 2\n32 px", "local 1\n16 px",
                                                   "local 2\n16 px", "local 3\n16 px"]
    # a 16 px local crop fills the middle half of a cell as wide as the 32 px global views
    assert axes[0].images[0].get_extent() == [0.0, 32.0, 32.0, 0.0]
    assert axes[2].images[0].get_extent() == [8.0, 24.0, 24.0, 8.0] and axes[2].get_xlim() == (0.0, 32.0)
    # the pixels drawn are the denormalised views
    shown = torch.as_tensor(axes[5 + 3].images[0].get_array()).permute(2, 0, 1)  # image 1, local 2
    assert torch.allclose(shown, (views[3][1] * STD + MEAN).clamp(0, 1), atol=1e-6)

    trainer = SimpleNamespace(datamodule=dm, default_root_dir=str(tmp_path), global_step=0, current_epoch=0, loggers=[])
    path = ViewPairsCallback(num_images=2).render(trainer, None, tag="e000")
    wait_for_pictures()
    assert path == tmp_path / "media" / "views_e000.png" and path.stat().st_size > 0
