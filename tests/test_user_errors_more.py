"""Bad input to main.py and the tools ends in one line ``error: ...`` naming the flag and what would be valid, exit
status 2, no traceback, and nothing written: no run directory, no file in a dataset folder. Also: an undecodable
image is named with what is wrong with it, and a killed cache build's temporary folder does not outlive it.

The main.py cases run as subprocesses, all started at once (most stop in the first, torch-free validation pass);
the output folder's listing is compared before and after each.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from config.errors import ConfigError
from config.loading import parse_config
from config.validation import validate_values
from tests.conftest import tiny_args
from tests.test_summarize import HEADER, history, make_run

ROOT = Path(__file__).resolve().parents[1]


def listing(folder: Path) -> list[tuple[str, int]]:
    """Every path under ``folder`` with its modification time in ns (empty when it does not exist)."""
    if not folder.exists():
        return []
    return sorted((str(p.relative_to(folder)), p.lstat().st_mtime_ns) for p in [folder, *folder.rglob("*")])


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------------------ main.py
def fake_voc_root(folder: Path) -> Path:
    """A folder laid out like a real VOC root (VOCdevkit/VOC2012/...), not written by the generator."""
    voc = folder / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    (voc / "JPEGImages" / "2007_000027.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000027\n")
    return folder


SEED_RULE = "--seed must be in [0, 4294967295]"
RUN_NAME_RULE = "give a single folder name without '/' that is not '.' or '..'"
# case id → (flags on top of the tiny run's, the flag the line names, what it must say)
CLI_CASES = {
    "seed_negative": ({"seed": -1}, "--seed", SEED_RULE),
    "seed_2_pow_70": ({"seed": 2**70}, "--seed", SEED_RULE),
    "beta2_one": ({"optim__beta2": 1}, "--optim.beta2", "must be in [0, 1), got 1.0"),
    "beta1_above_one": ({"optim__beta1": 1.5}, "--optim.beta1", "must be in [0, 1), got 1.5"),
    "lars_momentum_one": ({"optim__name": "lars", "optim__momentum": 1}, "--optim.momentum", "must be in [0, 1)"),
    "lars_eta_zero": ({"optim__name": "lars", "optim__lars_eta": 0}, "--optim.lars_eta", "must be > 0"),
    "lr_1e300": ({"optim__lr": 1e300}, "--optim.lr", "gives a peak learning rate of 1e+300; valid: at most 1000"),
    "weight_decay_huge": ({"optim__weight_decay": 1e300}, "--optim.weight_decay",
                          "× the peak learning rate 0.0005 must be at most 1"),
    "num_workers_minus_5": ({"data__num_workers": -5}, "--data.num_workers",
                            "must be -1 (auto: min(8, CPU count)), 0 (load in the training process) or a number"),
    "worker_timeout_huge": ({"data__worker_timeout": 1e300}, "--data.worker_timeout", "at most 1e+06 seconds"),
    "batch_size_2_pow_70": ({"data__batch_size": 2**70}, "--data.batch_size", "must be a 64-bit integer"),
    "limit_train_batches_fraction_above_1": ({"trainer__limit_train_batches": 2.5}, "--trainer.limit_train_batches",
                                             "a fraction <= 1.0 or a whole number of batches"),
    "brightness_1e300": ({"aug__brightness": 1e300}, "--aug.brightness", "must be at most 100"),
    "online_probe_lr_huge": ({"callbacks__online_probe_lr": 1e4}, "--callbacks.online_probe_lr", "at most 1000"),
    "run_name_parent": ({"log__run_name": "../x"}, "--log.run_name", RUN_NAME_RULE),
    "run_name_dot": ({"log__run_name": "."}, "--log.run_name", RUN_NAME_RULE),
    "run_name_nested": ({"log__run_name": "a/b"}, "--log.run_name", RUN_NAME_RULE),
    "run_name_absolute": ({"log__run_name": "__ABS__"}, "--log.run_name", RUN_NAME_RULE),
    "resume_auto_run_name_parent": ({"log__run_name": "../elsewhere", "trainer__resume": "auto"}, "--log.run_name",
                                    RUN_NAME_RULE),
    "synthetic_seed_negative": ({"data__synthetic_seed": -1}, "--data.synthetic_seed", "must be >= 0"),
    "synthetic_cache_in_a_voc_root": ({"data__root": "__VOC__"}, "--data.root",
                                      "cannot hold the generated data's cache (it holds VOCdevkit"),
}


@pytest.fixture(scope="module")
def cli(data_cache, tmp_path_factory):
    """case → (completed process, work folder, runs folder, listings before); all cases run at once."""
    started = {}
    for case, (flags, _, _) in CLI_CASES.items():
        work = tmp_path_factory.mktemp(case)
        runs = work / "runs"
        (runs / "earlier-run").mkdir(parents=True)  # the output folder exists and holds something
        (runs / "earlier-run" / "config.yaml").write_text("seed: 1\n")
        (work / "elsewhere" / "checkpoints").mkdir(parents=True)  # a run-like folder beside the output folder
        voc = fake_voc_root(work / "voc")
        values = {k: str(v).replace("__ABS__", str(work / "abs-run")).replace("__VOC__", str(voc))
                  for k, v in flags.items()}
        args = tiny_args(data_cache, runs, "tiny", log__wandb_mode="disabled", **values)
        before = {"work": listing(work)}
        proc = subprocess.Popen([sys.executable, "main.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        started[case] = (proc, work, before)
    done = {}
    for case, (proc, work, before) in started.items():
        out, err = proc.communicate(timeout=600)
        done[case] = (proc.returncode, out, err, work, before)
    return done


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_bad_value_is_one_line_naming_the_flag_and_nothing_is_created(cli, case):
    rc, out, err, work, before = cli[case]
    _, flag, expected = CLI_CASES[case]
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag}") and expected in lines[0], err
    # no run directory anywhere: the output folder, the folder a '../x' name points at, an absolute name, the VOC
    # root (no cache, lock or temporary folder there)
    assert listing(work) == before["work"]


def test_lr_bound_applies_to_the_peak_rate_after_linear_scaling():
    base = ["--data.dataset=synthetic", "--data.root=/tmp/unused", "--optim.weight_decay=0"]
    validate_values(parse_config(base + ["--optim.lr=1000"]))  # the bound itself is valid
    with pytest.raises(ConfigError, match=r"^--optim.lr=1000\.1 gives a peak learning rate of 1000\.1; valid"):
        validate_values(parse_config(base + ["--optim.lr=1000.1"]))
    # linear scaling: peak = lr × batch × devices / 256 = 2000 × 128 / 256 = 1000 (valid), at batch 256: 2000
    linear = base + ["--optim.lr_scaling=linear", "--optim.lr=2000"]
    validate_values(parse_config(linear + ["--data.batch_size=128"]))
    with pytest.raises(ConfigError, match=r"peak learning rate of 2000 \(2000 × global batch 256 / 256"):
        validate_values(parse_config(linear + ["--data.batch_size=256"]))
    # the 1-D parameters' rate: peak × bias_lr_scale = 0.5 × 2001 > 1000
    with pytest.raises(ConfigError, match=r"^--optim.bias_lr_scale=2001 gives the 1-D parameters a peak"):
        validate_values(parse_config(base + ["--optim.lr=0.5", "--optim.bias_lr_scale=2001"]))
    # weight decay: lr × wd = 0.5 × 2 = 1 is the largest valid product
    validate_values(parse_config(base + ["--optim.lr=0.5", "--optim.weight_decay=2"]))
    with pytest.raises(ConfigError, match=r"^--optim.weight_decay=2.1 × the peak learning rate 0.5 must be at most 1"):
        validate_values(parse_config(base + ["--optim.lr=0.5", "--optim.weight_decay=2.1"]))


def test_seed_bounds_are_numpys():
    import numpy as np

    base = ["--data.dataset=synthetic", "--data.root=/tmp/unused"]
    for seed in (0, 2**32 - 1):
        validate_values(parse_config(base + [f"--seed={seed}"]))
        np.random.seed(seed)  # the reference: what numpy accepts
    for seed in (-1, 2**32):
        with pytest.raises(ValueError):
            np.random.seed(seed)
        with pytest.raises(ConfigError, match=r"^--seed must be in \[0, 4294967295\]"):
            validate_values(parse_config(base + [f"--seed={seed}"]))


@pytest.mark.parametrize("name", ["run-1", ".hidden", "a b", "x..y"])
def test_ordinary_run_names_stay_valid(name):
    validate_values(parse_config(["--data.dataset=synthetic", "--data.root=/tmp/unused", f"--log.run_name={name}"]))


# ------------------------------------------------------------------------------------------ tools
def test_summarize_leaves_out_a_corrupt_run_and_names_what_is_wrong(tmp_path, capsys):
    from tools import summarize

    root = tmp_path / "runs"
    make_run(root, "good", history([3.0, 2.0]))
    binary = make_run(root, "binary", history([3.0, 1.0]))
    with (binary / "metrics.csv").open("ab") as f:
        f.write(b"\xff\xfe\x00garbage\n")
    text_cell = make_run(root, "text-cell", history([3.0, 1.5]))
    lines = (text_cell / "metrics.csv").read_text().splitlines()
    cells = lines[3].split(",")
    cells[HEADER.index("train/loss_step")] = "abc"
    lines[3] = ",".join(cells)
    (text_cell / "metrics.csv").write_text("\n".join(lines) + "\n")
    nul = make_run(root, "nul", history([3.0, 1.2]))
    (nul / "metrics.csv").write_text((nul / "metrics.csv").read_text() + "1,\x00,2\n")
    bad_yaml = make_run(root, "bad-yaml", history([3.0, 0.5]))
    (bad_yaml / "config.yaml").write_text("task: [unclosed\n")

    assert summarize.main([str(root), "--metric", "val/loss"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    warnings = {line.split(" left out: ")[0].removeprefix("warning: "): line.split(" left out: ")[1]
                for line in captured.err.splitlines() if " left out: " in line}
    assert warnings == {
        "binary": "metrics.csv is not text (it holds bytes that are not UTF-8)",
        "text-cell": "metrics.csv line 4, column 'train/loss_step': 'abc' is not a number",  # lines[3]: line 4
        # header + 20 rows, then the appended line 22 (Python's csv reads a NUL as a character of a cell)
        "nul": "metrics.csv line 22, column 'lr-AdamW/pg1': '\\x00' is not a number",
        "bad-yaml": warnings["bad-yaml"],
    }
    assert warnings["bad-yaml"].startswith("config.yaml is not valid YAML (")
    table = (root / "summary.md").read_text()
    assert "| **good** |" in table and "Left out, unreadable (4)" in table
    assert "| binary |" not in table and "| text-cell |" not in table


def test_summarize_drops_a_torn_last_row_and_keeps_the_run(tmp_path, capsys):
    from tools import summarize

    root = tmp_path / "runs"
    run = make_run(root, "torn", history([3.0, 2.0]))
    with (run / "metrics.csv").open("a") as f:
        f.write("1,0.001,7,9.")  # a writer killed mid-row: no line end
    assert summarize.main([str(root), "--metric", "val/loss"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    rows = list(__import__("csv").DictReader((root / "summary.csv").open()))
    assert [(r["run"], float(r["final"])) for r in rows] == [("torn", 2.0)]


def test_summarize_only_corrupt_runs_is_one_line(tmp_path, capsys):
    from tools import summarize

    root = tmp_path / "runs"
    run = make_run(root, "only", history([3.0]))
    (run / "metrics.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert summarize.main([str(root)]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: none of the 1 runs under {root} can be read (only: metrics.csv is not text (it holds bytes that are "
        f"not UTF-8))"]


def test_summarize_out_naming_a_file_or_runs_naming_a_file(tmp_path, capsys):
    from tools import summarize

    root = tmp_path / "runs"
    make_run(root, "good", history([3.0, 2.0]))
    target = tmp_path / "summary.txt"
    target.write_text("keep me\n")
    assert summarize.main([str(root), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [f"error: --out {target} is a file; give a folder (it is created if missing) for "
                                "summary.md, summary.csv and the plots"]
    assert target.read_text() == "keep me\n" and not (root / "summary.md").exists()
    assert summarize.main([str(target)]) == 2
    assert error_lines(capsys.readouterr().err) == [f"error: {target} is a file, not a folder of run directories"]


def test_summarize_cli_has_no_traceback(tmp_path):
    root = tmp_path / "runs"
    run = make_run(root, "only", history([3.0]))
    (run / "metrics.csv").write_bytes(b"\xff" * 10)
    out = subprocess.run([sys.executable, "-m", "tools.summarize", str(root)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(error_lines(out.stderr)) == 1, out.stderr


@pytest.mark.parametrize("argv, expected", [
    (["--suite", "pretrain", "--suite", "table1", "--set", "trainer.max_epochs=abc"],
     "error: --set trainer.max_epochs=abc: argument --trainer.max_epochs: invalid int value: 'abc'"),
    (["--suite", "table1", "--set", "trainer.max_epoch=3"],
     "error: --set trainer.max_epoch=3: unrecognized arguments: --trainer.max_epoch=3; did you mean"),
    (["--suite", "table1", "--output-dir", "__FILE__"], "error: --output-dir __FILE__ is a file"),
    (["--suite", "table1", "--bogus"], "error: unrecognized arguments: --bogus (see python -m tools.reproduce --help)"),
])
def test_reproduce_bad_input_is_one_line(tmp_path, capsys, argv, expected):
    from tools import reproduce

    afile = tmp_path / "file"
    afile.write_text("x")
    argv = [a.replace("__FILE__", str(afile)) for a in argv]
    assert reproduce.main([*argv, "--dry-run"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(expected.replace("__FILE__", str(afile))), lines
    assert afile.read_text() == "x"


@pytest.mark.parametrize("tool, argv, expected", [
    ("method_study", ["--budgets", "4,abc"], "error: --budgets: 'abc' is not an integer"),
    ("method_study", ["--budgets", "0"], "error: --budgets: every value must be >= 1, got 0"),
    ("method_study", ["--lrs", "0.1,-1"], "error: --lrs: every value must be > 0, got -1"),
    ("method_study", ["--warmup-fraction", "2"], "error: --warmup-fraction must be in [0, 1], got 2.0"),
    ("method_study", ["--set", "optim.lr=abc"], "error: --set optim.lr=abc: argument --optim.lr: invalid float value"),
    ("method_study", ["--output-dir", "__FILE__"], "error: --output-dir __FILE__ is a file"),
    ("proxy_study", ["--budgets", "x"], "error: --budgets: 'x' is not an integer"),
    ("proxy_study", ["--objectives", "global,nope"], "error: --objectives: unknown nope; valid: global, dense"),
    ("proxy_study", ["--set", "trainer.max_epochs"], "error: --set 'trainer.max_epochs': expected KEY=VALUE"),
    ("proxy_study", ["--output-dir", "__FILE__"], "error: --output-dir __FILE__ is a file"),
    ("synthetic_voc", ["__OUT__", "--size", "8"], "error: --size must be 16 to 4096, got 8"),
    ("synthetic_voc", ["__OUT__", "--train", "x"], "error: argument --train: invalid int value: 'x'"),
    ("synthetic_voc", ["__OUT__", "--seed", "-1"], "error: --seed must be >= 0, got -1"),
    ("sweep", ["__BINARY__", "--dry-run"], "error: __BINARY__ is not a text file (it holds bytes that are not UTF-8)"),
    ("sweep", ["__DIR__", "--dry-run"], "error: __DIR__ is a folder; give a sweep file"),
])
def test_other_tools_bad_input_is_one_line(tmp_path, capsys, tool, argv, expected):
    import importlib

    afile, binary = tmp_path / "file", tmp_path / "sweep.yaml"
    afile.write_text("x")
    binary.write_bytes(b"\xff\xfe\x00\x01")
    names = {"__FILE__": str(afile), "__OUT__": str(tmp_path / "out"), "__BINARY__": str(binary),
             "__DIR__": str(tmp_path)}
    for key, value in names.items():
        argv = [a.replace(key, value) for a in argv]
        expected = expected.replace(key, value)
    module = importlib.import_module(f"tools.{tool}")
    extra = ["--report-only", "--output-dir", str(tmp_path / "study")] if tool.endswith("study") and \
        "--output-dir" not in argv else (["--report-only"] if tool.endswith("study") else [])
    assert module.main([*argv, *extra]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert afile.read_text() == "x" and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ images
def damaged_images(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """name → (file, what the message must say after 'cannot decode image PATH: ')."""
    data = good.read_bytes()
    files = {
        # the first 16 bytes of the file are shown
        "text": (b"<html>not an image</html>", "it is not an image file (it starts with the text '<html>not an ima'"),
        "binary": (bytes(range(200, 232)), "it is not an image file (it starts with the bytes c8 c9 ca cb cc cd ce cf"),
        "empty": (b"", "the file is empty (0 bytes)"),
        "truncated_jpeg": (data[: len(data) // 3], f"its JPEG data is damaged or truncated ({len(data) // 3} bytes; "),
        "garbage_after_jpeg_signature": (b"\xff\xd8\xff" + b"\x20" * 60, "its JPEG data is damaged or truncated (63 bytes"),
    }
    out = {}
    for name, (content, message) in files.items():
        path = folder / f"{name}.jpg"
        path.write_bytes(content)
        out[name] = (path, message)
    out["missing"] = (folder / "missing.jpg", "the file does not exist")
    return out


@pytest.mark.parametrize("reader", ["load_rgb", "read_encoded"])
def test_undecodable_image_message_names_the_file_and_the_damage(voc_root, tmp_path, reader):
    from datamodules.device_decode import read_encoded
    from datamodules.errors import DataError
    from datamodules.images import load_rgb

    good = sorted((voc_root / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg"))[0]
    read = {"load_rgb": load_rgb, "read_encoded": read_encoded}[reader]
    checked = 0
    for name, (path, message) in damaged_images(tmp_path, good).items():
        if reader == "read_encoded" and name == "truncated_jpeg":
            continue  # the header survives: the worker cannot tell (the device decoder names it, test_device_data)
        with pytest.raises(DataError) as info:
            read(path)
        text = str(info.value)
        assert text.startswith(f"cannot decode image {path}: {message}"), (name, text)
        assert " object at 0x" not in text and ".cpp:" not in text and "\n" not in text, (name, text)
        checked += 1
    assert checked >= 5


# ------------------------------------------------------------------------------------------ the synthetic cache
def test_cache_in_a_voc_root_is_refused_before_anything_is_written(tmp_path):
    from datamodules.synthetic_voc import ForeignDirectoryError, ensure_synthetic_voc

    voc = fake_voc_root(tmp_path / "voc")
    before = listing(voc)
    for root in (voc, voc / "VOCdevkit" / "VOC2012" / "cache"):
        with pytest.raises(ForeignDirectoryError, match="cannot hold the generated data's cache"):
            ensure_synthetic_voc(root, 4, 2, 16, 0)
    assert listing(voc) == before


def _partial_folders(root: Path, name: str) -> list[Path]:
    return [p for p in root.iterdir() if p.name.startswith(f".{name}.tmp-") and (p / "synthetic_voc.partial").is_file()]


def test_killed_build_leaves_no_temp_folder_after_the_next_use_of_any_cache_there(tmp_path):
    """A real SIGKILL of a cache build; the next use of another set in the same folder removes its temp folder."""
    from datamodules.synthetic_voc import cache_dir_name, ensure_synthetic_voc

    root = tmp_path / "cache"
    root.mkdir()
    ensure_synthetic_voc(root, 4, 2, 16, 0)  # a set already there
    big = cache_dir_name(3000, 10, 64, 1)
    code = "import sys; from datamodules.synthetic_voc import ensure_synthetic_voc as e; e(sys.argv[1], 3000, 10, 64, 1)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        while not _partial_folders(root, big):
            assert proc.poll() is None, "the build ended before it could be killed"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    leftover = _partial_folders(root, big)
    assert len(leftover) == 1

    ensure_synthetic_voc(root, 4, 2, 16, 0)  # complete already: only a use of the cache, no build
    assert not leftover[0].exists()
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [cache_dir_name(4, 2, 16, 0)]


def test_leftovers_of_live_or_locked_builds_are_kept(tmp_path):
    """A temp folder whose builder is alive, or whose set's lock is held (a build on another machine), stays."""
    from datamodules.synthetic_voc import _target_lock, ensure_synthetic_voc

    root = tmp_path / "cache"
    root.mkdir()
    marker = {"generator": "vitssl utils.synthetic_voc", "format_version": 2, "n_train": 4, "n_val": 2, "size": 16,
              "seed": 5}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    alive = root / f".synthetic_voc_t4_v2_s16_seed5.tmp-{os.getpid()}-0123abcd"
    locked = root / f".synthetic_voc_t4_v2_s16_seed6.tmp-{dead_pid}-0123abcd"
    for folder, seed in ((alive, 5), (locked, 6)):
        folder.mkdir()
        (folder / "synthetic_voc.partial").write_text(json.dumps({**marker, "seed": seed}))
        (root / f".synthetic_voc_t4_v2_s16_seed{seed}.lock").touch()  # as a build leaves it; free unless held below
    with _target_lock(root / "synthetic_voc_t4_v2_s16_seed6"):
        ensure_synthetic_voc(root, 4, 2, 16, 0)
        assert alive.exists() and locked.exists()
    ensure_synthetic_voc(root, 4, 2, 16, 0)  # the lock is free now and its builder dead: removed
    assert alive.exists() and not locked.exists()
