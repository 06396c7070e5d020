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
# Rows added beside the report's (no report number to quote): each says so in its first line.
NEW_ROWS = [p for p in TABLE_ROWS if "not in the report" in p.read_text().splitlines()[0]]
REPORT_ROWS = [p for p in TABLE_ROWS if p not in NEW_ROWS]
REPORT = ROOT.parent / "shared" / "report.md"


def test_every_table_row_has_a_config():
    assert len([p for p in REPORT_ROWS if p.parent.name == "table1"]) == 4
    assert len([p for p in REPORT_ROWS if p.parent.name == "table2"]) == 7
    assert [p.name for p in NEW_ROWS] == ["dino_voc_vits16_setr_naive.yaml"]
    assert not any("Report's mIoU" in p.read_text() for p in NEW_ROWS)


def test_dino_from_scratch_pretraining_is_the_official_recipe_and_its_row_reads_its_teacher():
    """pretrain/dino_vits16_voc.yaml: --task=dino's official values (only batch, epochs and data differ), and
    the Table 2 row built like the report's Barlow Twins from-scratch row but on its checkpoint."""
    cfg = parse_config(["--config", str(ROOT / "config" / "experiments" / "pretrain" / "dino_vits16_voc.yaml")])
    assert (cfg.task, cfg.backbone.name, cfg.backbone.pretrained, cfg.backbone.drop_path_rate) == (
        "dino", "vit_small_patch16_224", False, 0.1)
    d, o = cfg.dino, cfg.optim
    assert (d.out_dim, d.hidden_dim, d.bottleneck_dim, d.momentum_teacher, d.student_temp, d.teacher_temp) == (
        65536, 2048, 256, 0.996, 0.1, 0.04)
    assert (d.local_crops_number, d.local_crops_scale_min, d.local_crops_scale_max, d.clip_grad) == (8, 0.05, 0.4, 3.0)
    assert (d.weight_decay_end, d.freeze_last_layer_epochs, d.center_momentum) == (0.4, 1, 0.9)
    assert (o.name, o.lr, o.lr_scaling, o.weight_decay, o.warmup_epochs) == ("adamw", 0.0005, "linear", 0.04, 10)
    assert (cfg.aug.crop_scale_min, cfg.data.img_size, cfg.data.batch_size) == (0.4, 224, 64)
    row = parse_config(["--config", str(ROOT / "config" / "experiments" / "table2" / "dino_voc_vits16_setr_naive.yaml")])
    bt = parse_config(["--config", str(ROOT / "config" / "experiments" / "table2" / "barlow_twins_vits16_setr_naive.yaml")])
    assert row.backbone.weights == f"{cfg.log.output_dir}/{cfg.log.run_name}/checkpoints/last.ckpt"
    assert (row.segmentation, row.optim, row.trainer, row.data) == (bt.segmentation, bt.optim, bt.trainer, bt.data)


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
@pytest.mark.parametrize("path", REPORT_ROWS, ids=[f"{p.parent.name}/{p.stem}" for p in REPORT_ROWS])
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
