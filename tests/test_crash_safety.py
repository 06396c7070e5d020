"""Crash safety with real processes and real signals: kill -9 / SIGTERM / SIGINT at chosen steps, then
resume; atomic checkpoint writes under a kill and a full disk; non-finite state; resume that never writes
into another run; exclusive run directories. One tiny model and data set shared by all (see conftest).

The reference for every resumed run is the same config run without interruption in a subprocess: its
per-step losses in metrics.csv must be reproduced exactly (same seed, CPU, deterministic data order)."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
from tests.conftest import tiny_args

ROOT = Path(__file__).resolve().parent.parent
STEPS_PER_EPOCH = 4  # 32 training images / batch 8
EPOCHS = 3
EVERY = 3  # step checkpoints at steps 3, 6, 9 (3 and 6 mid-epoch; epoch ends at 4, 8, 12)


def flags(data_cache: Path, out: Path, name: str, **overrides) -> list[str]:
    base = {"trainer__max_epochs": EPOCHS, "trainer__checkpoint_every_n_steps": EVERY,
            "log__wandb_mode": "disabled", "callbacks__attention": "false", "callbacks__cross_correlation": "false"}
    base.update(overrides)
    return tiny_args(data_cache, out, name, **base)


def run_main(args: list[str], fault: tuple[str, int, str] | None = None, timeout: int = 240):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if fault:
        cmd = [sys.executable, str(ROOT / "tests" / "fault_injection.py"), *map(str, fault), "--", *args]
    else:
        cmd = [sys.executable, str(ROOT / "main.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def rows(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def series(run_dir: Path, key: str) -> list[tuple[int, str]]:
    """(step, value as written) of every row holding ``key``: exact text, so equality is bitwise."""
    return [(int(r["step"]), r[key]) for r in rows(run_dir) if r.get(key)]


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path`` with its size and mtime: 'nothing written' means this does not change."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.fixture(scope="module")
def reference(data_cache, tmp_path_factory):
    """The uninterrupted run (subprocess), and the folder the interrupted ones go to."""
    out = tmp_path_factory.mktemp("crash")
    result = run_main(flags(data_cache, out, "reference"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "reference", out


def assert_same_history(run_dir: Path, reference_dir: Path) -> None:
    for key in ("train/loss_step", "train/off_diag_step", "val/loss"):
        got, want = series(run_dir, key), series(reference_dir, key)
        steps = [s for s, _ in got]
        assert len(steps) == len(set(steps)), f"{key}: a step logged twice: {steps}"
        assert got == want, key
    assert step_of(run_dir / "checkpoints" / "last.ckpt") == EPOCHS * STEPS_PER_EPOCH


# -- 1. a resumable checkpoint exists from the first epoch on --------------------------------------------------

def test_last_checkpoint_exists_after_the_first_epoch_and_each_step_interval(reference, data_cache):
    ref, out = reference
    # SIGKILL right after the first epoch-end checkpoint: it must be there (Lightning 2.6's save_last
    # would only have written it at the end of training).
    killed = run_main(flags(data_cache, out, "first-epoch"), fault=("KILL", STEPS_PER_EPOCH, "batch_start"))
    assert killed.returncode == -signal.SIGKILL
    assert step_of(out / "first-epoch" / "checkpoints" / "last.ckpt") == STEPS_PER_EPOCH
    # ... and a step checkpoint mid-epoch
    killed = run_main(flags(data_cache, out, "first-steps"), fault=("KILL", EVERY, "batch_end"))
    assert step_of(out / "first-steps" / "checkpoints" / "last.ckpt") == EVERY


# -- 2. kill -9, then resume == never killed ------------------------------------------------------------------

@pytest.mark.parametrize("fault", [("KILL", 2 * STEPS_PER_EPOCH, "batch_start"),  # epoch boundary
                                   ("KILL", 2 * EVERY + 1, "batch_end")],            # mid-epoch, 1 step after a step checkpoint
                         ids=["epoch-boundary", "mid-epoch"])
def test_kill_then_resume_equals_uninterrupted(reference, data_cache, fault):
    ref, out = reference
    name = f"kill-{fault[1]}-{fault[2]}"
    killed = run_main(flags(data_cache, out, name), fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = out / name
    resumed = run_main(["--trainer.resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_history(run_dir, ref)


# -- 3. SIGTERM and SIGINT: a checkpoint of the current step, exit 143 / 130 -----------------------------------

@pytest.mark.parametrize("name,status", [("TERM", 143), ("INT", 130)])
def test_signal_saves_the_current_step_and_exits_nonzero(reference, data_cache, name, status):
    ref, out = reference
    step = STEPS_PER_EPOCH + 1  # not a checkpoint step: only the signal can have saved it
    run_dir = out / f"sig{name}"
    stopped = run_main(flags(data_cache, out, run_dir.name), fault=(name, step, "batch_end"))
    assert stopped.returncode == status, stopped.stderr[-3000:]
    assert f"stopped by SIG{name} at step {step}" in stopped.stderr
    assert step_of(run_dir / "checkpoints" / "last.ckpt") == step
    resumed = run_main(["--trainer.resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_history(run_dir, ref)


def test_sigterm_from_outside_while_training(data_cache, tmp_path):
    """The scheduler's view: SIGTERM from another process at an arbitrary moment of training."""
    import time

    args = flags(data_cache, tmp_path, "outside", trainer__max_epochs=200, trainer__checkpoint_every_n_steps=0)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "outside" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert last.exists()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr
    step = step_of(last)
    assert f"at step {step}:" in stderr  # the checkpoint holds the step it stopped at


