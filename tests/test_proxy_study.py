"""The proxy study's bookkeeping: best-epoch selection, pretraining summaries, the results table."""
from __future__ import annotations

import csv
from pathlib import Path

from tools import proxy_study


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    run_dir.mkdir(parents=True)
    keys = sorted({k for r in rows for k in r})
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def test_report_takes_each_probes_best_epoch_and_summarises_pretraining(tmp_path):
    write_metrics(tmp_path / "pretrain-global-e2", [
        {"epoch": 0, "step": 0, "val/attn_jaccard": 0.20},
        {"epoch": 0, "step": 3, "time/train_epoch_s": 30.0, "val/loss_per_dim": 0.9},
        {"epoch": 1, "step": 7, "time/train_epoch_s": 90.0, "val/loss_per_dim": 0.7, "val/attn_jaccard": 0.25},
    ])
    for row in ("random-init ViT", "raw pixels", "BT global, 2 epochs", "BT dense, 2 epochs"):
        write_metrics(tmp_path / proxy_study.probe_name(row, "linear"), [
            {"epoch": 0, "step": 9, "val/mIoU": 0.10, "val/mIoU_fg": 0.05},
            {"epoch": 1, "step": 19, "val/mIoU": 0.30, "val/mIoU_fg": 0.20},  # best
            {"epoch": 2, "step": 29, "val/mIoU": 0.25, "val/mIoU_fg": 0.22},
        ])
    text = proxy_study.write_report(tmp_path, budgets=[2], heads=["linear"])
    assert "| pretrain-global-e2 | 2 | 2.0 | 0.7000 | nan | 0: 0.200, 7: 0.250 |" in text
    assert "| raw pixels | 0.300 (0.200) |" in text
    with (tmp_path / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(float(r["mIoU"]) == 0.30 and r["epoch"] == "1" for r in rows)


def test_probe_rows_wait_for_their_pretraining(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(proxy_study, "run", lambda name, *a, **k: calls.append(name) or True)
    proxy_study.main(["--output-dir", str(tmp_path), "--stage", "probe", "--budgets", "3", "--heads", "linear",
                      "--no-floors"])
    assert calls == []
    assert "probes of pretrain-global-e3: that pretraining run has not finished" in capsys.readouterr().out
    (tmp_path / "pretrain-global-e3").mkdir()
    (tmp_path / "pretrain-global-e3" / "done").write_text("1\n")
    proxy_study.main(["--output-dir", str(tmp_path), "--stage", "probe", "--budgets", "3", "--heads", "linear"])
    assert calls == ["probe-random-init-vit-linear", "probe-raw-pixels-linear", "probe-bt-global-3-epochs-linear"]


def fake_finished_run(run_dir: Path, argv: list[str], epochs: int) -> None:
    """A run directory as main.py leaves it: config.yaml of ``argv`` and a last.ckpt that processed ``epochs``."""
    import torch

    from config.loading import parse_config, save_config
    from tools.sweep import in_repo_root

    with in_repo_root():
        cfg = parse_config(argv)
    (run_dir / "checkpoints").mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    torch.save({"global_step": 7 * epochs, "loops": {"fit_loop": {"epoch_progress": {"total": {"processed": epochs}}}}},
               run_dir / "checkpoints" / "last.ckpt")


def test_a_finished_run_without_its_done_marker_is_not_run_again(tmp_path, monkeypatch):
    """A study stopped between a run's end and its marker: the run directory itself says it finished."""
    import subprocess

    launched = []
    monkeypatch.setattr(subprocess, "run", lambda command, **k: launched.append(command) or subprocess.CompletedProcess(command, 1, "", "x"))
    flags = ["--trainer.max_epochs=3"]
    fake_finished_run(tmp_path / "pre", ["--config", proxy_study.OBJECTIVES["global"], *flags], epochs=3)
    assert proxy_study.run("pre", proxy_study.OBJECTIVES["global"], flags, tmp_path, []) is True
    assert launched == [] and (tmp_path / "pre" / "done").is_file()
    # Same directory, other config (more epochs; or another objective): it runs, resuming the checkpoint.
    for name, config, more in (("pre2", proxy_study.OBJECTIVES["global"], ["--trainer.max_epochs=6"]),
                               ("pre3", proxy_study.OBJECTIVES["dense"], flags)):
        fake_finished_run(tmp_path / name, ["--config", proxy_study.OBJECTIVES["global"], *flags], epochs=3)
        assert proxy_study.run(name, config, more, tmp_path, []) is False  # the stubbed main.py "failed"
    assert len(launched) == 2 and all("--trainer.resume=auto" in c for c in launched)
