"""Overhead of the visualisation callbacks at their defaults: whole-run wall time of the same run with
the default pictures on and with every picture off, alternating rounds (same seed, same data).

    python benchmarks/bench_callbacks.py --config config/quickstart.yaml --epochs 10 --rounds 2
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

OFF = ["--callbacks.attention=false", "--callbacks.erf=false", "--callbacks.cross_correlation=false",
       "--callbacks.views=false", "--callbacks.predictions=false"]


def timed_run(base: list[str], extra: list[str], out: Path, name: str) -> float:
    start = time.perf_counter()
    rc = main.main([*base, *extra, f"--log.output_dir={out}", f"--log.run_name={name}"])
    if rc:
        raise SystemExit(f"run {name} failed with exit status {rc}")
    return time.perf_counter() - start


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
