"""Batch-size and learning-rate auto-tuning: the values found are the values trained with and recorded."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import yaml

import main
from tests.test_main import ckpt, column, metrics
from tests.wandb_records import logged, run_file


def test_batch_size_tuner_finds_a_batch_and_training_uses_it(tiny, tmp_path, caplog):
    # 32 training images, start at 8: power mode doubles to the bound 16 (nothing runs out of memory on CPU)
    args = tiny("bs", trainer__tune_batch_size="true", trainer__tune_batch_size_max=16, trainer__max_epochs=2)
    assert main.main(args) == 0
    run = tmp_path / "runs" / "bs"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["batch_size"] == 16 and config["trainer"]["tune_batch_size"] is False
    assert yaml.safe_load((run / "tuning.yaml").read_text())["batch_size"] == 16
    # training really ran with 16: 32 images / 16 = 2 steps per epoch, 2 epochs
    assert ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert [s for s, _ in column(metrics(run), "train/loss_step")] == [0, 1, 2, 3]
    # and wandb's run config was updated
    wandb_config, _ = logged(run_file(run))
    assert wandb_config["data"]["batch_size"] == 16 and wandb_config["tuned"]["batch_size"] == 16
    # Barlow Twins below 64 gets a warning that says what to do
    assert "below 64" in caplog.text and "smaller model" in caplog.text


def test_binsearch_mode_stays_within_bound(tiny, tmp_path):
    args = tiny("bin", trainer__tune_batch_size="true", trainer__tune_batch_size_mode="binsearch",
                trainer__tune_batch_size_max=24, data__batch_size=4, trainer__max_epochs=1)
    assert main.main(args) == 0
    run = tmp_path / "runs" / "bin"
    found = yaml.safe_load((run / "config.yaml").read_text())["data"]["batch_size"]
    assert 4 <= found <= 24
    assert ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 32 // found


def lightning_suggestion(lrs: list[float], losses: list[float], skip_begin: int = 10, skip_end: int = 1) -> float:
    """Lightning's rule, written out: the LR where d(smoothed loss)/d(lr) is most negative."""
    loss, lr = np.array(losses[skip_begin:-skip_end]), np.array(lrs[skip_begin:-skip_end])
    finite = np.isfinite(loss)
    gradient = np.gradient(loss[finite], lr[finite])
    return lr[finite][np.argmin(gradient)]


def test_lr_finder_suggestion_is_the_lr_training_starts_from(tiny, tmp_path):
    args = tiny("lr", trainer__tune_lr="true", trainer__tune_lr_steps=20, trainer__tune_lr_min=1e-5,
                trainer__tune_lr_max=1.0, optim__warmup_epochs=1, trainer__max_epochs=2)
    assert main.main(args) == 0
    run = tmp_path / "runs" / "lr"
    with (run / "media" / "lr_finder.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20
    expected = lightning_suggestion([float(r["lr"]) for r in rows], [float(r["loss"]) for r in rows])
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["optim"]["lr"] == pytest.approx(expected) and config["trainer"]["tune_lr"] is False
    # the optimizer's peak (base) learning rate is the suggestion...
    state = ckpt(run / "checkpoints" / "last.ckpt")
    assert state["optimizer_states"][0]["param_groups"][0]["initial_lr"] == pytest.approx(expected)
    # ...and the warmup starts from it: 4 steps per epoch, warmup 1 epoch → lr_k = s·(k+1)/4, then cosine
    logged_lr = dict(column(metrics(run), "lr-AdamW/pg1"))
    for k in range(4):
        assert logged_lr[k] == pytest.approx(expected * (k + 1) / 4)
    png = (run / "media" / "lr_finder.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_tuned_config_yaml_reproduces_the_tuned_run(tiny, tmp_path):
    args = tiny("tuned", trainer__tune_batch_size="true", trainer__tune_batch_size_max=16,
                trainer__tune_lr="true", trainer__tune_lr_steps=15, backbone__drop_path_rate=0.1)
    assert main.main(args) == 0
    tuned = tmp_path / "runs" / "tuned"
    assert main.main(["--config", str(tuned / "config.yaml"), "--log.run_name=again"]) == 0
    assert not (tmp_path / "runs" / "again" / "tuning.yaml").exists()  # no second search
    first, again = column(metrics(tuned), "train/loss_step"), column(metrics(tmp_path / "runs" / "again"), "train/loss_step")
    assert first == again and len(first) == 4


@pytest.mark.parametrize("flags, message", [
    (["--trainer.tune_lr=true", "--trainer.resume={ckpt}"], "apply to new runs"),
    (["--trainer.tune_lr=true", "--trainer.tune_lr_steps=5"], "tune_lr_steps must be >= 13"),
    (["--trainer.tune_batch_size=true", "--trainer.devices=2"], "need --trainer.devices=1"),
    (["--trainer.tune_lr_min=1", "--trainer.tune_lr_max=0.1"], "0 < min < max"),
])
def test_tuning_flag_errors(tiny, tmp_path, flags, message):
    from config.loading import ConfigError, parse_config
    from config.validation import validate

    (tmp_path / "last.ckpt").write_bytes(b"")
    flags = [f.format(ckpt=tmp_path / "last.ckpt") for f in flags]
    with pytest.raises(ConfigError, match=message):
        validate(parse_config(tiny("x") + flags))
