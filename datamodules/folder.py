"""Image-folder sources for pretraining: any tree of images (``folder``) and ImageNet-style class trees
(``imagenet``).

``--data.dataset folder --data.root DIR``: every JPEG/PNG/WebP under DIR, recursively (other files are
ignored; ``--data.subfolders a,b`` walks only those subfolders, e.g. COCO's ``train2017,unlabeled2017``;
``--data.file_list FILE`` reads the images' paths from a text file instead of walking).
``--data.dataset imagenet --data.root DIR``: the images of ``DIR/train/<class>/...``; each image keeps its
class id (``ImageIndex.labels``, classes sorted by folder name as torchvision's ImageFolder does), which
pretraining does not use.

The list of files is built once and cached (datamodules/image_index.py). These sources hold no masks: the
callbacks that measure against labels (emergence Jaccard, online probe) read a VOC-layout set given with
``--data.eval_root``, and the validation views come from its val split (without one: an evenly spaced subset
of the training images, ``data.val_max_images`` of them, :data:`DEFAULT_VAL_IMAGES` when 0).

Undecodable files stop the run with one line naming the file, as for VOC. With ``--data.skip_bad_images true``
such an image is replaced by the next decodable image of the index (the same one every time: the epoch keeps
its length and its batches, and a resumed run sees what the uninterrupted one saw); each file is named once
per worker in a warning, and the number replaced is logged at the end of each epoch.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import get_worker_info

from config.hparams import DataConfig
from datamodules.barlow_twins import TwoViewDataset, evenly_spaced
from datamodules.errors import DataError
from datamodules.image_index import IMAGE_EXTENSIONS, ImageIndex, load_or_build_index, read_file_list
from datamodules.images import load_rgb
from datamodules.registry import DATASETS
from datamodules.sampling import seeded
from datamodules.voc import VOC_SUBDIR, existing_image_paths, is_voc_root, read_split

log = logging.getLogger(__name__)

DEFAULT_VAL_IMAGES = 256
"""Validation views drawn from the training images when no --data.eval_root is given and val_max_images is 0."""
SUBSTITUTE_TRIES = 64
"""Consecutive undecodable images after which skip_bad_images gives up (the data, not a few files, is broken)."""
_COUNTER_SLOTS = 257  # slot 0: the main process; worker w writes slot 1 + w % 256 (no two writers share a slot)
_FORMATS = "/".join(e.lstrip(".").upper() for e in IMAGE_EXTENSIONS if e != ".jpeg")


def subfolder_names(cfg: DataConfig) -> list[str]:
    return [s.strip().strip("/") for s in cfg.subfolders.split(",") if s.strip().strip("/")]


def eval_root_problem(cfg: DataConfig) -> Optional[str]:
    if cfg.eval_root and not is_voc_root(cfg.eval_root):
        return (f"--data.eval_root: {cfg.eval_root!r} has no {VOC_SUBDIR}/JPEGImages and ImageSets/Segmentation; "
                f"point it at a folder holding VOCdevkit/VOC2012 (the labelled set the callbacks evaluate on)")
    return None


# ----------------------------------------------------------------------------------------------- datasets
class BadImageCounter:
    """How many images were replaced, in memory shared by the DataLoader workers and the main process (one
    slot per worker, so no two processes write the same number)."""

    def __init__(self):
        self.slots = torch.zeros(_COUNTER_SLOTS, dtype=torch.int64).share_memory_()

    def add(self) -> None:
        info = get_worker_info()
        self.slots[0 if info is None else 1 + info.id % (_COUNTER_SLOTS - 1)] += 1

    def total(self) -> int:
        return int(self.slots.sum())


class SubstitutingTwoViewDataset(TwoViewDataset):
    """:class:`TwoViewDataset` that, where a file cannot be decoded, uses the next decodable image of the
    index instead (index i+1, i+2, ... cyclically) with the item's own seed: a fixed function of the index,
    so the epoch's length, order and seeds are unchanged and exact resume still holds."""

    def __init__(self, paths, transform, counter: BadImageCounter):
        super().__init__(paths, transform)
        self.counter = counter
        self._named: set[int] = set()  # files this process already warned about

    def load(self, index: int, read: Callable):
        for step in range(SUBSTITUTE_TRIES):
            candidate = (index + step) % len(self.paths)
            try:
                image = read(self.paths[candidate])
            except DataError as err:
                if candidate not in self._named:
                    self._named.add(candidate)
                    log.warning("%s; replaced by the next decodable image (--data.skip_bad_images)", err)
                continue
            if step:
                self.counter.add()
            return image
        raise DataError(f"{SUBSTITUTE_TRIES} consecutive images from {self.paths[index]} on cannot be decoded "
                        f"(--data.skip_bad_images replaces single bad files, not a broken data set)")

    def __getitem__(self, key: tuple[int, int]):
        index, item_seed = key
        image = self.load(index, getattr(self.transform, "load", load_rgb))
        with seeded(item_seed):
            return self.transform(image)


