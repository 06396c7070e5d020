"""Barlow Twins training throughput: our Lightning step vs a bare PyTorch loop on the same model.

Both sides train the same backbone + projector (micro-batched and/or compiled when the config says so) with the same loss, optimiser and batches (pre-made
tensors already on the device, so data loading is excluded), alternating in rounds so machine noise hits both alike.
Each round prints ms per step of both (wall clock, and process CPU time, which other jobs on a shared machine
disturb less); the summary gives the medians, their spread over the rounds, the difference (our fixed per-step
cost) and the ratio. A last line measures the data path alone: our DataLoader (decode + two-view augmentation) in img/s.

    python benchmarks/bench_train_step.py --config config/quickstart.yaml --steps 20 --rounds 3

The per-step fixed cost, on a near-zero model so that the framework's cost dominates:

    python benchmarks/bench_train_step.py --config config/quickstart.yaml --steps 300 --warmup 20 --batch-size 8 \
        --data-batches 1 --backbone.depth 1 --backbone.embed_dim 16 --backbone.num_heads 1 --data.img_size 16 \
        --barlow.proj_dim 16 --data.num_workers 0 --rounds 7 --threads 1

``--callbacks run`` gives our side every callback and the CSV logger of a real run (trainer.build_callbacks);
``--bare-optimizer ours`` gives the bare loop our optimiser implementation instead of PyTorch's default AdamW;
``--sync-debug warn`` (CUDA) counts the host syncs in our measured steps (torch.cuda.set_sync_debug_mode);
``--profile N`` prints the N most expensive functions (cProfile, cumulative) of one extra run of our side.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from config.loading import parse_config, to_dict  # noqa: E402
from datamodules.barlow_twins import BarlowTwinsDataModule  # noqa: E402
from lightningmodules.barlow_twins import BarlowTwinsModule  # noqa: E402
from lightningmodules import TASKS  # noqa: E402
from models.losses import barlow_twins_loss  # noqa: E402
from trainer import build_callbacks  # noqa: E402
from utils.loggers import RunCSVLogger  # noqa: E402
from utils.optim import build_optimizer, effective_lr  # noqa: E402


class _Batches:
    """An iterable of ready batches (a bare list would be read by Lightning as a list of loaders)."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


