"""``val/attn_jaccard``: DINO's emergence number, tracked during Barlow Twins or DINO pretraining of a ViT.

It reads the backbone evaluation probes read (:func:`callbacks.visual.backbone_of`): DINO's teacher, as the
paper measures it; the one backbone of a Barlow Twins run.

On a fixed, evenly spaced subset of the validation images that have the protocol's masks (the same images
every time), the last block's CLS-attention heads are thresholded to ``--callbacks.attention_keep`` of their
mass and scored against the ground truth under ``--callbacks.jaccard_protocol`` (:mod:`analysis.emergence`):

* ``dino`` (default): the public reference code behind DINO's 45.9 / 27.3 / 22.0 — images and
  ``SegmentationClass`` masks resized to ``--callbacks.emergence_img_size`` (512 there), classes, void
  counted in the union, best head per class, mean over classes then images;
* ``strict``: ``SegmentationObject`` instances (class masks where a set has none) at their own resolution,
  void pixels excluded; images resized to ``--callbacks.emergence_img_size``.

The full validation split, for a number to compare with DINO's, is ``python -m tools.emergence``.

Measured before training starts (step 0), after every ``--callbacks.emergence_every_n_epochs`` epochs and
after the last one, at the end of a training epoch: no gradients, the model in eval mode then back in its
own modes, never inside the training step, no random numbers drawn. Logged at ``trainer.global_step`` to
every logger (metrics.csv and wandb): ``val/attn_jaccard`` and each head's own score
``val/attn_jaccard_head<h>``. The latest measurement is kept in checkpoints, so that a resumed run can
write it back to metrics.csv (see :func:`rewrite_after_resume`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Optional

import pytorch_lightning as pl
import torch
from torch import Tensor

from callbacks.visual import cls_attention_problem, eval_mode, vit_of
from analysis.attention import cls_attention
from datamodules.barlow_twins import evenly_spaced
from datamodules.images import DataError
from datamodules.segmentation import load_mask
from datamodules.voc import image_path, read_split, voc_dir
from datamodules.voc_detection import annotation_path, detection_ids, year_dir
from analysis.discovery import discover
from analysis.emergence import (DINO_IMG_SIZE, EmergenceScore, check_protocol, dino_position_embedding,
                             dino_preprocess, emergence_jaccard, label_folders, normalize)

log = logging.getLogger(__name__)

CHUNK = 32  # images per attention forward pass (bounds activation memory at 512 px)


# -- logging outside Lightning's self.log ------------------------------------------------------------
def tuning(trainer: pl.Trainer) -> bool:
    """True while Lightning's batch-size or LR search runs (its finder callback is in the trainer): those
    trial steps are thrown away (the tuner restores the state afterwards) and their loggers are no-ops, so
    measuring there would only cost time."""
    from pytorch_lightning.callbacks import BatchSizeFinder, LearningRateFinder

    return any(isinstance(callback, (BatchSizeFinder, LearningRateFinder)) for callback in trainer.callbacks)


def log_now(trainer: pl.Trainer, metrics: Mapping[str, float], only_csv: bool = False) -> None:
    """Write scalars to every logger (or only the CSV ones) at ``trainer.global_step``, from any hook
    (``self.log`` is not allowed in ``on_train_start``/``on_train_end``, and would average over an epoch);
    rank zero only."""
    from pytorch_lightning.loggers import CSVLogger

    if not trainer.is_global_zero:
        return
    values = {key: float(value) for key, value in metrics.items()}
    for logger in trainer.loggers:
        if not only_csv or isinstance(logger, CSVLogger):
            logger.log_metrics(values, step=trainer.global_step)


def rewrite_after_resume(trainer: pl.Trainer, last: Optional[dict]) -> None:
    """Write a restored measurement (``{"step", "metrics"}``) again to metrics.csv if it was taken at the
    checkpoint's step.

    A measurement at the end of an epoch is logged at ``trainer.global_step`` before that epoch's checkpoint
    is written, so it shares the checkpoint's step; on resume the CSV logger drops every row from that step
    on (they would otherwise be logged twice) and the resumed run does not measure there again. wandb keeps
    its rows, so only the CSV loggers get it back.
    """
    if last is not None and trainer.ckpt_path is not None and last["step"] == trainer.global_step:
        log_now(trainer, last["metrics"], only_csv=True)


# -- the image set -------------------------------------------------------------------------------------
def label_path(root: Path, image_id: str, protocol: str = "strict") -> Optional[Path]:
    """The image's mask for ``protocol``: ``dino`` its class mask; ``strict`` its instance mask
    (``SegmentationObject``) if present, else its class mask. None when it has none."""
    for folder in label_folders(protocol):
        path = voc_dir(root) / folder / f"{image_id}.png"
        if path.is_file():
            return path
    return None


def emergence_ids(root: Path, limit: int, protocol: str = "strict", split: str = "val") -> list[str]:
    """At most ``limit`` ids of ``split`` with a mask for ``protocol``, evenly spaced over the split
    (deterministic); ``limit`` <= 0: all of them."""
    return evenly_spaced([i for i in read_split(root, split) if label_path(root, i, protocol) is not None], limit)


def load_labels(path: Path) -> Tensor:
    """A VOC palette PNG of ids (class or instance ids, 0 background, 255 void) as uint8 (h, w)."""
    return load_mask(path, num_classes=255)  # instance ids go beyond the 21 classes; 255 stays void


def load_example(root: Path, image_id: str, img_size: int, protocol: str) -> tuple[Tensor, Tensor]:
    """One image as uint8 (3, img_size, img_size), resized with PIL as the reference code does, and its label
    map: ``dino`` the class mask resized with it (nearest), ``strict`` the mask at its own resolution.
    A missing mask, an unreadable file or a mask whose size differs from its image's is a DataError."""
    path = label_path(root, image_id, protocol)
    if path is None:
        raise DataError(f"image {image_id} has no {' or '.join(label_folders(protocol))} mask under {root}")
    image, resized = dino_preprocess(image_path(root, image_id), path, img_size)
    if protocol == "dino":
        return image, resized
    return image, load_labels(path)


