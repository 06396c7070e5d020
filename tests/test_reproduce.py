"""One-command reproduction (tools/reproduce.py): smoke runs write the table, finished runs are skipped, a
failing config does not stop the others, dry runs run nothing, order and weight paths follow dependencies."""
from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tools import reproduce

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "config" / "experiments"
RANDOM = EXPERIMENTS / "table2" / "random_vits16_setr_naive.yaml"
LINEAR = EXPERIMENTS / "table2" / "dino_vits8_linear.yaml"
REPORT = ROOT.parent / "shared" / "report.md"
# The report's Table 2 values of these rows, by the report's wandb run name (looked up in report.md below).
REPORT_RUNS = {"random_vits16_setr_naive.yaml": "valiant-puddle", "dino_vits8_linear.yaml": "devout-plant"}


def report_value(run: str) -> float:
    rows = [line.split("\t") for line in REPORT.read_text().splitlines() if line.rstrip().endswith(f"\t{run}")]
    assert len(rows) == 1, run
    return float(rows[0][-2])


def best_miou(run_dir: Path) -> float:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return max(float(r["val/mIoU"]) for r in csv.DictReader(f) if r.get("val/mIoU"))


def read_csv(path: Path) -> dict[str, dict]:
    with path.open(newline="") as f:
        return {Path(r["config"]).name: r for r in csv.DictReader(f)}


