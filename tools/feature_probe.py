"""A frozen-backbone segmentation probe on features computed once: the ``--task segmentation`` protocol
without training-time augmentation, tens of times faster on a CPU.

``main.py --task segmentation`` recomputes the frozen backbone's features for every batch, because its
training transform draws a random crop and flip per image. With ``--segmentation.crop_scale_min 1`` and
``--segmentation.hflip_prob 0`` that transform is deterministic: every image is taken whole, resized to
``data.img_size`` — the evaluation transform (for images whose aspect ratio lies within
RandomResizedCrop's 3/4–4/3; the generated data are square). The backbone then gives the same features at
every epoch, so this module computes them once and trains only the head on them, with everything else as
main.py does it: the module main.py builds (``lightningmodules.segmentation.SegmentationModule``, same seed,
so the same head initialisation), its loss (median-frequency weights from the training masks included),
optimiser and warmup + cosine schedule (``utils.schedule.with_schedule``), the same batches in the same
order (``datamodules.sampling.SeededSampler``, ``drop_last``), a validation pass after every epoch with the
head in eval mode, and scores from one confusion matrix per epoch (``utils.segmentation_metrics``).
tests/test_method_study.py checks that the val mIoU of every epoch matches main.py's run of that config.

It therefore measures the protocol called **fixed-view probe** in docs/results.md: main.py's frozen probe
with ``--segmentation.crop_scale_min 1 --segmentation.hflip_prob 0``. It is not the augmented probe of
config/proxy/probe.yaml (random crops of 0.5–1 of the image and flips), and its numbers are not
interchangeable with that one's. Heads that read the backbone's attention (attn_fusion) and full-resolution
evaluation are not supported (refused with one line).
"""
from __future__ import annotations

import contextlib
import csv
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from config.hparams import Hparams
from config.loading import ConfigError, to_dict
from datamodules.sampling import SeededSampler
from datamodules.segmentation import IGNORE_INDEX, SegmentationDataModule
from lightningmodules.segmentation import SegmentationModule
from models.backbones import is_vit
from models.heads import HEADS
from models.losses import median_frequency_weights, segmentation_loss
from tools.proxy_study import BestOfCurve
from utils.optim import optimizer_from_groups
from utils.quiet import silence_known_noise
from utils.schedule import with_schedule
from utils.segmentation_metrics import scores_from_confusion

METRICS_FILE = "metrics.csv"
COLUMNS = ("epoch", "step", "lr", "train/loss_epoch", "val/loss", "val/mIoU", "val/mIoU_fg",
           "val/pixel_acc", "time/train_epoch_s")


def protocol_problem(cfg: Hparams) -> str | None:
    """Why ``cfg`` is not a config this probe measures exactly (None when it is)."""
    seg = cfg.segmentation
    if cfg.task != "segmentation":
        return f"--task must be segmentation, got {cfg.task!r}"
    if not seg.freeze_backbone:
        return "--segmentation.freeze_backbone must be true (the features are computed once)"
    if seg.crop_scale_min != 1.0 or seg.hflip_prob != 0.0:
        return ("the training transform must be deterministic: --segmentation.crop_scale_min 1 and "
                f"--segmentation.hflip_prob 0 (got {seg.crop_scale_min} and {seg.hflip_prob})")
    if seg.eval_mode != "resize":
        return "--segmentation.eval_mode must be resize (full-resolution evaluation is not cached)"
    if not is_vit(cfg.backbone.name):
        return f"--backbone.name must be a ViT (or pixels), got {cfg.backbone.name!r}"
    if getattr(HEADS.get(seg.head), "needs_attention", False):
        return f"--segmentation.head={seg.head} reads the backbone's attention, which is not cached"
    if cfg.trainer.max_steps > 0 or cfg.trainer.limit_train_batches != 1 or cfg.trainer.limit_val_batches != 1:
        return "trainer.max_steps / limit_train_batches / limit_val_batches must keep their defaults"
    return None


@dataclass
class FeatureCache:
    """A frozen backbone's patch-token grids of every training and validation image, with the masks."""

    train_features: list[Tensor]
    """One (N, D, h, w) tensor per block the head reads."""
    train_masks: Tensor
    """(N, H, W) uint8 class ids, 255 = ignore."""
    val_features: list[Tensor]
    val_masks: Tensor
    class_pixel_counts: Tensor
    """Labelled pixels per class over the training masks (the median-frequency weights' input)."""
    seconds: float


def build_module(cfg: Hparams):
    """The module main.py builds for ``cfg``: seeded as trainer.build seeds before building it, so the
    head starts from the same weights."""
    silence_known_noise()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    return SegmentationModule(to_dict(cfg))


def compute_features(cfg: Hparams, module=None, batch_size: int = 64) -> FeatureCache:
    """Run the frozen backbone once over the training and validation images (the datamodule's own datasets
    and transforms, in index order)."""
    problem = protocol_problem(cfg)
    if problem:
        raise ConfigError(problem)
    start = time.time()
    module = module if module is not None else build_module(cfg)
    data = SegmentationDataModule(cfg.data, cfg.segmentation, cfg.seed)
    data.prepare_data()
    data.setup("fit")
    segmenter = module.model.eval()

    def run(dataset) -> tuple[list[Tensor], Tensor]:
        features: list[list[Tensor]] = []
        masks = []
        for first in range(0, len(dataset), batch_size):
            items = [dataset[(i, 0)] for i in range(first, min(first + batch_size, len(dataset)))]
            with torch.inference_mode():
                grids = segmenter.features(torch.stack([image for image, _ in items]))
            features.append([g.clone() for g in grids])
            masks.append(torch.stack([mask.to(torch.uint8) for _, mask in items]))
        return [torch.cat(level) for level in zip(*features)], torch.cat(masks)

    train_features, train_masks = run(data.train_set)
    val_features, val_masks = run(data.val_set)
    return FeatureCache(train_features, train_masks, val_features, val_masks, data.class_pixel_counts(),
                        time.time() - start)