# -- 4. atomic writes -----------------------------------------------------------------------------------------

KILL_DURING_WRITE = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
from callbacks.checkpointing import atomic_torch_save
path = sys.argv[1]
atomic_torch_save({{"global_step": 1, "w": torch.ones(1000)}}, path)
real_save = torch.save
def dying_save(obj, f, *a, **k):
    f.write(b"PK" + b"x" * 200000)   # part of a new checkpoint reaches the disk ...
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # ... and the process dies mid-write
torch.save = dying_save
atomic_torch_save({{"global_step": 2, "w": torch.zeros(1000)}}, path)
"""


@pytest.mark.parametrize("where", ["same", "other"])
def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, where):
    base = tmp_path if where == "same" else Path("/dev/shm")
    if where == "other" and (not base.is_dir() or os.stat(base).st_dev == os.stat(tmp_path).st_dev):
        pytest.skip("no second filesystem (/dev/shm) here")
    folder = base / f"vitssl-test-{os.getpid()}-{where}"
    folder.mkdir()
    try:
        path = folder / "last.ckpt"
        result = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE.format(root=str(ROOT)), str(path)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == -signal.SIGKILL
        state = torch.load(path, weights_only=True)
        assert state["global_step"] == 1 and torch.equal(state["w"], torch.ones(1000))
        leftovers = [p for p in folder.iterdir() if p.name != "last.ckpt"]
        assert leftovers, "the killed write's temporary file should still be there for this check"
        from callbacks.checkpointing import remove_stale_temporaries

        remove_stale_temporaries(folder)  # what the next run's checkpoint callback does at setup
        assert [p.name for p in folder.iterdir()] == ["last.ckpt"]
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def _mount_tmpfs(path: Path, size: str, read_only: bool = False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(data_cache, tmp_path):
    """A real small tmpfs that fills up while the run writes its checkpoints (needs mount permission)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1500k"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        # ~580 kB per checkpoint: last.ckpt fits, then best + last + a temporary copy do not.
        result = run_main(flags(data_cache, disk, "full", trainer__checkpoint_every_n_steps=1))
        assert result.returncode == 1, result.stderr[-3000:]
        line = one_error_line(result.stderr)
        assert "No space left on device" in line and str(disk / "full") in line, line
        ckpts = list((disk / "full" / "checkpoints").glob("*.ckpt"))
        assert ckpts
        for path in ckpts:  # no truncated file under a checkpoint's name: each one loads
            torch.load(path, map_location="cpu", weights_only=True)
        assert not [p for p in (disk / "full" / "checkpoints").iterdir() if p.suffix != ".ckpt"]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_full_disk_faked_in_process(data_cache, tmp_path, monkeypatch, capsys):
    """ENOSPC on the third checkpoint write (faked, so it runs everywhere): one line naming the file, exit 1,
    the previous last.ckpt intact, no temporary file left."""
    import errno

    import callbacks.checkpointing as checkpointing

    real_save, calls = torch.save, []

    def full_disk_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            f.write(b"PK" + b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", full_disk_save)
    args = flags(data_cache, tmp_path, "enospc", trainer__checkpoint_every_n_steps=1, trainer__limit_val_batches=0)
    assert main.main(args) == 1
    line = one_error_line(capsys.readouterr().err)
    last = tmp_path / "enospc" / "checkpoints" / "last.ckpt"
    assert f"cannot write checkpoint {last}: No space left on device" in line
    assert step_of(last) == 2
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]


