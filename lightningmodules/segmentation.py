"""Semantic segmentation on VOC 2012 with a (frozen) backbone and a light head — how the report
measures what pretraining learned."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassConfusionMatrix

from datamodules.device_decode import augment_mode
from datamodules.segmentation import IGNORE_INDEX, SegmentationDataModule
from datamodules.voc import VOC_CLASSES
from lightningmodules.base import TaskModule
from lightningmodules.registry import TASKS, Task
from models.losses import median_frequency_weights, segmentation_loss
from models.segmenters import build_segmenter
from utils.optim import parameter_groups
from utils.segmentation_metrics import scores_from_confusion

PER_CLASS_FILE = "per_class_iou.csv"


def class_names(num_classes: int) -> list[str]:
    return list(VOC_CLASSES) if num_classes == len(VOC_CLASSES) else [f"class_{i}" for i in range(num_classes)]


class SegmentationModule(TaskModule):
    """Trains the head (and the backbone when not frozen) with cross-entropy/Dice/Focal, label 255 ignored.

    Logs ``{train,val}/loss``, ``/mIoU``, ``/f1`` (macro) and ``/pixel_acc`` per epoch from one confusion
    matrix per stage; writes the per-class IoU to ``<run>/per_class_iou.csv`` and a wandb table.
    """

    # the training confusion matrix sums over the epoch: carried by checkpoints (utils/step_logging.py)
    epoch_metric_attributes = ("train_confusion",)

    def __init__(self, config: dict):
        super().__init__(config)  # self.lr: the head's rate, optim.lr_scaling applied
        seg = self.cfg.segmentation
        self.model = build_segmenter(self.cfg)
        self.criterion = segmentation_loss(seg.loss, seg.num_classes, IGNORE_INDEX, seg.focal_gamma)
        # validate_args=False in training: torchmetrics' value checks read the targets on the host (a sync every
        # step); out-of-range labels still fail loudly in the loss. Validation keeps the checks.
        self.train_confusion = MulticlassConfusionMatrix(seg.num_classes, ignore_index=IGNORE_INDEX,
                                                         validate_args=False)
        self.val_confusion = MulticlassConfusionMatrix(seg.num_classes, ignore_index=IGNORE_INDEX)
        self.last_val_scores: Optional[dict] = None

    def setup(self, stage: str) -> None:
        seg = self.cfg.segmentation
        # Validation computes the loss too: eval-only (stage "validate") must weight it exactly as training's
        # validation did, else it reports the unweighted loss for the same checkpoint (same mIoU, other loss).
        if seg.class_weighting == "median_frequency" and stage in ("fit", "validate"):
            weights = median_frequency_weights(self.trainer.datamodule.class_pixel_counts())
            self.criterion = segmentation_loss(seg.loss, seg.num_classes, IGNORE_INDEX, seg.focal_gamma, weights)

    def named_backbones(self) -> dict[str, nn.Module]:
        return {"": self.model.backbone}

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)["out"]

    def loss(self, out: dict, target: Tensor) -> Tensor:
        """The main loss plus aux_weight × each auxiliary head's (DeepLabV3's one tensor, SETR's list)."""
        loss = self.criterion(out["out"], target)
        aux = out.get("aux")
        for logits in [aux] if isinstance(aux, Tensor) else (aux or []):
            loss = loss + self.cfg.segmentation.aux_weight * self.criterion(logits, target)
        return loss

    # ------------------------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, masks = batch
        out = self.model(images)
        loss = self.loss(out, masks)
        self.train_confusion.update(out["out"].detach().argmax(1), masks)
        self.train_metrics.add("train/loss", loss, prog_bar=True)
        self.train_metrics.commit(self, images.shape[0], batch_idx)
        self.record_nonfinite(loss)
        return loss

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self._log_scores("train", self.train_confusion)

    # ---------------------------------------------------------------------------------- validation
    def validation_step(self, batch, batch_idx: int) -> Tensor:
        images, masks = batch
        out = self.model(images)
        if isinstance(masks, list):  # eval_mode=full: logits back to each image's own resolution
            losses = []
            for logits, mask in zip(out["out"], masks):
                logits = F.interpolate(logits[None], size=mask.shape[-2:], mode="bilinear", align_corners=False)
                losses.append(self.criterion(logits, mask[None]))
                self.val_confusion.update(logits.argmax(1), mask[None])
            loss = torch.stack(losses).mean()
        else:
            loss = self.criterion(out["out"], masks)
            self.val_confusion.update(out["out"].argmax(1), masks)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=images.shape[0])
        return loss

    def on_validation_epoch_end(self) -> None:
        scores = self._log_scores("val", self.val_confusion)
        self.last_val_scores = scores
        every = self.cfg.segmentation.log_per_class_every_n_epochs
        if not self.trainer.sanity_checking and self.current_epoch % every == 0:
            self._write_per_class(scores["per_class_iou"])

    def _log_scores(self, stage: str, confusion: MulticlassConfusionMatrix) -> dict:
        scores = scores_from_confusion(confusion.compute())
        confusion.reset()
        self.log_dict({f"{stage}/{k}": scores[k].float() for k in ("mIoU", "mIoU_fg", "f1", "pixel_acc")})
        return scores

    def _write_per_class(self, iou: Tensor) -> None:
        if self.trainer.global_rank != 0:
            return
        names = class_names(self.cfg.segmentation.num_classes)
        values = [float(v) for v in iou.cpu()]
        path = Path(self.trainer.default_root_dir) / PER_CLASS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)  # a Trainer's default_root_dir need not exist yet
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["epoch", "step", *names])
            writer.writerow([self.current_epoch, self.global_step, *("" if v != v else f"{v:.6f}" for v in values)])
        from pytorch_lightning.loggers import WandbLogger

        rows = [[name, None if v != v else v] for name, v in zip(names, values)]
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="val/per_class_iou", columns=["class", "IoU"], data=rows, step=self.global_step)

    # -------------------------------------------------------------------------------- optimisation
    def param_groups(self) -> list[dict]:
        groups = [g for m in self.model.head_modules() for g in parameter_groups(m, self.cfg.optim, self.lr)]
        if not self.cfg.segmentation.freeze_backbone:
            groups += parameter_groups(self.model.backbone, self.cfg.optim, self.cfg.segmentation.backbone_lr)
        return groups


def _metric_names() -> tuple[str, ...]:
    per_epoch = [f"{stage}/{m}" for stage in ("train", "val") for m in ("mIoU", "mIoU_fg", "f1", "pixel_acc")]
    return tuple(["train/loss_step", "train/loss_epoch", "val/loss"] + per_epoch)


TASKS.register("segmentation")(
    Task(
        module=SegmentationModule,
        datamodule=lambda cfg: SegmentationDataModule(cfg.data, cfg.segmentation, cfg.seed,
                                                   augment_device=augment_mode(cfg.aug)),
        monitor="val/mIoU",
        mode="max",
        report=("val/mIoU", "best"),
        metrics=_metric_names(),
    )
)
