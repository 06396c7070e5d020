"""--callbacks.emergence_corloc: CorLoc of LOST and TokenCut logged beside the emergence Jaccard during
pretraining, equal to the boxes recomputed from the final weights as main_lost.py reads the keys."""
from __future__ import annotations

import pytest

import main
from tests.test_main import ckpt, column, metrics
from tests.test_emergence_suite import main_lost_corloc

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_run_logs_corloc_beside_the_jaccard(tiny, tmp_path, data_cache):
    args = tiny("corloc", callbacks__attention="false", callbacks__cross_correlation="false",
                callbacks__emergence_images=4, callbacks__emergence_every_n_epochs=1,
                callbacks__emergence_img_size=32, callbacks__emergence_corloc="true")
    assert main.main(args) == 0
    run = tmp_path / "runs" / "corloc"
    jaccard = column(metrics(run), "val/attn_jaccard")
    lost = column(metrics(run), "val/corloc_lost")
    tokencut = column(metrics(run), "val/corloc_tokencut")
    # measured with the Jaccard: before training (step 0), then after each of the 2 epochs of 4 steps
    assert [s for s, _ in lost] == [s for s, _ in tokencut] == [s for s, _ in jaccard] == [0, 4, 8]
    assert all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for _, v in lost + tokencut)  # 4 images

    from lightningmodules.barlow_twins import BarlowTwinsModule

    state = ckpt(run / "checkpoints" / "last.ckpt")
    module = BarlowTwinsModule(state["hyper_parameters"]["config"])
    module.load_state_dict(state["state_dict"])
    root = next(data_cache.glob("synthetic_voc_*"))
    # 4 evenly spaced images of the 16 of the detection val split: every 4th
    want_lost, want_cut, n = main_lost_corloc(module.backbone.vit.eval(), root, "val", every=4)
    assert n == 4 and lost[-1][1] == pytest.approx(want_lost) and tokencut[-1][1] == pytest.approx(want_cut)


def test_corloc_is_off_without_box_annotations(tmp_path, caplog):
    from pathlib import Path
    from types import SimpleNamespace

    from callbacks.emergence import EmergenceCallback

    callback = EmergenceCallback(num_images=2, corloc=True)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(root=str(tmp_path)))
    assert callback.corloc_data(trainer) is None and not callback.corloc
    assert "CorLoc (val/corloc_lost, val/corloc_tokencut) is off" in caplog.text
    assert str(Path(tmp_path) / "VOCdevkit" / "VOC2012") in caplog.text
