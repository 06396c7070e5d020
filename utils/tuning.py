"""Batch-size and learning-rate auto-tuning with Lightning's Tuner, before training.

The values found are the ones training uses (the DataModule's ``batch_size`` and the module's ``lr``,
read when the dataloader and the optimiser are built), and they are written back: into the run's
``config.yaml`` (with the tune flags switched off, so giving that file back with ``--config`` trains
with the same values without searching again), into the wandb run config, and into ``tuning.yaml``
with the search's details. The LR range test's curve goes to ``media/lr_finder.png`` (and ``.csv``) and
to wandb.

The LR range test's suggestion is checked before it is used (:func:`check_lr_curve`): a curve too short
to tell a trend from batch-to-batch noise, a loss that never decreases meaningfully, or a suggestion at
the edge of the tested range or off the curve's falling part is refused with a warning, and training
keeps the configured ``--optim.lr``. The check works on the per-step losses, recovered exactly from Lightning's smoothed curve
(:func:`unsmoothed_losses`): that curve is an exponential moving average whose bias correction is one step
off (its first point is about half the first loss and it climbs for ~10 steps whatever the loss does),
so on a short test it seems to rise even when the loss does not.
"""
from __future__ import annotations

import csv
import logging
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml
from pytorch_lightning.tuner import Tuner

from config.loading import save_config, to_dict
from utils.figures import log_image, subplots
from utils.rng import collect_rng_state, restore_rng_state

log = logging.getLogger(__name__)

# Below this batch the Barlow Twins cross-correlation matrix explodes (report §5.1): its task entry's
# min_reliable_batch (lightningmodules/barlow_twins.py).
MIN_RELIABLE_BT_BATCH = 64


# The LR range test's sanity check (see check_lr_curve).
LIGHTNING_LR_BETA = 0.98
"""Smoothing factor of Lightning's LR-finder loss curve (``_LRCallback(beta=0.98)``, not configurable)."""
MIN_LR_POINTS = 20
"""Fewest finite per-step losses from which a trend is told from batch-to-batch noise."""
MIN_RELATIVE_DROP = 0.05
"""The smoothed loss must fall at least this fraction below its starting level..."""
NOISE_SIGMAS = 4.0
"""...and by more than this many standard errors of the difference of two window means (batch noise). With 4,
a flat curve of pure noise passes in under 1 % of cases (simulated, 20 to 50 steps, any noise level), and
a 25 % dip under 6 % batch noise (the quickstart model's) in 95 % at 30 steps."""


@dataclass
class TuningResult:
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    lr_finder: Optional[dict] = None
    """The LR range test's suggestion and the verdict of :func:`check_lr_curve` (for tuning.yaml)."""
    notes: list[str] = field(default_factory=list)


@dataclass
class LrCurveCheck:
    """The verdict on an LR range test's curve (per-step losses) and its suggestion."""

    accepted: bool
    reason: str
    """Why it was refused, or what makes it acceptable (one line)."""
    points: int
    """Finite per-step losses, counted from the start up to the first non-finite one."""
    window: int = 0
    """Width of the centred moving average the curve is judged by (2 * (points // 10) + 1, at least 3)."""
    start_loss: Optional[float] = None
    """Mean of the first ``window`` losses: the loss before the learning rate does anything."""
    min_loss: Optional[float] = None
    """Lowest centred moving average (full windows only)."""
    min_lr: Optional[float] = None
    """Learning rate at the centre of that window."""
    required_drop: Optional[float] = None
    """How far below start_loss min_loss had to be: max(5 % of |start_loss|, 4 noise standard errors)."""


