"""DataModule for semantic segmentation on VOC 2012: (image, mask) pairs, label 255 = ignore."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

from config.hparams import DataConfig, SegmentationConfig
from datamodules.barlow_twins import default_num_workers, evenly_spaced
from datamodules.device_decode import EncodedSegmentationTransform
from datamodules.images import DataError, load_rgb
from datamodules.registry import DATASETS
from datamodules.sampling import SeededLoader, SeededSampler, resume_mid_epoch, seeded
from datamodules.transforms import segmentation_eval_transform, segmentation_train_transform
from datamodules.voc import existing_image_paths, read_split, voc_dir

IGNORE_INDEX = 255


def load_mask(path: Path, num_classes: int) -> torch.Tensor:
    """A VOC class mask as uint8 (H, W): palette ("P") or grey ("L") PNG, values 0..num_classes-1 and 255."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise DataError(f"mask {path} is a {image.mode} image; VOC masks are palette (P) PNGs of class "
                                f"ids (a colour-rendered mask cannot be read as labels)")
            mask = torch.from_numpy(np.array(image, dtype=np.uint8))
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001
        raise DataError(f"cannot read mask {path}: {err}") from None
    bad = mask[(mask >= num_classes) & (mask != IGNORE_INDEX)]
    if bad.numel():
        values = sorted(set(bad.tolist()))[:8]
        raise DataError(f"mask {path} has values {values} outside 0–{num_classes - 1} and {IGNORE_INDEX}")
    return mask


class SegmentationDataset(Dataset):
    """(image, mask) pairs; indexed by (index, item_seed) from a SeededSampler for reproducible crops.

    ``full=True`` (evaluation at the original resolution): the image is resized for the network, the
    mask is returned untouched."""

    def __init__(self, root: Path, ids: list[str], transform, num_classes: int, full: bool = False,
                 mask_folder: str = "SegmentationClass"):
        self.images = existing_image_paths(root, ids)
        self.masks = [voc_dir(root) / mask_folder / f"{i}.png" for i in ids]
        missing = [m for m in self.masks if not m.is_file()]
        if missing:
            raise DataError(f"{len(missing)} mask(s) missing, e.g. {missing[0]}")
        self.transform, self.num_classes, self.full = transform, num_classes, full

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_paths(self) -> list[Path]:
        return self.images

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, item_seed = key
        if hasattr(self.transform, "load"):  # gpu_full: file bytes, size and mask; the device decodes and crops
            encoded = self.transform.load(self.images[index])
            mask = load_mask(self.masks[index], self.num_classes)
            if (encoded.height, encoded.width) != tuple(mask.shape):
                raise DataError(f"mask {self.masks[index]} is {tuple(mask.shape)} but its image is "
                                f"{(encoded.height, encoded.width)}")
            with seeded(item_seed):
                return self.transform(encoded, mask)
        image = tv_tensors.Image(load_rgb(self.images[index]))
        mask = load_mask(self.masks[index], self.num_classes)
        if image.shape[-2:] != mask.shape:
            raise DataError(f"mask {self.masks[index]} is {tuple(mask.shape)} but its image is {tuple(image.shape[-2:])}")
        with seeded(item_seed):
            if self.full:
                return self.transform(image), mask.long()
            image, mask = self.transform(image, tv_tensors.Mask(mask))
        return image, mask.long()


