"""tools.summarize on hand-written run directories (config.yaml + metrics.csv, as main.py writes them)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import pytest
import torch
import yaml

from config.hparams import Hparams
from config.loading import to_dict
from tools import summarize
from tools.summarize import SummaryError

HEADER = ["epoch", "lr-AdamW/pg1", "step", "train/loss_epoch", "train/loss_step", "val/loss"]


def make_run(root: Path, name: str, rows: list[dict], depth: int = 0, proj_dim: int = 512,
             lr: float = 5e-4, extra: Optional[dict] = None, max_epochs: Optional[int] = None,
             epochs_done: Optional[int] = -1, steps_per_epoch: int = 4) -> Path:
    """A run directory as main.py leaves it: config.yaml, metrics.csv and checkpoints/last.ckpt holding the
    fit loop's progress after ``epochs_done`` epochs (-1: as many as ``max_epochs`` asks, i.e. finished;
    None: no checkpoint). ``max_epochs`` defaults to the epochs in ``rows``."""
    run = root / name
    run.mkdir(parents=True)
    cfg = Hparams()
    cfg.backbone.depth, cfg.barlow.proj_dim, cfg.optim.lr = depth, proj_dim, lr
    cfg.log.run_name, cfg.log.output_dir = name, str(root)
    cfg.trainer.max_epochs = max_epochs if max_epochs is not None else 1 + max(
        [int(r["epoch"]) for r in rows if r.get("epoch") is not None] or [0])
    config = to_dict(cfg)
    for group, values in (extra or {}).items():
        config[group] = {**config[group], **values} if isinstance(values, dict) else values
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with (run / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HEADER)
        writer.writeheader()
        writer.writerows(rows)
    if epochs_done is not None:
        done = cfg.trainer.max_epochs if epochs_done == -1 else epochs_done
        write_checkpoint(run, epoch=done - 1, processed=done, global_step=done * steps_per_epoch)
    return run


def write_checkpoint(run: Path, epoch: int, processed: int, global_step: int) -> None:
    """The bookkeeping part of a Lightning checkpoint written at the end of epoch ``epoch`` (0-based)."""
    (run / "checkpoints").mkdir(exist_ok=True)
    progress = {"ready": processed, "started": processed, "processed": processed, "completed": processed}
    torch.save({"epoch": epoch, "global_step": global_step, "state_dict": {"w": torch.zeros(3)},
                "loops": {"fit_loop": {"epoch_progress": {"total": progress, "current": progress}}}},
               run / "checkpoints" / "last.ckpt")


def history(val: list[float], steps_per_epoch: int = 4) -> list[dict]:
    """Rows like Lightning's CSV logger: lr rows, train-step rows, then a validation row per epoch (empty cells)."""
    rows = []
    for epoch, v in enumerate(val):
        for s in range(steps_per_epoch):
            step = epoch * steps_per_epoch + s
            rows.append({"step": step, "lr-AdamW/pg1": 1e-3})
            rows.append({"epoch": epoch, "step": step, "train/loss_step": 10.0 - step * 0.1})
        last = (epoch + 1) * steps_per_epoch - 1
        rows.append({"epoch": epoch, "step": last, "val/loss": v})
        rows.append({"epoch": epoch, "step": last, "train/loss_epoch": 9.0 - epoch})
    return rows


def read_csv(path: Path) -> dict[str, dict]:
    with path.open(newline="") as f:
        return {r["run"]: r for r in csv.DictReader(f)}


