"""DataModule for Barlow Twins pretraining: unlabelled VOC images → pairs of augmented views."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from config.hparams import AugmentConfig, DataConfig
from datamodules.device_decode import EncodedTwoViewTransform, augment_mode
from datamodules.gpu_augment import DeviceAugmentTransform
from datamodules.images import DataError, load_rgb
from datamodules.registry import DATASETS
from datamodules.sampling import SeededLoader, SeededSampler, resume_mid_epoch, seeded
from datamodules.transforms import BarlowTwinsTransform
from datamodules.voc import all_image_ids, existing_image_paths, read_split

# CPU mode (workers finish the views), gpu_photometric (workers crop; the device finishes the batch) or
# gpu_full (workers read bytes; the device decodes, crops and finishes the batch).
TwoViewTransform = Union[BarlowTwinsTransform, DeviceAugmentTransform, EncodedTwoViewTransform]
AUGMENT_MODES = {"cpu": BarlowTwinsTransform, "gpu_photometric": DeviceAugmentTransform,
                 "gpu_full": EncodedTwoViewTransform}


class TwoViewDataset(Dataset):
    """Images → two views, indexed by ``(index, item_seed)`` from a :class:`SeededSampler`: the views (and,
    in GPU mode, their photometric parameters) depend only on the seed, never on the worker or on global
    RNG state. Items are whatever the transform makes: ``(view1, view2)`` (CPU mode), with
    ``(geometry1, geometry2)`` appended when asked, or GPU mode's dict of uint8 views and parameters."""

    def __init__(self, paths: list[Path], transform: TwoViewTransform):
        self.paths = paths
        self.transform = transform

    @property
    def image_paths(self) -> list[Path]:
        return self.paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]):
        index, item_seed = key
        # gpu_full's transform reads the file's bytes and size only (its ``load``); the others get pixels.
        image = getattr(self.transform, "load", load_rgb)(self.paths[index])
        with seeded(item_seed):
            return self.transform(image)

    def finished_batch(self, keys: list[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
        """The items of ``keys`` as the model receives them, computed in this process on the CPU:
        ``(x1, x2)`` normalised views, or ``(x1, x2, g1, g2)`` with geometry, in either augmentation mode
        (GPU mode's photometric operations run here on the CPU). For callbacks that need a few views."""
        collate = getattr(self.transform, "collate", default_collate)
        return tuple(self.transform.finish_batch(collate([self[key] for key in keys])))


def default_num_workers() -> int:
    return min(8, os.cpu_count() or 1)


def evenly_spaced(items: list, limit: int) -> list:
    """At most ``limit`` items spread over the whole list (deterministic, unlike a random subset)."""
    if limit <= 0 or limit >= len(items):
        return items
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


class BarlowTwinsDataModule(pl.LightningDataModule):
    """Pairs of augmented views of unlabelled images; the model receives ``(x1, x2)`` normalised float
    views, or ``(x1, x2, g1, g2)`` with ``geometry=True`` (each g a float32 (5,) crop box
    ``(y0, x0, y1, x1, flipped)`` per item, see :func:`datamodules.transforms.crop_geometry`, for a dense
    objective). ``shared_crop``: both views share one crop and flip.

    ``aug.device=gpu_photometric`` (or ``aug.gpu``): the workers only decode, crop and flip (uint8) and draw
    the photometric parameters; :meth:`on_after_batch_transfer` applies the photometric operations batched on
    the training device. ``gpu_full``: the workers only read the files' bytes and sizes and draw every
    parameter; decoding and crops run on the device too (datamodules/device_decode.py). The model receives
    the same batch format in every mode.
    """

    def __init__(self, data: DataConfig, aug: AugmentConfig, seed: int = 0, geometry: bool = False,
                 shared_crop: bool = False):
        super().__init__()
        self.cfg = data
        self.aug = aug
        self.seed = seed
        self.geometry = geometry
        self.shared_crop = shared_crop
        # Read by train_dataloader() each time it is called, so Lightning's batch-size tuner can change it.
        self.batch_size = data.batch_size
        self.num_workers = data.num_workers if data.num_workers >= 0 else default_num_workers()
        self.root: Optional[Path] = None
        self.train_set: Optional[TwoViewDataset] = None
        self.val_set: Optional[TwoViewDataset] = None
        self.transform: TwoViewTransform = self.make_transform()

    def make_transform(self) -> TwoViewTransform:
        mode = AUGMENT_MODES[augment_mode(self.aug)]
        return mode(self.aug, self.cfg.img_size, shared_crop=self.shared_crop, geometry=self.geometry)

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
        source = DATASETS.get(self.cfg.dataset)
        if hasattr(source, "pretraining_sets"):  # image folders (datamodules/folder.py); root: the labelled eval set
            self.train_set, self.val_set, self.root = source.pretraining_sets(self.cfg, self.transform, self.trainer,
                                                                              self.batch_size)
            return
        self.root = DATASETS.get(self.cfg.dataset).prepare(self.cfg)
        train_paths = existing_image_paths(self.root, self.pretrain_ids(self.root))
        val_ids = evenly_spaced(read_split(self.root, "val"), self.cfg.val_max_images)
        val_paths = existing_image_paths(self.root, val_ids)
        if len(train_paths) < self.batch_size:
            raise DataError(
                f"--data.batch_size={self.batch_size} is larger than the {len(train_paths)} training images "
                f"under {self.root} (data.pretrain_images={self.cfg.pretrain_images})"
            )
        self.train_set = TwoViewDataset(train_paths, self.transform)
        self.val_set = TwoViewDataset(val_paths, self.transform)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """GPU mode: the photometric augmentation of the batch, on its device; CPU mode: the batch as is."""
        return self.transform.finish_batch(batch)

    def validation_views(self, count: int) -> tuple[torch.Tensor, ...]:
        """The first ``count`` validation items, finished on the CPU in this process (no loader workers): the
        very views of the validation loader's first batch(es), ``(x1, x2)`` or ``(x1, x2, g1, g2)``."""
        sampler = SeededSampler(len(self.val_set), self.seed, shuffle=False, vary_with_epoch=False, shard=False)
        keys = [key for _, key in zip(range(min(count, len(self.val_set))), sampler)]
        return self.val_set.finished_batch(keys)

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        # Validation sees the same images with the same views every epoch.
        sampler = SeededSampler(len(dataset), self.seed, shuffle=train, vary_with_epoch=train)
        return SeededLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            # Worker base seeds from a private generator: iterating a loader does not advance the global
            # RNG, which then holds only the model's randomness (dropout, stochastic depth).
            generator=torch.Generator().manual_seed(self.seed),
            # The loss standardises over the batch: a ragged last batch (or one of 1) would be a noisier,
            # differently scaled estimate.
            drop_last=True,
            collate_fn=getattr(self.transform, "collate", None),  # gpu_full: file bytes stay a list
            num_workers=self.num_workers,
            pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            # a stuck worker ends the run with one line (datamodules/sampling.py) instead of hanging it
            timeout=self.cfg.worker_timeout if self.num_workers > 0 else 0,
        )

    def train_dataloader(self) -> DataLoader:
        loader = self._loader(self.train_set, self.batch_size, train=True)
        resume_mid_epoch(loader, self.trainer)  # a run resumed from a step checkpoint continues mid-epoch
        return loader

    def val_dataloader(self) -> DataLoader:
        batch = max(2, min(self.batch_size, len(self.val_set)))
        return self._loader(self.val_set, batch, train=False)