# -- 5. never a non-finite checkpoint -------------------------------------------------------------------------

def test_diverging_run_never_writes_a_nonfinite_checkpoint(data_cache, tmp_path, capsys):
    # LARS at the largest accepted rate with eta 1: each step scales a weight by about 1000, so it overflows
    args = flags(data_cache, tmp_path, "nan", optim__name="lars", optim__lars_eta=1.0, optim__lr=1000,
                 optim__weight_decay=0, optim__warmup_epochs=0, trainer__max_epochs=4,
                 trainer__checkpoint_every_n_steps=1, trainer__finite_check_every_n_steps=1)
    assert main.main(args) == 1
    line = one_error_line(capsys.readouterr().err)
    ckpts = list((tmp_path / "nan" / "checkpoints").glob("*.ckpt"))
    for path in ckpts:
        state = torch.load(path, map_location="cpu", weights_only=True)
        tensors = list(state["state_dict"].values())
        for opt in state["optimizer_states"]:
            tensors += [v for s in opt["state"].values() for v in s.values() if torch.is_tensor(v)]
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), path
    last = tmp_path / "nan" / "checkpoints" / "last.ckpt"
    if last.exists():
        assert f"last good checkpoint is {last} (step {step_of(last)})" in line, line
    else:
        assert "none" in line, line


# -- 6. resume writes only into the checkpoint's own run directory --------------------------------------------

@pytest.fixture(scope="module")
def finished(data_cache, tmp_path_factory):
    """Two finished tiny runs A and B (in-process, 1 epoch each)."""
    out = tmp_path_factory.mktemp("resume")
    for name in ("A", "B"):
        assert main.main(flags(data_cache, out, name, trainer__max_epochs=1)) == 0
    return out