def test_grid_summary_table_csv_and_plot(tmp_path):
    root = tmp_path / "runs"
    values = {}
    for i, (depth, dim) in enumerate([(d, p) for d in (4, 8) for p in (512, 1024)]):
        val = [30.0 - depth, 20.0 - depth + dim / 512, 25.0 - depth + dim / 512]  # best is not the last value
        values[f"s-{i}"] = (depth, dim, val)
        make_run(root, f"s-{i}", history(val), depth=depth, proj_dim=dim)
    (root / "s-0" / "wandb" / "offline-run-x" / "files").mkdir(parents=True)  # wandb's own config.yaml is no run
    (root / "s-0" / "wandb" / "offline-run-x" / "files" / "config.yaml").write_text("a: 1\n")

    report = summarize.summarize(root)
    assert [g.task for g in report.groups] == ["barlow_twins"] and not report.left_out
    assert report.groups[0].params == ["backbone.depth", "barlow.proj_dim"]  # found automatically, run names excluded
    rows = read_csv(root / "summary.csv")
    assert set(rows) == set(values)
    for name, (depth, dim, val) in values.items():
        r = rows[name]
        assert (int(r["backbone.depth"]), int(r["barlow.proj_dim"])) == (depth, dim)
        assert float(r["final"]) == val[-1] and float(r["best"]) == min(val)
        assert r["best_step"] == "7" and r["final_step"] == "11" and r["steps"] == "12" and r["epochs"] == "3"
        assert r["task"] == "barlow_twins" and r["status"] == "finished"
    table = (root / "summary.md").read_text()
    assert "| run | backbone.depth | barlow.proj_dim | final val/loss | best val/loss |" in table
    assert "backbone.depth (rows) × barlow.proj_dim (columns)" in table  # the 2-D grid
    assert "Best final val/loss (min): **18** — s-2 (backbone.depth=8, barlow.proj_dim=512)" in table
    png = (root / "summary.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_params_goal_metric_and_out(tmp_path):
    root = tmp_path / "runs"
    for i, lr in enumerate([1e-5, 1e-4, 1e-3]):
        make_run(root, f"lr-{i}", history([3.0, 2.0 + i]), lr=lr, depth=i)
    out = tmp_path / "report"
    report = summarize.summarize(root, metric="train/loss_step", params=["optim.lr"], goal="max", out=out)
    assert report.groups[0].params == ["optim.lr"]
    assert (out / "summary.md").is_file() and (out / "summary.png").is_file() and not (root / "summary.md").exists()
    rows = read_csv(out / "summary.csv")
    assert float(rows["lr-0"]["best"]) == 10.0 and rows["lr-0"]["best_step"] == "0"  # max: the first step
    assert float(rows["lr-0"]["final"]) == pytest.approx(10.0 - 7 * 0.1)
    assert list(rows) == ["lr-0", "lr-1", "lr-2"]  # sorted by the parameter
    # default params: everything that differs (depth and lr here)
    assert summarize.summarize(root).groups[0].params == ["backbone.depth", "optim.lr"]


def test_nested_folders_and_a_run_without_the_metric(tmp_path, capsys):
    root = tmp_path / "all"
    make_run(root / "sweepA", "a-1", history([5.0, 4.0]), proj_dim=256)
    make_run(root / "sweepB", "b-1", [{"epoch": 0, "step": 0, "train/loss_step": 1.0}], proj_dim=128)
    assert summarize.main([str(root)]) == 0
    captured = capsys.readouterr()
    assert "warning: sweepB/b-1 logged no val/loss" in captured.err
    rows = read_csv(root / "summary.csv")
    assert rows["sweepA/a-1"]["final"] == "4.0" and rows["sweepB/b-1"]["final"] == ""


def test_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SummaryError, match="no run directories"):
        summarize.summarize(tmp_path / "empty")
    root = tmp_path / "runs"
    make_run(root, "r", history([1.0]))
    with pytest.raises(SummaryError) as err:
        summarize.summarize(root, metric="val/acc")
    assert "logged metrics: lr-AdamW/pg1, train/loss_epoch, train/loss_step, val/loss" in str(err.value)
    with pytest.raises(SummaryError, match=r"'backbone.dpth' is not a config field \(did you mean backbone.depth"):
        summarize.summarize(root, params=["backbone.dpth"])
    for argv, text in [([str(root), "--metric", "val/los"], "did you mean val/loss"),
                       ([str(root), "--params", "depth"], "backbone.depth"),
                       ([str(tmp_path / "absent")], "no such folder"),
                       ([str(root), "--goal", "best"], "min or max")]:
        assert summarize.main(argv) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], lines
        assert "Traceback" not in captured.err


