"""Which one limits Barlow Twins training: the data pipeline or the training step?

Measures, for one config, view pairs per second of

- the CPU augmentation mode: DataLoader workers decode, crop, flip and run the photometric augmentations
  (torchvision, one image at a time), batches moved to the device;
- the GPU augmentation mode (``--aug.gpu=true``): workers decode, crop, flip and draw the parameters; the
  photometric operations run batched on the device (CUDA when available, else the CPU) in the
  datamodule's ``on_after_batch_transfer``, timed end to end, and also alone on one ready batch;
- the training step (Lightning, pre-made batches on the device; ``bench_train_step.lightning_steps_per_s``),

and the ratio of each data rate to the training rate: above 1 the data keeps up, below 1 the training step
waits for data. Each part is measured alone; in a real run on a CPU-only machine they share the cores.

    python benchmarks/bench_data.py --config config/quickstart.yaml --workers 2 --batches 20
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from pytorch_lightning.utilities import move_data_to_device  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from benchmarks.bench_train_step import lightning_steps_per_s  # noqa: E402
from config.loading import parse_config  # noqa: E402
from datamodules.barlow_twins import BarlowTwinsDataModule  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def datamodule(cfg, gpu_augment: bool) -> BarlowTwinsDataModule:
    aug = dataclasses.replace(cfg.aug, gpu=gpu_augment)
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


def loader_pairs_per_s(dm: BarlowTwinsDataModule, device: torch.device, batches: int) -> float:
    """View pairs/s of the whole data path; the first batch (worker start-up) is not timed."""
    stream = finished_batches(dm, device)
    next(stream)
    synchronize(device)
    start, pairs = time.perf_counter(), 0
    for _ in range(batches):
        pairs += next(stream)[0].shape[0]
    synchronize(device)
    elapsed = time.perf_counter() - start
    # Persistent workers live as long as their loader: stop them before the next measurement runs.
    stream.close()
    del stream
    gc.collect()
    return pairs / elapsed


def first_raw_batch(dm: BarlowTwinsDataModule) -> dict:
    """The training loader's first batch as the workers would make it, made here (no worker processes)."""
    keys = list(itertools.islice(iter(dm.train_dataloader().sampler), dm.batch_size))
    return default_collate([dm.train_set[key] for key in keys])


def device_ops_pairs_per_s(dm: BarlowTwinsDataModule, device: torch.device, repeats: int) -> float:
    """View pairs/s of GPU mode's on-device photometric operations alone, on one ready uint8 batch."""
    raw = move_data_to_device(first_raw_batch(dm), device)
    dm.on_after_batch_transfer(raw, 0)  # warm-up (kernels, allocator)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        x1 = dm.on_after_batch_transfer(raw, 0)[0]
    synchronize(device)
    return repeats * x1.shape[0] / (time.perf_counter() - start)


def training_pairs_per_s(cfg, device: torch.device, steps: int, warmup: int, precision: str) -> float:
    b, s = cfg.data.batch_size, cfg.data.img_size
    g = torch.Generator().manual_seed(0)
    views = (torch.randn(4 * b, 3, s, s, generator=g), torch.randn(4 * b, 3, s, s, generator=g))
    return lightning_steps_per_s(cfg, views, steps, warmup, precision, device) * b


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
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--rounds", type=int, default=1, help="repeat each measurement, report the median")
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
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = "bf16-mixed" if cuda and torch.cuda.is_bf16_supported() else "32-true"
    cpu_dm, gpu_dm = datamodule(cfg, gpu_augment=False), datamodule(cfg, gpu_augment=True)
    name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"device: {name}; config {args.config}; batch {cfg.data.batch_size}; img {cfg.data.img_size}px; "
          f"{cpu_dm.num_workers} workers; backbone {cfg.backbone.name} depth={cfg.backbone.depth} "
          f"embed_dim={cfg.backbone.embed_dim} patch={cfg.backbone.patch_size}; precision {precision}")

    def median(measure) -> float:
        return statistics.median(measure() for _ in range(args.rounds))

    cpu_rate = median(lambda: loader_pairs_per_s(cpu_dm, device, args.batches))
    gpu_rate = median(lambda: loader_pairs_per_s(gpu_dm, device, args.batches))
    ops_rate = median(lambda: device_ops_pairs_per_s(gpu_dm, device, args.batches))
    train_rate = median(lambda: training_pairs_per_s(cfg, device, args.steps, args.warmup, precision))
    rows = [
        ("data, CPU augmentation (workers do everything)", cpu_rate),
        (f"data, GPU augmentation (photometric ops on {device.type})", gpu_rate),
        (f"  on-device photometric ops alone ({device.type})", ops_rate),
        (f"training step (Lightning, {precision})", train_rate),
    ]
    for label, rate in rows:
        print(f"{label + ':':<58}{rate:9.1f} view pairs/s")
    print(f"ratio data/training, CPU augmentation: {verdict(cpu_rate, train_rate)}")
    print(f"ratio data/training, GPU augmentation: {verdict(gpu_rate, train_rate)}")
    print(f"GPU augmentation vs CPU augmentation: {gpu_rate / cpu_rate:.2f}x the data rate")


if __name__ == "__main__":
    main()