def unsmoothed_losses(smoothed: Sequence[float], first_step: int = 1, beta: float = LIGHTNING_LR_BETA) -> list[float]:
    """The per-step training losses behind Lightning's LR-finder curve (``finder.results["loss"]``).

    Lightning (pytorch-lightning 2.6, ``tuner/lr_finder.py: _LRCallback.on_train_batch_end``) records, for
    the k-th step's loss ``l_k``, ``avg_k = beta * avg_{k-1} + (1 - beta) * l_k`` (``avg_{-1} = 0``) divided
    by ``1 - beta ** (s_k + 1)``, where ``s_k`` is the trainer's global step *after* that step
    (``first_step + k``). Undoing both gives ``l_k`` exactly; values after the first non-finite one are
    non-finite (the moving average never recovers from a NaN)."""
    losses: list[float] = []
    previous = 0.0
    for k, value in enumerate(smoothed):
        if not math.isfinite(value) or not math.isfinite(previous):
            losses.append(float("nan"))
            previous = float("nan")
            continue
        average = value * (1.0 - beta ** (first_step + k + 1))
        losses.append((average - beta * previous) / (1.0 - beta))
        previous = average
    return losses


def _noise_std(losses: Sequence[float]) -> float:
    """Per-step noise of a slowly varying curve: the robust spread (1.4826 × MAD) of its first differences / √2."""
    diffs = [b - a for a, b in zip(losses, losses[1:])]
    centre = statistics.median(diffs)
    return 1.4826 * statistics.median(abs(d - centre) for d in diffs) / math.sqrt(2.0)


