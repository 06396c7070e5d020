"""Resume equals never stopping, as a matrix of real subprocesses and real signals.

Each cell runs a tiny model in ``main.py`` (through ``tests/fault_injection.py``), delivers kill -9, SIGTERM or
SIGINT at one phase of training, resumes the run with the same ``--trainer.resume auto`` command a scheduler's
requeue would issue, and compares the finished run's ``metrics.csv`` with an uninterrupted run of the same
config: every cell except the wall-time columns (``time/...``) must be equal as text — per-step values, epoch
means, validation scores, diagnostics.

Rows: the task (Barlow Twins, DINO, segmentation with median-frequency class weighting, as in the quick
start) with 0 or 2 DataLoader worker processes. Columns: the signal, and the phase it lands in:

* ``train_step``: right after optimizer step 3 of epoch 0 (not a checkpoint step: a kill resumes from the step
  checkpoint of step 2, a SIGTERM/SIGINT writes one of step 3; either way the run continues mid-epoch);
* ``validation``: in the middle of epoch 0's validation;
* ``epoch_end``: in epoch 0's epoch-end hooks, after its checkpoint, before its epoch means are written;
* ``ckpt_write``: half-way through writing the first checkpoint file of epoch 0's end (a kill leaves the
  checkpoint of step 2 as the last complete one).

The whole matrix is in the slow tier (``pytest -m slow tests/test_resume_matrix.py``); one cell of each task
runs in CI. The requeue-loop test runs the same command again and again, each time stopped by SIGTERM from
outside at a random (seeded) moment, until the run finishes.
"""
from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_args

ROOT = Path(__file__).resolve().parent.parent
STEPS_PER_EPOCH = 4  # 32 training images / batch 8
EPOCHS = 2
EVERY = 2  # step checkpoints at steps 2 and 6 (4 and 8 end an epoch and get the epoch-end checkpoint)
EXIT = {"KILL": -signal.SIGKILL, "TERM": 128 + signal.SIGTERM, "INT": 128 + signal.SIGINT}

TASKS = {
    "barlow_twins": {},
    "dino": {"task": "dino", "dino__out_dim": 64, "dino__hidden_dim": 48, "dino__bottleneck_dim": 16,
             "dino__local_crops_number": 2},
    "segmentation": {"task": "segmentation", "segmentation__hidden_dim": 16,
                     "segmentation__class_weighting": "median_frequency"},
}
PHASES = {  # phase → (step, fault_injection hook)
    "train_step": (3, "batch_end"),
    "validation": (STEPS_PER_EPOCH, "val_batch"),
    "epoch_end": (STEPS_PER_EPOCH, "epoch_end"),
    "ckpt_write": (STEPS_PER_EPOCH, "ckpt_write"),
}
# In CI: one cell per task, together covering every signal, both worker counts and three phases.
CI_CELLS = {("barlow_twins", 2, "TERM", "train_step"), ("dino", 2, "KILL", "epoch_end"),
            ("segmentation", 0, "INT", "validation")}


def run_args(data_cache: Path, out: Path, name: str, task: str, workers: int, **overrides) -> list[str]:
    values = {**TASKS[task], "trainer__max_epochs": EPOCHS, "trainer__checkpoint_every_n_steps": EVERY,
              "data__num_workers": workers, "log__wandb_mode": "disabled", "callbacks__attention": "false",
              "callbacks__cross_correlation": "false", **overrides}
    return tiny_args(data_cache, out, name, **values) + ["--trainer.resume=auto"]


def command(args: list[str], fault: tuple[str, int, str] | None = None) -> list[str]:
    if fault:
        return [sys.executable, str(ROOT / "tests" / "fault_injection.py"), *map(str, fault), "--", *args]
    return [sys.executable, str(ROOT / "main.py"), *args]


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run(args: list[str], fault: tuple[str, int, str] | None = None, timeout: int = 300):
    return subprocess.run(command(args, fault), cwd=ROOT, env=environment(), capture_output=True, text=True,
                          timeout=timeout)


