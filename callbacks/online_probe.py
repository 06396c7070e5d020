"""Online linear probe: segmentation mIoU of the features *while* Barlow Twins or DINO pretrains a ViT.

The features are those of the backbone evaluation probes read (:func:`callbacks.visual.backbone_of`):
DINO's teacher (as DINO evaluates), the one backbone of a Barlow Twins run.

A per-patch linear head (``models/heads/linear.py``) on the last block's patch tokens (after the final
norm, as the segmentation task's ViT heads see them) is trained alongside pretraining, one probe step per
training batch (``on_train_batch_end``, after the backbone's own optimiser step), on the labelled train
split with the segmentation task's augmentation (``--segmentation.crop_scale_min``, ``hflip_prob``), its own
AdamW (``--callbacks.online_probe_lr``) and batches (``--callbacks.online_probe_batch_size``). Every
``--callbacks.online_probe_every_n_epochs`` epochs and after the last, it is evaluated on the validation
split (image and mask at ``data.img_size``, label 255 ignored): ``val/probe_mIoU`` (and ``_fg``,
``val/probe_pixel_acc``, from one confusion matrix, :mod:`utils.segmentation_metrics`); the training loss
is ``train/probe_loss``.

The probe never touches the pretraining: the backbone runs for it under ``torch.no_grad()`` in eval mode
(no dropout or stochastic depth, so no random numbers drawn), the tokens are detached, the head is not
part of the LightningModule (not in its optimiser or state dict), and its data never draws from the global
torch RNG: the order and the augmentations come from a :class:`~datamodules.sampling.SeededSampler` of its
own seed (each item augmented under a forked RNG), the DataLoader's worker seeds from a private generator,
and the head is initialised under a forked RNG. So the backbone's parameters follow exactly the trajectory
they follow without the probe. Its state (head, optimiser, position in its data) is saved with every
checkpoint and restored on resume. It runs on global rank zero only (the head is small and local).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
from typing import Any, Iterator, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from callbacks.emergence import log_now, rewrite_after_resume, tuning
from callbacks.visual import eval_mode, vit_of
from datamodules.barlow_twins import default_num_workers, evenly_spaced
from datamodules.images import DataError
from datamodules.sampling import SeededSampler, mix_seed
from datamodules.segmentation import SegmentationDataset
from datamodules.transforms import segmentation_eval_transform, segmentation_train_transform
from datamodules.voc import read_split
from models.heads import HEADS
from utils.step_logging import is_logging_step
from utils.segmentation_metrics import scores_from_confusion

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
PROBE_STREAM = 0x70726F6265  # "probe": the probe's seeds are a stream of their own, apart from the data's
MAX_WORKERS = 2  # small batches, cheap augmentation (crop, flip): two workers keep up with a training step


# -- data ----------------------------------------------------------------------------------------------
class SkippingSampler(Sampler):
    """A :class:`SeededSampler`'s ``(index, item_seed)`` sequence for its current epoch, without its first
    ``skip`` items: a resumed probe continues where it stopped without loading the items it had used."""

    def __init__(self, sampler: SeededSampler):
        self.sampler = sampler
        self.skip = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


class CyclicBatches:
    """Endless training batches, pass after pass over a dataset, each pass in a new seeded order.

    The position (pass, batches taken in it) is all the state there is: :meth:`state_dict` /
    :meth:`load_state_dict` make a resumed run draw exactly the batches the uninterrupted run would have.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0):
        if len(dataset) < batch_size:
            raise DataError(f"--callbacks.online_probe_batch_size={batch_size} is larger than the "
                            f"{len(dataset)} labelled training images of the online probe")
        self.batch_size = batch_size
        self.sampler = SeededSampler(len(dataset), seed, shuffle=True, vary_with_epoch=True, shard=False)
        self.skipping = SkippingSampler(self.sampler)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.skipping, drop_last=True,
                                 num_workers=num_workers, persistent_workers=num_workers > 0,
                                 generator=torch.Generator().manual_seed(seed))
        self.epoch, self.position = 0, 0
        self._iterator: Optional[Iterator] = None

    def next(self) -> Any:
        if self._iterator is None:
            self.sampler.set_epoch(self.epoch)
            self.skipping.skip = self.position * self.batch_size
            self._iterator = iter(self.loader)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch, self.position, self._iterator = self.epoch + 1, 0, None
            return self.next()
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._iterator = int(state["epoch"]), int(state["position"]), None