class BadImageReport(pl.Callback):
    """At the end of each training epoch, one line with the number of images replaced during it (by this
    process's loaders; each process of a distributed run reports its own share)."""

    def __init__(self, counter: BadImageCounter):
        self.counter = counter
        self._at_start = 0
        self.last_epoch_count = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._at_start = self.counter.total()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.last_epoch_count = self.counter.total() - self._at_start
        if self.last_epoch_count:
            log.warning("epoch %d: %d undecodable image(s) replaced by the next decodable one "
                        "(--data.skip_bad_images; the epoch kept its length and order)",
                        trainer.current_epoch, self.last_epoch_count)


# ----------------------------------------------------------------------------------------------- sources
class FolderSource:
    """Any tree of images under ``data.root`` (or the images a file list names), unlabelled."""

    has_masks = False  # labelled callbacks read --data.eval_root instead (config/validation.py)

    @classmethod
    def check(cls, cfg: DataConfig) -> Optional[str]:
        root = Path(cfg.root)
        if not root.is_dir():
            return f"--data.root: {cfg.root!r} is not a folder; point it at the folder holding your images"
        if cfg.file_list and not Path(cfg.file_list).is_file():
            return f"--data.file_list: file {cfg.file_list!r} does not exist"
        if cfg.file_list and cfg.subfolders:
            return "--data.file_list and --data.subfolders both set: a file list names the images itself"
        for sub in subfolder_names(cfg):
            if not (root / sub).is_dir():
                return f"--data.subfolders: {sub!r} is not a folder under {cfg.root}"
        return eval_root_problem(cfg)

    @classmethod
    def index(cls, cfg: DataConfig) -> ImageIndex:
        """The training images, listed once and cached (a file list is read as it is: it is the list)."""
        root = Path(cfg.root)
        if cfg.file_list:
            names, ignored = read_file_list(Path(cfg.file_list), root)
            if ignored:
                log.info("--data.file_list: %d entries that are not %s images ignored", ignored, _FORMATS)
            index = ImageIndex.from_names(root, names)
        else:
            index, _ = load_or_build_index(root, subfolder_names(cfg), labelled=False, index_dir=cfg.index_dir)
        if len(index) == 0:
            where = f"--data.file_list {cfg.file_list}" if cfg.file_list else f"{root}"
            raise DataError(f"no {_FORMATS} images in {where} (--data.root/--data.file_list; other files are ignored)")
        return index

    @classmethod
    def prepare(cls, cfg: DataConfig) -> Path:
        cls.index(cfg)  # listed (and cached) once, before the run directory exists: an empty folder fails here
        return Path(cfg.root)

    @classmethod
    def pretraining_sets(cls, cfg: DataConfig, transform, trainer: Optional[pl.Trainer] = None,
                         batch_size: Optional[int] = None):
        """(training set, validation set, the VOC root the labelled callbacks read or None)."""
        index = cls.index(cfg)
        batch = batch_size or cfg.batch_size
        if len(index) < batch:
            raise DataError(f"--data.batch_size={batch} is larger than the {len(index)} training images "
                            f"under {cfg.root}")
        eval_root = Path(cfg.eval_root) if cfg.eval_root else None
        if eval_root is not None:
            val_ids = evenly_spaced(read_split(eval_root, "val"), cfg.val_max_images)
            val_paths: Sequence[Path] = existing_image_paths(eval_root, val_ids)
        else:
            val_paths = evenly_spaced(index, cfg.val_max_images or DEFAULT_VAL_IMAGES)
        if cfg.skip_bad_images:
            counter = BadImageCounter()
            train = SubstitutingTwoViewDataset(index, transform, counter)
            val = SubstitutingTwoViewDataset(list(val_paths), transform, BadImageCounter())
            if trainer is not None:
                # The count is reported where the epoch ends; the trainer is built before the data is set up.
                trainer.callbacks.append(BadImageReport(counter))
        else:
            train, val = TwoViewDataset(index, transform), TwoViewDataset(list(val_paths), transform)
        return train, val, eval_root


class ImageNetSource(FolderSource):
    """``data.root/train/<class>/...`` (ImageNet's layout): the training images with their class ids."""

    @classmethod
    def check(cls, cfg: DataConfig) -> Optional[str]:
        train = Path(cfg.root) / "train"
        if not train.is_dir():
            return (f"--data.root: {cfg.root!r} has no train/ folder; --data.dataset imagenet reads "
                    f"<root>/train/<class>/<image> (for any other tree of images use --data.dataset folder)")
        if cfg.file_list or cfg.subfolders:
            return ("--data.file_list/--data.subfolders apply to --data.dataset folder; imagenet reads every "
                    "class folder under <root>/train")
        return eval_root_problem(cfg)

    @classmethod
    def index(cls, cfg: DataConfig) -> ImageIndex:
        train = Path(cfg.root) / "train"
        index, _ = load_or_build_index(train, labelled=True, index_dir=cfg.index_dir)
        if len(index) == 0:
            raise DataError(f"no {_FORMATS} images in class folders under {train} (expected train/<class>/<image>)")
        return index


DATASETS.register("folder")(FolderSource)
DATASETS.register("imagenet")(ImageNetSource)
