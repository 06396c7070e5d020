"""The augmented views the network is asked to match (fixed validation views): Barlow Twins' view pairs, or
every crop of DINO's multi-crop (2 global, N local) per image."""
from __future__ import annotations

from callbacks.visual import VisualisationCallback, denormalise, save_figure
from utils.figures import subplots


class ViewPairsCallback(VisualisationCallback):
    """Draws the validation loader's first views (seeded per image: the same ones every time), finished on the
    CPU in every augmentation mode. Two views (Barlow Twins): one column per image, a row per view. More
    (multi-crop): one row per image, a column per view, each crop drawn at its size relative to the largest
    (local crops appear smaller than the global ones, as the network sees them)."""

    name = "views"

    def render(self, trainer, pl_module, tag: str):
        datamodule = trainer.datamodule
        # Geometry entries of a dense Barlow Twins batch are (B, 5) boxes, not pictures.
        views = [t for t in datamodule.validation_views(self.num_images) if t.dim() == 4]
        if len(views) > 2:
            names = [spec.name for spec in getattr(datamodule, "views", [])]
            names = names or [f"view {i + 1}" for i in range(len(views))]
            fig = multicrop_figure(views, names)
            fig.suptitle(f"Multi-crop views (epoch {trainer.current_epoch})")
        else:
            fig = pair_figure(*views[:2])
            fig.suptitle(f"Barlow Twins view pairs (epoch {trainer.current_epoch})")
        return save_figure(trainer, fig, f"{self.name}_{tag}")


def pair_figure(x1, x2):
    """Two views of each image: a column per image, the views in two rows."""
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
    return fig


def multicrop_figure(views, names: list[str]):
    """Every view of each image: a row per image, a column per view (``names``), each view centred in a cell
    as large as the largest view, so a 16 px local crop looks half as wide as a 32 px global one."""
    n = views[0].shape[0]
    largest = max(v.shape[-1] for v in views)
    fig, axes = subplots(n, len(views), figsize=(1.5 * len(views), 1.6 * n + 0.6), squeeze=False)
    for column, (batch, name) in enumerate(zip(views, names)):
        pictures = denormalise(batch[:n]).permute(0, 2, 3, 1).cpu().numpy()
        size = batch.shape[-1]
        low, high = (largest - size) / 2, (largest + size) / 2
        for row in range(n):
            ax = axes[row, column]
            ax.imshow(pictures[row], extent=(low, high, high, low))
            ax.set_xlim(0, largest)
            ax.set_ylim(largest, 0)
            ax.axis("off")
        axes[0, column].set_title(f"{name}\n{size} px", fontsize=9)
    for row in range(n):
        axes[row, 0].text(-0.1, 0.5, f"image {row}", transform=axes[row, 0].transAxes, rotation=90, va="center",
                          ha="right")
    return fig