class _Timer(pl.Callback):
    """Wall and CPU time from the start of step ``warmup`` to the end of step ``last`` - 1 (``last`` None: to
    the end of training). With ``sync_debug`` ("warn"/"error", CUDA), torch.cuda.set_sync_debug_mode is on in
    between and the warnings it raises are kept in ``sync_warnings``."""

    def __init__(self, warmup: int, last: Optional[int] = None, sync_debug: str = "off"):
        self.warmup, self.last, self.sync_debug = warmup, last, sync_debug
        self.start = self.end = self.start_cpu = self.end_cpu = None
        self.sync_warnings: list[str] = []
        self._catcher = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            self._sync(pl_module)
            if self.sync_debug != "off" and pl_module.device.type == "cuda":
                self._catcher = warnings.catch_warnings(record=True)
                self.sync_warnings = self._catcher.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode(self.sync_debug)
            self.start, self.start_cpu = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.last is not None and trainer.global_step == self.last and self.end is None:
            self._stop(pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.end is None:
            self._stop(pl_module)

    def _stop(self, module):
        self._sync(module)
        self.end, self.end_cpu = time.perf_counter(), time.process_time()
        if self._catcher is not None:
            torch.cuda.set_sync_debug_mode(0)
            self._catcher.__exit__(None, None, None)
            self.sync_warnings = [str(w.message) for w in self.sync_warnings]
            self._catcher = None

    @staticmethod
    def _sync(module):
        if module.device.type == "cuda":
            torch.cuda.synchronize()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def build_module(cfg) -> BarlowTwinsModule:
    module = BarlowTwinsModule(to_dict(cfg))
    if cfg.trainer.compile:  # as trainer.build does
        module.backbone.compile(mode=cfg.trainer.compile_mode)
    return module


def _trainer_extras(cfg, kind: str, tmp: Optional[str]) -> tuple[list, list]:
    """(callbacks, loggers) of our side: none, or those of a real run (``kind`` "run"; files under ``tmp``).
    Without validation batches here, ModelCheckpoint (best by val metric) is left out."""
    if kind == "none":
        return [], []
    cfg = copy.deepcopy(cfg)
    cfg.trainer.limit_val_batches = 0  # no validation loop here
    # Callbacks that draw pictures from validation images at epoch ends (outside the timed steps, and there is
    # no datamodule here) are left out; they have no per-step hooks. The cross-correlation callback (per-step
    # scalars) stays, as do the checks, checkpointing, LR monitor and progress bar.
    c = cfg.callbacks
    c.attention = c.emergence = c.views = c.erf = c.predictions = c.online_probe = False
    return build_callbacks(cfg, TASKS.get(cfg.task), Path(tmp) / "checkpoints"), [RunCSVLogger(Path(tmp))]


def lightning_step_times(cfg, views, steps: int, warmup: int, precision: str, device: torch.device,
                         callbacks: str = "none", sync_debug: str = "off") -> _Timer:
    """Our side: the Lightning module and Trainer over pre-made batches on the device; the timer holds the
    wall and CPU seconds of ``steps`` steps after ``warmup`` (and the sync-debug warnings, if asked)."""
    import tempfile

    module = build_module(cfg)
    # The same pre-made batches as the bare loop, already on the device: no collation, no host copies.
    b = cfg.data.batch_size
    x1s, x2s = (v.to(device) for v in views)
    batches = [(x1s[j:j + b], x2s[j:j + b]) for j in range(0, x1s.shape[0] - b + 1, b)]
    loader = _Batches([batches[i % len(batches)] for i in range(steps + warmup)])
    timer = _Timer(warmup, last=steps + warmup, sync_debug=sync_debug)
    with tempfile.TemporaryDirectory() as tmp:
        extra_callbacks, loggers = _trainer_extras(cfg, callbacks, tmp)
        run = callbacks == "run"
        # a real run's callbacks: its checkpointing (RunCheckpoint), progress bar and logging interval; the
        # Trainer alone: Lightning's defaults (log_every_n_steps 50), as the first figures were measured
        trainer = pl.Trainer(max_steps=steps + warmup, logger=loggers or False, enable_checkpointing=run,
                             enable_progress_bar=run and cfg.trainer.progress_bar, enable_model_summary=False,
                             limit_val_batches=0, precision=precision, callbacks=[timer, *extra_callbacks],
                             accelerator="auto", devices=1,
                             **({"log_every_n_steps": cfg.trainer.log_every_n_steps} if run else {}))
        trainer.fit(module, train_dataloaders=loader)
    return timer


def lightning_steps_per_s(cfg, views, steps: int, warmup: int, precision: str, device: torch.device) -> float:
    timer = lightning_step_times(cfg, views, steps, warmup, precision, device)
    return steps / (timer.end - timer.start)


def bare_step_times(cfg, views, steps: int, warmup: int, device: torch.device, bf16: bool,
                    optimizer: str = "default") -> tuple[float, float]:
    """The bare loop: (wall, CPU) seconds of ``steps`` steps after ``warmup``. ``optimizer`` "default":
    PyTorch's AdamW as one writes it by hand (its default implementation: foreach on CUDA, a per-tensor loop
    on CPU); "ours": utils.optim.build_optimizer (our groups and implementation; no schedule)."""
    module = build_module(cfg).to(device)
    if optimizer == "ours":
        opt = build_optimizer(module, cfg.optim, effective_lr(cfg))
    else:
        opt = torch.optim.AdamW(module.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    b = cfg.data.batch_size
    x1s, x2s = (v.to(device) for v in views)
    n = x1s.shape[0] // b
    for i in range(steps + warmup):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
        j = i % n
        x1, x2 = x1s[j * b:(j + 1) * b], x2s[j * b:(j + 1) * b]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            z1, z2 = module.embed(x1, x2)
            loss, _ = barlow_twins_loss(z1, z2, cfg.barlow.lambd)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - start_cpu


def bare_steps_per_s(cfg, views, steps: int, warmup: int, device: torch.device, bf16: bool) -> float:
    return steps / bare_step_times(cfg, views, steps, warmup, device, bf16)[0]


def profile_ours(cfg, views, steps: int, warmup: int, precision: str, device: torch.device, callbacks: str,
                 top: int) -> None:
    """cProfile of one run of our side, the ``top`` functions by cumulative time, per step."""
    import cProfile
    import pstats

    profiler = cProfile.Profile(time.process_time)  # CPU time: other jobs on the machine count less
    profiler.enable()
    lightning_step_times(cfg, views, steps, warmup, precision, device, callbacks)
    profiler.disable()
    print(f"profile of our side ({steps + warmup} steps; cumulative CPU ms per step, cProfile adds its own cost):")
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][3], reverse=True)[:top]
    for (filename, line, name), (_, calls, _, cumulative, _) in rows:
        where = "/".join(Path(filename).parts[-2:])
        print(f"  {1000 * cumulative / (steps + warmup):8.3f} ms  {calls:7d} calls  {name} ({where}:{line})")


