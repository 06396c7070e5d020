"""Batch-size and learning-rate auto-tuning: the values found are the values trained with and recorded."""
from __future__ import annotations

import csv
from typing import Optional

import numpy as np
import pytest
import yaml

import main
from utils import tuning
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


# Tiny segmentation (frozen random ViT, CE): its loss falls clearly with the rate, then diverges.
SEG_LR = {"task": "segmentation", "segmentation__hidden_dim": 16, "callbacks__predictions": "false",
          "trainer__tune_lr": "true", "trainer__tune_lr_steps": 30, "trainer__tune_lr_min": 1e-4,
          "trainer__tune_lr_max": 10.0}


def record_training_losses(monkeypatch, module_class, events: Optional[list[str]] = None) -> list[float]:
    """The loss of every training step the module takes (the LR finder's steps come first); ``events`` gets
    "train" per training step and "val" per validation step, in order."""
    losses: list[float] = []
    events = [] if events is None else events
    original_train, original_val = module_class.training_step, module_class.validation_step

    def training_step(self, *args, **kwargs):
        loss = original_train(self, *args, **kwargs)
        losses.append(float(loss.detach()))
        events.append("train")
        return loss

    def validation_step(self, *args, **kwargs):
        events.append("val")
        return original_val(self, *args, **kwargs)

    monkeypatch.setattr(module_class, "training_step", training_step)
    monkeypatch.setattr(module_class, "validation_step", validation_step)
    return losses


