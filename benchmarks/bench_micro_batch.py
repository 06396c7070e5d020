"""Peak memory and throughput of the Barlow Twins training step vs batch size, with and without
micro-batching (``--barlow.micro_batch_size``), and the largest batch within a memory budget.

Each configuration runs our Lightning step (pre-made batches on the device, data loading excluded) in a
fresh subprocess, so peak memories do not mix: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the
growth of the process's peak resident memory over its size before the first step (model, optimiser-free
weights and the input tensors already allocated), i.e. activations + gradients + optimiser state.
The first line pair is the reference: a plain step at batch M (the micro-batch size). The ratios printed
are against it, in one run, because these machines are noisy.

    python benchmarks/bench_micro_batch.py --config config/quickstart.yaml --micro 64 --batches 64,256,1024 \\
        --budget-gib 4
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(config: str, overrides: list[str], batch: int, micro: int, steps: int, warmup: int) -> dict:
    """One configuration, in this process: steps/s and peak memory of our training step."""
    import torch

    # local: only the measuring child process imports torch (its peak memory is what is measured)
    from benchmarks.bench_train_step import lightning_steps_per_s
    from config.loading import parse_config

    cfg = parse_config(["--config", config, *overrides])
    cfg.data.batch_size, cfg.barlow.micro_batch_size = batch, micro
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = "bf16-mixed" if cuda and torch.cuda.is_bf16_supported() else "32-true"
    s = cfg.data.img_size
    g = torch.Generator().manual_seed(0)
    views = (torch.randn(batch, 3, s, s, generator=g), torch.randn(batch, 3, s, s, generator=g))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    rate = lightning_steps_per_s(cfg, views, steps, warmup, precision, device)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    flops = model_flops_per_pair(cfg, device) * batch
    return {"batch": batch, "micro": micro, "steps_per_s": rate, "images_per_s": rate * batch,
            "peak_gib": peak / 2**30, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "model_tflops_per_s": flops * rate / 1e12}


def model_flops_per_pair(cfg, device) -> float:
    """Model FLOPs of one training step per image pair (forward + backward of backbone, projector and loss,
    without the micro-batching recomputation — the usual MFU convention), counted by torch's FLOP counter
    on 2 pairs; every term is linear in the batch (the D×D matrix costs N·D²)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    # local: only the measuring child process imports torch (its peak memory is what is measured)
    from benchmarks.bench_train_step import build_module
    from models.losses import barlow_twins_loss

    cfg = copy.deepcopy(cfg)
    cfg.barlow.micro_batch_size = 0
    module = build_module(cfg).to(device)
    s = cfg.data.img_size
    x1, x2 = torch.randn(2, 3, s, s, device=device), torch.randn(2, 3, s, s, device=device)
    with FlopCounterMode(display=False) as counter:
        z1, z2 = module.embed(x1, x2)
        barlow_twins_loss(z1, z2, cfg.barlow.lambd)[0].backward()
    return counter.get_total_flops() / 2


def run_isolated(args, batch: int, micro: int) -> dict | None:
    command = [sys.executable, __file__, "--worker", "--config", args.config, "--batch", str(batch),
               "--micro", str(micro), "--steps", str(args.steps), "--warmup", str(args.warmup), *args.overrides]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
        print(f"  batch {batch} micro {micro}: failed ({tail[0][:160]})")
        return None
    return json.loads(lines[-1])


def largest_batch(args, micro: int, budget_gib: float, start: int, limit: int) -> int:
    """Double the batch until the step does not fit the budget (or fails: out of memory); return the last
    one that fit."""
    best, batch = 0, start
    while batch <= limit:
        result = run_isolated(args, batch, micro if micro < batch else 0)
        if result is None or result["peak_gib"] > budget_gib:
            break
        best, batch = batch, batch * 2
    return best


def mfu(result: dict, peak_tflops: float) -> str:
    return f"{result['model_tflops_per_s'] / peak_tflops:.1%}" if peak_tflops else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/quickstart.yaml")
    parser.add_argument("--micro", type=int, default=64, help="micro-batch size M (also the reference batch)")
    parser.add_argument("--batches", default="256,1024", help="comma-separated batch sizes to compare")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--budget-gib", type=float, default=0.0, help="also find the largest batch within this budget")
    parser.add_argument("--budget-limit", type=int, default=16384, help="largest batch the budget search tries")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="the device's peak TFLOP/s at the run's precision, to print model FLOPs utilisation "
                             "(e.g. 989 for an H100 SXM in bf16, 989 for an H200)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    args, args.overrides = parser.parse_known_args()
    if args.worker:
        print(json.dumps(measure(args.config, args.overrides, args.batch, args.micro, args.steps, args.warmup)))
        return

    reference = run_isolated(args, args.micro, 0)
    if reference is None:
        sys.exit("the reference step failed")
    print(f"device: {reference['device']}; config {args.config} {' '.join(args.overrides)}")
    print(f"reference: plain step at batch {args.micro}: {reference['images_per_s']:.1f} image pairs/s, "
          f"peak {reference['peak_gib']:.3f} GiB")
    print("| batch | micro-batch | pairs/s | × reference | peak GiB | × reference | model TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        for micro in (0, args.micro):
            r = run_isolated(args, batch, micro)
            if r is None:
                continue
            print(f"| {batch} | {micro or 'off'} | {r['images_per_s']:.1f} | "
                  f"{r['images_per_s'] / reference['images_per_s']:.2f} | {r['peak_gib']:.3f} | "
                  f"{r['peak_gib'] / reference['peak_gib']:.2f} | {r['model_tflops_per_s']:.2f} | "
                  f"{mfu(r, args.peak_tflops)} |", flush=True)
    if args.budget_gib:
        for micro in (0, args.micro):
            best = largest_batch(args, micro, args.budget_gib, args.micro, args.budget_limit)
            print(f"largest batch within {args.budget_gib} GiB, micro-batching {micro or 'off'}: "
                  f"{best or 'none'} (doubling from {args.micro}, limit {args.budget_limit})", flush=True)


if __name__ == "__main__":
    main()