def data_images_per_s(cfg, batches: int) -> float:
    dm = BarlowTwinsDataModule(cfg.data, cfg.aug, cfg.seed)
    dm.prepare_data()
    dm.setup()
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # worker start-up excluded
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        x1 = dm.on_after_batch_transfer(batch, 0)[0]  # finished views in either augmentation mode
        seen += x1.shape[0]
    return seen / (time.perf_counter() - start)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=0, help="override data.batch_size")
    parser.add_argument("--data-batches", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads (0: torch's default); 1 measures more stably on a shared CPU")
    parser.add_argument("--callbacks", choices=("none", "run"), default="none",
                        help="our side's callbacks and logger: none (the Trainer alone), or a real run's")
    parser.add_argument("--bare-optimizer", choices=("default", "ours"), default="default",
                        help="the bare loop's optimiser: PyTorch's default AdamW, or ours (utils.optim)")
    parser.add_argument("--sync-debug", choices=("off", "warn", "error"), default="off",
                        help="CUDA: torch.cuda.set_sync_debug_mode during our measured steps; prints the syncs")
    parser.add_argument("--profile", type=int, default=0, help="print the N costliest functions of our side")
    args, overrides = parser.parse_known_args()
    cfg = parse_config(["--config", args.config, *overrides])
    if args.batch_size:
        cfg.data.batch_size = args.batch_size
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = cuda and torch.cuda.is_bf16_supported()
    precision = "bf16-mixed" if bf16 else "32-true"
    b, s = cfg.data.batch_size, cfg.data.img_size
    n = b * 4
    g = torch.Generator().manual_seed(0)
    views = (torch.randn(n, 3, s, s, generator=g), torch.randn(n, 3, s, s, generator=g))
    name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"device: {name}; precision {precision}; backbone {cfg.backbone.name} depth={cfg.backbone.depth} "
          f"embed_dim={cfg.backbone.embed_dim} patch={cfg.backbone.patch_size}; img {s}px; batch {b}; "
          f"proj {cfg.barlow.proj_layers}x{cfg.barlow.proj_dim}; optim {cfg.optim.name}; "
          f"ours: callbacks {args.callbacks}; bare: {args.bare_optimizer} optimiser; "
          f"{args.steps} steps x {args.rounds} rounds")
    ours, bare, ours_cpu, bare_cpu = [], [], [], []
    for r in range(args.rounds):
        torch.manual_seed(r)
        _reset_peak()
        timer = lightning_step_times(cfg, views, args.steps, args.warmup, precision, device, args.callbacks,
                                     args.sync_debug)
        ours.append(1000 * (timer.end - timer.start) / args.steps)
        ours_cpu.append(1000 * (timer.end_cpu - timer.start_cpu) / args.steps)
        ours_peak = _peak_gib()
        torch.manual_seed(r)
        _reset_peak()
        wall, cpu = bare_step_times(cfg, views, args.steps, args.warmup, device, bf16, args.bare_optimizer)
        bare.append(1000 * wall / args.steps)
        bare_cpu.append(1000 * cpu / args.steps)
        bare_peak = _peak_gib()
        print(f"round {r}: ours {ours[-1]:.3f} ms/step ({1000 / ours[-1]:.3f} steps/s, CPU {ours_cpu[-1]:.3f} ms, "
              f"peak {ours_peak:.2f} GiB), bare {bare[-1]:.3f} ms/step ({1000 / bare[-1]:.3f} steps/s, "
              f"CPU {bare_cpu[-1]:.3f} ms, peak {bare_peak:.2f} GiB)")
        if args.sync_debug != "off":
            sites = sorted(set(timer.sync_warnings))
            print(f"  host syncs in our {args.steps} measured steps: {len(timer.sync_warnings)}"
                  + "".join(f"\n    {site.splitlines()[0][:200]}" for site in sites[:5]))
    o, p = statistics.median(ours), statistics.median(bare)
    diffs = [a - c for a, c in zip(ours, bare)]
    print(f"ours: {1000 / o:.3f} steps/s = {1000 / o * b:.1f} image pairs/s; ms/step {_spread(ours)}; "
          f"CPU ms/step {_spread(ours_cpu)}")
    print(f"bare PyTorch loop: {1000 / p:.3f} steps/s = {1000 / p * b:.1f} image pairs/s; ms/step {_spread(bare)}; "
          f"CPU ms/step {_spread(bare_cpu)}")
    print(f"difference ours - bare: {o - p:+.3f} ms/step (median of medians); per round {_spread(diffs)}; "
          f"CPU {statistics.median(ours_cpu) - statistics.median(bare_cpu):+.3f} ms/step")
    cpu_ratio = statistics.median(bare_cpu) / statistics.median(ours_cpu)
    print(f"ratio ours/bare: {p / o:.3f} (steps/s; CPU time: {cpu_ratio:.3f})")
    if args.profile:
        profile_ours(cfg, views, args.steps, args.warmup, precision, device, args.callbacks, args.profile)
    if args.data_batches:
        d = data_images_per_s(cfg, args.data_batches)
        print(f"data path (decode + two views, {cfg.data.num_workers if cfg.data.num_workers >= 0 else 'auto'} "
              f"workers): {d:.1f} images/s = {d / b:.2f} batches/s (training needs {1000 / o:.2f} batches/s)")


if __name__ == "__main__":
    main()
