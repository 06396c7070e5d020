"""Shared machinery of the visualisation callbacks.

Each callback draws on a small fixed set of validation images (the same ones every time, resized to the
input size, no augmentation), every ``every_n_epochs`` epochs and after the last epoch, at the end of a
training epoch — outside the training step, with gradients available (validation runs under
``torch.inference_mode``, which gradient-based pictures cannot use). Each picture is written to
``<run>/media/<name>_e<epoch>.png`` and logged to wandb under ``media/<name>``.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
from torch import Tensor

from datamodules.images import load_rgb
from datamodules.transforms import segmentation_eval_transform
from lightningmodules.base import TaskModule
from utils.figures import log_image

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def denormalise(images: Tensor) -> Tensor:
    """(B, 3, H, W) ImageNet-normalised → [0, 1] for display."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def fixed_validation_images(trainer: pl.Trainer, num_images: int) -> tuple[Tensor, list[Path]]:
    """The first ``num_images`` validation images, resized to the input size and normalised (CPU)."""
    datamodule = trainer.datamodule
    paths = list(datamodule.val_set.image_paths[:num_images])
    transform = segmentation_eval_transform(datamodule.cfg.img_size)
    return torch.stack([transform(load_rgb(p)) for p in paths]), paths


@contextmanager
def eval_mode(module: torch.nn.Module):
    """Eval mode (dropout and stochastic depth off, BatchNorm statistics untouched), then every submodule's
    own mode back (a frozen backbone stays in eval mode)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


class VisualisationCallback(pl.Callback):
    """Subclasses set ``name`` and implement :meth:`draw` returning a matplotlib figure (or None)."""

    name = "picture"

    def __init__(self, every_n_epochs: int = 5, num_images: int = 4):
        self.every_n_epochs = max(1, every_n_epochs)
        self.num_images = num_images
        self._images: Optional[Tensor] = None
        self.enabled = True

    # -- subclass API ------------------------------------------------------------------------------
    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[str]:
        """Why this callback cannot work with this run (it then disables itself), or None."""
        return None

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: Tensor):
        raise NotImplementedError

    # -- schedule ----------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        problem = self.check(trainer, pl_module)
        if problem:
            log.warning("%s pictures are off: %s", self.name, problem)
            self.enabled = False

    def due(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch == trainer.max_epochs - 1
        return (self.enabled and trainer.is_global_zero and not trainer.sanity_checking
                and (epoch % self.every_n_epochs == 0 or last))

    def images(self, trainer: pl.Trainer, device: torch.device) -> Tensor:
        if self._images is None:
            self._images, _ = fixed_validation_images(trainer, self.num_images)
        return self._images.to(device)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.due(trainer):
            self.render(trainer, pl_module, tag=f"e{trainer.current_epoch:03d}")

    def render(self, trainer, pl_module, tag: str) -> Optional[Path]:
        with eval_mode(pl_module):
            figure = self.draw(trainer, pl_module, self.images(trainer, pl_module.device))
        if figure is None:
            return None
        return save_figure(trainer, figure, f"{self.name}_{tag}")

    def on_train_end(self, trainer, pl_module) -> None:
        wait_for_pictures()


_writer: Optional[ThreadPoolExecutor] = None
_pending: list[Future] = []


def save_figure(trainer: pl.Trainer, figure, stem: str) -> Path:
    """Write media/<stem>.png under the run directory and log it to wandb as media/<name>.

    Rasterising and writing the PNG (most of a picture's cost) happens on a background thread, so the
    next training steps run meanwhile; :func:`wait_for_pictures` (called at the end of training) waits."""
    global _writer
    media = Path(trainer.default_root_dir) / "media"
    media.mkdir(parents=True, exist_ok=True)
    path = media / f"{stem}.png"
    key, step = f"media/{stem.rsplit('_', 1)[0]}", trainer.global_step

    def write() -> None:
        figure.savefig(path, dpi=100, bbox_inches="tight")
        log_image(trainer, key, path, stem, step)

    if _writer is None:
        _writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitssl-pictures")
    _pending.append(_writer.submit(write))
    return path


def wait_for_pictures() -> None:
    """Block until every queued picture is written; a failed picture is a warning, never a failed run."""
    while _pending:
        future = _pending.pop(0)
        try:
            future.result()
        except Exception as err:  # noqa: BLE001
            log.warning("a picture could not be written: %s", err)


def parse_indices(text: str, flag: str) -> list[int]:
    """'0, 5,11' → [0, 5, 11]; a clear error naming the flag otherwise."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag}={text!r}: expected comma-separated integers, e.g. 0,5,11") from None


