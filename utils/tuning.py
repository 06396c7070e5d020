"""Batch-size and learning-rate auto-tuning with Lightning's Tuner, before training.

The values found are the ones training uses (the DataModule's ``batch_size`` and the module's ``lr``,
read when the dataloader and the optimiser are built), and they are written back: into the run's
``config.yaml`` (with the tune flags switched off, so giving that file back with ``--config`` trains
with the same values without searching again), into the wandb run config, and into ``tuning.yaml``
with the search's details. The LR range test's loss-vs-LR curve goes to ``media/lr_finder.png`` (and
``.csv``) and to wandb.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml
from pytorch_lightning.tuner import Tuner

from callbacks.rng_state import collect_rng_state, restore_rng_state
from callbacks.visual import log_image
from config.loading import save_config, to_dict

log = logging.getLogger(__name__)

# Below this batch the Barlow Twins cross-correlation matrix explodes (report §5.1).
MIN_RELIABLE_BT_BATCH = 64


@dataclass
class TuningResult:
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    notes: list[str] = field(default_factory=list)


def _batch_size_warning(batch: int) -> str:
    return (
        f"the batch-size tuner found {batch}, below {MIN_RELIABLE_BT_BATCH}: Barlow Twins' cross-correlation "
        f"matrix is estimated over the batch and the report saw it explode below {MIN_RELIABLE_BT_BATCH}. "
        f"Use a smaller model (--backbone.depth / embed_dim), a larger patch or smaller --data.img_size, "
        f"bf16 precision on a GPU, or a GPU with more memory"
    )


def tune_batch_size(run, tuner: Tuner, result: TuningResult) -> None:
    t = run.cfg.trainer
    init = max(2, min(run.cfg.data.batch_size, t.tune_batch_size_max))
    found = tuner.scale_batch_size(
        run.module, datamodule=run.datamodule, mode=t.tune_batch_size_mode, init_val=init,
        max_trials=t.tune_batch_size_trials, max_val=t.tune_batch_size_max, batch_arg_name="batch_size",
    )
    found = int(found if found is not None else run.datamodule.batch_size)
    run.datamodule.batch_size = found
    run.cfg.data.batch_size = found
    result.batch_size = found
    log.info("batch-size tuner (%s, start %d, bound %d): training with batch %d",
             t.tune_batch_size_mode, init, t.tune_batch_size_max, found)
    if run.cfg.task == "barlow_twins" and found < MIN_RELIABLE_BT_BATCH:
        message = _batch_size_warning(found)
        log.warning(message)
        result.notes.append(message)


def tune_lr(run, tuner: Tuner, result: TuningResult) -> None:
    t = run.cfg.trainer
    # The range test counts steps, not epochs: let it run past max_epochs on small datasets.
    max_epochs = run.trainer.fit_loop.max_epochs
    run.trainer.fit_loop.max_epochs = max(max_epochs, t.tune_lr_steps)
    try:
        finder = tuner.lr_find(
            run.module, datamodule=run.datamodule, min_lr=t.tune_lr_min, max_lr=t.tune_lr_max,
            num_training=t.tune_lr_steps, attr_name="lr", update_attr=False,
        )
    finally:
        run.trainer.fit_loop.max_epochs = max_epochs
    suggestion = finder.suggestion() if finder is not None else None
    media = run.run_dir / "media"
    if finder is not None:
        _save_lr_curve(finder, media / "lr_finder.csv")
        figure = finder.plot(suggest=suggestion is not None)
        ax = figure.axes[0]
        ax.set_title(f"LR range test ({len(finder.results['lr'])} steps) — suggestion: "
                     + (f"{suggestion:.3g}" if suggestion is not None else "none"))
        figure.savefig(media / "lr_finder.png", dpi=120, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(figure)
        log_image(run.trainer, "tune/lr_finder", media / "lr_finder.png",
                  f"suggested lr {suggestion:.3g}" if suggestion is not None else "no suggestion", step=0)
    if suggestion is None:
        message = (f"the LR finder made no suggestion (fewer than 13 finite losses between {t.tune_lr_min} and "
                   f"{t.tune_lr_max}); training with --optim.lr={run.cfg.optim.lr}")
        log.warning(message)
        result.notes.append(message)
        return
    run.module.lr = float(suggestion)
    run.cfg.optim.lr = float(suggestion)
    result.lr = float(suggestion)
    log.info("LR finder: training with peak learning rate %.3g (warmup starts from it)", suggestion)


def _save_lr_curve(finder, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lr", "loss"])
        writer.writerows(zip(finder.results["lr"], finder.results["loss"]))


def _write_back(run, result: TuningResult) -> None:
    cfg = run.cfg
    searched = {"batch_size": cfg.trainer.tune_batch_size, "lr": cfg.trainer.tune_lr}
    # The saved config trains with the values found, without searching again.
    cfg.trainer.tune_batch_size = False
    cfg.trainer.tune_lr = False
    save_config(cfg, run.run_dir / "config.yaml")
    report = {
        "searched": searched,
        "batch_size": result.batch_size,
        "lr": result.lr,
        "notes": result.notes,
    }
    (run.run_dir / "tuning.yaml").write_text(yaml.safe_dump(report, sort_keys=False))
    from pytorch_lightning.loggers import WandbLogger

    for logger in run.trainer.loggers:
        if isinstance(logger, WandbLogger):
            values = to_dict(cfg)
            logger.experiment.config.update(
                {"data": values["data"], "optim": values["optim"], "trainer": values["trainer"],
                 "tuned": {k: v for k, v in report.items() if k != "notes"}},
                allow_val_change=True,
            )


def tune(run) -> Optional[TuningResult]:
    """Run the requested searches on ``run`` (a trainer.Run) and make training use what they found."""
    t = run.cfg.trainer
    if not (t.tune_batch_size or t.tune_lr):
        return None
    # The searches train a few steps (the model is restored afterwards by Lightning) and draw random
    # numbers: put the RNG back too, so the run equals one started with the found values directly.
    rng = collect_rng_state()
    tuner = Tuner(run.trainer)
    result = TuningResult()
    if t.tune_batch_size:  # batch first: the best learning rate depends on it
        tune_batch_size(run, tuner, result)
    if t.tune_lr:
        tune_lr(run, tuner, result)
    restore_rng_state(rng)
    _write_back(run, result)
    return result