def test_single_run_and_categorical_parameter(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "only", history([2.0]))
    make_run(root, "tagged", history([2.5]), extra={"log": {**to_dict(Hparams())["log"], "wandb_tags": "x"}})
    assert summarize.summarize(root).groups[0].params == []  # only names and wandb settings differ: one bar per run
    assert (root / "summary.png").stat().st_size > 5_000
    make_run(root, "lars", history([3.0]), extra={"optim": {**to_dict(Hparams())["optim"], "name": "lars"}})
    summary = summarize.summarize(root).groups[0]
    assert summary.params == ["optim.name"]
    assert [r.params["optim.name"] for r in summary.rows] == ["adamw", "adamw", "lars"]


# ------------------------------------------------------------------------------------ like with like
SEG_TASK = {"task": "segmentation"}


def test_tasks_apart_finished_runs_only_lengths_never_averaged(tmp_path, capsys):
    root = tmp_path / "runs"
    long = history([9.0] * 14 + [5.0])  # 15 epochs
    make_run(root, "bt-a", long, depth=4)
    make_run(root, "bt-b", history([9.0] * 14 + [6.0]), depth=4)  # same setting as bt-a: averaged with it
    make_run(root, "bt-short", history([7.0]), depth=4)  # asked for 1 epoch: finished, but another length
    make_run(root, "bt-killed", history([9.0, 8.0, 4.0]), depth=4, max_epochs=15, epochs_done=3)
    make_run(root, "bt-no-ckpt", history([3.0]), depth=4, max_epochs=15, epochs_done=None)
    make_run(root, "seg-1", history([2.5, 2.0]), extra=SEG_TASK)
    make_run(root, "seg-2", history([2.5, 1.5]), extra=SEG_TASK, depth=8)
    evaluated = make_run(root, "seg-eval", [{"epoch": 0, "step": 0, "val/loss": 1.9}], epochs_done=None,
                         extra={**SEG_TASK, "trainer": {"eval_only": True}})
    (evaluated / "eval_metrics.yaml").write_text("val/loss: 1.9\n")
    make_run(root, "seg-eval-killed", [{"epoch": 0, "step": 0, "val/loss": 0.1}], epochs_done=None,
             extra={**SEG_TASK, "trainer": {"eval_only": True}})

    assert summarize.main([str(root), "--params", "backbone.depth", "--metric", "val/loss"]) == 0
    captured = capsys.readouterr()
    report_md = (root / "summary.md").read_text()
    assert captured.out.startswith(report_md)
    rows = read_csv(root / "summary.csv")
    # only finished runs, each in its own task's table
    assert set(rows) == {"bt-a", "bt-b", "bt-short", "seg-1", "seg-2", "seg-eval"}
    assert {n: r["task"] for n, r in rows.items()} == {
        "bt-a": "barlow_twins", "bt-b": "barlow_twins", "bt-short": "barlow_twins",
        "seg-1": "segmentation", "seg-2": "segmentation", "seg-eval": "segmentation (eval-only)"}
    assert "## barlow_twins: 3 runs" in report_md and "## segmentation: 2 runs" in report_md
    assert "## segmentation (eval-only): 1 run" in report_md
    # epochs and steps trained, from the checkpoint
    assert (rows["bt-a"]["epochs"], rows["bt-a"]["steps"]) == ("15", "60")
    assert (rows["bt-short"]["epochs"], rows["bt-short"]["steps"]) == ("1", "4")
    assert "| **bt-a** | 4 | 15 | 5 | 5 | 59 | 15/15 | 60 |" in report_md
    # runs of different lengths are not averaged: max_epochs joins the parameters, a 2-D grid results
    assert rows["bt-a"]["trainer.max_epochs"] == "15" and rows["bt-short"]["trainer.max_epochs"] == "1"
    assert "barlow_twins runs differ in trainer.max_epochs" in captured.err
    grid = report_md.split("Final val/loss, backbone.depth (rows) × trainer.max_epochs (columns):")[1]
    assert "| backbone.depth=4 | 7 | 5.5 (mean of 2) |" in grid.split("##")[0]  # (5 + 6) / 2, bt-short alone
    assert "mean of 3" not in report_md and "mean of 4" not in report_md
    # the unfinished ones are named, with how far they got, and --include-unfinished is suggested
    left = report_md[report_md.index("Left out, unfinished (3;"):]
    assert "bt-killed (barlow_twins, stopped at epoch 3 of 15)" in left
    assert "bt-no-ckpt (barlow_twins, no checkpoints/last.ckpt)" in left
    assert "seg-eval-killed (segmentation (eval-only), evaluation did not finish (no eval_metrics.yaml))" in left
    # one plot per task
    for task in ("barlow_twins", "segmentation", "segmentation_eval-only"):
        assert (root / f"summary_{task}.png").read_bytes()[:4] == b"\x89PNG"
    assert not (root / "summary.png").exists()


