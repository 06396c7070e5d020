"""GPU augmentation mode, crop geometry and shared crops.

Every batched operation is checked against torchvision.transforms.v2.functional applied image by image with
the same parameter; the random pipelines against torchvision Compose pipelines written out here, and the
parameter sampler against the config's probabilities and ranges.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import math

import pytest
import torch
from torch.utils.data import default_collate
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import main
from config.hparams import AugmentConfig, DataConfig
from config.loading import ConfigError, parse_config
from config.validation import validate
from datamodules.barlow_twins import BarlowTwinsDataModule
from datamodules.gpu_augment import (DeviceAugmentTransform, DevicePhotometric, PhotometricParams, PhotometricSampler,
                                     adjust_hue, blend, color_jitter_ops, gaussian_blur_ops, grayscale,
                                     random_grayscale, random_solarize)
from datamodules.images import load_rgb
from datamodules.sampling import seeded
from datamodules.transforms import BarlowTwinsTransform

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
NO_PHOTOMETRIC = dict(jitter_prob=0.0, grayscale_prob=0.0, blur_prob_1=0.0, blur_prob_2=0.0,
                      solarize_prob_1=0.0, solarize_prob_2=0.0)
# Float operations against torchvision's float kernels: only float32 rounding differs.
FLOAT_TOL = 1e-5


def random_images(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    """Float images in [0, 1] on the uint8 grid, with some grey pixels and saturated ones (hue edge cases)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    images[:, :, :3] = images[:, :1, :3]          # grey rows (r = g = b)
    images[:, 0, 3, :] = 255                       # saturated red row
    return images.float() / 255


def per_sample(fn, images: torch.Tensor, values) -> torch.Tensor:
    """Reference: a torchvision function applied image by image with that image's parameter."""
    return torch.stack([fn(image, float(value)) for image, value in zip(images, values)])


def denormalised_uint8_scale(views: torch.Tensor) -> torch.Tensor:
    """Normalised views → pixel values on the 0..255 scale."""
    return (views * STD + MEAN) * 255


# ---------------------------------------------------------------------------- batched ops vs torchvision
# The three blends color_jitter_ops applies (a per-sample reference: black, the mean luma, the luma), written as
# torchvision's single-image functions so each can be compared with its torchvision counterpart.
def adjust_brightness(images, factor):
    return blend(images, torch.zeros_like(images), factor)


