"""wandb sweep files: offline expansion as wandb does it, validation against main.py, and local runs."""
from __future__ import annotations

import csv
import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from config.loading import parse_config
from tests.conftest import tiny_args
from tools import summarize, sweep
from tools.sweep import SweepError

REPO = Path(__file__).resolve().parent.parent
SWEEP_FILES = sorted((REPO / "sweeps").glob("*.yaml"))
OFFLINE = ["data.dataset=synthetic"]  # validates every check, data included, with no VOC on disk
COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]


def write_sweep(path: Path, parameters: dict, **top) -> Path:
    spec = {"program": "main.py", "method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
            "parameters": parameters, "command": COMMAND, **top}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_the_sweep_files_exist():
    assert {p.name for p in SWEEP_FILES} >= {"depth_x_projdim.yaml", "patch_size.yaml", "learning_rate.yaml"}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_every_sweep_file_expands_and_validates(path):
    grid = sweep.load_sweep(path).method == "grid"
    plan = sweep.plan(path, overrides=OFFLINE, count=None if grid else 4, seed=0, strict_data=True)
    assert len(plan.runs) == (math.prod(len(sweep._grid_values(p)) for p in plan.sweep.parameters.values())
                              if grid else 4)
    assert all(n.startswith("bayes is drawn like random") for n in plan.notes)  # nothing else to report
    for run in plan.runs:
        assert run.command[:3] == ["/usr/bin/env", "python", "main.py"]
        assert all(a.startswith("--") and "=" in a for a in run.argv)
        assert plan.sweep.metric["name"] in sweep.logged_metrics(run.config)  # the task's and its callbacks'
        parsed = parse_config(run.argv)
        for name, value in run.params.items():  # each value reaches the config as written
            got = parsed
            for part in name.split("."):
                got = getattr(got, part)
            assert got == value


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_sweep_files_dry_run_without_data_only_notes_it(path, capsys):
    assert sweep.main([str(path), "--dry-run", "--count", "2", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "ok: all" in out
    if not (REPO / "data" / "VOCdevkit").exists():
        assert "note: data not available on this machine" in out
        # --strict-data turns exactly that note into an error
        assert sweep.main([str(path), "--dry-run", "--count", "2", "--seed", "1", "--strict-data"]) == 2
        assert "--data.root" in capsys.readouterr().err


def test_depth_x_projdim_is_the_12_run_grid():
    plan = sweep.plan(REPO / "sweeps" / "depth_x_projdim.yaml", overrides=OFFLINE)
    assert plan.sweep.method == "grid" and len(plan.runs) == 12
    assert plan.sweep.metric == {"name": "val/loss_per_dim", "goal": "minimize"}
    got = [(r.config.backbone.depth, r.config.barlow.proj_dim) for r in plan.runs]
    # wandb's grid order: parameters sorted by name, the first one varying slowest
    assert got == list(itertools.product([4, 6, 8, 12], [512, 1024, 2048]))
    assert "--backbone.depth=4" in plan.runs[0].argv and "--barlow.proj_dim=512" in plan.runs[0].argv
    assert "--data.dataset=synthetic" in plan.runs[0].argv


def test_patch_size_grid_at_224():
    plan = sweep.plan(REPO / "sweeps" / "patch_size.yaml", overrides=OFFLINE)
    assert [r.config.backbone.patch_size for r in plan.runs] == [8, 16, 32]
    assert all(r.config.data.img_size == 224 for r in plan.runs)


def test_learning_rate_samples_are_log_uniform_in_bounds_and_seeded():
    path = REPO / "sweeps" / "learning_rate.yaml"
    plan = sweep.plan(path, overrides=OFFLINE, count=7, seed=123)
    lrs = [r.config.optim.lr for r in plan.runs]
    assert len(lrs) == 7 and all(1e-5 <= lr <= 1e-2 for lr in lrs)
    assert [r.params["optim.lr"] for r in sweep.plan(path, overrides=OFFLINE, count=7, seed=123).runs] == lrs
    assert [r.params["optim.lr"] for r in sweep.plan(path, overrides=OFFLINE, count=7, seed=124).runs] != lrs
    assert plan.seed == 123
    # log-uniform, not uniform: half the draws fall below the geometric midpoint (uniform: ~3 %)
    many = [p["optim.lr"] for p in sweep.expand(sweep.load_sweep(path), count=2000, seed=0)]
    below = sum(lr < math.sqrt(1e-5 * 1e-2) for lr in many) / len(many)
    assert 0.45 < below < 0.55
    # without --count: the file's run_cap
    assert len(sweep.plan(path, overrides=OFFLINE, seed=0).runs) == plan.sweep.run_cap


def test_command_is_wandbs_name_equals_value_form_and_parses_back(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", {
        "backbone.depth": {"values": [6]}, "optim.lr": {"value": 0.0003}, "trainer.progress_bar": {"value": False},
        "data.dataset": {"value": "synthetic"}})
    (run,) = sweep.plan(path).runs
    assert run.command == ["/usr/bin/env", "python", "main.py", "--backbone.depth=6", "--data.dataset=synthetic",
                           "--optim.lr=0.0003", "--trainer.progress_bar=False"]
    cfg = parse_config(run.argv)
    assert cfg.backbone.depth == 6 and cfg.optim.lr == 0.0003 and cfg.trainer.progress_bar is False
    # the default command (no `command:`) is the same
    spec = yaml.safe_load(path.read_text())
    del spec["command"]
    path.write_text(yaml.safe_dump(spec))
    assert sweep.plan(path).runs[0].command == run.command


def test_macros_match_wandbs_own_expansion(monkeypatch):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    params = {"backbone.depth": 6, "data.pin_memory": True, "optim.lr": 3.1622776601683794e-05,
              "trainer.progress_bar": False, "data.dataset": "synthetic"}
    theirs = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    ours = sweep.command_args(params)
    assert {k: ours[k] for k in ours} == {k: theirs[k] for k in ours}
    monkeypatch.setenv("VITSSL_TEST_PY", "python3")
    s = sweep.Sweep(path=Path("x.yaml"), name="x", method="grid", program="main.py",
                    command=["${env}", "${envvar:VITSSL_TEST_PY}", "-u", "${program}", "--config", "c.yaml",
                             "${args_no_boolean_flags}"], parameters={}, metric=None, run_cap=None, raw={})
    assert sweep.build_command(s, {"data.pin_memory": True, "trainer.progress_bar": False, "seed": 3}) == [
        "/usr/bin/env", "python3", "-u", "main.py", "--config", "c.yaml", "--data.pin_memory", "--seed=3"]
    assert sweep.program_argv(s, sweep.build_command(s, {"seed": 3})) == ["--config", "c.yaml", "--seed=3"]


def test_fixed_config_file_in_the_command(tmp_path):
    cfg_file = tmp_path / "base.yaml"
    cfg_file.write_text("data: {dataset: synthetic}\nbackbone: {name: vit, embed_dim: 64, num_heads: 4}\n")
    path = write_sweep(tmp_path / "s.yaml", {"backbone.depth": {"values": [2, 3]}},
                       command=["${env}", "${interpreter}", "${program}", "--config", str(cfg_file), "${args}"])
    plan = sweep.plan(path, strict_data=True)
    assert [(r.config.backbone.name, r.config.backbone.depth) for r in plan.runs] == [("vit", 2), ("vit", 3)]


BAD = {
    "unknown parameter": ({"backbone.dept": {"values": [4]}}, {},
                          ["'backbone.dept' is not a config field", "did you mean backbone.depth",
                           "valid names in backbone: backbone.name, backbone.depth"]),
    "ungrouped unknown parameter": ({"proj_dim": {"values": [4]}}, {}, ["did you mean", "barlow.proj_dim", "task, seed"]),
    "wrong type": ({"backbone.depth": {"values": [4, "four"]}}, {}, ["backbone.depth", "'four'", "int"]),
    "float for an int": ({"backbone.depth": {"values": [4.0]}}, {}, ["4.0", "not an int"]),
    "float distribution for an int": ({"backbone.depth": {"distribution": "q_uniform", "min": 2, "max": 8}},
                                      {"method": "random"}, ["draws floats", "q: 1"]),
    "bad choice": ({"optim.name": {"values": ["adamw", "sgd"]}}, {}, ["'sgd'", "adamw, lars"]),
    "unknown metric": ({"backbone.depth": {"values": [4]}}, {"metric": {"name": "val/acc", "goal": "maximize"}},
                       ["'val/acc' is never logged", "logged metrics:", "val/loss", "train/loss_epoch"]),
    "metric goal": ({"backbone.depth": {"values": [4]}}, {"metric": {"name": "val/loss", "goal": "min"}},
                    ["goal 'min'", "minimize or maximize"]),
    "missing parameters": (None, {}, ["missing 'parameters'"]),
    "unknown method": ({"backbone.depth": {"values": [4]}}, {"method": "hyperopt"}, ["method 'hyperopt'", "grid, random, bayes"]),
    "unknown top-level key": ({"backbone.depth": {"values": [4]}}, {"paramters": {}}, ["'paramters'", "did you mean 'parameters'"]),
    "bare list": ({"backbone.depth": [4, 6]}, {}, ["must be a mapping", "{values: [...]}"]),
    "nested": ({"backbone": {"parameters": {"depth": {"values": [4]}}}}, {}, ["nested parameters", "dotted names"]),
    "unsupported distribution": ({"optim.lr": {"distribution": "zipf", "min": 1, "max": 2}}, {"method": "random"},
                                 ["unsupported distribution 'zipf'", "log_uniform_values"]),
    "distribution in a grid": ({"optim.lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-2}}, {},
                               ["grid search needs values"]),
    "exponent read as text": ({"optim.lr": {"distribution": "log_uniform_values", "min": "1e-5", "max": 1e-2}},
                              {"method": "random"}, ["'1e-5'", "1.0e-5"]),
    "min above max": ({"optim.lr": {"distribution": "uniform", "min": 0.1, "max": 0.01}}, {"method": "random"},
                      ["min 0.1 is not less than max 0.01"]),
    "unknown macro": ({"backbone.depth": {"values": [4]}}, {"command": ["${env}", "${interpreter}", "${program}", "${argz}"]},
                      ["unknown macro ${argz}"]),
    "no args macro": ({"backbone.depth": {"values": [4]}}, {"command": ["${env}", "${interpreter}", "${program}"]},
                      ["passes no parameters"]),
    "other program": ({"backbone.depth": {"values": [4]}}, {"program": "train.py"}, ["'train.py' is not this project's main.py"]),
    "invalid combination": ({"backbone.patch_size": {"values": [16, 15]}, "data.dataset": {"value": "synthetic"}}, {},
                            ["1 of 2 runs are invalid", "run 2 (backbone.patch_size=15)", "not a multiple of the patch size 15"]),
    "missing --config file": ({"backbone.depth": {"values": [4]}},
                              {"command": ["${env}", "${interpreter}", "${program}", "--config", "nope.yaml", "${args}"]},
                              ["nope.yaml", "does not exist"]),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_sweep_error_naming_the_problem(case, tmp_path):
    parameters, top, expected = BAD[case]
    path = write_sweep(tmp_path / "bad.yaml", parameters, **top)
    if parameters is None:
        spec = yaml.safe_load(path.read_text())
        del spec["parameters"]
        path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SweepError) as err:
        sweep.plan(path, overrides=OFFLINE, seed=0)
    message = str(err.value)
    assert "\n" not in message
    for text in expected:
        assert text in message, (text, message)


def test_malformed_files(tmp_path):
    for text, expected in [("[1, 2]", "a sweep file is a mapping"), ("a: [", "not valid YAML"),
                           ("program: main.py\nmethod: grid\ncommand: [${env}, ${args}]\nparameters: {seed: {value: 1}}",
                            "must be quoted")]:
        (tmp_path / "m.yaml").write_text(text)
        with pytest.raises(SweepError, match="m.yaml") as err:
            sweep.load_sweep(tmp_path / "m.yaml")
        assert expected in str(err.value)
    with pytest.raises(SweepError, match="no such sweep file"):
        sweep.load_sweep(tmp_path / "absent.yaml")


def test_set_overrides(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", {"backbone.depth": {"values": [4, 6]}, "data.dataset": {"value": "voc"}})
    plan = sweep.plan(path, overrides=["data.dataset=synthetic", "trainer.max_epochs=1"], strict_data=True)
    assert all(r.config.data.dataset == "synthetic" and r.config.trainer.max_epochs == 1 for r in plan.runs)
    with pytest.raises(SweepError, match="--set backbone.depth: the sweep varies this parameter"):
        sweep.plan(path, overrides=["backbone.depth=8"])
    with pytest.raises(SweepError, match=r"unknown parameter \(from --set\) 'trainer.max_epoch'.*trainer.max_epochs"):
        sweep.plan(path, overrides=["trainer.max_epoch=1"])
    with pytest.raises(SweepError, match="--set trainer.max_epochs: value 'one'"):
        sweep.plan(path, overrides=["trainer.max_epochs=one"])
    with pytest.raises(SweepError, match="expected KEY=VALUE"):
        sweep.plan(path, overrides=["trainer.max_epochs"])


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    path = write_sweep(tmp_path / "bad.yaml", {"backbone.depth": {"values": ["four"]}})
    assert sweep.main([str(path), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'four'" in lines[0]
    assert sweep.main([str(path), "--no-such-flag"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # as a real process: exit status 2, one line, no traceback
    proc = subprocess.run([sys.executable, "-m", "tools.sweep", str(path), "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_without_dry_run_or_local_it_prints_how_to_launch_and_runs_nothing(capsys, tmp_path):
    path = REPO / "sweeps" / "depth_x_projdim.yaml"
    assert sweep.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "wandb sweep --project vitssl sweeps/depth_x_projdim.yaml" in out and "wandb agent" in out
    assert "Nothing was run" in out


def tiny_overrides(data_cache: Path, out: Path) -> list[str]:
    flags = tiny_args(data_cache, out, trainer__max_epochs=1, log__wandb_mode="disabled")
    return [f[2:] for f in flags if not f.startswith(("--barlow.proj_dim=", "--log.run_name="))]


def last_value(run_dir: Path, column: str) -> float:
    with (run_dir / "metrics.csv").open(newline="") as f:
        values = [row[column] for row in csv.DictReader(f) if row.get(column)]
    return float(values[-1])


def test_local_sweep_then_summary(data_cache, tmp_path, capsys):
    path = write_sweep(tmp_path / "tiny.yaml", {"barlow.proj_dim": {"values": [32, 64]}}, name="tiny")
    out = tmp_path / "runs"
    sets = [a for s in tiny_overrides(data_cache, out) for a in ("--set", s)]
    assert sweep.main([str(path), "--local", "--quiet", *sets]) == 0
    printed = capsys.readouterr().out
    assert "[1/2]" in printed and "[2/2]" in printed and "--log.run_name=tiny-1" in printed
    runs = {p.name: yaml.safe_load((p / "config.yaml").read_text()) for p in out.iterdir() if p.is_dir()}
    assert {n: c["barlow"]["proj_dim"] for n, c in runs.items()} == {"tiny-1": 32, "tiny-2": 64}

    # the same sweep again would mix its runs with these: refused before anything runs
    with pytest.raises(SweepError, match="already exist"):
        sweep.plan(path, overrides=tiny_overrides(data_cache, out), local=True)

    assert summarize.main([str(out)]) == 0
    table = (out / "summary.md").read_text()
    assert "tiny-1" in table and "tiny-2" in table and "barlow.proj_dim" in table
    with (out / "summary.csv").open(newline="") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert {n: int(r["barlow.proj_dim"]) for n, r in rows.items()} == {"tiny-1": 32, "tiny-2": 64}
    for name, row in rows.items():
        assert float(row["final"]) == last_value(out / name, "val/loss")
        assert row["steps"] == "4"
    png = (out / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_failing_run_stops_the_sweep_with_its_output_tail(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "second-run-started"
    s = sweep.Sweep(path=tmp_path / "f.yaml", name="f", method="grid", program="main.py", command=COMMAND,
                    parameters={"seed": sweep.Param("seed", "categorical", {"values": [1, 2]})}, metric=None,
                    run_cap=None, raw={})
    fail = [sys.executable, "-c", "import sys; print('loading...'); print('error: boom', file=sys.stderr); sys.exit(3)"]
    touch = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    plan = sweep.SweepPlan(s, [sweep.SweepRun(1, {"seed": 1}, fail, []), sweep.SweepRun(2, {"seed": 2}, touch, [])])
    with pytest.raises(sweep.SweepRunError) as err:
        sweep.run_local(plan, echo=False)
    assert err.value.returncode == 3 and "error: boom" in err.value.output_tail
    assert "run 1/2 (seed=1) failed with exit status 3" in str(err.value)
    assert not marker.exists()
    monkeypatch.setattr(sweep, "plan", lambda *a, **k: plan)
    assert sweep.main([str(s.path), "--local", "--quiet"]) == 1
    err_text = capsys.readouterr().err
    assert "failed with exit status 3" in err_text and "error: boom" in err_text and "Traceback" not in err_text
