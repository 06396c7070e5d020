"""Pictures that tell the truth: rendered pixels and plotted lines checked against hand-written expectations.

- cross-correlation: a diverging map centred on 0 over the fixed range [-1, 1] (0 white, 1 red, -1 blue), so a
  half-learnt diagonal (0.47) stands out from an uncorrelated background (0);
- attention maps: one colour scale for all maps of a figure (attention relative to uniform), so a flat map is
  one flat colour, and each panel prints its flatness (max / mean);
- summarize: each task by its own metric (segmentation: val/mIoU, max), a copied run directory counted once,
  and no plotted line joins runs of different lengths or configurations.
"""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg

from analysis.attention import peak_to_mean, relative_to_uniform
from callbacks.attention_maps import attention_figure
from callbacks.cross_correlation import plot_cross_correlation
from config.hparams import Hparams
from config.loading import to_dict
from tools import summarize

pytestmark = pytest.mark.usefixtures("one_thread")


def pixels(figure) -> np.ndarray:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(float) / 255


def cell_colour(figure, image_axes, row: int, col: int) -> np.ndarray:
    """The rendered RGB at the centre of matrix cell (row, col) of an imshow axes."""
    rgb = pixels(figure)
    height = rgb.shape[0]
    n = image_axes.get_images()[0].get_array().shape[0]
    x0, y0, x1, y1 = image_axes.get_window_extent().extents
    x = x0 + (col + 0.5) * (x1 - x0) / n
    y = y1 - (row + 0.5) * (y1 - y0) / n  # display y grows upwards, rows downwards
    return rgb[int(height - y), int(x)]


def test_cross_correlation_is_diverging_centred_on_zero_over_minus_one_to_one():
    c = torch.zeros(8, 8)
    c.fill_diagonal_(0.47)
    c[0, 7], c[7, 0], c[1, 1], c[2, 2] = -1.0, 1.0, 1.0, -0.47
    figure = plot_cross_correlation({"val": c}, "test")
    ax = figure.axes[0]
    image = ax.get_images()[0]
    assert (image.norm.vmin, image.norm.vmax) == (-1.0, 1.0)
    zero, half, one, minus_one = (cell_colour(figure, ax, *rc) for rc in [(0, 1), (3, 3), (1, 1), (0, 7)])
    assert np.all(zero > 0.95)  # uncorrelated: white
    assert one[0] > 0.3 and one[1] < 0.15 and one[2] < 0.5 * one[0]  # +1: (dark) red
    assert minus_one[2] > minus_one[0] + 0.3  # -1: blue
    assert np.abs(half - zero).sum() > 0.4  # a diagonal of 0.47 is clearly not background
    assert half[0] > half[2]  # and on the positive (red) side
    # symmetric about 0: -0.47 is as far from white as +0.47
    minus_half = cell_colour(figure, ax, 2, 2)
    assert abs(np.abs(minus_half - zero).sum() - np.abs(half - zero).sum()) < 0.15


def test_flatness_and_relative_to_uniform_by_hand():
    flat = torch.full((1, 1, 2, 2), 0.25)
    peak = torch.tensor([[[[0.7, 0.1], [0.1, 0.1]]]])
    assert torch.allclose(relative_to_uniform(flat), torch.ones(1, 1, 2, 2))
    assert torch.allclose(relative_to_uniform(peak), torch.tensor([[[[2.8, 0.4], [0.4, 0.4]]]]))
    assert torch.allclose(peak_to_mean(torch.cat([flat, peak], dim=1)), torch.tensor([[1.0, 2.8]]))
    assert peak_to_mean(torch.zeros(1, 1, 2, 2)).item() == 0.0


