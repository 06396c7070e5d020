"""DataModule for Barlow Twins pretraining: unlabelled VOC images → pairs of augmented views."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from config.hparams import AugmentConfig, DataConfig
from datamodules.images import DataError, load_rgb
from datamodules.registry import DATASETS
from datamodules.sampling import SeededSampler, seeded
from datamodules.transforms import BarlowTwinsTransform
from datamodules.voc import all_image_ids, existing_image_paths, read_split


class TwoViewDataset(Dataset):
    """Images → (view1, view2), indexed by ``(index, item_seed)`` from a :class:`SeededSampler`: the views
    depend only on the seed, never on the worker or on global RNG state."""

    def __init__(self, paths: list[Path], transform: BarlowTwinsTransform):
        self.paths = paths
        self.transform = transform

    @property
    def image_paths(self) -> list[Path]:
        return self.paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, item_seed = key
        image = load_rgb(self.paths[index])
        with seeded(item_seed):
            return self.transform(image)


def default_num_workers() -> int:
    return min(8, os.cpu_count() or 1)


def evenly_spaced(items: list, limit: int) -> list:
    """At most ``limit`` items spread over the whole list (deterministic, unlike a random subset)."""
    if limit <= 0 or limit >= len(items):
        return items
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


class BarlowTwinsDataModule(pl.LightningDataModule):
    def __init__(self, data: DataConfig, aug: AugmentConfig, seed: int = 0):
        super().__init__()
        self.cfg = data
        self.aug = aug
        self.seed = seed
        # Read by train_dataloader() each time it is called, so Lightning's batch-size tuner can change it.
        self.batch_size = data.batch_size
        self.num_workers = data.num_workers if data.num_workers >= 0 else default_num_workers()
        self.root: Optional[Path] = None
        self.train_set: Optional[TwoViewDataset] = None
        self.val_set: Optional[TwoViewDataset] = None

    def prepare_data(self) -> None:
        DATASETS.get(self.cfg.dataset).prepare(self.cfg)

    def pretrain_ids(self, root: Path) -> list[str]:
        choice = self.cfg.pretrain_images
        if choice == "train":
            return read_split(root, "train")
        if choice == "train+val":
            return sorted(set(read_split(root, "train")) | set(read_split(root, "val")))
        return all_image_ids(root)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        self.root = DATASETS.get(self.cfg.dataset).prepare(self.cfg)
        transform = BarlowTwinsTransform(self.aug, self.cfg.img_size)
        train_paths = existing_image_paths(self.root, self.pretrain_ids(self.root))
        val_ids = evenly_spaced(read_split(self.root, "val"), self.cfg.val_max_images)
        val_paths = existing_image_paths(self.root, val_ids)
        if len(train_paths) < self.batch_size:
            raise DataError(
                f"--data.batch_size={self.batch_size} is larger than the {len(train_paths)} training images "
                f"under {self.root} (data.pretrain_images={self.cfg.pretrain_images})"
            )
        self.train_set = TwoViewDataset(train_paths, transform)
        self.val_set = TwoViewDataset(val_paths, transform)

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        # Validation sees the same images with the same views every epoch.
        sampler = SeededSampler(len(dataset), self.seed, shuffle=train, vary_with_epoch=train)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            # Worker base seeds from a private generator: iterating a loader does not advance the global
            # RNG, which then holds only the model's randomness (dropout, stochastic depth).
            generator=torch.Generator().manual_seed(self.seed),
            # The loss standardises over the batch: a ragged last batch (or one of 1) would be a noisier,
            # differently scaled estimate.
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        batch = max(2, min(self.batch_size, len(self.val_set)))
        return self._loader(self.val_set, batch, train=False)