def test_include_unfinished_marks_them(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "done", history([9.0, 5.0]), depth=4, proj_dim=128)
    make_run(root, "done-too", history([9.0, 7.0]), depth=4, proj_dim=256)
    make_run(root, "killed", history([9.0, 1.0]), depth=4, proj_dim=128, max_epochs=2, epochs_done=1)
    report = summarize.summarize(root, include_unfinished=True)
    assert not report.left_out and report.groups[0].params == ["barlow.proj_dim"]
    rows = read_csv(root / "summary.csv")
    assert rows["killed"]["status"] == "stopped at epoch 1 of 2" and rows["done"]["status"] == "finished"
    assert rows["killed"]["epochs"] == "1" and rows["killed"]["steps"] == "4"
    table = (root / "summary.md").read_text()
    assert "1 of them unfinished" in table and "| **killed** | 128 | 1 | 1 | 7 | 1/2 | 4 | stopped at epoch 1 of 2 |" in table
    assert "Best final val/loss (min): **1** — killed (barlow.proj_dim=128) (unfinished)" in table
    # without the flag the same folder gives the finished runs only
    report = summarize.summarize(root)
    assert [r.name for r in report.left_out] == ["killed"]
    assert sorted(r.run.name for r in report.groups[0].rows) == ["done", "done-too"]


def test_max_steps_and_broken_checkpoints(tmp_path):
    root = tmp_path / "runs"
    # max_steps reached before max_epochs: finished (Lightning stops at whichever comes first)
    make_run(root, "by-steps", history([3.0, 2.0]), max_epochs=10, epochs_done=2,
             extra={"trainer": {"max_steps": 8}})
    make_run(root, "short-of-steps", history([3.0, 2.0]), max_epochs=10, epochs_done=1,
             extra={"trainer": {"max_steps": 8}})
    cut = make_run(root, "cut", history([3.0, 1.0]))
    (cut / "checkpoints" / "last.ckpt").write_bytes((cut / "checkpoints" / "last.ckpt").read_bytes()[:100])
    report = summarize.summarize(root)
    assert [r.run.name for r in report.groups[0].rows] == ["by-steps"]
    statuses = {r.name: r.progress.status for r in report.left_out}
    assert statuses == {"short-of-steps": "stopped at epoch 1 of 10 / step 4 of 8",
                        "cut": "checkpoints/last.ckpt is unreadable (cut short?)"}
    # nothing finished at all: one clear error, exit status 2
    (tmp_path / "none").mkdir()
    make_run(tmp_path / "none", "k", history([3.0]), max_epochs=5, epochs_done=1)
    with pytest.raises(SummaryError, match=r"none of the 1 runs .* finished \(k: stopped at epoch 1 of 5\); "
                                           r"--include-unfinished"):
        summarize.summarize(tmp_path / "none")


def test_a_real_run_is_finished_and_a_longer_config_is_not(tiny, tmp_path):
    import main

    assert main.main(tiny("real", trainer__max_epochs=1)) == 0
    run = tmp_path / "runs" / "real"
    progress = summarize.run_progress(run, summarize.flatten(yaml.safe_load((run / "config.yaml").read_text())))
    assert progress == summarize.Progress(True, "finished", epochs=1, steps=4)  # 32 images / batch 8
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["trainer"]["max_epochs"] = 3  # as if it had been asked for 3 epochs and killed after the first
    progress = summarize.run_progress(run, summarize.flatten(config))
    assert progress == summarize.Progress(False, "stopped at epoch 1 of 3", epochs=1, steps=4)
