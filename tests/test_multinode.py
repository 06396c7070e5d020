"""Multi-node runs on this machine: two torchrun "nodes" (``--nnodes 2 --nproc-per-node 1``, c10d rendezvous on
127.0.0.1, gloo on CPU) running main.py with ``--trainer.num_nodes 2``, and two processes under a simulated
SLURM allocation built from the sbatch script of docs/distributed.md.

References: one process with the global batch (2 × the per-node batch): the same loss (Barlow Twins: its loss is
computed on the gathered global batch; DINO: the mean of the two nodes' batch means), the same gradients after
DDP's all-reduce at every step, the same parameters after the last step. Outputs: one run directory with one
``last.ckpt``, one ``metrics.csv`` (each step once), one wandb run, the run lock held by global rank 0 only.
A node that vanishes mid-epoch (its agent and its process SIGKILLed, from a callback at a fixed step: steps of
the tiny model take milliseconds, a kill from outside could not be placed) and both nodes relaunched with
``--trainer.resume auto`` continue with the reference's gradients and end with its parameters.

The processes run tests/multinode_entry.py: main.py plus a callback that saves each process's losses, gradients
and final parameters. Each launch imports torch and Lightning in every process: slow on a busy CPU, so only the
Barlow Twins comparison runs in CI; the rest is ``-m slow``.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_args

ROOT = Path(__file__).resolve().parents[1]
ENTRY = str(ROOT / "tests" / "multinode_entry.py")
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
LAUNCH_TIMEOUT_S = 420
NODE_BATCH = 4  # per node; the reference process runs 2 × 4 (32 images: 4 steps per epoch)

DINO = {"task": "dino", "dino__out_dim": 64, "dino__hidden_dim": 32, "dino__bottleneck_dim": 16,
        "dino__local_crops_number": 2, "dino__local_crop_size": 16, "backbone__drop_path_rate": 0,
        "optim__warmup_epochs": 1, "trainer__max_epochs": -1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(record: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_", "VITSSL_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)})
    if record is not None:
        record.mkdir(parents=True, exist_ok=True)
        env["VITSSL_TEST_RECORD"] = str(record)
    return env


def run_args(data: Path, out: Path, name: str, steps: int, **overrides) -> list[str]:
    values = {"data__batch_size": NODE_BATCH, "trainer__max_steps": steps, "trainer__max_epochs": -1,
              "trainer__limit_val_batches": 0, "callbacks__emergence": "false", "callbacks__attention": "false",
              "callbacks__cross_correlation": "false", "callbacks__teacher_entropy": "false",
              "optim__name": "lars", "optim__warmup_epochs": 1}
    values.update(overrides)
    return tiny_args(data, out, name, **values)


def launch_nodes(args: list[str], env: dict, logs: Path, rdzv_id: str) -> list[subprocess.Popen]:
    """Two torchrun agents as two nodes of one job (each in its own session, so a node can be killed whole)."""
    port = free_port()
    procs = []
    for node in range(2):
        command = [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id, ENTRY, *args,
                   "--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]
        log = open(logs / f"node{node}-{rdzv_id}.log", "w")
        procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def wait(procs: list[subprocess.Popen], logs: Path) -> None:
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    for proc in procs:
        try:
            proc.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError(f"nodes did not finish: {tail(logs)}")
    assert all(p.returncode == 0 for p in procs), f"exit statuses {[p.returncode for p in procs]}: {tail(logs)}"


def tail(logs: Path) -> str:
    return "\n".join(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:])
                     for f in sorted(logs.glob("*.log")))


def single_process(args: list[str], record: Path, logs: Path) -> dict:
    command = [sys.executable, ENTRY, *args, f"--data.batch_size={2 * NODE_BATCH}", "--trainer.accelerator=cpu"]
    done = subprocess.run(command, cwd=ROOT, env=base_env(record), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(record / "rank0.pt")


def assert_close_tensors(ours: dict, reference: dict, what: str, gradients: bool = False) -> None:
    """Equal up to float32 rounding. The global batch's sums run in another order on two nodes (gathered
    features, all-reduced gradients); the rounding error follows the size of the terms summed, which for a
    gradient is the scale of the whole step's gradients (a near-zero gradient, e.g. the final norm's bias, is
    a cancellation of large terms). Measured here: 1e-5 of the step's largest gradient at the first step,
    3e-5 at the third; on the parameters 5e-7 after 3 steps, 8e-6 after 7 (the drift grows with the steps).
    A wrong factor (e.g. the world size) is off by 50 percent."""
    assert ours.keys() == reference.keys(), what
    scale = max(float(t.abs().max()) for t in reference.values() if t.is_floating_point() and t.numel())
    for name in reference:
        if reference[name].is_floating_point():
            atol = 1e-4 * scale if gradients else 5e-5
            torch.testing.assert_close(ours[name], reference[name], rtol=1e-3 if gradients else 1e-4, atol=atol,
                                       msg=f"{what}: {name}")
        else:
            assert torch.equal(ours[name], reference[name]), f"{what}: {name}"


def check_against_reference(nodes: list[dict], reference: dict, task: str, steps: int) -> None:
    assert [n["world_size"] for n in nodes] == [2, 2] and [n["num_nodes"] for n in nodes] == [2, 2]
    assert sorted(n["node_rank"] for n in nodes) == [0, 1]
    assert len(reference["loss"]) == len(nodes[0]["loss"]) == steps
    for step in range(steps):
        if task == "barlow_twins":  # the loss of the gathered global batch, on both nodes
            expected = [reference["loss"][step]] * 2
            assert nodes[0]["loss"][step] == pytest.approx(expected[0], rel=1e-5)
            assert nodes[1]["loss"][step] == pytest.approx(expected[1], rel=1e-5)
        else:  # DINO: each node's own batch mean; their mean is the global batch's
            assert (nodes[0]["loss"][step] + nodes[1]["loss"][step]) / 2 == pytest.approx(reference["loss"][step],
                                                                                          rel=1e-5)
        for node in nodes:
            assert_close_tensors(node["grads"][step], reference["grads"][step], f"gradients at step {step}", True)
    for node in nodes:
        assert_close_tensors(node["params"], reference["params"], "parameters after the last step")


def check_one_run(out: Path, name: str, steps: int) -> None:
    assert [p.name for p in out.iterdir()] == [name]  # one run directory
    run = out / name
    assert [p.name for p in (run / "checkpoints").glob("*.ckpt")] == ["last.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == steps
    assert [p.name for p in run.glob("**/metrics.csv")] == ["metrics.csv"]
    with open(run / "metrics.csv") as f:
        logged = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss_step")]
    assert logged == list(range(steps))  # each step once (only rank 0 writes)
    # one wandb run: each launch of an offline run adds a folder offline-run-<time>-<id>, all with the run's id
    assert len({p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")}) == 1


@pytest.mark.usefixtures("one_thread")
def test_two_torchrun_nodes_train_like_one_process_on_the_global_batch(data_cache, tmp_path):
    steps = 3
    reference = single_process(run_args(data_cache, tmp_path / "ref-runs", "ref", steps), tmp_path / "ref", tmp_path)
    wait(launch_nodes(run_args(data_cache, tmp_path / "runs", "twonodes", steps), base_env(tmp_path / "rec"),
                      tmp_path, "bt"), tmp_path)
    nodes = [torch.load(tmp_path / "rec" / f"rank{r}.pt") for r in range(2)]
    check_against_reference(nodes, reference, "barlow_twins", steps)
    check_one_run(tmp_path / "runs", "twonodes", steps)
    # the run's lock (one process per run directory) was taken by global rank 0 alone; rank 1 ran beside it
    assert json.loads((tmp_path / "runs" / "twonodes" / "run.lock").read_text())["pid"] == nodes[0]["pid"]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_two_torchrun_nodes_train_dino_like_one_process_on_the_global_batch(data_cache, tmp_path):
    steps = 3
    args = lambda out, name: run_args(data_cache, out, name, steps, **DINO)  # noqa: E731
    reference = single_process(args(tmp_path / "ref-runs", "ref"), tmp_path / "ref", tmp_path)
    wait(launch_nodes(args(tmp_path / "runs", "dino"), base_env(tmp_path / "rec"), tmp_path, "dino"), tmp_path)
    nodes = [torch.load(tmp_path / "rec" / f"rank{r}.pt") for r in range(2)]
    check_against_reference(nodes, reference, "dino", steps)
    check_one_run(tmp_path / "runs", "dino", steps)


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, weights_only=False, map_location="cpu")["global_step"])


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_killed_node_and_a_relaunch_with_resume_auto_continue_exactly(data_cache, tmp_path):
    steps, killed_at = 7, 5  # 4 steps per epoch: the second node goes away in the middle of the second epoch
    args = lambda out, name: run_args(data_cache, out, name, steps, trainer__checkpoint_every_n_steps=1,  # noqa: E731
                                      trainer__resume="auto")
    reference = single_process(args(tmp_path / "ref-runs", "ref"), tmp_path / "ref", tmp_path)

    out = tmp_path / "runs"
    nodes = launch_nodes(args(out, "killed"), {**base_env(tmp_path / "first"), "VITSSL_TEST_KILL_AT_STEP": str(killed_at)},
                         tmp_path, "first")
    nodes[1].wait(timeout=LAUNCH_TIMEOUT_S)
    assert nodes[1].returncode == -signal.SIGKILL
    try:
        nodes[0].wait(timeout=180)  # its peer gone, node 0 fails in the next collective
    except subprocess.TimeoutExpired:
        os.killpg(nodes[0].pid, signal.SIGKILL)
        nodes[0].wait()
    assert nodes[0].returncode != 0
    last = out / "killed" / "checkpoints" / "last.ckpt"
    assert checkpoint_step(last) == killed_at

    wait(launch_nodes(args(out, "killed"), base_env(tmp_path / "rec"), tmp_path, "second"), tmp_path)
    resumed = [torch.load(tmp_path / "rec" / f"rank{r}.pt") for r in range(2)]
    assert len(resumed[0]["loss"]) == steps - killed_at  # continued from the checkpoint, not from scratch
    for node in resumed:
        assert_close_tensors(node["params"], reference["params"], "parameters after the resumed run")
    for step, (ours, theirs) in enumerate(zip(resumed[0]["grads"], reference["grads"][killed_at:])):
        assert_close_tensors(ours, theirs, f"gradients at step {killed_at + step}", True)
    check_one_run(out, "killed", steps)


# ----------------------------------------------------------------------------------------------- SLURM
def documented_sbatch() -> tuple[dict[str, str], str]:
    """The sbatch script of docs/distributed.md: its #SBATCH options and its srun command line."""
    text = (ROOT / "docs" / "distributed.md").read_text()
    script = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "#SBATCH" in b)
    options = dict(re.findall(r"^\s*#SBATCH --([\w-]+)(?:=(\S+))?", script, re.M))
    joined = re.sub(r"\\\n\s*", " ", script)
    srun = next(line.strip() for line in joined.splitlines() if line.strip().startswith("srun "))
    return options, re.sub(r"\s#.*$", "", srun)