def test_lr_finder_suggestion_is_the_lr_training_starts_from(tiny, tmp_path, monkeypatch):
    from lightningmodules.segmentation import SegmentationModule

    events: list[str] = []
    taken = record_training_losses(monkeypatch, SegmentationModule, events)
    args = tiny("lr", **SEG_LR, optim__warmup_epochs=1, trainer__max_epochs=2)
    assert main.main(args) == 0
    run = tmp_path / "runs" / "lr"
    # the finder's 30 steps (7.5 epochs of 4) ran without validation; training's then validated as usual
    first = events.index("train")
    assert events[first:first + 30] == ["train"] * 30 and "val" in events[first + 30:]
    with (run / "media" / "lr_finder.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30
    # the per-step losses recovered from Lightning's smoothed curve are the losses the module returned
    assert [float(r["loss"]) for r in rows] == pytest.approx(taken[:30], rel=1e-6)
    expected = lightning_suggestion([float(r["lr"]) for r in rows], [float(r["lightning_smoothed_loss"]) for r in rows])
    tuning = yaml.safe_load((run / "tuning.yaml").read_text())
    assert tuning["lr_finder"]["accepted"] is True and tuning["lr"] == pytest.approx(expected)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["optim"]["lr"] == pytest.approx(expected) and config["trainer"]["tune_lr"] is False
    # the optimizer's peak (base) learning rate is the suggestion...
    state = ckpt(run / "checkpoints" / "last.ckpt")
    assert state["optimizer_states"][0]["param_groups"][0]["initial_lr"] == pytest.approx(expected)
    # ...and the warmup leads to it: 4 steps per epoch, warmup 1 epoch → lr_k = s·k/4 (official Barlow Twins
    # schedule), the suggestion itself at step 4, then cosine
    logged_lr = dict(column(metrics(run), "lr-AdamW/pg1"))
    for k in range(5):
        assert logged_lr[k] == pytest.approx(expected * k / 4)
    png = (run / "media" / "lr_finder.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_lr_finder_refuses_a_curve_that_never_decreases(tiny, tmp_path, caplog):
    # Rates far too small to move the weights: the loss stays where it started, whatever Lightning suggests.
    args = tiny("flat", **{**SEG_LR, "trainer__tune_lr_steps": 20, "trainer__tune_lr_min": 1e-10,
                           "trainer__tune_lr_max": 1e-9}, optim__lr=3e-3, trainer__max_epochs=1)
    assert main.main(args) == 0
    run = tmp_path / "runs" / "flat"
    tuning = yaml.safe_load((run / "tuning.yaml").read_text())
    finder = tuning["lr_finder"]
    assert finder["suggestion"] is not None and finder["accepted"] is False and tuning["lr"] is None
    assert finder["reason"].startswith("the loss never decreases")
    assert finder["start_loss"] - finder["min_loss"] < 0.05 * finder["start_loss"]
    assert "never decreases" in caplog.text and "training with the configured --optim.lr=0.003" in caplog.text
    assert any("never decreases" in note for note in tuning["notes"])
    # training uses the configured rate
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 3e-3
    state = ckpt(run / "checkpoints" / "last.ckpt")
    assert state["optimizer_states"][0]["param_groups"][0]["initial_lr"] == pytest.approx(3e-3)
    assert (run / "media" / "lr_finder.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ the decision, on planted curves
def u_curve(n: int, noise: float = 0.0, seed: int = 0) -> tuple[list[float], list[float], int]:
    """(lrs, losses, steepest-descent index) of a range test from 1e-6 to 1: flat at 3, falling to ~1.5
    around 1e-3..1e-2, then diverging; ``noise``: relative Gaussian batch noise."""
    lrs = np.logspace(-6, 0, n)
    x = np.log10(lrs)
    clean = 3.0 - 1.5 / (1 + np.exp(-3 * (x + 3.5))) + 6.0 * np.exp(3 * x)
    noisy = clean * (1 + noise * np.random.default_rng(seed).standard_normal(n))
    return list(lrs), list(noisy), int(np.argmin(np.gradient(clean, x)))


def test_check_accepts_a_u_shaped_curve():
    lrs, losses, steepest = u_curve(40, noise=0.03)
    check = tuning.check_lr_curve(lrs, losses, steepest)
    assert check.accepted, check.reason
    assert check.points == 40 and check.window == 9  # h = 40 // 10 = 4
    assert check.start_loss == pytest.approx(np.mean(losses[:9]))
    means = [np.mean(losses[i - 4:i + 5]) for i in range(4, 36)]
    assert check.min_loss == pytest.approx(min(means)) and check.min_lr == lrs[4 + int(np.argmin(means))]


@pytest.mark.parametrize("n, accepted", [(13, False), (19, False), (20, True)])
def test_check_refuses_too_few_steps(n, accepted):
    lrs, losses, steepest = u_curve(n)
    check = tuning.check_lr_curve(lrs, losses, steepest)
    assert check.accepted is accepted, check.reason
    if not accepted:
        assert check.reason.startswith(f"too few steps: {n} finite losses")


def test_check_refuses_a_curve_that_rises_all_the_way():
    # the curve: 13 steps would be refused anyway; 30 rising ones are refused for rising
    lrs = list(np.logspace(-6, 0, 30))
    losses = list(300 + 170 * np.linspace(0, 1, 30) ** 2 + np.random.default_rng(1).normal(0, 5, 30))
    check = tuning.check_lr_curve(lrs, losses, 20)
    assert not check.accepted and check.reason.startswith("the loss never decreases")
    assert check.min_loss == pytest.approx(check.start_loss)  # the first window is the lowest


@pytest.mark.parametrize("seed", range(5))
def test_check_tells_batch_noise_from_a_dip(seed):
    rng = np.random.default_rng(seed)
    lrs = list(np.logspace(-6, 0, 30))
    # pure batch noise on a flat loss of ~300 (15 %: more than the quickstart's Barlow Twins, ~6 %): refused
    assert not tuning.check_lr_curve(lrs, list(300 * (1 + 0.15 * rng.standard_normal(30))), 15).accepted
    # quickstart-like noise (6 %) on a 33 % dip: accepted
    noisy = 300 * (1 + 0.06 * rng.standard_normal(30))
    dip = noisy - 100 * np.exp(-0.5 * ((np.arange(30) - 18) / 3) ** 2)
    assert tuning.check_lr_curve(lrs, list(dip), 15).accepted
    assert not tuning.check_lr_curve(lrs, list(noisy), 15).accepted  # the same noise without the dip


def test_required_drop_by_hand():
    # no noise: 5 % of the start level. Flat at 2 for 8 steps, down to 2·(1 - depth) over 4, flat for 11, up again
    lrs = list(np.logspace(-6, 0, 30))
    k = np.arange(30)
    for depth, accepted in [(0.04, False), (0.06, True)]:
        losses = list(2.0 - 2.0 * depth * np.clip((k - 8) / 4, 0, 1) * np.clip((26 - k) / 4, 0, 1))
        check = tuning.check_lr_curve(lrs, losses, 13)
        assert (check.start_loss, check.min_loss) == (pytest.approx(2.0), pytest.approx(2.0 * (1 - depth)))
        assert check.required_drop == pytest.approx(0.1)
        assert check.accepted is accepted, check.reason
    # alternating noise ±a on a flat curve: first differences ±2a, MAD 2a → σ = 1.4826·2a/√2; w = 9 at n = 41
    a = 0.5
    losses = [10.0 + a * (-1) ** k for k in range(41)]
    check = tuning.check_lr_curve(list(np.logspace(-6, 0, 41)), losses, 20)
    sigma = 1.4826 * 2 * a / np.sqrt(2)
    assert check.required_drop == pytest.approx(max(0.05 * check.start_loss, 4 * sigma * np.sqrt(2 / 9)))
    assert not check.accepted


def test_check_refuses_a_suggestion_at_the_edge_and_no_suggestion():
    # still falling fastest at the largest rate tried: the range did not bracket a good rate
    lrs = list(np.logspace(-6, -2, 30))
    losses = list(3.0 - 2.0 * np.linspace(0, 1, 30) ** 3)
    for index, accepted in [(27, False), (28, False), (26, True)]:  # h = 3
        check = tuning.check_lr_curve(lrs, losses, index)
        assert check.accepted is accepted, (index, check.reason)
    assert "at the end of the curve" in tuning.check_lr_curve(lrs, losses, 28).reason
    assert tuning.check_lr_curve(lrs, losses, None).reason == "the LR finder made no suggestion"
    # falling fastest where the test began: the range started too high
    losses = list(1.0 + 2.0 * (1 - np.linspace(0, 1, 30)) ** 3)
    for index, accepted in [(0, False), (2, False), (3, True)]:
        check = tuning.check_lr_curve(lrs, losses, index)
        assert check.accepted is accepted, (index, check.reason)
    assert "at the start of the curve" in tuning.check_lr_curve(lrs, losses, 0).reason


def test_check_refuses_a_suggestion_off_the_falling_part():
    # flat at 3 up to lr ~1e-3, falls to ~1.5 around 3e-3, rises from ~0.1: 40 steps, h = 4
    lrs = np.logspace(-6, 0, 40)
    x = np.log10(lrs)
    clean = 3.0 - 1.5 / (1 + np.exp(-6 * (x + 2.5))) + 20.0 * np.exp(6 * x)
    losses = list(clean * (1 + 0.02 * np.random.default_rng(0).standard_normal(40)))
    lowest = int(np.argmin(clean))
    steepest = int(np.argmin(np.gradient(clean, x)))
    risen = next(i for i in range(lowest, 40) if clean[i] > clean[lowest] + 0.15)  # on the rising side
    assert clean[8] == pytest.approx(3.0, abs=0.01) and steepest < lowest < risen < 36  # none at the edge
    flat = tuning.check_lr_curve(list(lrs), losses, 8)
    assert not flat.accepted and "before the loss falls" in flat.reason
    rising = tuning.check_lr_curve(list(lrs), losses, risen)
    assert not rising.accepted and "past the lowest loss" in rising.reason
    assert tuning.check_lr_curve(list(lrs), losses, steepest).accepted


def test_check_judges_the_curve_up_to_its_divergence():
    lrs, losses, steepest = u_curve(30)
    check = tuning.check_lr_curve(lrs + [2.0] * 5, losses + [float("nan")] * 5, steepest)
    assert check.accepted and check.points == 30
    check = tuning.check_lr_curve(lrs, losses[:15] + [float("inf")] + losses[16:], steepest)
    assert not check.accepted and check.points == 15 and check.reason.startswith("too few steps")


def test_unsmoothed_losses_undo_lightnings_smoothing():
    raw = [5.0, 4.0, 6.5, 3.25, 3.0, 2.0, 8.0]
    beta, avg, smoothed = 0.98, 0.0, []
    for k, loss in enumerate(raw):  # pytorch_lightning/tuner/lr_finder.py, _LRCallback.on_train_batch_end
        current_step = 1 + k  # the trainer's global step after the k-th step of a fresh run
        avg = beta * avg + (1 - beta) * loss
        smoothed.append(avg / (1 - beta ** (current_step + 1)))
    assert smoothed[0] == pytest.approx(0.505 * raw[0], rel=1e-3)  # the one-step-off bias correction
    assert tuning.unsmoothed_losses(smoothed) == pytest.approx(raw, rel=1e-9)
    broken = tuning.unsmoothed_losses(smoothed[:3] + [float("nan")] + smoothed[4:])
    assert broken[:3] == pytest.approx(raw[:3]) and all(np.isnan(broken[3:]))


def test_tuned_config_yaml_reproduces_the_tuned_run(tiny, tmp_path, monkeypatch):
    from lightningmodules.barlow_twins import BarlowTwinsModule

    taken = record_training_losses(monkeypatch, BarlowTwinsModule)
    args = tiny("tuned", trainer__tune_batch_size="true", trainer__tune_batch_size_max=16,
                trainer__tune_lr="true", trainer__tune_lr_steps=20, backbone__drop_path_rate=0.1)
    assert main.main(args) == 0
    tuned = tmp_path / "runs" / "tuned"
    # after the batch search, the finder's 20 steps, then training's 4: the recovered losses are those 20
    with (tuned / "media" / "lr_finder.csv").open() as f:
        assert [float(r["loss"]) for r in csv.DictReader(f)] == pytest.approx(taken[-24:-4], rel=1e-6)
    # the rate trained with (and written to config.yaml): the suggestion if the check accepted it, else optim.lr
    tuning_yaml = yaml.safe_load((tuned / "tuning.yaml").read_text())
    finder = tuning_yaml["lr_finder"]
    used = finder["suggestion"] if finder["accepted"] else 5e-4
    assert yaml.safe_load((tuned / "config.yaml").read_text())["optim"]["lr"] == pytest.approx(used)
    assert tuning_yaml["lr"] == (finder["suggestion"] if finder["accepted"] else None)
    assert main.main(["--config", str(tuned / "config.yaml"), "--log.run_name=again"]) == 0
    assert not (tmp_path / "runs" / "again" / "tuning.yaml").exists()  # no second search
    first, again = column(metrics(tuned), "train/loss_step"), column(metrics(tmp_path / "runs" / "again"), "train/loss_step")
    assert first == again and len(first) == 4


@pytest.mark.parametrize("flags, message", [
    (["--trainer.tune_lr=true", "--trainer.resume={ckpt}"], "apply to new runs"),
    (["--trainer.tune_lr=true", "--trainer.tune_lr_steps=5"], "tune_lr_steps must be >= 20"),
    (["--trainer.tune_batch_size=true", "--trainer.devices=2"], "need --trainer.devices=1"),
    (["--trainer.tune_lr_min=1", "--trainer.tune_lr_max=0.1"], "0 < min < max"),
])
def test_tuning_flag_errors(tiny, tmp_path, flags, message):
    import torch

    from config.loading import ConfigError, parse_config, save_config
    from config.validation import validate

    # a run directory to resume: <runs>/x/config.yaml and its checkpoints/last.ckpt
    run = tmp_path / "runs" / "x"
    (run / "checkpoints").mkdir(parents=True)
    save_config(parse_config(tiny("x")), run / "config.yaml")
    torch.save({"state_dict": {}, "global_step": 4, "epoch": 0}, run / "checkpoints" / "last.ckpt")
    flags = [f.format(ckpt=run / "checkpoints" / "last.ckpt") for f in flags]
    with pytest.raises(ConfigError, match=message):
        validate(parse_config(tiny("x") + flags))