def collate_full(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Images (all resized) stacked; masks of different original sizes kept as a list."""
    return torch.stack([image for image, _ in batch]), [mask for _, mask in batch]


TRAIN_SPLIT_MASKS = {"train": "SegmentationClass", "trainaug": "SegmentationClassAug"}
"""--segmentation.train_split → the folder of its masks (trainaug's are grey PNGs of class ids, as distributed)."""


def train_split_ids(root: Path, split: str) -> list[str]:
    """The ids of a training split, or a DataError naming what is missing (trainaug is not part of VOC's archive)."""
    folder = voc_dir(root)
    if split == "trainaug":
        missing = [p for p in (folder / "ImageSets" / "Segmentation" / "trainaug.txt", folder / "SegmentationClassAug")
                   if not p.exists()]
        if missing:
            raise DataError(f"--segmentation.train_split=trainaug: {missing[0]} is missing; trainaug is VOC 2012's "
                            f"train split extended with the SBD annotations (docs/emergence.md says where to get "
                            f"SegmentationClassAug/ and trainaug.txt), or use --segmentation.train_split=train")
    return read_split(root, split)


class SegmentationDataModule(pl.LightningDataModule):
    """``augment_device="gpu_full"`` (``--aug.device``): training images are decoded, cropped and flipped on
    the training device, masks (decoded by the workers) cropped there with nearest neighbours
    (datamodules/device_decode.py); validation keeps the CPU pipeline (one fixed resize)."""

    def __init__(self, data: DataConfig, seg: SegmentationConfig, seed: int = 0, augment_device: str = "cpu"):
        super().__init__()
        self.cfg, self.seg, self.seed = data, seg, seed
        self.augment_device = augment_device
        self.batch_size = data.batch_size  # read at each train_dataloader() call (batch-size tuner)
        self.num_workers = data.num_workers if data.num_workers >= 0 else default_num_workers()
        self.train_set: Optional[SegmentationDataset] = None
        self.val_set: Optional[SegmentationDataset] = None

    def prepare_data(self) -> None:
        root = DATASETS.get(self.cfg.dataset).prepare(self.cfg)
        train_split_ids(root, self.seg.train_split)  # a missing trainaug fails before the run directory exists

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        root = DATASETS.get(self.cfg.dataset).prepare(self.cfg)
        size, n = self.cfg.img_size, self.seg.num_classes
        if self.augment_device == "gpu_full":
            train = EncodedSegmentationTransform(size, self.seg.crop_scale_min, self.seg.hflip_prob)
        else:  # the photometric-only device mode has nothing to do here: segmentation has no photometric step
            train = segmentation_train_transform(size, self.seg.crop_scale_min, self.seg.hflip_prob)
        split = self.seg.train_split
        self.train_set = SegmentationDataset(root, train_split_ids(root, split), train, n,
                                             mask_folder=TRAIN_SPLIT_MASKS[split])
        val_ids = evenly_spaced(read_split(root, "val"), self.cfg.val_max_images)
        self.val_set = SegmentationDataset(root, val_ids, segmentation_eval_transform(size), n,
                                           full=self.seg.eval_mode == "full")
        if len(self.train_set) < self.batch_size:
            raise DataError(f"--data.batch_size={self.batch_size} is larger than the {len(self.train_set)} "
                            f"training images under {root}")

    def class_pixel_counts(self) -> torch.Tensor:
        """Labelled pixels per class over the training masks (ignored pixels excluded)."""
        counts = np.zeros(256, dtype=np.int64)
        for path in self.train_set.masks:
            counts += np.bincount(load_mask(path, self.seg.num_classes).numpy().ravel(), minlength=256)
        return torch.from_numpy(counts[: self.seg.num_classes])

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        return SeededLoader(
            dataset,
            batch_size=batch_size,
            # Evaluation keeps every image (uneven shards across devices; the metrics are synced at epoch end).
            sampler=SeededSampler(len(dataset), self.seed, shuffle=train, vary_with_epoch=train, even=train),
            drop_last=train,  # BatchNorm in the heads; evaluation sees every image
            collate_fn=collate_full if (not train and self.val_set.full) else getattr(dataset.transform, "collate", None),
            num_workers=self.num_workers,
            pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            # a stuck worker ends the run with one line (datamodules/sampling.py) instead of hanging it
            timeout=self.cfg.worker_timeout if self.num_workers > 0 else 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """gpu_full training batches: decoded and cropped on their device; other batches as they are."""
        if isinstance(batch, dict):
            return self.train_set.transform.finish_batch(batch)
        return batch

    def train_dataloader(self) -> DataLoader:
        loader = self._loader(self.train_set, self.batch_size, train=True)
        resume_mid_epoch(loader, self.trainer)  # a run resumed from a step checkpoint continues mid-epoch
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.batch_size, train=False)