def check_lr_curve(lrs: Sequence[float], losses: Sequence[float], suggestion_index: Optional[int]) -> LrCurveCheck:
    """Whether an LR range test's suggestion can be trusted; ``losses`` are the per-step (unsmoothed) losses.

    Only the finite losses from the start are judged (n of them; a divergence ends the curve). With
    h = n // 10 (at least 1) and w = 2h + 1, the curve is the centred moving average of width w; its start
    is the mean of the first w losses. Refused when:

    1. *too few steps*: n < 20 (MIN_LR_POINTS) — shorter tests cannot tell a trend from batch noise;
    2. *the loss never decreases*: the lowest moving average is not below the start by more than
       max(5 % of |start|, 4 σ √(2 / w)), σ the per-step noise (robust spread of the first differences / √2);
       i.e. the dip must be both large and well outside what noise produces;
    3. *the suggestion is at the edge*: ``suggestion_index`` lies in the first or last h steps of the curve —
       the loss was still falling fastest where the test began or ended (or the test hit its divergence),
       so the range did not bracket a good rate;
    4. *the suggestion is off the falling part*: more than h steps before the first moving average that is
       below the start by the required drop (the loss has not begun to fall there: Lightning's rule, the
       steepest slope per unit of learning rate, favours the smallest rates), or after the lowest one (the
       loss rises again there);
    or when there is no suggestion. Otherwise accepted.
    """
    finite: list[float] = []
    for value in losses:
        if not math.isfinite(value):
            break
        finite.append(float(value))
    n = len(finite)
    if n < MIN_LR_POINTS:
        return LrCurveCheck(False, f"too few steps: {n} finite losses, at least {MIN_LR_POINTS} are needed to tell "
                                   f"a trend from batch-to-batch noise (raise --trainer.tune_lr_steps)", n)
    half = max(1, n // 10)
    width = 2 * half + 1
    start = statistics.fmean(finite[:width])
    means = [(statistics.fmean(finite[i - half:i + half + 1]), i) for i in range(half, n - half)]
    lowest, at = min(means)
    required = max(MIN_RELATIVE_DROP * abs(start), NOISE_SIGMAS * _noise_std(finite) * math.sqrt(2.0 / width))
    check = LrCurveCheck(False, "", n, width, start, lowest, float(lrs[at]), required)
    if start - lowest <= required:
        check.reason = (f"the loss never decreases: its {width}-step moving average falls at most to {lowest:.4g} "
                        f"from {start:.4g}, not the {required:.3g} below it that would stand out from noise "
                        f"(max of {MIN_RELATIVE_DROP:.0%} and {NOISE_SIGMAS:g} noise standard errors); "
                        f"widen --trainer.tune_lr_min/max or raise --trainer.tune_lr_steps")
        return check
    if suggestion_index is None:
        check.reason = "the LR finder made no suggestion"
        return check
    if suggestion_index < half or suggestion_index >= n - half:
        where = "start" if suggestion_index < half else "end"
        check.reason = (f"the suggestion (step {suggestion_index} of {n}) is at the {where} of the curve: the loss "
                        f"fell fastest where the test {'began' if where == 'start' else 'ended'}, so the range "
                        f"--trainer.tune_lr_min/max did not bracket a good rate")
        return check
    falls = next(i for m, i in means if start - m > required)  # exists: the lowest one qualifies
    if suggestion_index < falls - half or suggestion_index > at:
        before = suggestion_index < falls - half
        check.reason = (f"the suggestion {lrs[suggestion_index]:.3g} (step {suggestion_index} of {n}) is "
                        + (f"before the loss falls (from about lr {lrs[falls]:.3g}, step {falls})" if before else
                           f"past the lowest loss (lr {lrs[at]:.3g}, step {at}), where it rises again")
                        + "; see media/lr_finder.png for a rate to set with --optim.lr")
        return check
    check.accepted = True
    check.reason = (f"the {width}-step moving average falls from {start:.4g} to {lowest:.4g} (at lr {lrs[at]:.3g}), "
                    f"more than the {required:.3g} noise allows, and the suggestion (step {suggestion_index} of {n}) "
                    f"lies on its falling part")
    return check


def _batch_size_warning(batch: int, bound: int = MIN_RELIABLE_BT_BATCH, method: str = "Barlow Twins' cross-correlation "
                        "matrix is estimated over the batch and the report saw it explode") -> str:
    return (
        f"the batch-size tuner found {batch}, below {bound}: {method} below {bound}. "
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
    bound = run.task.min_reliable_batch  # the task entry's fact (lightningmodules/registry.py)
    if bound and found < bound:
        message = _batch_size_warning(found, bound, run.task.min_reliable_batch_reason)
        log.warning(message)
        result.notes.append(message)


def tune_lr(run, tuner: Tuner, result: TuningResult) -> None:
    t = run.cfg.trainer
    trainer = run.trainer
    # The range test counts steps, not epochs: let it run past max_epochs on small datasets. Its curve uses
    # training losses only: skip the validation Lightning would run at every epoch end meanwhile.
    max_epochs, check_val = trainer.fit_loop.max_epochs, trainer.check_val_every_n_epoch
    trainer.fit_loop.max_epochs = max(max_epochs, t.tune_lr_steps)
    trainer.check_val_every_n_epoch = 2**62
    first_step = trainer.global_step + 1
    try:
        finder = tuner.lr_find(
            run.module, datamodule=run.datamodule, min_lr=t.tune_lr_min, max_lr=t.tune_lr_max,
            num_training=t.tune_lr_steps, attr_name="lr", update_attr=False,
        )
    finally:
        trainer.fit_loop.max_epochs, trainer.check_val_every_n_epoch = max_epochs, check_val
    configured = run.cfg.optim.lr
    if finder is None:  # Lightning skips the finder under fast_dev_run
        _refuse_lr(result, "the LR finder did not run", configured)
        return
    lrs, smoothed = list(finder.results["lr"]), list(finder.results["loss"])
    suggestion = finder.suggestion()
    index = lrs.index(suggestion) if suggestion is not None else None
    losses = unsmoothed_losses(smoothed, first_step=first_step)
    check = check_lr_curve(lrs, losses, index)
    result.lr_finder = {"suggestion": None if suggestion is None else float(suggestion), **asdict(check)}
    media = run.run_dir / "media"
    _save_lr_curve(lrs, losses, smoothed, media / "lr_finder.csv")
    _plot_lr_curve(lrs, losses, check, suggestion, index, configured, media / "lr_finder.png")
    caption = (f"lr {suggestion:.3g} used" if check.accepted else
               f"suggestion {'none' if suggestion is None else f'{suggestion:.3g}'} refused: lr {configured:.3g} kept")
    log_image(trainer, "tune/lr_finder", media / "lr_finder.png", caption, step=0)
    if not check.accepted:
        what = "made no suggestion" if suggestion is None else f"suggested {suggestion:.3g}"
        _refuse_lr(result, f"the LR finder {what} from a curve that cannot be trusted ({check.reason})", configured)
        return
    run.module.lr = float(suggestion)
    run.cfg.optim.lr = float(suggestion)
    result.lr = float(suggestion)
    log.info("LR finder: training with peak learning rate %.3g (warmup starts from it); %s", suggestion, check.reason)


def _refuse_lr(result: TuningResult, why: str, configured: float) -> None:
    message = f"{why}; training with the configured --optim.lr={configured:g} (plot: media/lr_finder.png)"
    log.warning(message)
    result.notes.append(message)


def _save_lr_curve(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lr", "loss", "lightning_smoothed_loss"])
        writer.writerows(zip(lrs, losses, smoothed))


def _plot_lr_curve(lrs: Sequence[float], losses: Sequence[float], check: LrCurveCheck, suggestion: Optional[float],
                   index: Optional[int], configured: float, path: Path) -> None:
    """Per-step losses, their centred moving average (what the check judges), the start level and the
    required drop, the suggestion and the rate training uses."""
    fig, ax = subplots(1, 1, figsize=(7.5, 4.6))
    n = check.points
    ax.plot(lrs[:len(losses)], losses, ".", color="0.6", label="loss per step")
    if check.window:
        half = check.window // 2
        centres = range(half, n - half)
        ax.plot([lrs[i] for i in centres], [statistics.fmean(losses[i - half:i + half + 1]) for i in centres],
                color="tab:blue", label=f"{check.window}-step moving average")
        ax.axhline(check.start_loss, color="0.3", linestyle=":", linewidth=1, label="start level")
        ax.axhline(check.start_loss - check.required_drop, color="tab:red", linestyle=":", linewidth=1,
                   label=f"must fall below ({MIN_RELATIVE_DROP:.0%} / {NOISE_SIGMAS:g} noise s.e.)")
    if suggestion is not None and index is not None and index < len(losses):
        ax.plot([suggestion], [losses[index]], "o", markersize=9, markerfacecolor="none",
                color="tab:green" if check.accepted else "tab:red", label=f"suggestion {suggestion:.3g}")
    used = suggestion if check.accepted else configured
    if min(lrs) <= used <= max(lrs):
        ax.axvline(used, color="tab:green", linewidth=1, label=f"training lr {used:.3g}")
    else:  # outside the tested range: named, not drawn (it would squeeze the curve into a corner)
        ax.plot([], [], " ", label=f"training lr {used:.3g} (outside the range tested)")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    finite = [v for v in losses if math.isfinite(v)]
    if finite:  # the top decile (the divergence) may leave the frame: the dip is what matters
        ordered = sorted(finite)
        low, high = ordered[0], ordered[int(0.9 * (len(ordered) - 1))]
        if check.window:  # keep the start level and the line the average had to fall below in view
            low, high = min(low, check.start_loss - check.required_drop), max(high, check.start_loss)
        pad = 0.08 * ((high - low) or abs(low) or 1.0)
        ax.set_ylim(low - pad, high + pad)
    verdict = "used" if check.accepted else "refused, configured lr kept"
    ax.set_title(f"LR range test, {len(lrs)} steps — suggestion "
                 f"{'none' if suggestion is None else f'{suggestion:.3g}'} {verdict}", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3, which="both")
    fig.text(0.01, -0.02, check.reason, fontsize=7, wrap=True, va="top")
    fig.savefig(path, dpi=120, bbox_inches="tight")


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
        "lr_finder": result.lr_finder,
        "notes": result.notes,
    }
    (run.run_dir / "tuning.yaml").write_text(yaml.safe_dump(report, sort_keys=False))
    from pytorch_lightning.loggers import WandbLogger

    for logger in run.trainer.loggers:
        if isinstance(logger, WandbLogger):
            values = to_dict(cfg)
            logger.experiment.config.update(
                {"data": values["data"], "optim": values["optim"], "trainer": values["trainer"],
                 "tuned": {k: v for k, v in report.items() if k in ("searched", "batch_size", "lr")}},
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
