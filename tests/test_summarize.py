"""utils.summarize on hand-written run directories (config.yaml + metrics.csv, as main.py writes them)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import pytest
import yaml

from config.hparams import Hparams
from config.loading import to_dict
from utils import summarize
from utils.summarize import SummaryError

HEADER = ["epoch", "lr-AdamW/pg1", "step", "train/loss_epoch", "train/loss_step", "val/loss"]


def make_run(root: Path, name: str, rows: list[dict], depth: int = 0, proj_dim: int = 512,
             lr: float = 5e-4, extra: Optional[dict] = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    cfg = Hparams()
    cfg.backbone.depth, cfg.barlow.proj_dim, cfg.optim.lr = depth, proj_dim, lr
    cfg.log.run_name, cfg.log.output_dir = name, str(root)
    config = to_dict(cfg)
    config.update(extra or {})
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with (run / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HEADER)
        writer.writeheader()
        writer.writerows(rows)
    return run


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

    summary = summarize.summarize(root)
    assert summary.params == ["backbone.depth", "barlow.proj_dim"]  # found automatically, run names excluded
    rows = read_csv(root / "summary.csv")
    assert set(rows) == set(values)
    for name, (depth, dim, val) in values.items():
        r = rows[name]
        assert (int(r["backbone.depth"]), int(r["barlow.proj_dim"])) == (depth, dim)
        assert float(r["final"]) == val[-1] and float(r["best"]) == min(val)
        assert r["best_step"] == "7" and r["final_step"] == "11" and r["steps"] == "12" and r["epochs"] == "3"
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
    summary = summarize.summarize(root, metric="train/loss_step", params=["optim.lr"], goal="max", out=out)
    assert summary.params == ["optim.lr"]
    assert (out / "summary.md").is_file() and (out / "summary.png").is_file() and not (root / "summary.md").exists()
    rows = read_csv(out / "summary.csv")
    assert float(rows["lr-0"]["best"]) == 10.0 and rows["lr-0"]["best_step"] == "0"  # max: the first step
    assert float(rows["lr-0"]["final"]) == pytest.approx(10.0 - 7 * 0.1)
    assert list(rows) == ["lr-0", "lr-1", "lr-2"]  # sorted by the parameter
    # default params: everything that differs (depth and lr here)
    assert summarize.summarize(root).params == ["backbone.depth", "optim.lr"]


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
    assert summarize.summarize(root).params == []  # only names and wandb settings differ: one bar per run
    assert (root / "summary.png").stat().st_size > 5_000
    make_run(root, "lars", history([3.0]), extra={"optim": {**to_dict(Hparams())["optim"], "name": "lars"}})
    summary = summarize.summarize(root)
    assert summary.params == ["optim.name"]
    assert [r.params["optim.name"] for r in summary.rows] == ["adamw", "adamw", "lars"]
