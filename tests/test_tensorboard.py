"""--log.tensorboard: Lightning's TensorBoard logger beside the CSV (and wandb), scalars and pictures, read back
from the event files with TensorBoard's own reader and compared with metrics.csv and media/*.png."""
from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main

pytestmark = pytest.mark.usefixtures("one_thread")


def read_events(folder):
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_gets_the_scalars_of_metrics_csv_and_every_picture(tiny, tmp_path):
    args = tiny("tb", log__tensorboard="true", log__wandb_mode="disabled", callbacks__every_n_epochs=1,
                callbacks__emergence="false", trainer__limit_val_batches=1)
    assert main.main(args) == 0
    run = tmp_path / "runs" / "tb"
    events = read_events(run / "tensorboard")
    tags = events.Tags()

    with (run / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    for name in ("train/loss_step", "val/loss", "cc/diag_mean"):
        expected = [(int(r["step"]), float(r[name])) for r in rows if r.get(name)]
        assert expected, name
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in logged] == [s for s, _ in expected], name
        assert np.allclose([v for _, v in logged], [v for _, v in expected], rtol=1e-6), name

    # Every picture of media/ reached TensorBoard, pixel for pixel (RGB), at its step.
    pictures = sorted(p.stem for p in (run / "media").glob("*.png"))
    assert {"attention_e000", "attention_e001", "cross_correlation_start", "cross_correlation_e001"} <= set(pictures)
    assert set(tags["images"]) == {f"media/{stem.rsplit('_', 1)[0]}" for stem in pictures}
    images = events.Images("media/attention")
    assert len(images) == 2  # epochs 0 and 1
    last = images[-1]
    written = np.asarray(Image.open(run / "media" / "attention_e001.png").convert("RGB"))
    logged = np.asarray(Image.open(io.BytesIO(last.encoded_image_string)).convert("RGB"))
    assert (last.height, last.width) == written.shape[:2]
    assert np.array_equal(logged, written)


def test_tensorboard_is_off_by_default(tiny, tmp_path):
    assert main.main(tiny("plain", log__wandb_mode="disabled", trainer__max_epochs=1, callbacks__attention="false",
                          callbacks__emergence="false", trainer__limit_val_batches=1)) == 0
    assert not (tmp_path / "runs" / "plain" / "tensorboard").exists()