def no_subprocess(monkeypatch):
    """No run may start; other programs (e.g. the /sbin/ldconfig that ctypes asks while torch is imported)
    may."""
    run, popen = subprocess.run, subprocess.Popen

    def guard(real):
        def launch(command, *args, **kwargs):
            words = [str(command)] if isinstance(command, (str, os.PathLike)) else [str(w) for w in command]
            if any(w == sys.executable or w.endswith("main.py") or w.startswith("tools.") for w in words):
                raise AssertionError(f"nothing should run, got {command}")
            return real(command, *args, **kwargs)
        return launch

    monkeypatch.setattr(subprocess, "run", guard(run))
    monkeypatch.setattr(subprocess, "Popen", guard(popen))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke invocation on two report configs and one that fails at run time (an empty weight file:
    it passes validation, main.py then refuses it). The failing one sorts first, so the others run after it."""
    tmp = tmp_path_factory.mktemp("reproduce")
    garbage = tmp / "garbage.pth"
    garbage.write_bytes(b"")
    broken = tmp / "table2" / "broken.yaml"
    broken.parent.mkdir()
    text = RANDOM.read_text().replace("run_name: table2-random_vits16_setr_naive", "run_name: table2-broken")
    broken.write_text(text.replace("  name: vit_small_patch16_224\n", f"  name: vit_small_patch16_224\n  weights: {garbage}\n"))
    out = tmp / "out"
    argv = [str(RANDOM), str(LINEAR), str(broken), "--smoke", "--output-dir", str(out)]
    return {"out": out, "rc": reproduce.main(argv), "broken": broken}


def test_smoke_writes_the_table_with_measured_and_report_values(smoke, capsys):
    out = smoke["out"]
    md, table = out / "reproduce" / "table2-smoke.md", out / "reproduce" / "table2-smoke.csv"
    assert md.is_file() and table.is_file()
    rows = read_csv(table)
    assert list(rows) == ["broken.yaml", "dino_vits8_linear.yaml", "random_vits16_setr_naive.yaml"]
    for name, run in REPORT_RUNS.items():
        row = rows[name]
        run_dir = out / row["run"]
        assert row["run"].endswith("-smoke") and row["status"] == "ran" and row["metric"] == "val/mIoU"
        assert float(row["measured"]) == pytest.approx(best_miou(run_dir))
        if REPORT.is_file():
            assert float(row["report"]) == report_value(run)
        assert float(row["difference"]) == pytest.approx(float(row["measured"]) - float(row["report"]))
        assert f"| {row['run']} |" in md.read_text() and f"| {float(row['report']):.4f} |" in md.read_text()
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["data"]["dataset"] == "synthetic" and config["trainer"]["max_epochs"] == 1
        assert config["backbone"]["depth"] == 2 and config["backbone"]["pretrained"] is False
    assert "weights not downloaded: random init" in rows["dino_vits8_linear.yaml"]["notes"]  # said in the table
    assert "Smoke mode" in md.read_text()


def test_a_failing_config_is_reported_and_the_others_still_run(smoke):
    assert smoke["rc"] == 1
    rows = read_csv(smoke["out"] / "reproduce" / "table2-smoke.csv")
    assert rows["broken.yaml"]["status"] == "failed (exit 1)" and rows["broken.yaml"]["measured"] == ""
    log = smoke["out"] / "reproduce" / "logs" / "table2-broken-smoke.log"
    assert str(log) in rows["broken.yaml"]["notes"] and "garbage.pth" in log.read_text()
    assert all(rows[name]["status"] == "ran" for name in REPORT_RUNS)


def test_second_invocation_skips_the_finished_runs(smoke, monkeypatch, capsys):
    out = smoke["out"]
    before = read_csv(out / "reproduce" / "table2-smoke.csv")
    no_subprocess(monkeypatch)
    assert reproduce.main([str(RANDOM), str(LINEAR), "--smoke", "--output-dir", str(out)]) == 0
    rows = read_csv(out / "reproduce" / "table2-smoke.csv")
    assert list(rows) == ["dino_vits8_linear.yaml", "random_vits16_setr_naive.yaml"]
    for name in REPORT_RUNS:
        assert rows[name]["status"] == "finished earlier (skipped)"
        assert rows[name]["run"] == before[name]["run"] and rows[name]["measured"] == before[name]["measured"]
    assert capsys.readouterr().out.count("skipped") == 2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("table2-random")) == \
        ["table2-random_vits16_setr_naive-smoke"]  # no second run directory


def test_dry_run_prints_commands_and_runs_nothing(smoke, tmp_path, monkeypatch, capsys):
    no_subprocess(monkeypatch)
    fresh = tmp_path / "fresh"
    assert reproduce.main([str(RANDOM), "--smoke", "--dry-run", "--output-dir", str(fresh)]) == 0
    printed = capsys.readouterr().out
    assert f"main.py --config {RANDOM}" in printed and "--data.dataset=synthetic" in printed
    assert f"--log.output_dir={fresh}" in printed and "--log.run_name=table2-random_vits16_setr_naive-smoke" in printed
    assert not fresh.exists()  # no table, no data, no run directory
    # the finished smoke run is announced as skipped; a changed config (more epochs) would run again
    assert reproduce.main([str(RANDOM), "--smoke", "--dry-run", "--output-dir", str(smoke["out"])]) == 0
    assert "skip: finished" in capsys.readouterr().out
    argv = [str(RANDOM), "--smoke", "--dry-run", "--output-dir", str(smoke["out"]), "--set", "trainer.max_epochs=2"]
    assert reproduce.main(argv) == 0
    printed = capsys.readouterr().out
    assert ": run\n" in printed and "--trainer.max_epochs=2" in printed


def test_an_unfinished_run_of_the_same_config_is_resumed(smoke, tmp_path, monkeypatch, capsys):
    # The finished 1-epoch run, with its config.yaml asking for 2 epochs: its last.ckpt has 1 of 2 epochs.
    out = tmp_path / "out"
    run = shutil.copytree(smoke["out"] / "table2-random_vits16_setr_naive-smoke",
                          out / "table2-random_vits16_setr_naive-smoke")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["trainer"]["max_epochs"] = 2
    config["log"]["output_dir"] = str(out)
    config["data"]["root"] = str(out / "reproduce" / "smoke-data")  # smoke data lives beside the tables
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    no_subprocess(monkeypatch)
    argv = [str(RANDOM), "--smoke", "--dry-run", "--output-dir", str(out), "--set", "trainer.max_epochs=2"]
    assert reproduce.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"resume {run}" in printed and f"--trainer.resume={run}" in printed
    assert reproduce.training_finished(run, max_epochs=1, max_steps=-1)
    assert not reproduce.training_finished(run, max_epochs=2, max_steps=-1)


def test_pretraining_runs_first_and_its_checkpoint_becomes_the_backbone(tmp_path, monkeypatch, capsys):
    no_subprocess(monkeypatch)
    table = EXPERIMENTS / "table2" / "barlow_twins_vits16_setr_naive.yaml"
    pretrain = EXPERIMENTS / "pretrain" / "vits16_voc.yaml"
    assert reproduce.main([str(table), str(pretrain), "--smoke", "--dry-run", "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("[")]
    assert lines == ["[1/2] pretrain/vits16_voc.yaml: run", "[2/2] table2/barlow_twins_vits16_setr_naive.yaml: run"]
    assert f"--backbone.weights={tmp_path}/pretrain-vits16-voc-smoke/checkpoints/last.ckpt" in printed
    # every suite together: pretraining first, then table1, then table2
    every = reproduce.order([reproduce.load_experiment(p) for p in sorted(EXPERIMENTS.rglob("*.yaml"), reverse=True)])
    groups = [e.group for e in every]
    assert groups == sorted(groups) and groups[0] == "pretrain" and len(groups) == 16


DINO_PRETRAIN = EXPERIMENTS / "pretrain" / "dino_vits16_voc.yaml"
DINO_ROW = EXPERIMENTS / "table2" / "dino_voc_vits16_setr_naive.yaml"


def test_dino_pretraining_runs_before_the_table2_row_that_uses_its_teacher(tmp_path, monkeypatch, capsys):
    import lightningmodules  # noqa: F401  (importing torch runs ldconfig: done before subprocesses are refused)

    no_subprocess(monkeypatch)
    synthetic = ["--set", "data.dataset=synthetic", "--set", f"data.root={tmp_path}"]  # no VOC here
    assert reproduce.main([str(DINO_ROW), str(DINO_PRETRAIN), "--dry-run", "--output-dir", str(tmp_path), *synthetic]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("[")]
    assert lines == ["[1/2] pretrain/dino_vits16_voc.yaml: run", "[2/2] table2/dino_voc_vits16_setr_naive.yaml: run"]
    assert f"--backbone.weights={tmp_path}/pretrain-dino-vits16-voc/checkpoints/last.ckpt" in printed
    assert "error" not in printed
    pretrain = reproduce.load_experiment(DINO_PRETRAIN)
    assert (pretrain.task, pretrain.published) == ("dino", None)
    assert reproduce.TASK_METRICS["dino"] == ("val/loss", "final")
    # --suite table2 alone: the row names the pretraining config it needs, and nothing runs
    assert reproduce.main([str(DINO_ROW), "--output-dir", str(tmp_path), *synthetic]) == 2
    assert "run pretrain/dino_vits16_voc.yaml first" in capsys.readouterr().err


def test_smoke_shrinks_dinos_head_and_crops(tmp_path):
    flags, notes = reproduce.smoke_flags(reproduce.load_experiment(DINO_PRETRAIN), tmp_path)
    assert {"--dino.out_dim=64", "--dino.local_crops_number=2", "--backbone.depth=2"} <= set(flags)
    assert notes == []


@pytest.mark.slow
def test_smoke_trains_dino_then_segments_with_its_teacher(tmp_path):
    assert reproduce.main([str(DINO_PRETRAIN), str(DINO_ROW), "--smoke", "--output-dir", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "reproduce" / "table2-smoke.csv")
    row = rows["dino_voc_vits16_setr_naive.yaml"]
    assert row["status"] == "ran" and "backbone from run pretrain-dino-vits16-voc-smoke" in row["notes"]
    assert float(row["measured"]) == pytest.approx(best_miou(tmp_path / row["run"]))
    pretrain = read_csv(tmp_path / "reproduce" / "pretrain-smoke.csv")["dino_vits16_voc.yaml"]
    assert pretrain["status"] == "ran" and pretrain["metric"] == "val/loss" and float(pretrain["measured"]) > 0


def test_without_smoke_a_missing_dependency_or_an_invalid_config_stops_before_running(tmp_path, monkeypatch, capsys):
    no_subprocess(monkeypatch)
    table = EXPERIMENTS / "table2" / "barlow_twins_vits16_setr_naive.yaml"
    argv = [str(table), "--output-dir", str(tmp_path), "--set", "data.dataset=synthetic"]
    assert reproduce.main(argv) == 2
    err = capsys.readouterr().err
    assert "backbone.weights" in err and "run pretrain/vits16_voc.yaml first" in err and "nothing was run" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(re.sub("max_epochs: 400", "max_epoch: 400", RANDOM.read_text()))
    assert reproduce.main([str(bad), "--smoke", "--output-dir", str(tmp_path)]) == 2
    assert "unknown key 'trainer.max_epoch'" in capsys.readouterr().err
    assert reproduce.main(["--suite", "table9"]) == 2
    assert "valid suites: pretrain, table1, table2" in capsys.readouterr().err


def test_published_values_are_read_from_the_configs():
    assert reproduce.published_value("# Report's mIoU (val): 0.1281 (run quiet-darkness).") == 0.1281
    assert reproduce.published_value("# Barlow Twins pretraining") is None
    found = {p.name: reproduce.load_experiment(p).published for p in EXPERIMENTS.rglob("*.yaml")}
    assert found["dino_vits8_setr_naive.yaml"] == 0.5861 and found["vits16_voc.yaml"] is None
    assert sum(v is not None for v in found.values()) == 11  # every table row, no pretraining config