# -- model pieces ------------------------------------------------------------------------------------------
def build_linear_head(in_dim: int, num_classes: int, patch_size: int, seg_cfg, seed: int) -> nn.Module:
    """The segmentation task's linear head, initialised from ``seed`` under a forked RNG (the global torch
    RNG, which dropout and stochastic depth draw from, is left exactly as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HEADS.get("linear")(in_dim, num_classes, patch_size, seg_cfg, num_levels=1)


def patch_tokens(vit: nn.Module, images: Tensor, context=None) -> Tensor:
    """Last block's patch-token grid (B, D, h, w) after the final norm, float32, detached: the backbone in
    eval mode (its modes restored) under no_grad, in ``context`` (the trainer's precision autocast)."""
    weight = vit.patch_embed.proj.weight
    with torch.no_grad(), eval_mode(vit), (context if context is not None else contextlib.nullcontext()):
        grid = vit.forward_intermediates(images.to(device=weight.device, dtype=weight.dtype),
                                         indices=[len(vit.blocks) - 1], norm=True, stop_early=True,
                                         output_fmt="NCHW", intermediates_only=True)[0]
    return grid.detach().float()


def logits_at(head: nn.Module, grid: Tensor, size: tuple[int, int]) -> Tensor:
    """The head's patch logits, bilinearly upsampled to ``size`` (as the segmentation task does)."""
    logits = head([grid])
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits


def masked_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over the non-ignored pixels; 0 (not NaN) for a batch with none, without a host
    sync to find out."""
    total = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp(min=1)


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """(C, C) counts, rows target, columns prediction, label 255 ignored (as utils.segmentation_metrics
    expects)."""
    valid = target != IGNORE_INDEX
    index = target[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


# -- the callback --------------------------------------------------------------------------------------------
class OnlineProbeCallback(pl.Callback):
    """See the module docstring. ``seg_cfg`` is the run's SegmentationConfig (classes, augmentation)."""

    def __init__(self, seg_cfg, img_size: int, seed: int = 0, every_n_epochs: int = 5, lr: float = 1e-3,
                 batch_size: int = 16, val_max_images: int = 0, num_workers: int = 0):
        if every_n_epochs < 1 or batch_size < 1 or not lr > 0:
            raise ValueError(f"every_n_epochs and batch_size must be >= 1 and lr > 0; got {every_n_epochs}, "
                             f"{batch_size}, {lr}")
        self.seg_cfg, self.img_size, self.seed = seg_cfg, img_size, seed
        self.every_n_epochs, self.lr, self.batch_size = every_n_epochs, lr, batch_size
        self.val_max_images, self.num_workers = val_max_images, num_workers
        self.num_classes = seg_cfg.num_classes
        self.enabled = True
        self.head: Optional[nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.train_batches: Optional[CyclicBatches] = None
        self.val_loader: Optional[DataLoader] = None
        self._pending: Optional[dict] = None
        self.last_logged: Optional[dict] = None  # {"step": global step, "metrics": {...}} of the latest evaluation
        self.history: list[tuple[int, float]] = []  # (global step, val/probe_mIoU) of this process

    @classmethod
    def from_hparams(cls, cfg) -> "OnlineProbeCallback":
        c = cfg.callbacks
        workers = cfg.data.num_workers if cfg.data.num_workers >= 0 else default_num_workers()
        return cls(cfg.segmentation, cfg.data.img_size, seed=cfg.seed, every_n_epochs=c.online_probe_every_n_epochs,
                   lr=c.online_probe_lr, batch_size=c.online_probe_batch_size, val_max_images=cfg.data.val_max_images,
                   num_workers=min(workers, MAX_WORKERS))

    # -- set-up ----------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if vit_of(pl_module) is None:
            log.warning("online probe is off: it needs a ViT backbone (this run's backbone is a CNN)")
            self.enabled = False
        elif getattr(trainer.datamodule, "root", None) is None:
            log.warning("online probe is off: the datamodule has no VOC root to read labelled images from")
            self.enabled = False

    def active(self, trainer: pl.Trainer) -> bool:
        return self.enabled and trainer.is_global_zero and not tuning(trainer)

    def build_data(self, root) -> None:
        s = self.seg_cfg
        train = SegmentationDataset(root, read_split(root, "train"),
                                    segmentation_train_transform(self.img_size, s.crop_scale_min, s.hflip_prob),
                                    self.num_classes)
        val = SegmentationDataset(root, evenly_spaced(read_split(root, "val"), self.val_max_images),
                                  segmentation_eval_transform(self.img_size), self.num_classes)
        self.train_batches = CyclicBatches(train, self.batch_size, mix_seed(self.seed, PROBE_STREAM), self.num_workers)
        self.val_loader = DataLoader(
            val, batch_size=self.batch_size, num_workers=self.num_workers,
            sampler=SeededSampler(len(val), self.seed, shuffle=False, vary_with_epoch=False, even=False, shard=False),
            generator=torch.Generator().manual_seed(self.seed),
        )

    def build_probe(self, vit: nn.Module, device: torch.device) -> None:
        """A fresh head on ``device`` and its AdamW, the data position back at the start."""
        self.head = build_linear_head(vit.embed_dim, self.num_classes, vit.patch_embed.patch_size[0], self.seg_cfg,
                                      mix_seed(self.seed, PROBE_STREAM, 1)).to(device)
        # No weight decay: the probe reads what the features hold; shrinking its weights would only blur that.
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=self.lr, weight_decay=0.0)
        self.train_batches.load_state_dict({"epoch": 0, "position": 0})
        self.last_logged = None

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.active(trainer):
            return
        if self.train_batches is None:
            self.build_data(trainer.datamodule.root)
        pending, self._pending = self._pending, None
        if self.head is None or pending is not None:
            self.build_probe(vit_of(pl_module), pl_module.device)
        if pending:
            self.head.load_state_dict(pending["head"])
            self.optimizer.load_state_dict(pending["optimizer"])
            self.train_batches.load_state_dict(pending["loader"])
            self.last_logged = pending.get("last_logged")
            rewrite_after_resume(trainer, self.last_logged)
        self.head.to(pl_module.device)

    # -- training --------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.active(trainer) or self.head is None:
            return
        loss = self.step(trainer, pl_module)
        if is_logging_step(trainer):  # self.log costs ~0.4 ms a call; the CSV only keeps logging steps anyway
            pl_module.log("train/probe_loss", loss, on_step=True, on_epoch=False, batch_size=self.batch_size)

    def step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        """One AdamW step of the head on the next labelled batch; the detached loss (no host sync)."""
        images, masks = self.train_batches.next()
        images, masks = images.to(pl_module.device, non_blocking=True), masks.to(pl_module.device, non_blocking=True)
        grid = patch_tokens(vit_of(pl_module), images, trainer.precision_plugin.forward_context())
        self.head.train()
        with torch.enable_grad():
            loss = masked_cross_entropy(logits_at(self.head, grid, masks.shape[-2:]), masks)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return loss.detach()

    # -- evaluation ------------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.active(trainer) and self.head is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.report(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        done = (self.last_logged or {}).get("step") == trainer.global_step
        if self.active(trainer) and self.head is not None and not done:
            self.report(trainer, pl_module)  # after the last epoch, whatever the period

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """Scores of the head on the validation split (the backbone and the head in eval mode)."""
        vit, context = vit_of(pl_module), trainer.precision_plugin.forward_context
        confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long, device=pl_module.device)
        with torch.no_grad(), eval_mode(self.head):
            for images, masks in self.val_loader:
                masks = masks.to(pl_module.device)
                grid = patch_tokens(vit, images.to(pl_module.device), context())
                pred = logits_at(self.head, grid, masks.shape[-2:]).argmax(dim=1)
                confusion += confusion_matrix(pred, masks, self.num_classes)
        return scores_from_confusion(confusion.cpu())

    def report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        scores = self.evaluate(trainer, pl_module)
        metrics = {"val/probe_mIoU": float(scores["mIoU"]), "val/probe_mIoU_fg": float(scores["mIoU_fg"]),
                   "val/probe_pixel_acc": float(scores["pixel_acc"])}
        self.last_logged = {"step": trainer.global_step, "metrics": metrics}
        self.history.append((trainer.global_step, metrics["val/probe_mIoU"]))
        log_now(trainer, metrics)
        return metrics

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Head, optimiser and data position ({} before the probe exists): tensors and plain values only, so
        checkpoints stay loadable with ``torch.load(weights_only=True)``."""
        if self.head is None:
            return {}
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "loader": self.train_batches.state_dict(), "last_logged": self.last_logged}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in on_train_start, once the head can be built on the module's device. An empty state (a
        # checkpoint from before the probe existed, e.g. the tuner's) means a fresh probe.
        self._pending = dict(state_dict)
