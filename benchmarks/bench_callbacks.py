"""Overhead of the visualisation callbacks at their defaults, measured two ways in one script:

1. time spent inside the picture callbacks' hooks on the training thread (Lightning's SimpleProfiler)
   as a fraction of the training loop's time, in one run with the default pictures on;
2. whole-run wall time of the same run with the default pictures on and with every picture off,
   alternating rounds (same seed, same data) — noisy on a shared 2-core machine, where the background
   PNG writer also competes with training for the same cores.

    python benchmarks/bench_callbacks.py --config config/quickstart.yaml --epochs 10 --rounds 3
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import main  # noqa: E402
import trainer as trainer_module  # noqa: E402

OFF = ["--callbacks.attention=false", "--callbacks.erf=false", "--callbacks.cross_correlation=false",
       "--callbacks.views=false", "--callbacks.predictions=false"]


def timed_run(base: list[str], extra: list[str], out: Path, name: str) -> float:
    start = time.perf_counter()
    rc = main.main([*base, *extra, f"--log.output_dir={out}", f"--log.run_name={name}"])
    if rc:
        raise SystemExit(f"run {name} failed with exit status {rc}")
    return time.perf_counter() - start


PICTURE_CALLBACKS = ("AttentionMapCallback", "ReceptiveFieldCallback", "CrossCorrelationCallback",
                     "ViewPairsCallback", "PredictionsCallback")


def profiled_hook_share(base: list[str], out: Path) -> tuple[float, float]:
    """(seconds in picture-callback hooks, seconds of the fit loop) from Lightning's SimpleProfiler."""
    import functools

    import pytorch_lightning as pl
    from pytorch_lightning.profilers import SimpleProfiler

    profiler = SimpleProfiler()
    original = trainer_module.pl.Trainer
    trainer_module.pl.Trainer = functools.partial(pl.Trainer, profiler=profiler)
    try:
        timed_run(base, [], out, "profiled")
    finally:
        trainer_module.pl.Trainer = original
    totals = {name: sum(durations) for name, durations in profiler.recorded_durations.items()}
    hooks = sum(t for name, t in totals.items() if any(f"[Callback]{cb}." in name for cb in PICTURE_CALLBACKS))
    fit = totals.get("run_training_epoch", 0.0) + totals.get("[Callback]CrossCorrelationCallback.on_train_start", 0.0) \
        + totals.get("[Callback]AttentionMapCallback.on_train_end", 0.0)
    return hooks, fit


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/quickstart.yaml")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args, overrides = parser.parse_known_args()
    logging.disable(logging.WARNING)
    base = ["--config", args.config, f"--trainer.max_epochs={args.epochs}", "--log.wandb_mode=disabled",
            "--trainer.progress_bar=false", *overrides]
    on, off = [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        timed_run(base, OFF + ["--trainer.max_epochs=1"], out, "warmup")  # data generation, imports, caches
        hooks, fit = profiled_hook_share(base, out)
        print(f"picture hooks on the training thread: {hooks:.2f} s of {fit:.1f} s training = {100 * hooks / fit:.1f}%",
              flush=True)
        for r in range(args.rounds):
            on.append(timed_run(base, [], out, f"on{r}"))
            off.append(timed_run(base, OFF, out, f"off{r}"))
            print(f"round {r}: defaults {on[-1]:.1f} s, pictures off {off[-1]:.1f} s", flush=True)
        pictures = sorted(p.name for p in (out / "on0" / "media").glob("*.png"))
    a, b = statistics.median(on), statistics.median(off)
    print(f"pictures written per run: {len(pictures)} ({', '.join(pictures)})")
    print(f"median wall time: defaults {a:.1f} s, pictures off {b:.1f} s; overhead {100 * (a / b - 1):.1f}%")


if __name__ == "__main__":
    main_cli()
