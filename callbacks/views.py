"""Barlow Twins: the augmented view pairs the network is asked to match (fixed validation views)."""
from __future__ import annotations

from callbacks.visual import VisualisationCallback, denormalise


class ViewPairsCallback(VisualisationCallback):
    name = "views"

    def render(self, trainer, pl_module, tag: str):
        from callbacks.visual import save_figure, subplots

        # The validation loader's first views (seeded per image: the same pairs every time), finished on
        # the CPU in either augmentation mode.
        x1, x2 = trainer.datamodule.validation_views(self.num_images)[:2]
        n = x1.shape[0]
        v1, v2 = denormalise(x1[:n]), denormalise(x2[:n])
        fig, axes = subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
        for i in range(n):
            for row, views in enumerate((v1, v2)):
                axes[row, i].imshow(views[i].permute(1, 2, 0).cpu().numpy())
                axes[row, i].axis("off")
            axes[0, i].set_title(f"image {i}")
        axes[0, 0].text(-0.1, 0.5, "view 1", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right")
        axes[1, 0].text(-0.1, 0.5, "view 2", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right")
        fig.suptitle(f"Barlow Twins view pairs (epoch {trainer.current_epoch})")
        return save_figure(trainer, fig, f"{self.name}_{tag}")