EVALUATED_ROLE = "teacher"
"""The backbone evaluation probes read when a module trains several (:func:`named_backbones`): DINO's
teacher, as DINO evaluates (k-NN, linear probe, attention maps and segmentation masks of the paper)."""


def named_backbones(pl_module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every backbone a module trains, by role: a task module's declared ``named_backbones()``
    (lightningmodules/base.py; DINO: ``{"teacher": ..., "student": ...}``). Another module (a plain
    LightningModule in a test or a plugin): its own ``named_backbones()`` when it has one, else
    ``{"": backbone}`` with ``pl_module.backbone`` or ``pl_module.model.backbone``; ``{}`` when it has none.
    Pictures drawn per backbone (attention maps) draw one per entry, named after the role."""
    if isinstance(pl_module, TaskModule):
        return pl_module.named_backbones()
    method = getattr(pl_module, "named_backbones", None)
    if callable(method):
        return dict(method())
    backbone = getattr(pl_module, "backbone", None)
    if backbone is None:
        backbone = getattr(getattr(pl_module, "model", None), "backbone", None)
    return {"": backbone} if backbone is not None else {}


def evaluated_role(pl_module: torch.nn.Module) -> str:
    """The role (key of :func:`named_backbones`) of the backbone :func:`backbone_of` returns: a task module's
    declared ``evaluated_role`` (``"teacher"`` for DINO, ``""`` for a module with a single backbone)."""
    if isinstance(pl_module, TaskModule):
        return pl_module.evaluated_role
    named = named_backbones(pl_module)
    return EVALUATED_ROLE if EVALUATED_ROLE in named else next(iter(named), "")


def backbone_of(pl_module: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The backbone evaluation probes read (emergence Jaccard, receptive fields, online probe): the teacher
    when the module has one (:data:`EVALUATED_ROLE`), else its only backbone (see :func:`named_backbones`)."""
    return named_backbones(pl_module).get(evaluated_role(pl_module))


def vit_in(backbone: Optional[torch.nn.Module]):
    """The timm VisionTransformer of a backbone, or None for a CNN backbone (or the attention-less raw-pixel
    baseline, models/backbones/pixels.py)."""
    vit = getattr(backbone, "vit", None)
    return vit if getattr(vit, "has_attention", True) else None


def vit_of(pl_module: pl.LightningModule):
    """The timm VisionTransformer of the evaluated backbone (:func:`backbone_of`: DINO's teacher), or None
    (see :func:`vit_in`)."""
    return vit_in(backbone_of(pl_module))


def cls_attention_problem(vit) -> Optional[str]:
    """Why the CLS-token attention of ``vit`` (from :func:`vit_of`) cannot be computed, or None."""
    if vit is None:
        return "a ViT backbone with attention is needed, and this run's backbone has none (a CNN or raw pixels)"
    if getattr(vit, "cls_token", None) is None:
        return "the CLS token's attention is needed, and this ViT has no class token"
    return None


def cnn_of(pl_module: pl.LightningModule) -> Optional[torch.nn.Module]:
    """The ResNet trunk (a module with children layer1..layer4), or None for a ViT."""
    backbone = backbone_of(pl_module)
    trunk = getattr(backbone, "model", backbone)  # ResNetBackbone.model, or DeepLab's IntermediateLayerGetter
    return trunk if trunk is not None and hasattr(trunk, "layer4") else None
