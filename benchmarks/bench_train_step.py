"""Barlow Twins training throughput: our Lightning step vs a bare PyTorch loop on the same model.

Both sides train the same backbone + projector (micro-batched and/or compiled when the config says so) with the same loss, optimiser and batches (pre-made
tensors already on the device, so data loading is excluded), alternating in rounds so machine noise hits both alike.
A third line measures the data path alone: our DataLoader (decode + two-view augmentation) in img/s.

    python benchmarks/bench_train_step.py --config config/quickstart.yaml --steps 20 --rounds 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from config.loading import parse_config, to_dict  # noqa: E402
from lightningmodules.barlow_twins import BarlowTwinsModule  # noqa: E402
from models.losses import barlow_twins_loss  # noqa: E402


class _Batches:
    """An iterable of ready batches (a bare list would be read by Lightning as a list of loaders)."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


class _Timer(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self._sync(pl_module)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self._sync(pl_module)
        self.end = time.perf_counter()

    @staticmethod
    def _sync(module):
        if module.device.type == "cuda":
            torch.cuda.synchronize()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def build_module(cfg) -> BarlowTwinsModule:
    module = BarlowTwinsModule(to_dict(cfg))
    if cfg.trainer.compile:  # as trainer.build does
        module.backbone.compile(mode=cfg.trainer.compile_mode)
    return module


def lightning_steps_per_s(cfg, views, steps: int, warmup: int, precision: str, device: torch.device) -> float:
    module = build_module(cfg)
    # The same pre-made batches as the bare loop, already on the device: no collation, no host copies.
    b = cfg.data.batch_size
    x1s, x2s = (v.to(device) for v in views)
    batches = [(x1s[j:j + b], x2s[j:j + b]) for j in range(0, x1s.shape[0] - b + 1, b)]
    loader = _Batches([batches[i % len(batches)] for i in range(steps + warmup)])
    timer = _Timer(warmup)
    trainer = pl.Trainer(max_steps=steps + warmup, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, precision=precision, callbacks=[timer],
                         accelerator="auto", devices=1)
    trainer.fit(module, train_dataloaders=loader)
    return steps / (timer.end - timer.start)


def bare_steps_per_s(cfg, views, steps: int, warmup: int, device: torch.device, bf16: bool) -> float:
    module = build_module(cfg).to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    b = cfg.data.batch_size
    x1s, x2s = (v.to(device) for v in views)
    n = x1s.shape[0] // b
    for i in range(steps + warmup):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        j = i % n
        x1, x2 = x1s[j * b:(j + 1) * b], x2s[j * b:(j + 1) * b]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            z1, z2 = module.embed(x1, x2)
            loss, _ = barlow_twins_loss(z1, z2, cfg.barlow.lambd)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def data_images_per_s(cfg, batches: int) -> float:
    from datamodules.barlow_twins import BarlowTwinsDataModule

    dm = BarlowTwinsDataModule(cfg.data, cfg.aug, cfg.seed)
    dm.prepare_data()
    dm.setup()
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # worker start-up excluded
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        x1 = dm.on_after_batch_transfer(batch, 0)[0]  # finished views in either augmentation mode
        seen += x1.shape[0]
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=0, help="override data.batch_size")
    parser.add_argument("--data-batches", type=int, default=10)
    args, overrides = parser.parse_known_args()
    cfg = parse_config(["--config", args.config, *overrides])
    if args.batch_size:
        cfg.data.batch_size = args.batch_size
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = cuda and torch.cuda.is_bf16_supported()
    precision = "bf16-mixed" if bf16 else "32-true"
    b, s = cfg.data.batch_size, cfg.data.img_size
    n = b * 4
    g = torch.Generator().manual_seed(0)
    views = (torch.randn(n, 3, s, s, generator=g), torch.randn(n, 3, s, s, generator=g))
    name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"device: {name}; precision {precision}; backbone {cfg.backbone.name} depth={cfg.backbone.depth} "
          f"embed_dim={cfg.backbone.embed_dim} patch={cfg.backbone.patch_size}; img {s}px; batch {b}; "
          f"proj {cfg.barlow.proj_layers}x{cfg.barlow.proj_dim}")
    ours, bare = [], []
    for r in range(args.rounds):
        torch.manual_seed(r)
        _reset_peak()
        ours.append(lightning_steps_per_s(cfg, views, args.steps, args.warmup, precision, device))
        ours_peak = _peak_gib()
        torch.manual_seed(r)
        _reset_peak()
        bare.append(bare_steps_per_s(cfg, views, args.steps, args.warmup, device, bf16))
        bare_peak = _peak_gib()
        print(f"round {r}: ours {ours[-1]:.3f} steps/s (peak {ours_peak:.2f} GiB), "
              f"bare {bare[-1]:.3f} steps/s (peak {bare_peak:.2f} GiB)")
    o, p = statistics.median(ours), statistics.median(bare)
    print(f"ours: {o:.3f} steps/s = {o * b:.1f} image pairs/s")
    print(f"bare PyTorch loop: {p:.3f} steps/s = {p * b:.1f} image pairs/s")
    print(f"ratio ours/bare: {o / p:.3f}")
    if args.data_batches:
        d = data_images_per_s(cfg, args.data_batches)
        print(f"data path (decode + two views, {cfg.data.num_workers if cfg.data.num_workers >= 0 else 'auto'} "
              f"workers): {d:.1f} images/s = {d / b:.2f} batches/s (training needs {o:.2f} batches/s)")


if __name__ == "__main__":
    main()