def slurm_env(rank: int, nodes: int, port: int, job_id: str) -> dict:
    """What srun gives task ``rank`` of ``nodes`` one-task nodes (the variables Lightning's SLURMEnvironment reads)."""
    return {"SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": "vitssl", "SLURM_NTASKS": str(nodes),
            "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": str(nodes), "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_NODELIST": "127.0.0.1", "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0",
            "SLURM_NODEID": str(rank), "MASTER_PORT": str(port)}


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_the_documented_sbatch_script_under_a_simulated_slurm_allocation(data_cache, tmp_path):
    options, srun = documented_sbatch()
    tokens = shlex.split(srun)
    assert tokens[:3] == ["srun", "python", "main.py"]
    flags = tokens[3:]
    # the script's own numbers agree: one task per GPU, nodes × tasks processes
    assert flags[flags.index("--trainer.num_nodes") + 1] == options["nodes"]
    assert flags[flags.index("--trainer.devices") + 1] == options["ntasks-per-node"]
    assert options.get("requeue", "") == "" and "requeue" in options
    assert flags[flags.index("--trainer.resume") + 1] == "auto"
    # Simulated: the script's nodes, one task per node here (CPU processes), the script's flags with the tiny
    # overrides after them (later flags win), $SLURM_JOB_ID expanded as the shell would.
    nodes, job_id, port = int(options["nodes"]), "4242", free_port()
    tiny = [f for f in run_args(data_cache, tmp_path / "runs", "unused", 2) if not f.startswith("--log.run_name")]
    procs = []
    for rank in range(nodes):
        env = {**base_env(tmp_path / "rec"), **slurm_env(rank, nodes, port, job_id)}
        argv = [os.path.expandvars(t).replace("$SLURM_JOB_ID", job_id) for t in flags]
        argv = [t.replace("${SLURM_JOB_ID}", job_id) for t in argv]
        command = [sys.executable, ENTRY, *argv, *tiny, "--trainer.devices=1", "--trainer.accelerator=cpu"]
        log = open(tmp_path / f"slurm{rank}.log", "w")
        procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    wait(procs, tmp_path)
    records = [torch.load(tmp_path / "rec" / f"rank{r}.pt") for r in range(nodes)]
    assert [r["world_size"] for r in records] == [nodes] * nodes and [r["num_nodes"] for r in records] == [nodes] * nodes
    assert sorted(r["node_rank"] for r in records) == list(range(nodes))
    run_name = re.search(r"--log\.run_name (\S+)", srun).group(1).replace("$SLURM_JOB_ID", job_id)
    check_one_run(tmp_path / "runs", run_name, 2)
