"""Which one limits Barlow Twins training: the data path or the training step? Every augmentation mode side by
side in one run, next to the step rate they must feed.

Measures, for one config, images per second (one image = one pair of views) of the whole data path —
DataLoader workers → batch transfer to the device → the datamodule's ``on_after_batch_transfer`` — in each
``--aug.device`` mode:

- ``cpu``: workers decode, crop, flip and run the photometric augmentations (torchvision, image by image);
- ``gpu_photometric``: workers decode, crop and flip; the photometric operations run batched on the device;
- ``gpu_full``: workers read file bytes and sizes; decoding (``decode_jpeg``), crops, flips and the
  photometric operations run batched on the device (datamodules/device_decode.py);

then the device half alone on one ready batch (gpu_full also split into decode / crop / photometric), and
the training step (Lightning, pre-made batches on the device; ``bench_train_step.lightning_steps_per_s``).
Modes alternate within each round (machine noise hits all alike); medians over rounds. Ratios above 1: the
data keeps up with the step. On a CPU-only machine the "device" is the same cores the workers use.

``--compare-resamplers`` also prints how far batched alternatives to gpu_full's resampling matrices are from
torchvision's ``resized_crop`` (the CPU pipeline's crops): ``roi_align(aligned=True)`` and bicubic
``grid_sample``, which do not antialias.

    python benchmarks/bench_data.py --config config/quickstart.yaml --workers 2 --batches 20 --steps 10
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from pytorch_lightning.utilities import move_data_to_device  # noqa: E402

from benchmarks.bench_train_step import lightning_steps_per_s  # noqa: E402
from config.loading import parse_config  # noqa: E402
from datamodules.barlow_twins import BarlowTwinsDataModule  # noqa: E402
from datamodules.device_decode import decode_images, pad_images, resized_crops  # noqa: E402
from datamodules.gpu_augment import PhotometricParams  # noqa: E402
from datamodules.images import load_rgb  # noqa: E402
from datamodules.transforms import CropFlip  # noqa: E402

MODES = ("cpu", "gpu_photometric", "gpu_full")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def datamodule(cfg, mode: str) -> BarlowTwinsDataModule:
    aug = dataclasses.replace(cfg.aug, gpu=False, device=mode)
    dm = BarlowTwinsDataModule(cfg.data, aug, cfg.seed, shared_crop=cfg.barlow.shared_crop)
    dm.prepare_data()
    dm.setup()
    return dm


def finished_batches(dm: BarlowTwinsDataModule, device: torch.device):
    """Endless finished batches as the LightningModule would receive them (loader → device → hook)."""
    loader = dm.train_dataloader()
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            yield dm.on_after_batch_transfer(move_data_to_device(batch, device), 0)
        epoch += 1


def loader_images_per_s(dm: BarlowTwinsDataModule, device: torch.device, batches: int) -> float:
    """Images/s of the whole data path; the first batch (worker start-up) is not timed."""
    stream = finished_batches(dm, device)
    next(stream)
    synchronize(device)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += next(stream)[0].shape[0]
    synchronize(device)
    elapsed = time.perf_counter() - start
    # Persistent workers live as long as their loader: stop them before the next measurement runs.
    stream.close()
    del stream
    gc.collect()
    return images / elapsed


def first_raw_batch(dm: BarlowTwinsDataModule, device: torch.device):
    """The training loader's first batch as the workers would make it, made here, moved to ``device``."""
    keys = list(itertools.islice(iter(dm.train_dataloader().sampler), dm.batch_size))
    collate = getattr(dm.transform, "collate", None) or torch.utils.data.default_collate
    return move_data_to_device(collate([dm.train_set[key] for key in keys]), device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call of ``fn`` (one warm-up call first)."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def device_half_images_per_s(dm: BarlowTwinsDataModule, device: torch.device, repeats: int) -> dict:
    """Images/s of a mode's device half alone on one ready batch; gpu_full also per stage."""
    raw = first_raw_batch(dm, device)
    b = dm.batch_size
    out = {"device_half": b / timed(lambda: dm.on_after_batch_transfer(raw, 0), device, repeats)}
    if "encoded" in raw:
        views = dm.transform.device_views
        images = pad_images(decode_images(raw["encoded"], device))
        boxes = torch.stack([v["box"] for v in raw["views"]], dim=1)
        flips = torch.stack([v["flip"] for v in raw["views"]], dim=1)
        spec = views.specs[0]
        crops = resized_crops(images, boxes, flips, spec.size, spec.interpolation)
        params = [PhotometricParams(*v["params"]) for v in raw["views"]]
        out["decode"] = b / timed(lambda: decode_images(raw["encoded"], device), device, repeats)
        out["crop_resize"] = b / timed(lambda: resized_crops(images, boxes, flips, spec.size, spec.interpolation),
                                       device, repeats)
        out["photometric"] = b / timed(lambda: [views.photometric(crops[:, k], params[k]) for k in range(2)],
                                       device, repeats)
    return out


def training_images_per_s(cfg, device: torch.device, steps: int, warmup: int, precision: str) -> float:
    b, s = cfg.data.batch_size, cfg.data.img_size
    g = torch.Generator().manual_seed(0)
    views = (torch.randn(4 * b, 3, s, s, generator=g), torch.randn(4 * b, 3, s, s, generator=g))
    return lightning_steps_per_s(cfg, views, steps, warmup, precision, device) * b


def compare_resamplers(dm: BarlowTwinsDataModule, count: int = 32) -> dict:
    """Mean and max |difference| (uint8 levels) from torchvision's antialiased ``resized_crop`` of the same
    boxes: gpu_full's matrices, ``roi_align(aligned=True)`` (adaptive sampling) and bicubic ``grid_sample``."""
    from torch.nn import functional as F
    from torchvision.ops import roi_align
    from torchvision.transforms.v2 import functional as TF

    cfg, size = dm.aug, dm.cfg.img_size
    mode = TF.InterpolationMode.BICUBIC if cfg.crop_interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
    crop = CropFlip(cfg, size)
    results = {"matrices (gpu_full)": [], "roi_align aligned=True": [], f"grid_sample {cfg.crop_interpolation}": []}
    torch.manual_seed(0)
    for path in dm.train_set.paths[:count]:
        image = load_rgb(path)
        h, w = image.shape[-2:]
        params, _ = crop.draw(h, w)
        top, left, height, width = params["top"], params["left"], params["height"], params["width"]
        expected = TF.resized_crop(image, top, left, height, width, [size, size], interpolation=mode, antialias=True).float()
        x = image[None].float()
        ours = resized_crops(x, torch.tensor([[[top, left, height, width]]]), torch.tensor([[False]]), size,
                             cfg.crop_interpolation)[0, 0]
        box = torch.tensor([[0, left, top, left + width, top + height]], dtype=torch.float32)
        roi = roi_align(x, box, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)[0]
        u = (torch.arange(size) + 0.5) / size
        ys = (top + u * height) / h * 2 - 1
        xs = (left + u * width) / w * 2 - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]
        sampled = F.grid_sample(x, grid, mode=cfg.crop_interpolation, align_corners=False)[0]
        for name, got in zip(results, (ours, roi, sampled)):
            results[name].append((got.clamp(0, 255).round() - expected).abs())
    return {name: {"mean": torch.stack(d).mean().item(), "max": torch.stack(d).max().item()} for name, d in results.items()}


