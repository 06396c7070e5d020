"""Segmentation: image | ground truth | prediction for fixed validation images, in the VOC palette with a
class legend; also wandb masks with class labels (toggleable overlays in the wandb UI)."""
from __future__ import annotations

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from callbacks.visual import VisualisationCallback, denormalise
from datamodules.segmentation import IGNORE_INDEX, load_mask
from datamodules.synthetic_voc import VOC_PALETTE
from datamodules.voc import VOC_CLASSES
from utils.figures import subplots


def voc_palette() -> np.ndarray:
    """The standard VOC colour map as (256, 3) uint8 (255 → the void colour)."""
    return np.asarray(VOC_PALETTE, dtype=np.uint8).reshape(256, 3)


def class_label(c: int, num_classes: int) -> str:
    if c == IGNORE_INDEX:
        return "void (ignored)"
    return VOC_CLASSES[c] if num_classes == len(VOC_CLASSES) else f"class {c}"


class PredictionsCallback(VisualisationCallback):
    name = "predictions"

    def _masks(self, trainer) -> torch.Tensor:
        dataset = trainer.datamodule.val_set
        size = trainer.datamodule.cfg.img_size
        resize = v2.Resize((size, size), interpolation=v2.InterpolationMode.NEAREST)
        n = dataset.num_classes
        return torch.stack([resize(tv_tensors.Mask(load_mask(p, n))) for p in dataset.masks[: self.num_images]])

    def draw(self, trainer, pl_module, images):
        from matplotlib.patches import Patch

        num_classes = pl_module.cfg.segmentation.num_classes
        with torch.no_grad():
            pred = pl_module.model(images)["out"].argmax(1).cpu().numpy()
        truth = self._masks(trainer).numpy()
        shown = denormalise(images).permute(0, 2, 3, 1).cpu().numpy()
        palette = voc_palette()
        n = images.shape[0]
        fig, axes = subplots(n, 3, figsize=(7.5, 2.5 * n + 0.8), squeeze=False)
        for i in range(n):
            for j, (picture, title) in enumerate(((shown[i], "image"), (palette[truth[i]], "ground truth"),
                                                  (palette[pred[i]], "prediction"))):
                axes[i, j].imshow(picture, interpolation="nearest")
                axes[i, j].axis("off")
                if i == 0:
                    axes[i, j].set_title(title)
        present = sorted(set(np.unique(truth)) | set(np.unique(pred)))
        handles = [Patch(color=palette[c] / 255, label=class_label(int(c), num_classes)) for c in present]
        fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8, frameon=False)
        fig.suptitle(f"Predictions (epoch {trainer.current_epoch}, step {trainer.global_step})")
        fig.subplots_adjust(bottom=0.02 + 0.12 * ((len(handles) + 3) // 4) / n)
        self._log_wandb_masks(trainer, shown, truth, pred, num_classes)
        return fig

    def _log_wandb_masks(self, trainer, shown, truth, pred, num_classes: int) -> None:
        from pytorch_lightning.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        labels = {c: class_label(c, num_classes) for c in list(range(num_classes)) + [IGNORE_INDEX]}
        masks = [{"ground_truth": {"mask_data": t.astype(np.uint8), "class_labels": labels},
                  "predictions": {"mask_data": p.astype(np.uint8), "class_labels": labels}}
                 for t, p in zip(truth, pred)]
        images = [(s * 255).astype(np.uint8) for s in shown]
        for logger in loggers:
            logger.log_image(key="media/predictions_masks", images=images, masks=masks, step=trainer.global_step)
