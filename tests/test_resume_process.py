"""Resuming as a process: one process per run directory, preemption during start-up, the best checkpoint across
resumes, class-weighted segmentation, and resumes that would rewind a run or change the epoch it stops in.

Real ``python main.py`` subprocesses and real signals (``tests/fault_injection.py`` for training steps, the
start-up injector below for the moments before training). The reference for a resumed or restarted run is
the same command run without interruption: every ``metrics.csv`` cell except the wall times must be equal
as text.
"""
from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from tests.conftest import tiny_args

ROOT = Path(__file__).resolve().parent.parent
STEPS_PER_EPOCH = 4  # 32 training images / batch 8

pytestmark = pytest.mark.usefixtures("one_thread")


def flags(data_cache: Path, out: Path, name: str, **overrides) -> list[str]:
    base = {"trainer__max_epochs": 2, "log__wandb_mode": "disabled", "callbacks__attention": "false",
            "callbacks__cross_correlation": "false"}
    base.update(overrides)
    return tiny_args(data_cache, out, name, **base)


SEGMENTATION = {"task": "segmentation", "segmentation__hidden_dim": 16,
                "segmentation__class_weighting": "median_frequency"}


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run_main(args: list[str], fault: tuple[str, int, str] | None = None, timeout: int = 300):
    if fault:
        cmd = [sys.executable, str(ROOT / "tests" / "fault_injection.py"), *map(str, fault), "--", *args]
    else:
        cmd = [sys.executable, str(ROOT / "main.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=timeout)


def metrics_cells(run_dir: Path) -> list[tuple[int, list]]:
    """metrics.csv as written: per row its step and non-empty cells, wall-time columns (time/...) left out."""
    with (run_dir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    cells = []
    for row in rows:
        kept = {k: v for k, v in row.items() if v not in ("", None) and not k.startswith("time/")}
        if set(kept) - {"epoch", "step"}:
            cells.append((int(kept["step"]), sorted(kept.items())))
    return sorted(cells)


def assert_same_metrics(run_dir: Path, reference_dir: Path) -> None:
    got, want = metrics_cells(run_dir), metrics_cells(reference_dir)
    assert len(want) >= 2 * STEPS_PER_EPOCH, want  # per-step and per-epoch rows
    assert got == want


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path`` with its size and mtime: 'nothing written' means this does not change."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


# -- one process per run directory -----------------------------------------------------------------------------

@pytest.mark.parametrize("moment", ["training", pytest.param("start-up", marks=pytest.mark.slow)])
def test_a_second_process_on_a_running_run_gets_one_line_and_writes_nothing(data_cache, tmp_path, moment):
    """Process A trains (or is still starting: its directory has no checkpoint yet); it is frozen with SIGSTOP
    so that nothing changes under the test. B resumes the same run (`--trainer.resume DIR`, and the requeue form
    `--trainer.resume auto`): exit 2, one line naming A's pid and host, and not a byte written into the run."""
    args = flags(data_cache, tmp_path, "busy", trainer__max_epochs=500)
    a = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args, "--trainer.resume=auto"], cwd=ROOT,
                         env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "busy"
    try:
        if moment == "training":
            wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), a)
        else:
            wait_for(lambda: (run_dir / "run.json").exists(), a)
        a.send_signal(signal.SIGSTOP)
        if moment == "start-up":
            if (run_dir / "checkpoints" / "last.ckpt").exists():
                pytest.skip("A wrote its first checkpoint before it could be frozen")
        before = tree(run_dir)
        # training: the plain resume; start-up: the requeue form, which would otherwise start the run over
        others = [["--trainer.resume", str(run_dir)] if moment == "training" else [*args, "--trainer.resume=auto"]]
        for other in others:
            b = run_main(other)
            assert b.returncode == 2, b.stderr[-3000:]
            line = one_error_line(b.stderr)
            assert line.startswith(f"error: run directory {run_dir} is in use by process {a.pid} on host "
                                   f"{socket.gethostname()}"), line
            assert tree(run_dir) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # B made no directory of its own either
    finally:
        a.send_signal(signal.SIGCONT)
        a.send_signal(signal.SIGTERM)
        _, stderr = a.communicate(timeout=120)
    assert a.returncode == 143, stderr[-3000:]


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_the_lock_of_a_killed_process_does_not_block(data_cache, tmp_path, workers):
    """kill -9 leaves run.lock behind, naming a dead process (and, with DataLoader workers, orphans that still
    hold the lock for a moment): the resume takes the run over and finishes it."""
    args = flags(data_cache, tmp_path, "killed", trainer__checkpoint_every_n_steps=3, data__num_workers=workers)
    killed = run_main(args, fault=("KILL", 3, "batch_end"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    lock = tmp_path / "killed" / "run.lock"
    assert lock.is_file() and f'"host": "{socket.gethostname()}"' in lock.read_text()
    assert main.main(["--trainer.resume", str(tmp_path / "killed")]) == 0
    assert step_of(tmp_path / "killed" / "checkpoints" / "last.ckpt") == 2 * STEPS_PER_EPOCH


# -- preemption during start-up ---------------------------------------------------------------------------------

_startup_references: dict[bool, Path] = {}


@pytest.fixture(scope="module")
def references_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("startup-references")


def startup_reference(data_cache: Path, out: Path, tuned: bool) -> Path:
    """The uninterrupted run of the start-up tests' command (with or without the LR range test), once."""
    if tuned not in _startup_references or not (_startup_references[tuned] / "metrics.csv").is_file():
        name = "reference-tuned" if tuned else "reference"
        extra = {"trainer__tune_lr": "true", "trainer__tune_lr_steps": 20} if tuned else {}
        result = run_main(flags(data_cache, out, name, **extra) + ["--trainer.resume=auto"])
        assert result.returncode == 0, result.stderr[-3000:]
        _startup_references[tuned] = out / name
    return _startup_references[tuned]


STARTUP_FAULT = """
import os, signal, sys
sys.path.insert(0, {root!r})
phase, signum = sys.argv[1], getattr(signal, "SIG" + sys.argv[2])

def fire():
    os.kill(os.getpid(), signum)

def after(module, name):
    real = getattr(module, name)
    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        fire()
        return result
    setattr(module, name, wrapped)

import trainer
import utils.run_dir as run_dir
import pytorch_lightning as pl

if phase == "created":      # the run directory was just made: nothing in it yet
    after(run_dir, "_create_exclusively")
elif phase == "run_file":   # run.json written; no config.yaml, no code/ yet
    after(run_dir, "write_run_file")
elif phase == "config":     # config.yaml written, loggers and trainer not built yet
    after(trainer, "save_config")
elif phase == "fit_setup":  # Lightning's fit is setting up (before our training-time signal handling)
    class FireAtSetup(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            fire()
    build = trainer.build_callbacks
    trainer.build_callbacks = lambda *a, **k: [FireAtSetup()] + build(*a, **k)
elif phase == "tuner":      # in the middle of the LR range test
    from pytorch_lightning.tuner import lr_finder
    real = lr_finder._LRCallback.on_train_batch_end
    def batch_end(self, trainer, *args, **kwargs):
        real(self, trainer, *args, **kwargs)
        if trainer.global_step == 5:
            fire()
    lr_finder._LRCallback.on_train_batch_end = batch_end
import main
sys.exit(main.main(sys.argv[3:]))
"""

STARTUP_CASES = [  # (phase, signal, expected exit status) — one in CI, the rest in the slow tier
    ("fit_setup", "TERM", 143),
    pytest.param("created", "KILL", -signal.SIGKILL, marks=pytest.mark.slow),
    pytest.param("run_file", "KILL", -signal.SIGKILL, marks=pytest.mark.slow),
    pytest.param("created", "TERM", 143, marks=pytest.mark.slow),
    pytest.param("config", "TERM", 143, marks=pytest.mark.slow),
    pytest.param("config", "KILL", -signal.SIGKILL, marks=pytest.mark.slow),
    pytest.param("fit_setup", "INT", 130, marks=pytest.mark.slow),
    pytest.param("tuner", "TERM", 143, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("phase,name,status", STARTUP_CASES)
def test_preemption_during_start_up_then_resume_auto_equals_uninterrupted(data_cache, references_dir, tmp_path,
                                                                          phase, name, status):
    """The SLURM requeue loop: the same command with `--trainer.resume auto`, stopped during start-up (no
    checkpoint yet), then run again: it starts the run over in its own directory and ends equal to a run
    never stopped."""
    tuned = phase == "tuner"
    extra = {"trainer__tune_lr": "true", "trainer__tune_lr_steps": 20} if tuned else {}
    command = lambda name_: flags(data_cache, tmp_path, name_, **extra) + ["--trainer.resume=auto"]  # noqa: E731
    reference = startup_reference(data_cache, references_dir, tuned)

    stopped = subprocess.run([sys.executable, "-c", STARTUP_FAULT.format(root=str(ROOT)), phase, name,
                              *command("preempted")], cwd=ROOT, env=environment(), capture_output=True, text=True,
                             timeout=300)
    assert stopped.returncode == status, stopped.stderr[-3000:]
    run_dir = tmp_path / "preempted"
    assert run_dir.is_dir() and not list((run_dir / "checkpoints").glob("*.ckpt"))
    if name != "KILL":
        assert "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
        assert (f"stopped by SIG{name} during start-up, before the first training step: the same command with "
                f"--trainer.resume auto --log.run_name preempted starts it over in {run_dir}") in stopped.stderr

    again = run_main(command("preempted"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preempted"]  # no "preempted-1"
    assert_same_metrics(run_dir, reference)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        sorted(p.name for p in (reference / "checkpoints").iterdir())
    if tuned:
        assert (run_dir / "tuning.yaml").read_text() == (reference / "tuning.yaml").read_text()


@pytest.mark.slow
def test_killed_while_writing_the_first_checkpoint_then_resume_auto_starts_over(data_cache, references_dir, tmp_path):
    """kill -9 half-way through the first checkpoint file: only its hidden temporary file exists, which is no
    checkpoint; the same `--trainer.resume auto` command starts the run over and ends equal."""
    command = lambda name_: flags(data_cache, tmp_path, name_) + ["--trainer.resume=auto"]  # noqa: E731
    reference = startup_reference(data_cache, references_dir, False)
    killed = run_main(command("first"), fault=("KILL", STEPS_PER_EPOCH, "ckpt_write"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [p.name.startswith(".tmp-") for p in (tmp_path / "first" / "checkpoints").iterdir()] == [True]
    again = run_main(command("first"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_metrics(tmp_path / "first", reference)


def test_resume_auto_never_restarts_a_directory_it_cannot_prove_is_a_run(data_cache, tmp_path):
    """Only a directory holding this tool's run.json (or nothing but its lock) is started over; a folder with
    anything else in it stays untouched and the old one-line refusal stands."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a run\n")
    before = tree(foreign)
    result = run_main(flags(data_cache, tmp_path, "mine") + ["--trainer.resume=auto"])
    assert result.returncode == 2
    assert "holds no checkpoints/last.ckpt" in one_error_line(result.stderr)
    assert tree(foreign) == before


# -- the best checkpoint across resumes -------------------------------------------------------------------------

def best_by_hand(run_dir: Path, monitor: str = "val/loss") -> tuple[int, float]:
    """(epoch, value) of the lowest validation value in metrics.csv, first on ties."""
    with (run_dir / "metrics.csv").open(newline="") as f:
        vals = [(int(r["epoch"]), float(r[monitor])) for r in csv.DictReader(f) if r.get(monitor)]
    epochs = [e for e, _ in vals]
    assert len(epochs) == len(set(epochs)), vals  # one validation per epoch
    return min(vals, key=lambda ev: (ev[1], ev[0]))


def test_the_best_checkpoint_and_the_printed_best_are_right_after_every_resume(data_cache, tmp_path, capsys):
    """1 epoch, extended to 2, then 3, then requeued finished: after each, exactly one best-*.ckpt, of the epoch
    with the lowest val/loss in metrics.csv, holding that epoch's weights, and the printed line names it with
    its value. (In this set-up epoch 2 is worse than epoch 1: a stale best would show.)"""
    run_dir = tmp_path / "runs" / "best"
    ckpt_dir = run_dir / "checkpoints"
    history = []
    for step, args in enumerate([flags(data_cache, tmp_path / "runs", "best", trainer__max_epochs=1),
                                 ["--trainer.resume", str(run_dir), "--trainer.max_epochs", "2"],
                                 ["--trainer.resume", str(run_dir), "--trainer.max_epochs", "3"],
                                 ["--trainer.resume", str(run_dir), "--trainer.max_epochs", "3"]]):
        assert main.main(args) == 0
        out = capsys.readouterr().out
        epoch, value = best_by_hand(run_dir)
        history.append(epoch)
        best = sorted(p.name for p in ckpt_dir.glob("best-*.ckpt"))
        name = f"best-e{epoch:03d}-s{(epoch + 1) * STEPS_PER_EPOCH}.ckpt"
        assert best == [name], (step, best)
        assert f"best val/loss {value:.4f} at epoch {epoch}, checkpoint {ckpt_dir / name}\n" in out, out
        state = torch.load(ckpt_dir / name, map_location="cpu", weights_only=True)
        assert state["epoch"] == epoch and state["global_step"] == (epoch + 1) * STEPS_PER_EPOCH
    assert history[-1] != 2, "epoch 2 was the best: this run does not exercise a best older than the last epoch"


def test_a_best_checkpoint_the_resumed_state_does_not_record_is_removed(data_cache, tmp_path, capsys):
    """A best-*.ckpt written after the state a run resumes from (killed between the best checkpoint and
    last.ckpt, or rewound) is not the best of the resumed run: it is removed at the start of training; other
    files in checkpoints/ are left alone."""
    import shutil

    out = tmp_path / "runs"
    assert main.main(flags(data_cache, out, "stale", trainer__max_epochs=1)) == 0
    ckpt_dir = out / "stale" / "checkpoints"
    shutil.copy(ckpt_dir / "last.ckpt", ckpt_dir / "best-e007-s32.ckpt")  # unknown to last.ckpt's state
    shutil.copy(ckpt_dir / "last.ckpt", ckpt_dir / "mine.ckpt")  # not a best checkpoint: not ours to remove
    capsys.readouterr()
    assert main.main(["--trainer.resume", str(out / "stale"), "--trainer.max_epochs", "2"]) == 0
    epoch, value = best_by_hand(out / "stale")
    name = f"best-e{epoch:03d}-s{(epoch + 1) * STEPS_PER_EPOCH}.ckpt"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted([name, "last.ckpt", "mine.ckpt"])
    assert f"best val/loss {value:.4f} at epoch {epoch}, checkpoint {ckpt_dir / name}" in capsys.readouterr().out


# -- segmentation with class weighting -------------------------------------------------------------------------

def median_frequency_by_hand(voc_root: Path, num_classes: int = 21) -> torch.Tensor:
    """Eigen & Fergus's median frequency balancing over the training masks, written out here."""
    voc = voc_root / "VOCdevkit" / "VOC2012"
    names = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    counts = np.zeros(num_classes, dtype=np.float64)
    for name in names:
        mask = np.array(Image.open(voc / "SegmentationClass" / f"{name}.png"))
        for c in range(num_classes):
            counts[c] += (mask == c).sum()
    freq = counts / counts.sum()
    present = freq > 0
    weights = np.zeros(num_classes)
    weights[present] = np.median(freq[present]) / freq[present]
    return torch.tensor(weights, dtype=torch.float32)


@pytest.mark.parametrize("name,status", [("TERM", 143), pytest.param("KILL", -signal.SIGKILL, marks=pytest.mark.slow)])
def test_class_weighted_segmentation_resumes_mid_epoch_equal_to_uninterrupted(data_cache, voc_root, tmp_path, name,
                                                                              status):
    """The quick start's median_frequency weighting: stopped mid-epoch, resumed with the very command the SIGTERM
    message prints (or after kill -9, with the run directory): same metrics.csv as never stopping, and the
    loss's class weights in every checkpoint equal to the hand-computed median frequency weights."""
    assert main.main(flags(data_cache, tmp_path, "reference", trainer__checkpoint_every_n_steps=2, **SEGMENTATION)) == 0
    args = flags(data_cache, tmp_path, "seg", trainer__checkpoint_every_n_steps=2, **SEGMENTATION)
    stopped = run_main(args, fault=(name, STEPS_PER_EPOCH + 3, "batch_end"))  # mid-epoch 1
    assert stopped.returncode == status, stopped.stderr[-3000:]
    if name == "TERM":
        printed = stopped.stderr.split("continue with: ")[1].split("\n")[0].split()
        assert printed[:2] == ["python", "main.py"]
        again = subprocess.run([sys.executable, *printed[1:]], cwd=ROOT, env=environment(), capture_output=True,
                               text=True, timeout=300)
    else:
        again = run_main(["--trainer.resume", str(tmp_path / "seg")])
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_metrics(tmp_path / "seg", tmp_path / "reference")
    expected = median_frequency_by_hand(voc_root)
    assert (expected > 0).sum() >= 2  # several classes present: the weights are not trivial
    for path in [*(tmp_path / "seg" / "checkpoints").glob("*.ckpt"), tmp_path / "reference" / "checkpoints" / "last.ckpt"]:
        weight = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]["criterion.weight"]
        torch.testing.assert_close(weight, expected, rtol=1e-6, atol=0)


@pytest.mark.slow
def test_switching_class_weighting_on_resume_is_one_line_and_writes_nothing(data_cache, tmp_path, capsys):
    """The class weights are part of the checkpoint: resuming with them switched off (or on, for a run trained
    without) is refused like another architecture, before anything is written (not a traceback from
    Lightning's strict loading after set-up)."""
    out = tmp_path / "runs"
    plain = {**SEGMENTATION, "segmentation__class_weighting": "none"}
    assert main.main(flags(data_cache, out, "weighted", trainer__max_epochs=1, **SEGMENTATION)) == 0
    assert main.main(flags(data_cache, out, "plain", trainer__max_epochs=1, **plain)) == 0
    capsys.readouterr()
    before = tree(out)
    for name, value, detail in [("weighted", "none", "0 tensors missing there (e.g. -), 1 unexpected (e.g. criterion.weight)"),
                                ("plain", "median_frequency", "1 tensors missing there (e.g. criterion.weight), 0 unexpected")]:
        assert main.main(["--trainer.resume", str(out / name), "--segmentation.class_weighting", value,
                          "--trainer.max_epochs", "2"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "holds another architecture than this config" in line and detail in line, line
    assert tree(out) == before


# -- resumes that would rewind a run or change its epoch structure ----------------------------------------------

@pytest.fixture(scope="module")
def finished_two_epochs(data_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("rewind")
    assert main.main(flags(data_cache, out, "done", trainer__max_epochs=2)) == 0
    return out / "done"


def test_fewer_epochs_than_trained_is_refused_before_any_write(finished_two_epochs, capsys):
    before = tree(finished_two_epochs)
    assert main.main(["--trainer.resume", str(finished_two_epochs), "--trainer.max_epochs", "1"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --trainer.max_epochs=1: run {finished_two_epochs} has already trained 2 epochs"), line
    assert "--trainer.max_epochs 2 or more" in line
    assert tree(finished_two_epochs) == before  # config.yaml untouched


def test_requeue_of_a_finished_run_changes_nothing_but_succeeds(finished_two_epochs, capsys):
    last = finished_two_epochs / "checkpoints" / "last.ckpt"
    cells = metrics_cells(finished_two_epochs)
    assert main.main(["--trainer.resume", str(finished_two_epochs)]) == 0
    assert "best val/loss" in capsys.readouterr().out
    assert step_of(last) == 2 * STEPS_PER_EPOCH and metrics_cells(finished_two_epochs) == cells


def test_resuming_from_an_older_best_checkpoint_needs_allow_rewind(data_cache, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main.main(flags(data_cache, out, "rw", trainer__max_epochs=3, optim__lr=0.05)) == 0
    run_dir = out / "rw"
    best = next((run_dir / "checkpoints").glob("best-*.ckpt"))
    best_step = step_of(best)
    if best_step == 3 * STEPS_PER_EPOCH:
        pytest.skip("the last epoch is the best here: no older checkpoint to rewind to")
    capsys.readouterr()
    before = tree(run_dir)
    assert main.main(["--trainer.resume", str(best)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (f"error: --trainer.resume: {best} is at step {best_step}, behind the run's last.ckpt (step "
                    f"{3 * STEPS_PER_EPOCH}): continuing from it would discard steps {best_step + 1}-"
                    f"{3 * STEPS_PER_EPOCH} and overwrite last.ckpt; give the run directory {run_dir} to continue "
                    f"where it stopped, or add --trainer.allow_rewind true to go back to step {best_step}")
    assert tree(run_dir) == before
    # asked for explicitly: the run goes back to that step and trains on from there (to the same end)
    assert main.main(["--trainer.resume", str(best), "--trainer.allow_rewind", "true"]) == 0
    assert step_of(run_dir / "checkpoints" / "last.ckpt") == 3 * STEPS_PER_EPOCH
    with (run_dir / "metrics.csv").open(newline="") as f:
        train_steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]
    assert train_steps == list(range(3 * STEPS_PER_EPOCH))  # the discarded steps logged once, by the rewound run
    assert "allow_rewind: false" in (run_dir / "config.yaml").read_text()  # this command only


def test_mid_epoch_resume_with_another_batch_size_is_refused(data_cache, tmp_path, capsys):
    args = flags(data_cache, tmp_path, "mid", trainer__checkpoint_every_n_steps=3)
    killed = run_main(args, fault=("KILL", 3, "batch_end"))
    assert killed.returncode == -signal.SIGKILL
    run_dir = tmp_path / "mid"
    before = tree(run_dir)
    assert main.main(["--trainer.resume", str(run_dir), "--data.batch_size", "4"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: --data.batch_size=4 differs from the run's 8 while last.ckpt stops inside "
                           "epoch 0 (after 3 batches)"), line
    assert line.endswith("or add --trainer.allow_rewind true to accept it")
    assert tree(run_dir) == before
    # the same change at an epoch end is a plain resume
    assert main.main(["--trainer.resume", str(run_dir)]) == 0
    assert main.main(["--trainer.resume", str(run_dir), "--data.batch_size", "4", "--trainer.max_epochs", "3"]) == 0
    assert step_of(run_dir / "checkpoints" / "last.ckpt") == 2 * STEPS_PER_EPOCH + 8