def verdict(data: float, train: float) -> str:
    ratio = data / train
    if ratio >= 1:
        return f"{ratio:.2f}x the training rate: the training step limits"
    return f"{ratio:.2f}x the training rate: data limits (the step would wait {1 - ratio:.0%} of the time)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/quickstart.yaml")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the config's)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per data measurement")
    parser.add_argument("--batch-size", type=int, default=0, help="override data.batch_size")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (0: skip the step)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--rounds", type=int, default=1, help="repeat each measurement, report the median")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--compare-resamplers", action="store_true",
                        help="also measure roi_align / grid_sample against torchvision's resized_crop")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads of this process (0 = torch's default); on a busy CPU, 1 can be faster")
    args, overrides = parser.parse_known_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)  # the trainer's banner lines
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = parse_config(["--config", args.config, *overrides])
    if args.workers is not None:
        cfg.data.num_workers = args.workers
    if args.batch_size:
        cfg.data.batch_size = args.batch_size
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: {', '.join(unknown)} not among {', '.join(MODES)}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = "bf16-mixed" if cuda and torch.cuda.is_bf16_supported() else "32-true"
    dms = {mode: datamodule(cfg, mode) for mode in modes}
    name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    first = dms[modes[0]]
    print(f"device: {name}; config {args.config}; batch {cfg.data.batch_size}; img {cfg.data.img_size}px "
          f"({cfg.aug.crop_interpolation}); {first.num_workers} workers; backbone {cfg.backbone.name} "
          f"depth={cfg.backbone.depth} embed_dim={cfg.backbone.embed_dim} patch={cfg.backbone.patch_size}; "
          f"precision {precision}; torch {torch.__version__}")

    loader: dict[str, list[float]] = {m: [] for m in modes}
    halves: dict[str, list[dict]] = {m: [] for m in modes if m != "cpu"}
    train: list[float] = []
    for _ in range(args.rounds):
        for mode in modes:
            loader[mode].append(loader_images_per_s(dms[mode], device, args.batches))
        for mode in halves:
            halves[mode].append(device_half_images_per_s(dms[mode], device, max(3, args.batches // 2)))
        if args.steps:
            train.append(training_images_per_s(cfg, device, args.steps, args.warmup, precision))
    results = {"device": name, "batch_size": cfg.data.batch_size, "img_size": cfg.data.img_size,
               "workers": first.num_workers, "precision": precision,
               "loader_images_per_s": {m: statistics.median(v) for m, v in loader.items()},
               "device_half_images_per_s": {m: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                                            for m, rows in halves.items()}}
    if train:
        results["training_images_per_s"] = statistics.median(train)
    for mode in modes:
        print(f"{'data path, ' + mode + ':':<42}{results['loader_images_per_s'][mode]:10.1f} images/s")
    for mode, parts in results["device_half_images_per_s"].items():
        detail = ", ".join(f"{k} {v:.0f}" for k, v in parts.items() if k != "device_half")
        print(f"{'  ' + mode + ' device half alone:':<42}{parts['device_half']:10.1f} images/s"
              + (f"  ({detail} images/s)" if detail else ""))
    if train:
        t = results["training_images_per_s"]
        print(f"{'training step (Lightning, ' + precision + '):':<42}{t:10.1f} images/s")
        for mode in modes:
            print(f"ratio data/training, {mode}: {verdict(results['loader_images_per_s'][mode], t)}")
    if "cpu" in modes:
        for mode in modes[1:]:
            print(f"{mode} vs cpu: {results['loader_images_per_s'][mode] / results['loader_images_per_s']['cpu']:.2f}x "
                  f"the data rate")
    if args.compare_resamplers:
        results["resamplers_vs_torchvision_levels"] = compare_resamplers(first)
        for label, d in results["resamplers_vs_torchvision_levels"].items():
            print(f"crop {label}: mean {d['mean']:.3f}, max {d['max']:.0f} uint8 levels from torchvision's resized_crop")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