def load_emergence_set(root: Path, ids: list[str], img_size: int,
                       protocol: str = "strict") -> tuple[Tensor, list[Tensor]]:
    """Images (N, 3, img_size, img_size) uint8 and their label maps (see :func:`load_example`)."""
    examples = [load_example(root, i, img_size, protocol) for i in ids]
    return torch.stack([image for image, _ in examples]), [label for _, label in examples]


# -- measuring -----------------------------------------------------------------------------------------
def attention_maps(vit, images: Tensor, device: torch.device, protocol: str = "strict", chunk: int = CHUNK) -> Tensor:
    """Last-block CLS attention (N, heads, h, w) on the CPU of uint8 images (normalised here), ``chunk``
    images at a time; under ``dino`` with the reference's position-embedding interpolation."""
    check_protocol(protocol)
    patch = vit.patch_embed.patch_size
    grid = (images.shape[-2] // patch[0], images.shape[-1] // patch[1])
    out = []
    for part in images.split(chunk):
        x = normalize(part.to(device))
        if protocol == "dino":
            with dino_position_embedding(vit, grid):
                out.append(cls_attention(vit, x, block=-1).cpu())
        else:
            out.append(cls_attention(vit, x, block=-1).cpu())
    return torch.cat(out)


def score_metrics(score: EmergenceScore) -> dict[str, float]:
    return {"val/attn_jaccard": score.jaccard,
            **{f"val/attn_jaccard_head{h}": float(v) for h, v in enumerate(score.per_head)}}


class EmergenceCallback(pl.Callback):
    """Logs ``val/attn_jaccard`` (see the module docstring); disables itself, with a warning, when the
    backbone is not a ViT with a class token or the validation split has no masks."""

    def __init__(self, num_images: int = 64, every_n_epochs: int = 1, keep: float = 0.6,
                 protocol: Optional[str] = None, img_size: Optional[int] = None, corloc: bool = False):
        """``protocol`` (``dino``/``strict``) and ``img_size`` default to the run's
        ``--callbacks.jaccard_protocol`` and ``--callbacks.emergence_img_size`` (read from the module's config
        at setup), else to ``dino`` at 512 px. ``corloc``: with every measurement also CorLoc of LOST and
        TokenCut (``val/corloc_lost``, ``val/corloc_tokencut``, :mod:`analysis.discovery`) on ``num_images``
        evenly spaced images of the VOC 2012 detection val split (``Annotations/``, ``ImageSets/Main/val.txt``)
        at their own size."""
        if num_images < 1 or every_n_epochs < 1 or not 0 < keep <= 1 or (img_size is not None and img_size < 1):
            raise ValueError(f"num_images, every_n_epochs and img_size must be >= 1 and keep in (0, 1]; got "
                             f"{num_images}, {every_n_epochs}, {img_size}, {keep}")
        if protocol is not None:
            check_protocol(protocol)
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.keep = keep
        self.protocol = protocol
        self.img_size = img_size
        self.corloc = corloc
        self._corloc_ids: Optional[list[str]] = None
        self.enabled = True
        self._data: Optional[tuple[Tensor, list[Tensor]]] = None
        self.last_logged: Optional[dict] = None  # {"step": global step, "metrics": {...}} of the latest measurement
        self._restored: Optional[dict] = None
        self.history: list[tuple[int, float]] = []  # (global step, val/attn_jaccard), this process's measurements

    # -- checks --------------------------------------------------------------------------------------
    def problem(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[str]:
        problem = cls_attention_problem(vit_of(pl_module))
        if problem:
            return problem
        if getattr(trainer.datamodule, "root", None) is None:
            return "the datamodule has no VOC root to read validation masks from"
        return None

    def setup(self, trainer, pl_module, stage: str) -> None:
        callbacks_cfg = getattr(getattr(pl_module, "cfg", None), "callbacks", None)
        if self.protocol is None:
            self.protocol = getattr(callbacks_cfg, "jaccard_protocol", "dino")
        if self.img_size is None:
            self.img_size = getattr(callbacks_cfg, "emergence_img_size", DINO_IMG_SIZE)
        problem = self.problem(trainer, pl_module)
        if problem:
            log.warning("emergence Jaccard (val/attn_jaccard) is off: %s", problem)
            self.enabled = False

    # -- data ----------------------------------------------------------------------------------------
    def data(self, trainer: pl.Trainer) -> Optional[tuple[Tensor, list[Tensor]]]:
        """The fixed images and label maps, loaded once (CPU)."""
        if self._data is None:
            datamodule = trainer.datamodule
            root = Path(datamodule.root)
            ids = emergence_ids(root, self.num_images, self.protocol)
            if not ids:
                log.warning("emergence Jaccard (val/attn_jaccard) is off: no validation image under %s has a "
                            "%s mask (--callbacks.jaccard_protocol=%s)", root,
                            " or ".join(label_folders(self.protocol)), self.protocol)
                self.enabled = False
                return None
            self._data = load_emergence_set(root, ids, self.img_size, self.protocol)
        return self._data

    def corloc_data(self, trainer: pl.Trainer) -> Optional[list[str]]:
        """The fixed CorLoc image ids (detection val split), or None (CorLoc then turns itself off, warning)."""
        if self._corloc_ids is None and self.corloc:
            root = Path(trainer.datamodule.root)
            try:
                self._corloc_ids = evenly_spaced(detection_ids(root, "2012", "val"), self.num_images)
            except DataError as err:
                log.warning("CorLoc (val/corloc_lost, val/corloc_tokencut) is off: %s (under %s)", err,
                            year_dir(root, "2012"))
                self.corloc = False
        return self._corloc_ids if self.corloc else None

    # -- schedule ------------------------------------------------------------------------------------
    def active(self, trainer: pl.Trainer) -> bool:
        return self.enabled and trainer.is_global_zero and not trainer.sanity_checking and not tuning(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        restored, self._restored = self._restored, None
        if not self.active(trainer):
            return
        if trainer.global_step == 0:
            self.measure(trainer, pl_module)
        elif restored is not None:
            self.last_logged = restored
            rewrite_after_resume(trainer, restored)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.active(trainer) and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.active(trainer) and (self.last_logged or {}).get("step") != trainer.global_step:
            self.measure(trainer, pl_module)  # the final value, whatever the period

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"last_logged": self.last_logged} if self.last_logged else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict.get("last_logged")

    # -- work ----------------------------------------------------------------------------------------
    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[EmergenceScore]:
        data = self.data(trainer)
        if data is None:
            return None
        images, labels = data
        with torch.no_grad(), eval_mode(pl_module):
            attn = attention_maps(vit_of(pl_module), images, pl_module.device, self.protocol)
        return emergence_jaccard(attn, labels, self.keep, self.protocol)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[EmergenceScore]:
        score = self.compute(trainer, pl_module)
        if score is None:
            return None
        if score.images == 0:
            log.warning("emergence Jaccard (val/attn_jaccard) is off: none of its %d validation images has an "
                        "object (their masks are background and void only)", len(self._data[1]))
            self.enabled = False
            return score
        metrics = score_metrics(score)
        ids = self.corloc_data(trainer)
        if ids:
            root = Path(trainer.datamodule.root)
            with torch.no_grad(), eval_mode(pl_module):
                found = discover(vit_of(pl_module), [year_dir(root, "2012") / "JPEGImages" / f"{i}.jpg" for i in ids],
                                 [annotation_path(root, "2012", i) for i in ids], ids, pl_module.device)
            metrics.update({"val/corloc_lost": found.lost, "val/corloc_tokencut": found.tokencut})
        self.last_logged = {"step": trainer.global_step, "metrics": metrics}
        self.history.append((trainer.global_step, score.jaccard))
        log_now(trainer, metrics)
        return score
