"""The report's experiments as configs: each parses strictly, validates, and quotes the report's number."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import main
from config.loading import load_yaml, parse_config
from config.validation import validate

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted((ROOT / "config" / "experiments").rglob("*.yaml"))
TABLE_ROWS = [p for p in EXPERIMENTS if p.parent.name in ("table1", "table2")]
REPORT = ROOT.parent / "shared" / "report.md"


def test_every_table_row_has_a_config():
    assert len([p for p in TABLE_ROWS if p.parent.name == "table1"]) == 4
    assert len([p for p in TABLE_ROWS if p.parent.name == "table2"]) == 7


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[f"{p.parent.name}/{p.stem}" for p in EXPERIMENTS])
def test_experiment_config_parses_and_validates(path, tmp_path):
    cfg = parse_config(["--config", str(path)])
    assert cfg.data.img_size == 224 and cfg.optim.name == "adamw"
    if cfg.task == "segmentation":
        assert cfg.segmentation.freeze_backbone is True
    # Offline stand-ins for what a user downloads or pretrains first: data and weight files.
    overrides = ["--data.dataset=synthetic", f"--data.root={tmp_path}"]
    if cfg.backbone.weights:
        stand_in = tmp_path / Path(cfg.backbone.weights).name
        stand_in.write_bytes(b"")
        overrides.append(f"--backbone.weights={stand_in}")
    validate(parse_config(["--config", str(path), *overrides]))


@pytest.mark.skipif(not REPORT.is_file(), reason="shared/report.md not beside the project")
@pytest.mark.parametrize("path", TABLE_ROWS, ids=[f"{p.parent.name}/{p.stem}" for p in TABLE_ROWS])
def test_quoted_miou_is_the_reports(path):
    quoted = re.search(r"Report's mIoU \(val\): ([0-9.]+)", path.read_text())
    assert quoted, f"{path} does not quote the report's mIoU"
    # Table rows in the report end with "<mIoU>\t<wandb run name>"
    rows = [line.split("\t") for line in REPORT.read_text().splitlines() if f"\t{quoted.group(1)}\t" in line]
    assert len(rows) == 1, f"{quoted.group(1)} is not a table value of the report"
    assert f"run {rows[0][-1].strip()}" in path.read_text()


def test_random_vits16_row_runs_end_to_end_with_tiny_overrides(tiny, tmp_path):
    path = ROOT / "config" / "experiments" / "table2" / "random_vits16_setr_naive.yaml"
    assert load_yaml(path)["segmentation"]["head"] == "setr_pytorch_naive"  # the report's setr-pytorch head
    args = ["--config", str(path), *tiny("row"), "--task=segmentation", "--segmentation.hidden_dim=8",
            "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.precision=32-true"]
    assert main.main(args) == 0