@contextlib.contextmanager
def given_features(segmenter, features: list[Tensor]) -> Iterator[None]:
    """Make ``segmenter.forward`` use ``features`` instead of running its backbone, so the head, the
    upsampling to the input size and the auxiliary outputs are exactly the segmenter's own."""
    segmenter.features = lambda x: features  # instance attribute: shadows the method for this call only
    try:
        yield
    finally:
        del segmenter.features


def _forward(segmenter, features: list[Tensor], image_size: tuple[int, int]) -> dict:
    placeholder = torch.empty(features[0].shape[0], 0, *image_size)  # only its size is read
    with given_features(segmenter, features):
        return segmenter(placeholder)


@dataclass
class ProbeResult(BestOfCurve):
    lr: float
    epochs: int
    curve: list[float]
    """val mIoU after each epoch."""
    curve_fg: list[float]
    seconds: float


def train_head(cfg: Hparams, cache: FeatureCache, metrics_path: Path | None = None) -> ProbeResult:
    """Train ``cfg``'s head on the cached features for ``cfg.trainer.max_epochs`` epochs, validating after
    each; one metrics.csv row per epoch when ``metrics_path`` is given."""
    problem = protocol_problem(cfg)
    if problem:
        raise ConfigError(problem)
    start = time.time()
    module = build_module(cfg)
    seg, batch = cfg.segmentation, cfg.data.batch_size
    if seg.class_weighting == "median_frequency":  # SegmentationModule.setup("fit")
        weights = median_frequency_weights(cache.class_pixel_counts)
        module.criterion = segmentation_loss(seg.loss, seg.num_classes, IGNORE_INDEX, seg.focal_gamma, weights)
    segmenter = module.model
    num_train = cache.train_masks.shape[0]
    steps_per_epoch = num_train // batch
    if steps_per_epoch == 0:
        raise ConfigError(f"--data.batch_size={batch} is larger than the {num_train} training images")
    epochs = cfg.trainer.max_epochs
    # The schedule main.py's configure_optimizers builds, given the step counts Lightning would report.
    schedule_trainer = SimpleNamespace(estimated_stepping_batches=epochs * steps_per_epoch,
                                       num_training_batches=steps_per_epoch, is_global_zero=False, loggers=[])
    optimizer = optimizer_from_groups(module.param_groups(), cfg.optim, module.lr)
    scheduler = with_schedule(schedule_trainer, optimizer, cfg.optim)["lr_scheduler"]["scheduler"]
    clip = cfg.trainer.gradient_clip_val
    sampler = SeededSampler(num_train, cfg.seed, shuffle=True, vary_with_epoch=True, even=True, shard=False)
    size = tuple(cache.train_masks.shape[-2:])
    # No training-set scores (main.py logs them; they cost a third of an epoch here and change nothing).
    val_confusion = MulticlassConfusionMatrix(seg.num_classes, ignore_index=IGNORE_INDEX, validate_args=False)
    rows, curve, curve_fg, step = [], [], [], 0
    for epoch in range(epochs):
        epoch_start = time.time()
        segmenter.train()
        sampler.set_epoch(epoch)
        order = torch.tensor([index for index, _ in sampler])
        losses = []
        for b in range(steps_per_epoch):
            idx = order[b * batch:(b + 1) * batch]
            masks = cache.train_masks[idx].long()
            out = _forward(segmenter, [f[idx] for f in cache.train_features], size)
            loss = module.loss(out, masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(float(loss.detach()))
        train_seconds = time.time() - epoch_start
        segmenter.eval()
        val_losses, val_sizes = [], []
        with torch.inference_mode():
            for first in range(0, cache.val_masks.shape[0], batch):
                masks = cache.val_masks[first:first + batch].long()
                out = _forward(segmenter, [f[first:first + batch] for f in cache.val_features], size)
                val_losses.append(float(module.criterion(out["out"], masks)))
                val_sizes.append(masks.shape[0])
                val_confusion.update(out["out"].argmax(1), masks)
        scores = scores_from_confusion(val_confusion.compute())
        val_confusion.reset()
        curve.append(float(scores["mIoU"]))
        curve_fg.append(float(scores["mIoU_fg"]))
        rows.append({"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"],
                     "train/loss_epoch": sum(losses) / len(losses),
                     # Lightning's epoch value of a per-batch logged loss: the batch-size-weighted mean
                     "val/loss": sum(v * n for v, n in zip(val_losses, val_sizes)) / sum(val_sizes),
                     "val/mIoU": curve[-1], "val/mIoU_fg": curve_fg[-1],
                     "val/pixel_acc": float(scores["pixel_acc"]), "time/train_epoch_s": train_seconds})
    if metrics_path is not None:
        write_metrics(metrics_path, rows)
    return ProbeResult(cfg.optim.lr, epochs, curve, curve_fg, time.time() - start)


def write_metrics(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def with_values(cfg: Hparams, lr: float | None = None, epochs: int | None = None, head: str | None = None) -> Hparams:
    """A copy of ``cfg`` with another head learning rate / number of epochs / head."""
    optim = replace(cfg.optim, lr=lr) if lr is not None else cfg.optim
    trainer = replace(cfg.trainer, max_epochs=epochs) if epochs is not None else cfg.trainer
    seg = replace(cfg.segmentation, head=head) if head is not None else cfg.segmentation
    return replace(cfg, optim=optim, trainer=trainer, segmentation=seg)