def adjust_contrast(images, factor):
    return blend(images, grayscale(images).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(images, factor):
    return blend(images, grayscale(images), factor)


def test_blend_operations_match_torchvision_with_a_factor_per_sample():
    images = random_images(5)
    factors = torch.tensor([0.0, 0.6, 1.0, 1.37, 2.0])
    for ours, theirs in ((adjust_brightness, TF.adjust_brightness), (adjust_contrast, TF.adjust_contrast),
                         (adjust_saturation, TF.adjust_saturation)):
        expected = per_sample(theirs, images, factors)
        assert torch.allclose(ours(images, factors), expected, atol=FLOAT_TOL), ours.__name__


def test_hue_matches_torchvision_with_a_shift_per_sample():
    images = random_images(6)
    shifts = torch.tensor([-0.5, -0.1, 0.0, 0.03, 0.25, 0.5])
    expected = per_sample(TF.adjust_hue, images, shifts)
    assert torch.allclose(adjust_hue(images, shifts), expected, atol=FLOAT_TOL)


def test_grayscale_and_solarize_match_torchvision_where_applied():
    images = random_images(4)
    apply = torch.tensor([True, False, True, False])
    expected = torch.stack([TF.rgb_to_grayscale(x, num_output_channels=3) if a else x for x, a in zip(images, apply)])
    assert torch.allclose(random_grayscale(images, apply), expected, atol=FLOAT_TOL)
    # solarisation: torchvision's uint8 semantics (threshold 128), exactly, on uint8-representable values
    as_uint8 = (images * 255).round().to(torch.uint8)
    as_uint8[0, :, 0, :4] = torch.tensor([126, 127, 128, 129], dtype=torch.uint8)  # around the threshold
    expected = torch.stack([TF.solarize(x, 128) if a else x for x, a in zip(as_uint8, apply)]).float() / 255
    assert torch.allclose(random_solarize(as_uint8.float() / 255, apply), expected, atol=1e-6)


@pytest.mark.parametrize("kernel_size", [3, 13])
def test_blur_matches_torchvision_with_a_sigma_per_sample(kernel_size):
    images = random_images(4, size=20)
    sigmas = torch.tensor([0.1, 0.7, 2.0, 1.3])
    apply = torch.tensor([True, True, True, False])  # the last one stays sharp
    expected = torch.stack([TF.gaussian_blur(x, [kernel_size, kernel_size], [float(s), float(s)]) if a else x
                            for x, s, a in zip(images, sigmas, apply)])
    assert torch.allclose(gaussian_blur_ops(images, sigmas, apply, kernel_size), expected, atol=FLOAT_TOL)


def test_jitter_applies_each_samples_own_operation_order():
    orders = torch.tensor(list(itertools.permutations(range(4))))  # all 24 orders, one per sample
    n = len(orders)
    images = random_images(n, size=12, seed=1)
    g = torch.Generator().manual_seed(2)
    brightness, contrast, saturation = (0.6 + 0.8 * torch.rand(n, generator=g) for _ in range(3))
    hue = 0.2 * torch.rand(n, generator=g) - 0.1
    functions = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    expected = []
    for i in range(n):
        x = images[i]
        for op in orders[i].tolist():
            x = functions[op](x, float((brightness, contrast, saturation, hue)[op][i]))
        expected.append(x)
    out = color_jitter_ops(images, orders, brightness, contrast, saturation, hue)
    assert torch.allclose(out, torch.stack(expected), atol=FLOAT_TOL)
    # without a hue strength the hue step is skipped, which must equal the three other operations in order
    no_hue = color_jitter_ops(images, orders, brightness, contrast, saturation, torch.zeros(n), use_hue=False)
    expected = []
    for i in range(n):
        x = images[i]
        for op in [o for o in orders[i].tolist() if o != 3]:
            x = functions[op](x, float((brightness, contrast, saturation)[op][i]))
        expected.append(x)
    assert torch.allclose(no_hue, torch.stack(expected), atol=FLOAT_TOL)


# ---------------------------------------------------------------------------- sampled parameters
def sample_many(sampler: PhotometricSampler, n: int, seed: int = 0) -> PhotometricParams:
    torch.manual_seed(seed)
    return default_collate([sampler() for _ in range(n)])


def assert_frequency(flags: torch.Tensor, p: float) -> None:
    """Observed frequency within 4.5 binomial standard deviations of p."""
    n = flags.numel()
    assert abs(flags.float().mean().item() - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 1e-9, (flags.float().mean(), p)


def test_sampled_parameters_follow_the_config():
    cfg = AugmentConfig()
    n = 4000
    first = sample_many(PhotometricSampler(cfg, cfg.blur_prob_1, cfg.solarize_prob_1), n, seed=0)
    second = sample_many(PhotometricSampler(cfg, cfg.blur_prob_2, cfg.solarize_prob_2), n, seed=1)
    for params, blur_p, solarize_p in ((first, 1.0, 0.0), (second, 0.1, 0.2)):
        jittered = params.brightness != 1.0
        assert_frequency(jittered, cfg.jitter_prob)
        assert_frequency(params.grayscale, cfg.grayscale_prob)
        assert_frequency(params.blur, blur_p)
        assert_frequency(params.solarize, solarize_p)
        for name, low, high in (("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4), ("saturation", 0.8, 1.2),
                                ("hue", -0.1, 0.1)):
            values = getattr(params, name)[jittered]
            width = high - low
            assert low <= values.min() < low + 0.01 * width and high - 0.01 * width < values.max() <= high, name
            assert abs(values.mean().item() - (low + high) / 2) < 0.02 * width, name  # uniform: centred
            # views without jitter keep the identity values
            assert torch.all(getattr(params, name)[~jittered] == (0.0 if name == "hue" else 1.0)), name
        orders = params.order[jittered]
        assert torch.equal(orders.sort(dim=1).values, torch.arange(4).expand_as(orders))  # permutations
        counts = torch.unique(orders, dim=0, return_counts=True)[1]
        expected = len(orders) / 24
        assert len(counts) == 24 and torch.all((counts - expected).abs() < 5 * math.sqrt(expected))
        sigmas = params.blur_sigma[params.blur]
        assert cfg.blur_sigma_min <= sigmas.min() < 0.15 and 1.95 < sigmas.max() <= cfg.blur_sigma_max


def test_switched_off_jitter_operations_stay_neutral():
    cfg = AugmentConfig(saturation=0.0, hue=0.0, jitter_prob=1.0)
    params = sample_many(PhotometricSampler(cfg, 0.0, 0.0), 200)
    assert torch.all(params.saturation == 1.0) and torch.all(params.hue == 0.0)
    assert torch.all(params.brightness != 1.0) and not params.blur.any() and not params.solarize.any()


# ---------------------------------------------------------------------------- GPU mode vs CPU pipeline
def structured_image(height: int = 48, width: int = 64) -> torch.Tensor:
    """A colourful uint8 test picture: colour gradients, a bright square and texture."""
    y = torch.linspace(0, 1, height).view(-1, 1)
    x = torch.linspace(0, 1, width).view(1, -1)
    image = torch.stack([x.expand(height, width), y.expand(height, width), 0.5 + 0.5 * torch.sin(12 * x + 7 * y)])
    image[:, 10:25, 20:40] = torch.tensor([0.95, 0.85, 0.2]).view(3, 1, 1)
    return (image * 255).round().to(torch.uint8)


def cpu_views(cfg: AugmentConfig, seeds, img_size: int = 32) -> list[torch.Tensor]:
    """The CPU pipeline's view pairs of the structured image, one per seed, as two (N, 3, S, S) batches."""
    transform, image = BarlowTwinsTransform(cfg, img_size), structured_image()
    items = []
    for seed in seeds:
        with seeded(seed):
            items.append(transform(image))
    return default_collate(items)


def gpu_views(cfg: AugmentConfig, seeds, img_size: int = 32) -> tuple[torch.Tensor, ...]:
    """The same through GPU mode: worker half per item, then the batched device half (here on the CPU)."""
    transform, image = DeviceAugmentTransform(cfg, img_size), structured_image()
    items = []
    for seed in seeds:
        with seeded(seed):
            items.append(transform(image))
    return transform.finish_batch(default_collate(items))


def both_modes(cfg: AugmentConfig, seeds):
    return cpu_views(cfg, seeds), gpu_views(cfg, seeds)


def test_gpu_mode_reproduces_the_cpu_views_of_the_same_seed():
    # Same seed → same crops and parameters in both modes; the CPU pipeline rounds to uint8 after every
    # operation (truncating in the blends) where GPU mode stays in float: a few levels apart at most.
    cpu, gpu = both_modes(AugmentConfig(), range(60))
    for a, b in zip(cpu, gpu):
        diff = (denormalised_uint8_scale(a) - denormalised_uint8_scale(b)).abs()
        assert diff.mean() < 2.0 and diff.max() < 10.0, (diff.mean(), diff.max())
    # without photometric operations both modes give the very same views
    cpu, gpu = both_modes(AugmentConfig(**NO_PHOTOMETRIC), range(20))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(cpu, gpu))


def test_gpu_mode_output_statistics_match_the_cpu_pipeline():
    # Disjoint seeds: a comparison of distributions, not of paired samples.
    n = 200
    cpu, gpu = cpu_views(AugmentConfig(), range(n)), gpu_views(AugmentConfig(), range(10_000, 10_000 + n))
    for view in range(2):
        for statistic in (lambda v: v.mean(dim=(2, 3)), lambda v: v.std(dim=(2, 3))):
            a, b = statistic(cpu[view]), statistic(gpu[view])  # (n, 3) per-sample, per-channel
            standard_error = torch.sqrt(a.var(dim=0) / n + b.var(dim=0) / n)
            # 4.5 standard errors of sampling noise + 0.02 (≈ 1.2 uint8 levels) for the CPU's rounding
            assert torch.all((a.mean(dim=0) - b.mean(dim=0)).abs() < 4.5 * standard_error + 0.02), (view, a.mean(0), b.mean(0))


# ---------------------------------------------------------------------------- the default CPU path
def reference_view_pipeline(cfg: AugmentConfig, size: int, blur_prob: float, solarize_prob: float) -> v2.Compose:
    """The pipeline as it was before GPU mode and geometry existed, written out with torchvision."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(cfg.crop_scale_min, cfg.crop_scale_max),
                             interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=cfg.hflip_prob),
        v2.RandomApply([v2.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast,
                                       saturation=cfg.saturation, hue=cfg.hue)], p=cfg.jitter_prob),
        v2.RandomGrayscale(p=cfg.grayscale_prob),
        v2.RandomApply([v2.GaussianBlur(13, sigma=(cfg.blur_sigma_min, cfg.blur_sigma_max))], p=blur_prob),
        v2.RandomSolarize(threshold=128, p=solarize_prob),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])


def test_default_cpu_views_are_the_torchvision_pipelines_pixels():
    cfg = AugmentConfig()
    first = reference_view_pipeline(cfg, 32, cfg.blur_prob_1, cfg.solarize_prob_1)
    second = reference_view_pipeline(cfg, 32, cfg.blur_prob_2, cfg.solarize_prob_2)
    image = structured_image()
    plain, with_geometry = BarlowTwinsTransform(cfg, 32), BarlowTwinsTransform(cfg, 32, geometry=True)
    for seed in range(40):
        with seeded(seed):
            expected = (first(image), second(image))
        with seeded(seed):
            views = plain(image)
        with seeded(seed):
            geometric = with_geometry(image)
        assert len(views) == 2 and all(torch.equal(a, b) for a, b in zip(views, expected))
        assert len(geometric) == 4 and all(torch.equal(a, b) for a, b in zip(geometric[:2], expected))


def data_cfg(root, **kw) -> DataConfig:
    values = {"dataset": "voc", "root": str(root), "img_size": 32, "batch_size": 4, "num_workers": 0, **kw}
    return DataConfig(**values)


def test_datamodule_default_items_are_the_torchvision_pipelines_views(voc_root):
    dm = BarlowTwinsDataModule(data_cfg(voc_root), AugmentConfig(), seed=0)
    dm.setup()
    cfg = AugmentConfig()
    first = reference_view_pipeline(cfg, 32, cfg.blur_prob_1, cfg.solarize_prob_1)
    second = reference_view_pipeline(cfg, 32, cfg.blur_prob_2, cfg.solarize_prob_2)
    for index, item_seed in list(dm.train_dataloader().sampler)[:6]:
        with seeded(item_seed):
            expected = (first(load_rgb(dm.train_set.paths[index])), second(load_rgb(dm.train_set.paths[index])))
        assert all(torch.equal(a, b) for a, b in zip(dm.train_set[(index, item_seed)], expected))


# ---------------------------------------------------------------------------- geometry and shared crops
def coordinate_image(height: int = 192, width: int = 256) -> torch.Tensor:
    """uint8 image whose red value is the pixel's column and green its row."""
    columns = torch.arange(width).view(1, -1).expand(height, width)
    rows = torch.arange(height).view(-1, 1).expand(height, width)
    return torch.stack([columns, rows, torch.zeros_like(rows)]).to(torch.uint8)


def expected_coordinates(geometry: torch.Tensor, size: int, height: int, width: int):
    """(rows, columns) of the original pixel each view pixel should show, from the box alone."""
    y0, x0, y1, x1, flipped = geometry.tolist()
    u = (torch.arange(size) + 0.5) / size
    v = 1 - u if flipped else u
    rows = (y0 + u * (y1 - y0)) * height - 0.5    # pixel k covers [k, k+1): its centre k + 0.5 has value k
    columns = (x0 + v * (x1 - x0)) * width - 0.5
    return rows.view(-1, 1).expand(size, size), columns.view(1, -1).expand(size, size)


def assert_geometry_maps(view: torch.Tensor, geometry: torch.Tensor, size: int) -> None:
    """The view's coordinate values equal the box mapping, away from the resampling clamp at the view edge."""
    rows, columns = expected_coordinates(geometry, size, 192, 256)
    inner = (slice(2, -2), slice(2, -2))
    assert (view[1][inner] - rows[inner]).abs().max() <= 1.0
    assert (view[0][inner] - columns[inner]).abs().max() <= 1.0


@pytest.mark.parametrize("hflip_prob", [0.0, 1.0])
def test_geometry_maps_view_pixels_to_the_original_pixels(hflip_prob):
    cfg = AugmentConfig(hflip_prob=hflip_prob, crop_interpolation="bilinear", **NO_PHOTOMETRIC)
    image, size = coordinate_image(), 32
    cpu = BarlowTwinsTransform(cfg, size, geometry=True)
    gpu = DeviceAugmentTransform(cfg, size, geometry=True)
    for seed in range(12):
        with seeded(seed):
            x1, x2, g1, g2 = cpu(image)
        with seeded(seed):
            item = gpu(image)
        for view, geometry in ((x1, g1), (x2, g2)):
            assert geometry.dtype == torch.float32 and geometry.shape == (5,)
            assert geometry[4] == hflip_prob
            assert 0 <= geometry[0] < geometry[2] <= 1 and 0 <= geometry[1] < geometry[3] <= 1
            assert_geometry_maps(denormalised_uint8_scale(view), geometry, size)
        for name in ("1", "2"):
            assert_geometry_maps(item["view" + name].float(), item["geometry" + name], size)
        assert torch.equal(item["geometry1"], g1) and torch.equal(item["geometry2"], g2)


def test_bicubic_crops_map_too():
    cfg = AugmentConfig(hflip_prob=0.5, **NO_PHOTOMETRIC)
    transform, flips = BarlowTwinsTransform(cfg, 32, geometry=True), set()
    for seed in range(12):
        with seeded(seed):
            x1, _, g1, _ = transform(coordinate_image())
        flips.add(float(g1[4]))
        assert_geometry_maps(denormalised_uint8_scale(x1), g1, 32)
    assert flips == {0.0, 1.0}


def test_shared_crop_gives_both_views_one_geometry():
    image = coordinate_image()
    cfg = AugmentConfig(hflip_prob=0.5)
    gpu = DeviceAugmentTransform(cfg, 32, shared_crop=True, geometry=True)
    cpu_plain = BarlowTwinsTransform(dataclasses.replace(cfg, **NO_PHOTOMETRIC), 32, shared_crop=True, geometry=True)
    cpu = BarlowTwinsTransform(cfg, 32, shared_crop=True, geometry=True)
    views_differ = False
    for seed in range(10):
        with seeded(seed):
            item = gpu(image)
        assert torch.equal(item["view1"], item["view2"]) and torch.equal(item["geometry1"], item["geometry2"])
        with seeded(seed):
            x1, x2, g1, g2 = cpu_plain(image)
        assert torch.equal(x1, x2) and torch.equal(g1, g2)
        with seeded(seed):
            x1, x2, g1, g2 = cpu(image)
        assert torch.equal(g1, g2)
        views_differ |= not torch.equal(x1, x2)  # the photometric operations still differ
    assert views_differ
    with seeded(0):
        _, _, g1, g2 = BarlowTwinsTransform(cfg, 32, geometry=True)(image)
    assert not torch.equal(g1, g2)  # without shared_crop, two crops


# ---------------------------------------------------------------------------- the datamodule
def datamodule(voc_root, gpu: bool, workers: int = 0, **kw) -> BarlowTwinsDataModule:
    dm = BarlowTwinsDataModule(data_cfg(voc_root, num_workers=workers, val_max_images=8),
                               AugmentConfig(gpu=gpu), seed=0, **kw)
    dm.setup()
    return dm


def flatten(batch) -> list[torch.Tensor]:
    if isinstance(batch, dict):
        return [t for value in batch.values() for t in flatten(value)]
    if isinstance(batch, (list, tuple)):
        return [t for value in batch for t in flatten(value)]
    return [batch.clone()]


def test_gpu_mode_batches_are_deterministic_and_worker_independent(voc_root):
    def raw_batches(workers: int) -> list[list[torch.Tensor]]:
        return [flatten(b) for b in datamodule(voc_root, gpu=True, workers=workers).train_dataloader()]

    a = raw_batches(0)
    torch.manual_seed(1234)  # global RNG state must not matter
    b = raw_batches(2)
    assert len(a) == len(b) == 8
    assert all(torch.equal(p, q) for u, v in zip(a, b) for p, q in zip(u, v))
    dm = datamodule(voc_root, gpu=True)
    first = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    again = dm.on_after_batch_transfer(next(iter(datamodule(voc_root, gpu=True, workers=2).train_dataloader())), 0)
    assert all(torch.equal(p, q) for p, q in zip(first, again))


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("geometry", [False, True])
def test_batches_reach_the_model_in_one_format(voc_root, gpu, geometry):
    dm = datamodule(voc_root, gpu=gpu, geometry=geometry)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batch = dm.on_after_batch_transfer(next(iter(loader)), 0)
        assert len(batch) == (4 if geometry else 2)
        x1, x2 = batch[:2]
        assert x1.shape == x2.shape == (4, 3, 32, 32) and x1.dtype == torch.float32 and not torch.equal(x1, x2)
        if geometry:
            assert batch[2].shape == batch[3].shape == (4, 5) and batch[2].dtype == torch.float32
    # the callbacks' helper gives the validation loader's first views, finished on the CPU
    first = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    helper = dm.validation_views(3)
    assert len(helper) == len(first) and all(torch.allclose(h, f[:3], atol=1e-6) for h, f in zip(helper, first))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_device_photometric_runs_on_the_views_device_without_host_syncs(device):
    cfg = AugmentConfig()
    params = PhotometricParams(*(t.to(device) for t in sample_many(PhotometricSampler(cfg, 1.0, 1.0), 3)))
    views = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, device=device)
    photometric = DevicePhotometric(cfg)
    photometric(views, params)  # first call: the normalisation constants are copied to the device once
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        out = photometric(views, params)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert out.device.type == device and out.shape == (3, 3, 16, 16) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------- config and end to end
def test_a_blur_kernel_wider_than_the_view_is_refused(voc_root):
    args = ["--data.dataset=voc", f"--data.root={voc_root}", "--data.img_size=8", "--backbone.name=vit",
            "--backbone.patch_size=8", "--aug.blur_kernel_size=17"]
    with pytest.raises(ConfigError, match=r"--aug.blur_kernel_size \(17 px\) needs 8 px of reflect padding"):
        validate(parse_config(args))
    validate(parse_config(args[:-1] + ["--aug.blur_kernel_size=15"]))


@pytest.mark.parametrize("extra", [{}, {"barlow__dense_weight": 0.5, "barlow__shared_crop": "true"}],
                         ids=["global", "dense_shared_crop"])
def test_tiny_run_with_gpu_augmentation_trains(tiny, tmp_path, extra):
    # the dense term consumes the crop geometry: (x1, x2, g1, g2) batches made on the device
    args = tiny("gpu_aug", aug__gpu="true", trainer__max_epochs=1, callbacks__views="true",
                callbacks__every_n_epochs=1, **extra)
    assert main.main(args) == 0
    run = tmp_path / "runs" / "gpu_aug"
    with (run / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses + val) and val
    assert (run / "media" / "views_e000.png").is_file() and (run / "media" / "cross_correlation_start.png").is_file()