def test_attention_maps_share_one_scale_and_print_their_flatness():
    images = torch.zeros(2, 3, 16, 16)
    flat = torch.full((2, 2, 2), 0.2)  # two heads, uniform over 4 patches (0.8 of the mass on patches)
    flat[0, 0, 0] += 1e-3  # a tiny bump that min-max scaling would stretch to full contrast
    peaked = torch.full((2, 2, 2), 0.05)  # head 0 uniform, head 1 peaked on one patch
    peaked[1, 1, 1] = 0.65
    figure = attention_figure(images, torch.stack([flat, peaked]), block=1, depth=2, epoch=0)
    texts = [t.get_text() for t in figure.axes[0].texts]
    # flatness per panel, by hand: the flat maps ≈ 1 (4 of them), head 1 of image 1: 0.65 / 0.2 = 3.25, the
    # mean of its heads: 0.35 / ((3 · 0.05 + 0.35) / 4) = 2.8
    assert texts.count("max/mean 1") == 4 and "max/mean 3.25" in texts and "max/mean 2.8" in texts
    # the flat map is one flat colour (no stretched noise), the peaked map spans the scale
    canvas = figure.axes[0].get_images()[0].get_array()
    tile = 16 + max(2, 16 // 16)
    flat_tile = np.asarray(canvas[0:16, tile:tile + 16])
    peaked_tile = np.asarray(canvas[tile:tile + 16, 2 * tile:2 * tile + 16])
    assert np.ptp(flat_tile, axis=(0, 1)).max() < 0.02
    assert np.ptp(peaked_tile, axis=(0, 1)).max() > 0.5
    # uniform (1) sits mid-scale: flat maps are neither dark nor bright
    from matplotlib import colormaps

    assert np.allclose(flat_tile[0, 0], colormaps["inferno"](0.5)[:3], atol=0.02)
    # one colour bar, in units of uniform attention, log scale from 1/3.25 to the largest value drawn (3.25)
    bar = figure.axes[-1]
    assert "uniform" in bar.get_ylabel() and bar.get_yscale() == "log"
    assert bar.get_ylim() == pytest.approx((1 / 3.25, 3.25), abs=1e-6)


# ---------------------------------------------------------------------------------------------- summarize
def make_run(root, name, task, val, epochs, run_id, lr=5e-4):
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    cfg = Hparams()
    cfg.task, cfg.trainer.max_epochs, cfg.optim.lr, cfg.log.run_name = task, epochs, lr, name
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    metric = "val/mIoU" if task == "segmentation" else "val/loss"
    with (run / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "step", "val/loss", metric] if metric != "val/loss"
                                else ["epoch", "step", "val/loss"])
        writer.writeheader()
        for epoch, v in enumerate(val):
            row = {"epoch": epoch, "step": epoch, metric: v}
            if metric != "val/loss":
                row["val/loss"] = 1 + v  # made up so that the loss (min) ranks the runs the other way round
            writer.writerow(row)
    progress = {"ready": epochs, "started": epochs, "processed": epochs, "completed": epochs}
    torch.save({"epoch": epochs - 1, "global_step": epochs, "state_dict": {},
                "loops": {"fit_loop": {"epoch_progress": {"total": progress, "current": progress}}}},
               run / "checkpoints" / "last.ckpt")
    (run / "run.json").write_text(f'{{"run_id": "{run_id}"}}')
    return run


def test_summarize_ranks_segmentation_by_miou_and_counts_a_copy_once(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "seg-a", "segmentation", [0.1, 0.3], 2, "a", lr=1e-3)
    make_run(root, "seg-b", "segmentation", [0.1, 0.2], 2, "b", lr=2e-3)
    make_run(root, "seg-b-copy", "segmentation", [0.1, 0.2], 2, "b", lr=2e-3)  # cp -r seg-b, resumed
    report = summarize.summarize(root)
    group = report.group("segmentation")
    assert (group.metric, group.goal) == ("val/mIoU", "max")
    assert group.best_row.run.name == "seg-a"  # by val/loss (min) it would be seg-b
    assert sorted(r.run.name for r in group.rows) == ["seg-a", "seg-b"]
    assert any("seg-b-copy is a copy of run seg-b" in n for n in report.notes)
    md = (root / "summary.md").read_text()
    assert "Best final val/mIoU (max): **0.3** — seg-a" in md
    # an explicit --metric still applies to every task
    assert summarize.summarize(root, metric="val/loss").group("segmentation").best_row.run.name == "seg-b"


def plotted_lines(monkeypatch, summary, tmp_path):
    """(label, x data) of every drawn line with a line style (not markers only) in the summary plot."""
    from matplotlib.figure import Figure

    figures = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), original(self, *a, **k))[1])
    summarize.write_plot(summary, tmp_path / "plot.png")
    ax = figures[0].axes[0]
    return [(line.get_label(), list(line.get_xdata())) for line in ax.get_lines()
            if line.get_linestyle() not in ("None", "none", "")]


def test_summary_plot_never_joins_runs_of_other_lengths_or_configs(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    for name, epochs, lr in [("e2", 2, 1e-3), ("e3", 3, 1e-3), ("e15", 15, 1e-3)]:
        make_run(root, name, "barlow_twins", [5.0] * epochs, epochs, name, lr=lr)
    # x = the training length: points only, no line through runs of 2, 3 and 15 epochs
    group = summarize.summarize(root).group("barlow_twins")
    assert group.params == ["trainer.max_epochs"]
    assert plotted_lines(monkeypatch, group, tmp_path) == []

    root2 = tmp_path / "runs2"
    for name, lr, wd in [("a", 1e-3, 0.05), ("b", 2e-3, 0.05), ("c", 1e-3, 0.1), ("d", 2e-3, 0.1)]:
        run = make_run(root2, name, "barlow_twins", [4.0, 3.0], 2, name, lr=lr)
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["optim"]["weight_decay"] = wd
        (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # --params names one field; weight decay differs too: one line per weight decay, never across them
    group = summarize.summarize(root2, params=["optim.lr"]).group("barlow_twins")
    assert group.others == ["optim.weight_decay"]
    lines = plotted_lines(monkeypatch, group, tmp_path)
    assert sorted(label for label, _ in lines) == ["weight_decay=0.05", "weight_decay=0.1"]
    assert all(sorted(x) == [1e-3, 2e-3] for _, x in lines)