@pytest.mark.parametrize("extra,expect", [
    (["--log.run_name", "B"], "differs from the run being resumed"),
    (["--task", "segmentation"], "cannot resume"),
    (["--backbone.depth", "3"], "another architecture"),
    (["--barlow.proj_dim", "32"], "another architecture"),
], ids=["other-run-name", "other-task", "other-depth", "other-projector"])
def test_resume_mismatch_is_refused_and_writes_nothing(finished, capsys, extra, expect):
    before = tree(finished)
    assert main.main(["--trainer.resume", str(finished / "A"), *extra]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert expect in line, line
    assert tree(finished) == before


def test_checkpoint_copied_into_another_run_is_refused(finished, capsys, tmp_path):
    import shutil

    other = tmp_path / "runs" / "C"
    shutil.copytree(finished / "B", other)
    shutil.copy(finished / "A" / "checkpoints" / "last.ckpt", other / "checkpoints" / "last.ckpt")
    before, before_runs = tree(other), tree(finished)
    assert main.main(["--trainer.resume", str(other)]) == 2
    assert "was written by run A" in one_error_line(capsys.readouterr().err)
    assert tree(other) == before and tree(finished) == before_runs


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "truncated"], ids=["empty", "garbage", "truncated"])
def test_unreadable_checkpoint_is_one_line(finished, tmp_path, capsys, content):
    import shutil

    run = tmp_path / "runs" / "D"
    shutil.copytree(finished / "A", run)
    last = run / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2] if content == "truncated" else content)
    before = tree(run)
    assert main.main(["--trainer.resume", str(last)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(last) in line and "not a readable checkpoint" in line
    assert tree(run) == before


def test_moved_run_directory_resumes_in_place(finished, data_cache, tmp_path):
    import shutil

    moved = tmp_path / "elsewhere" / "A-moved"
    shutil.copytree(finished / "A", moved)
    before = tree(finished)
    assert main.main(["--trainer.resume", str(moved), "--trainer.max_epochs", "2"]) == 0  # extend a finished run
    assert tree(finished) == before  # the original A (named in the moved config.yaml) untouched
    assert step_of(moved / "checkpoints" / "last.ckpt") == 2 * STEPS_PER_EPOCH
    train = series(moved, "train/loss_step")
    assert [s for s, _ in train] == list(range(2 * STEPS_PER_EPOCH))


def test_config_yaml_reproduces_as_a_new_run_never_resumes(finished, data_cache, tmp_path):
    import shutil

    import yaml

    run = tmp_path / "runs" / "E"
    shutil.copytree(finished / "A", run)
    assert main.main(["--trainer.resume", str(run), "--trainer.max_epochs", "2"]) == 0  # E was resumed once
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["resume"] == ""
    before = tree(run)
    assert main.main(["--config", str(run / "config.yaml"), "--log.run_name", "again"]) == 0
    again = run.parent / "again"
    assert [s for s, _ in series(again, "train/loss_step")] == list(range(2 * STEPS_PER_EPOCH))  # from step 0
    assert series(again, "train/loss_step") == series(run, "train/loss_step")  # the same run again
    assert tree(run) == before


def test_resume_auto(finished, data_cache, tmp_path, capsys):
    out = str(finished)
    assert main.main(["--trainer.resume", "auto", "--log.output_dir", out]) == 2
    assert "needs --log.run_name" in one_error_line(capsys.readouterr().err)
    before = tree(finished)
    assert main.main(["--trainer.resume", "auto", "--log.output_dir", out, "--log.run_name", "A",
                      "--task", "segmentation"]) == 2
    assert "cannot resume" in one_error_line(capsys.readouterr().err)
    assert tree(finished) == before
    # a name that does not exist yet: the run starts (the requeue form of a first launch)
    new = flags(data_cache, tmp_path, "fresh", trainer__max_epochs=1) + ["--trainer.resume=auto"]
    assert main.main(new) == 0
    assert step_of(tmp_path / "fresh" / "checkpoints" / "last.ckpt") == STEPS_PER_EPOCH


def test_read_only_output_directory_is_one_line(data_cache, tmp_path, capsys):
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "1m", read_only=True):
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        assert main.main(flags(data_cache, ro, "x")) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "--log.output_dir" in line and str(ro) in line and "Read-only file system" in line
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


# -- 8. exclusive run directories ------------------------------------------------------------------------------

def _make_run_dir(out: str, queue) -> None:
    from config.hparams import Hparams
    from utils.run_dir import prepare_run_dir

    cfg = Hparams()
    cfg.log.output_dir, cfg.log.run_name = out, "same"
    queue.put(str(prepare_run_dir(cfg)))


def test_concurrent_runs_never_share_a_directory(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_make_run_dir, args=(str(tmp_path), queue)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    dirs = [queue.get(timeout=5) for _ in procs]
    assert len(set(dirs)) == 6
    ids = {(Path(d) / "run.json").read_text() for d in dirs}
    assert len(ids) == 6


# -- 10. a failure on the user's input leaves no run directory behind ------------------------------------------

def test_failure_before_training_leaves_no_run_directory(data_cache, tmp_path, capsys):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not weights")
    out = tmp_path / "runs"
    assert main.main(flags(data_cache, out, "bad-weights", backbone__weights=str(garbage))) == 1
    assert str(garbage) in one_error_line(capsys.readouterr().err)
    # found while training starts (the batch is larger than the training set): the new directory is removed
    assert main.main(flags(data_cache, out, "big-batch", data__batch_size=64)) == 1
    assert "--data.batch_size=64" in one_error_line(capsys.readouterr().err)
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("flag", ["optim.lr=inf", "optim.weight_decay=nan", "optim.warmup_epochs=nan",
                                  "trainer.gradient_clip_val=inf", "barlow.lambd=nan", "aug.hue=nan"])
def test_nan_and_inf_are_rejected_for_every_float_field(flag, capsys):
    assert main.main([f"--{flag}"]) == 2
    name, value = flag.split("=")
    assert one_error_line(capsys.readouterr().err) == f"error: --{name} must be a finite number, got {value}"


def test_every_float_field_of_the_config_rejects_nan():
    import dataclasses

    from config.hparams import Hparams
    from config.loading import ConfigError, parse_config

    floats = [f"{group.name}.{f.name}" for group in dataclasses.fields(Hparams)
              if dataclasses.is_dataclass(getattr(Hparams(), group.name))
              for f in dataclasses.fields(getattr(Hparams(), group.name))
              if isinstance(getattr(getattr(Hparams(), group.name), f.name), float)]
    assert len(floats) > 20
    for name in floats:
        with pytest.raises(ConfigError, match=f"--{name} must be a finite number"):
            parse_config([f"--{name}=nan"])
