"""Cross-correlation, view-pair and prediction pictures; the scalars; the epoch timer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import main
from callbacks.cross_correlation import CMAP, VMAX, VMIN, convergence_scalars, plot_cross_correlation
from tests.test_main import column, metrics
from tests.wandb_records import logged, run_file


def test_convergence_scalars_by_hand():
    c = torch.tensor([[0.95, -0.2, 0.1], [0.3, 0.5, 0.0], [-0.4, 0.2, 0.92]])
    s = convergence_scalars(c)
    off = [abs(c[i, j].item()) for i in range(3) for j in range(3) if i != j]
    assert s["diag_mean"].item() == pytest.approx((0.95 + 0.5 + 0.92) / 3)
    assert s["offdiag_abs_mean"].item() == pytest.approx(sum(off) / len(off))
    assert s["diag_above_0.9"].item() == pytest.approx(2 / 3)


def test_cross_correlation_plot_uses_the_fixed_scale_and_the_block():
    import matplotlib

    matplotlib.use("Agg")
    fig = plot_cross_correlation({"train": torch.eye(100), "val": torch.eye(100) * 0.5}, "t", block=16)
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 4  # whole matrices + top-left blocks
    for im in images:
        assert im.norm.vmin == VMIN and im.norm.vmax == VMAX and im.get_cmap().name == CMAP
    assert images[2].get_array().shape == (16, 16)
    # 1 is (dark) red, 0 white, -1 blue on this diverging scale (tests/test_pictures.py checks the pixels)
    red, white, blue = (im.cmap(im.norm(v)) for v in (1.0, 0.0, -1.0))
    assert red[0] > 0.3 and red[1] < 0.15 and red[2] < 0.5 * red[0]
    assert min(white[:3]) > 0.95 and blue[2] > blue[0] + 0.3
    no_block = plot_cross_correlation({"train": torch.eye(32)}, "t", block=64)
    assert len([im for ax in no_block.axes for im in ax.get_images()]) == 1


def test_every_drawn_cell_covers_whole_pixels():
    import matplotlib

    matplotlib.use("Agg")
    from callbacks.cross_correlation import DPI

    # 512×512 in 512 pixels, the 64×64 block 6×6 pixels per cell, a 100×100 matrix 3×3 per cell: no resampling
    fig = plot_cross_correlation({"train": torch.eye(512), "val": torch.eye(100)}, "t", block=64)
    assert fig.dpi == DPI
    for ax, (cells, per_cell) in zip(fig.axes, [(512, 1), (100, 3), (64, 6), (64, 6)]):
        box = ax.get_window_extent()
        assert ax.get_images()[0].get_array().shape == (cells, cells)
        assert (round(box.width, 6), round(box.height, 6)) == (cells * per_cell,) * 2
    assert [ax.get_title() for ax in fig.axes[:3]] == ["train: 512×512, 1 px per cell", "val: 100×100, 3 px per cell",
                                                       "train: top-left 64×64, 6 px per cell"]


def test_wide_matrices_are_pooled_keeping_the_diagonal():
    from callbacks.cross_correlation import MAX_CELLS, pool_for_display

    torch.manual_seed(0)
    d = 1030  # f = ceil(1030 / 512) = 3, 344 cells, the last block holds 1030 - 343·3 = 1 row and column
    c = torch.randn(d, d)
    pooled, f = pool_for_display(c)
    assert f == 3 and pooled.shape == (344, 344) and MAX_CELLS == 512
    for i, j in [(0, 1), (5, 200), (343, 0), (343, 343), (17, 17), (0, 0)]:
        rows, cols = range(3 * i, min(3 * i + 3, d)), range(3 * j, min(3 * j + 3, d))
        if i == j:  # the mean of the diagonal entries of the block
            expected = sum(c[k, k].item() for k in rows) / len(rows)
        else:
            expected = sum(c[r, q].item() for r in rows for q in cols) / (len(rows) * len(cols))
        assert pooled[i, j].item() == pytest.approx(expected, abs=1e-5), (i, j)
    assert torch.equal(pool_for_display(c[:512, :512])[0], c[:512, :512])  # up to 512: drawn as it is
    fig = plot_cross_correlation({"val": torch.eye(2048)}, "t", block=0)
    assert fig.axes[0].get_images()[0].get_array().shape == (512, 512)
    assert "shown as 512×512 means of 4×4 blocks" in fig.axes[0].get_title()
    assert (np.diag(fig.axes[0].get_images()[0].get_array()) == 1).all()  # the identity's diagonal stays 1


def png(path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_barlow_twins_pictures_and_scalars(tiny, tmp_path):
    args = tiny("bt", callbacks__attention="false", callbacks__views="true", callbacks__every_n_epochs=1)
    assert main.main(args) == 0
    media = tmp_path / "runs" / "bt" / "media"
    for name in ("cross_correlation_start", "cross_correlation_e000", "cross_correlation_e001", "views_e000", "views_e001"):
        width, height = png(media / f"{name}.png")
        assert width > 300 and height > 200, name
    rows = metrics(tmp_path / "runs" / "bt")
    diag = column(rows, "cc/diag_mean")
    assert len(diag) == 8 and all(-1 <= v <= 1 for _, v in diag)
    assert all(0 <= v <= 1 for _, v in column(rows, "cc/diag_above_0.9"))
    assert len(column(rows, "time/train_epoch_s")) == 2
    _, history = logged(run_file(tmp_path / "runs" / "bt"))
    assert any(k.startswith("media/cross_correlation/") for h in history for k in h)


def test_dense_term_has_its_own_cross_correlation_diagnostics(tiny, tmp_path):
    args = tiny("dense", callbacks__attention="false", callbacks__emergence="false", callbacks__every_n_epochs=1,
                barlow__dense_weight=1.0, barlow__dense_proj_dim=16, barlow__dense_points=4, barlow__shared_crop="true",
                trainer__max_epochs=1)
    assert main.main(args) == 0
    rows = metrics(tmp_path / "runs" / "dense")
    dense_diag = column(rows, "cc_dense/diag_mean")
    assert len(dense_diag) == 4 and all(-1 <= v <= 1 for _, v in dense_diag)
    for key in ("train/dense_loss_epoch", "train/global_loss_epoch", "val/dense_loss", "val/dense_loss_per_dim"):
        assert column(rows, key), key
    # total = global + 1.0 × dense, as logged
    total = dict(column(rows, "train/loss_epoch"))
    parts = {step: g + d for (step, g), (_, d) in zip(column(rows, "train/global_loss_epoch"),
                                                      column(rows, "train/dense_loss_epoch"))}
    for step, value in total.items():
        assert abs(value - parts[step]) < 1e-3 * abs(value)
    assert png(tmp_path / "runs" / "dense" / "media" / "cross_correlation_e000.png")[0] > 4 * 300  # 4 matrices


def test_segmentation_prediction_pictures(tiny, tmp_path):
    args = tiny("seg", task="segmentation", segmentation__hidden_dim=8, data__batch_size=4,
                callbacks__attention="false", callbacks__every_n_epochs=5, trainer__max_epochs=2)
    assert main.main(args) == 0
    media = tmp_path / "runs" / "seg" / "media"
    # every 5 epochs → epoch 0, and the last epoch
    assert sorted(p.name for p in media.glob("predictions_*.png")) == ["predictions_e000.png", "predictions_e001.png"]
    width, height = png(media / "predictions_e001.png")
    assert width > 300 and height > 4 * 100
    _, history = logged(run_file(tmp_path / "runs" / "seg"))
    assert any(k.startswith("media/predictions_masks/") for h in history for k in h)


def test_pictures_can_be_switched_off(tiny, tmp_path):
    args = tiny("off", callbacks__attention="false", callbacks__cross_correlation="false", trainer__max_epochs=1)
    assert main.main(args) == 0
    assert not list((tmp_path / "runs" / "off" / "media").glob("*.png"))
