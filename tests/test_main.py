"""End to end through main.py: tiny models, generated data, real wandb in offline mode."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import main
from config.loading import parse_config, to_dict
from tests.wandb_records import logged, run_file


def metrics(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_tiny_vit_run_writes_the_run_directory(tiny, tmp_path):
    args = tiny("vit")
    assert main.main(args) == 0
    run = tmp_path / "runs" / "vit"
    # config.yaml is the fully resolved config
    assert yaml.safe_load((run / "config.yaml").read_text()) == to_dict(parse_config(args))
    # checkpoints: last + best by validation loss, with the global step of 2 epochs of 32/8 batches
    assert ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 8
    assert len(list((run / "checkpoints").glob("best-*.ckpt"))) == 1
    assert (run / "media").is_dir()
    assert (run / "code" / "git_commit.txt").is_file()
    # metrics.csv has every logged series
    rows = metrics(run)
    train = column(rows, "train/loss_step")
    assert [s for s, _ in train] == list(range(8))
    assert all(torch.isfinite(torch.tensor(v)) for _, v in train)
    assert len(column(rows, "val/loss")) == 2
    from lightningmodules import TASKS

    for key in TASKS.get("barlow_twins").metrics:  # the declared metric names (sweeps check against them)
        assert column(rows, key), key
    # on/off-diagonal terms recombine into the loss: loss = on + λ·off
    lambd = parse_config(args).barlow.lambd
    for (_, loss), (_, on), (_, off) in zip(train, column(rows, "train/on_diag_step"), column(rows, "train/off_diag_step")):
        assert loss == pytest.approx(on + lambd * off, rel=1e-5)
    # wandb (offline, real files): the run config is our config; the logged losses are metrics.csv's
    config, history = logged(run_file(run))
    ours = to_dict(parse_config(args))
    assert {k: config[k] for k in ours} == ours
    wandb_losses = [(h["trainer/global_step"], h["train/loss_step"]) for h in history if "train/loss_step" in h]
    # pytest 9's approx refuses lists of tuples: compare steps exactly and values approximately
    assert [s for s, _ in wandb_losses] == [s for s, _ in train]
    assert [v for _, v in wandb_losses] == pytest.approx([v for _, v in train])


def test_config_yaml_reproduces_the_run(tiny, tmp_path):
    assert main.main(tiny("first")) == 0
    first = tmp_path / "runs" / "first"
    assert main.main(["--config", str(first / "config.yaml"), "--log.run_name=second"]) == 0
    second = tmp_path / "runs" / "second"
    a, b = metrics(first), metrics(second)
    assert column(a, "train/loss_step") == column(b, "train/loss_step")  # same seed → identical losses
    assert column(a, "val/loss") == column(b, "val/loss")
    # the config names the first run; the first run directory is never written into again
    assert main.main(["--config", str(first / "config.yaml")]) == 0
    assert (tmp_path / "runs" / "first-1" / "checkpoints" / "last.ckpt").is_file()
    assert column(metrics(first), "train/loss_step") == column(b, "train/loss_step")
    # a different seed gives different numbers (so the equality above is not vacuous)
    assert main.main(["--config", str(first / "config.yaml"), "--log.run_name=third", "--seed=1"]) == 0
    assert column(metrics(tmp_path / "runs" / "third"), "train/loss_step") != column(a, "train/loss_step")


def test_resume_continues_from_the_saved_step(tiny, tmp_path):
    # stochastic depth on: the model's own randomness must also continue where it stopped
    assert main.main(tiny("full", trainer__max_epochs=3, backbone__drop_path_rate=0.2)) == 0
    assert main.main(tiny("cut", trainer__max_epochs=1, backbone__drop_path_rate=0.2)) == 0
    cut = tmp_path / "runs" / "cut"
    assert ckpt(cut / "checkpoints" / "last.ckpt")["global_step"] == 4
    # resume by path; the run's own config.yaml is the base, the flag extends the schedule
    assert main.main(["--trainer.resume", str(cut / "checkpoints" / "last.ckpt"), "--trainer.max_epochs=3"]) == 0
    state, full_state = ckpt(cut / "checkpoints" / "last.ckpt"), ckpt(tmp_path / "runs" / "full" / "checkpoints" / "last.ckpt")
    assert state["global_step"] == full_state["global_step"] == 12
    assert state["epoch"] == full_state["epoch"]
    steps = [s for s, _ in column(metrics(cut), "train/loss_step")]
    assert steps == list(range(12))  # history kept, continued, nothing duplicated
    # optimizer, scheduler and RNG state were restored: the resumed run matches the uninterrupted one
    full = column(metrics(tmp_path / "runs" / "full"), "train/loss_step")
    resumed = column(metrics(cut), "train/loss_step")
    assert [v for _, v in resumed] == pytest.approx([v for _, v in full], rel=1e-5)


def test_resume_auto_finds_the_run(tiny, tmp_path):
    assert main.main(tiny("auto", trainer__max_epochs=1)) == 0
    assert main.main(tiny("auto", trainer__max_epochs=2, trainer__resume="auto")) == 0
    assert ckpt(tmp_path / "runs" / "auto" / "checkpoints" / "last.ckpt")["global_step"] == 8


def test_tiny_input_resnet50_trains(tiny, tmp_path):
    args = tiny("resnet", backbone__name="resnet50", backbone__depth=0, backbone__embed_dim=0,
                backbone__num_heads=0, backbone__patch_size=0, trainer__max_epochs=1, trainer__max_steps=2,
                trainer__limit_val_batches=1)
    assert main.main(args) == 0
    state = ckpt(tmp_path / "runs" / "resnet" / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 2
    assert any(k.startswith("backbone.model.layer4") for k in state["state_dict"])


def corrupt_copy(voc_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "voc"
    shutil.copytree(voc_root, root)
    victim = sorted((root / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg"))[3]
    victim.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root, victim


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupted_jpeg_error_names_the_file(tiny, tmp_path, voc_root, capsys, workers):
    root, victim = corrupt_copy(voc_root, tmp_path)
    args = tiny("corrupt", data__dataset="voc", data__root=str(root), data__num_workers=workers,
                data__pretrain_images="all", trainer__max_epochs=1)
    assert main.main(args) == 1
    err = capsys.readouterr().err
    line = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(line) == 1 and str(victim) in line[0] and "cannot decode image" in line[0]
    assert "Traceback" not in err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, capsys):
    assert main.main(tiny("nan", trainer__max_epochs=1)) == 0
    last = tmp_path / "runs" / "nan" / "checkpoints" / "last.ckpt"
    # the largest learning rate accepted (1000) blows the weights up within a few resumed steps
    rc = main.main(["--trainer.resume", str(last), "--trainer.max_epochs=3", "--optim.lr=1000", "--optim.weight_decay=0",
                    "--trainer.finite_check_every_n_steps=3", "--trainer.checkpoint_every_n_steps=1"])
    assert rc == 1
    err = capsys.readouterr().err
    # the loss guard or the checkpoint's state check (weights blow up before the loss does) stops it
    assert "non-finite" in err and f"last good checkpoint is {last}" in err
    state = ckpt(last)  # whatever step it holds, nothing in it is NaN/inf
    tensors = list(state["state_dict"].values())
    tensors += [v for opt in state["optimizer_states"] for s in opt["state"].values() for v in s.values()
                if torch.is_tensor(v)]
    assert all(torch.isfinite(v).all() for v in tensors if v.is_floating_point())


def test_online_without_credentials_falls_back_to_offline(tiny, tmp_path, monkeypatch, caplog):
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert main.main(tiny("online", log__wandb_mode="online", trainer__max_steps=1, trainer__limit_val_batches=1)) == 0
    assert "no credentials" in caplog.text
    assert run_file(tmp_path / "runs" / "online").is_file()


def test_wandb_disabled_writes_no_wandb_files(tiny, tmp_path):
    assert main.main(tiny("nowandb", log__wandb_mode="disabled", trainer__max_steps=1, trainer__limit_val_batches=1)) == 0
    run = tmp_path / "runs" / "nowandb"
    assert (run / "metrics.csv").is_file() and not (run / "wandb").exists()