def metrics_cells(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv as written, one dict per row of its non-empty cells, wall-time columns left out."""
    with (run_dir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    cells = []
    for row in rows:
        kept = {k: v for k, v in row.items() if v not in ("", None) and not k.startswith("time/")}
        if set(kept) - {"epoch", "step"}:
            cells.append(kept)
    return cells


def assert_same_metrics(run_dir: Path, reference_dir: Path) -> None:
    got, want = metrics_cells(run_dir), metrics_cells(reference_dir)
    assert len(want) > 3 * EPOCHS * STEPS_PER_EPOCH // 2  # the reference holds per-step and per-epoch rows
    key = lambda row: (int(row["step"]), sorted(row.items()))  # noqa: E731  (row order within a step is free)
    got_sorted, want_sorted = sorted(got, key=key), sorted(want, key=key)
    if got_sorted != want_sorted:
        missing = [r for r in want_sorted if r not in got_sorted]
        extra = [r for r in got_sorted if r not in want_sorted]
        pytest.fail(f"metrics.csv differs from the uninterrupted run's: {len(missing)} rows missing or changed, "
                    f"{len(extra)} extra or changed\nfirst missing: {missing[:3]}\nfirst extra: {extra[:3]}")


_references: dict[tuple[str, int, int], Path] = {}


@pytest.fixture(scope="module")
def matrix_out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume-matrix")


def reference(data_cache: Path, out: Path, task: str, workers: int, epochs: int = EPOCHS) -> Path:
    """The uninterrupted run of ``task`` with ``workers`` for ``epochs`` (once per module)."""
    key = (task, workers, epochs)
    if key not in _references or not (_references[key] / "metrics.csv").is_file():
        name = f"reference-{task}-{workers}-e{epochs}"
        result = run(run_args(data_cache, out, name, task, workers, trainer__max_epochs=epochs))
        assert result.returncode == 0, result.stderr[-3000:]
        _references[key] = out / name
    return _references[key]


def cells():
    for task in TASKS:
        for workers in (0, 2):
            for name in EXIT:
                for phase in PHASES:
                    marks = () if (task, workers, name, phase) in CI_CELLS else (pytest.mark.slow,)
                    yield pytest.param(task, workers, name, phase, marks=marks,
                                       id=f"{task}-w{workers}-{name}-{phase}")


@pytest.mark.parametrize("task,workers,name,phase", list(cells()))
def test_stop_then_resume_equals_uninterrupted(data_cache, matrix_out, task, workers, name, phase):
    ref = reference(data_cache, matrix_out, task, workers)
    run_name = f"{task}-w{workers}-{name}-{phase}"
    args = run_args(data_cache, matrix_out, run_name, task, workers)
    step, hook = PHASES[phase]
    stopped = run(args, fault=(name, step, hook))
    if stopped.returncode == 0:
        # SIGTERM/SIGINT late in the last epoch may let the run finish; the phases here are all in epoch 0
        pytest.fail(f"the signal did not stop the run: {stopped.stderr[-2000:]}")
    assert stopped.returncode == EXIT[name], stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    resumed = run(args)  # the very same command: --trainer.resume auto
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_metrics(matrix_out / run_name, ref)


# -- the requeue loop ------------------------------------------------------------------------------------------

def requeue_until_finished(args: list[str], seed: int, max_attempts: int,
                           window: tuple[float, float]) -> list[int]:
    """Run ``args`` until it exits 0; each attempt gets SIGTERM after a random delay drawn from ``window``
    (seconds, seeded). Returns every attempt's exit status."""
    rng = random.Random(seed)
    statuses: list[int] = []
    for attempt in range(max_attempts):
        proc = subprocess.Popen(command(args), cwd=ROOT, env=environment(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        delay = rng.uniform(*window) if attempt < max_attempts - 1 else float("inf")
        try:
            _, stderr = proc.communicate(timeout=delay if delay != float("inf") else 300)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=300)
        statuses.append(proc.returncode)
        if proc.returncode == 0:
            return statuses
        # 143: stopped by the run's handler (with or without a checkpoint of the moment); -15: the signal came
        # before the handler was installed or after it was removed (process start, interpreter exit)
        assert proc.returncode in (143, -signal.SIGTERM), f"attempt {attempt}: exit {proc.returncode}\n{stderr[-3000:]}"
        assert "Traceback" not in stderr, stderr[-3000:]
    return statuses


def _requeue(data_cache, out, task: str, workers: int, seed: int, attempts: int, window, epochs: int = EPOCHS):
    ref = reference(data_cache, out, task, workers, epochs)
    run_name = f"requeue-{task}-{workers}-{seed}"
    args = run_args(data_cache, out, run_name, task, workers, trainer__max_epochs=epochs)
    statuses = requeue_until_finished(args, seed, attempts, window)
    assert statuses[-1] == 0, statuses
    assert_same_metrics(out / run_name, ref)
    return statuses


def test_requeue_loop_with_sigterm_at_random_moments_short(data_cache, matrix_out):
    """CI variant: Barlow Twins with 2 workers, SIGTERM 2–8 s after each start (start-up included)."""
    statuses = _requeue(data_cache, matrix_out, "barlow_twins", 2, seed=1, attempts=5, window=(2.0, 8.0))
    assert len(statuses) >= 2, statuses  # at least one preemption happened


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("seed", [0, 2])
def test_requeue_loop_with_sigterm_at_random_moments(data_cache, matrix_out, task, seed):
    """Slow tier: every task, 4 epochs, up to 12 preemptions 0.5–10 s after each start."""
    statuses = _requeue(data_cache, matrix_out, task, 2, seed=seed, attempts=12, window=(0.5, 10.0), epochs=4)
    assert len(statuses) >= 2, statuses


# -- a stuck DataLoader worker ---------------------------------------------------------------------------------

STUCK_WORKER = """
import sys, time
sys.path.insert(0, {root!r})
import torch
import main
from datamodules.barlow_twins import TwoViewDataset

real_getitem = TwoViewDataset.__getitem__

def stuck(self, key):
    if torch.utils.data.get_worker_info() is not None:
        time.sleep(10_000)  # a worker blocked on a hung read
    return real_getitem(self, key)

TwoViewDataset.__getitem__ = stuck
sys.exit(main.main(sys.argv[1:]))
"""


def test_stuck_dataloader_worker_ends_the_run_with_one_line(data_cache, tmp_path):
    args = tiny_args(data_cache, tmp_path, "stuck", data__num_workers=2, data__worker_timeout=3,
                     trainer__max_epochs=1, log__wandb_mode="disabled")
    result = subprocess.run([sys.executable, "-c", STUCK_WORKER.format(root=str(ROOT)), *args], cwd=ROOT,
                            env=environment(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    # (the subprocess timeout above fails the test if the run hangs on the sleeping worker instead)
    assert "--data.worker_timeout=3 s" in errors[0] and "2 DataLoader worker processes" in errors[0], errors[0]


def test_negative_worker_timeout_is_one_line(capsys):
    import main

    assert main.main(["--data.worker_timeout=-1"]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: --data.worker_timeout must be >= 0 seconds (0 = wait forever), got -1.0"


# -- the pieces, in process --------------------------------------------------------------------------------------

class _KeyDataset(torch.utils.data.Dataset):
    """Returns the sampler's key itself: the batches show which items, with which item seeds, were loaded."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, key):
        return torch.tensor(key)


def _expected_keys(seed: int, epoch: int, start: int) -> list[list[int]]:
    """The documented order of a shuffled SeededSampler, written out: a permutation drawn from
    mix_seed(seed, epoch, 0), item seeds mix_seed(seed, epoch, 1, position), from position ``start`` on."""
    from datamodules.sampling import mix_seed

    order = torch.randperm(16, generator=torch.Generator().manual_seed(mix_seed(seed, epoch, 0))).tolist()
    return [[order[p], mix_seed(seed, epoch, 1, p)] for p in range(start, 16)]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_reads_its_sampler_at_the_first_batch_not_at_iter(workers):
    """Lightning calls iter() on the training loader before it restores a checkpoint and sets the epoch; the
    batches must follow the sampler's state at the first next(), with workers as without."""
    from datamodules.sampling import SeededLoader, SeededSampler

    def loader(cls):
        sampler = SeededSampler(16, seed=5)
        return cls(_KeyDataset(), batch_size=4, sampler=sampler, num_workers=workers, drop_last=True,
                   persistent_workers=workers > 0), sampler

    seeded, sampler = loader(SeededLoader)
    iterator = iter(seeded)
    sampler.set_epoch(3)
    sampler.resume_within_epoch(3, 8)  # what a checkpoint 2 batches into epoch 3 restores
    got = [key.tolist() for batch in iterator for key in batch]
    assert got == _expected_keys(5, 3, 8)
    # the next epoch starts at its first batch (persistent workers reused)
    sampler.set_epoch(4)
    assert [key.tolist() for batch in seeded for key in batch] == _expected_keys(5, 4, 0)
    if workers:  # the failure this guards against: a plain DataLoader with workers reads the sampler at iter()
        plain, plain_sampler = loader(torch.utils.data.DataLoader)
        iterator = iter(plain)
        plain_sampler.set_epoch(3)
        plain_sampler.resume_within_epoch(3, 8)
        assert [key.tolist() for batch in iterator for key in batch] != _expected_keys(5, 3, 8)


class _Recorder:
    """Stands in for a LightningModule: records what StepMetrics.log_epoch logs."""

    _trainer = None

    def __init__(self):
        self.logged = {}

    def log(self, name, value, **kwargs):
        self.logged[name] = value


def test_step_metrics_state_continues_an_epoch_exactly():
    from utils.step_logging import StepMetrics

    values = [(torch.tensor(1.5), torch.tensor(10.0), 8), (torch.tensor(2.25), torch.tensor(-3.0), 8),
              (torch.tensor(0.1), torch.tensor(7.7), 8), (torch.tensor(4.0), torch.tensor(0.3), 8)]

    def feed(metrics, items):
        for loss, other, batch in items:
            metrics.add("train/loss", loss, prog_bar=True)
            metrics.add("train/per_dim", other, on_step=False)
            metrics.commit(_Recorder(), batch)

    whole, first = StepMetrics(), StepMetrics()
    feed(whole, values)
    feed(first, values[:2])
    state = first.state_dict()
    resumed = StepMetrics()  # a new process
    resumed.load_state_dict(state)
    feed(resumed, values[2:])
    logged_whole, logged_resumed = _Recorder(), _Recorder()
    whole.log_epoch(logged_whole)
    resumed.log_epoch(logged_resumed)
    # Lightning's arithmetic by hand: float32 running sum of value × batch size from zero, over Σ batch size
    for name, column in (("train/loss_epoch", 0), ("train/per_dim", 1)):
        total = torch.tensor(0.0)
        for item in values:
            total = total + item[column] * item[2]
        want = total / torch.tensor(32)
        assert torch.equal(logged_whole.logged[name], want), name
        assert torch.equal(logged_resumed.logged[name], want), name
    # without the state, the mean would be over the last two batches only (the defect this prevents)
    fresh = StepMetrics()
    feed(fresh, values[2:])
    logged_fresh = _Recorder()
    fresh.log_epoch(logged_fresh)
    assert not torch.equal(logged_fresh.logged["train/loss_epoch"], logged_whole.logged["train/loss_epoch"])
