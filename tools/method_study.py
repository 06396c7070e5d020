"""Barlow Twins (global, global + dense) and DINO side by side on the synthetic proxy data (docs/results.md).

1. Pretraining of the same small ViT with each method at equal epochs, at every budget
   (config/proxy/pretrain.yaml, pretrain_dense.yaml, pretrain_dino.yaml; main.py in a subprocess, skipped
   when finished, resumed when interrupted — tools/proxy_study.run). Each run logs its attention Jaccard
   every 5 epochs and its training wall time per epoch.
2. Converged frozen-backbone probes of every pretrained backbone (a DINO run's teacher), of a random-init
   ViT and of raw pixel patches (the floors): for each head, a learning-rate grid, each rate trained long
   enough that its best val mIoU does not come at the last epoch (see :func:`converged`): a rate whose run
   ends still improving is trained again with twice the epochs, up to ``--max-probe-epochs``, and flagged if
   it still ends improving. The probe is the *fixed-view* protocol of tools/feature_probe.py: main.py's
   frozen probe (config/proxy/probe.yaml + config/proxy/fixed_view.yaml, i.e. no training-time crops or
   flips), with the backbone's features computed once. Each (feature set, head, rate, epochs) leaves a
   metrics.csv under ``<output-dir>/probes/``; one that exists is not trained again.
3. The report: ``<output-dir>/results.md`` and ``.csv`` (each method's wall time per epoch, Jaccard curve,
   and per head the best val mIoU over the grid with its rate and epoch) and one figure of the three
   methods' Jaccard curves (``--figure``, default ``<output-dir>/method_study_jaccard.png``; docs/images/ holds
   a copy).

    python -m tools.method_study --budgets 4,8                         # everything
    python -m tools.method_study --budgets 4,8 --methods bt-global,bt-dense --stage pretrain
    python -m tools.method_study --budgets 4,8 --report-only
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from config.loading import parse_config
from config.validation import validate
from tools.cli import OneLineParser, ToolInputError, choice_list, main_flags, number_list, output_folder
from tools.proxy_study import FLOORS, PROBE, BestOfCurve, column, read_metrics, run
from tools.sweep import in_repo_root

STUDIED = {
    "bt-global": ("Barlow Twins, global", "config/proxy/pretrain.yaml"),
    "bt-dense": ("Barlow Twins, global + dense", "config/proxy/pretrain_dense.yaml"),
    "dino": ("DINO", "config/proxy/pretrain_dino.yaml"),
}
"""The methods of the published study (docs/results.md), run by default."""
PROXY_DIR = Path(__file__).resolve().parent.parent / "config" / "proxy"
TITLE_PREFIX = "# title: "


def discovered_methods() -> dict[str, tuple[str, str]]:
    """Every other ``config/proxy/pretrain_<method>.yaml``: a method of its own (its ``task``), titled by a first
    line ``# title: <Title>`` (else its name). Adding a method to the study is adding that config file."""
    known = {path for _, path in STUDIED.values()}
    found: dict[str, tuple[str, str]] = {}
    for path in sorted(PROXY_DIR.glob("pretrain_*.yaml")):
        rel = f"config/proxy/{path.name}"
        if rel in known:
            continue
        first = path.read_text().splitlines()[:1]
        name = path.stem[len("pretrain_"):]
        title = first[0][len(TITLE_PREFIX):].strip() if first and first[0].startswith(TITLE_PREFIX) else name
        found[name] = (title, rel)
    return found


METHODS = {**STUDIED, **discovered_methods()}
FIXED_VIEW = "config/proxy/fixed_view.yaml"
DEFAULT_LRS = (3e-3, 3e-2)
IMPROVEMENT_TOLERANCE = 0.002
"""mIoU gain over the final fifth of a probe's epochs below which a best-at-the-last-epoch run counts as
converged (the cosine schedule's tail barely moves the head; differences below this are seed noise)."""


# ------------------------------------------------------------------------------------------ pretraining
def pretrain_name(method: str, epochs: int) -> str:
    return f"pretrain-{method}-e{epochs}"


def pretrain_flags(epochs: int, warmup_fraction: float) -> list[str]:
    """One budget's flags: its epochs, and a learning-rate warmup of the same fraction of them at every budget."""
    return [f"--trainer.max_epochs={epochs}", f"--optim.warmup_epochs={warmup_fraction * epochs:g}"]


def pretrain(methods: Sequence[str], budgets: Sequence[int], out: Path, extra: list[str],
             warmup_fraction: float = 0.5) -> bool:
    ok = True
    for method in methods:
        for epochs in budgets:
            ok &= run(pretrain_name(method, epochs), METHODS[method][1], pretrain_flags(epochs, warmup_fraction), out,
                      extra)
    return ok


@dataclass
class PretrainSummary:
    epochs: int
    epoch_seconds: float
    """Median training wall time of one epoch (time/train_epoch_s): robust to other jobs' bursts."""
    final_val_loss: float
    jaccard: list[tuple[float, float]]
    """(epochs trained, val/attn_jaccard); 0 = the initialisation."""


def pretrain_summary(run_dir: Path) -> PretrainSummary:
    rows = read_metrics(run_dir)
    epoch_times = [v for _, _, v in column(rows, "time/train_epoch_s")]
    steps = [step for _, step, _ in column(rows, "time/train_epoch_s")]
    # An epoch's row is logged at its last step (0-based): epoch e of S steps each at step (e + 1)·S − 1.
    steps_per_epoch = (steps[-1] + 1) / len(steps) if steps else 1.0
    val = column(rows, "val/loss")
    jaccard = [(step / steps_per_epoch, v) for _, step, v in column(rows, "val/attn_jaccard")]
    return PretrainSummary(len(epoch_times), statistics.median(epoch_times) if epoch_times else math.nan,
                           val[-1][2] if val else math.nan, jaccard)


# ------------------------------------------------------------------------------------------------ probes
def feature_sets(methods: Sequence[str], budgets: Sequence[int], floors: bool) -> list[tuple[str, list[str], str]]:
    """(row name, probe flags, pretraining run name or '') of every feature set, floors first."""
    rows = [(name, flags, "") for name, flags in FLOORS.items()] if floors else []
    for method in methods:
        for epochs in budgets:
            pre = pretrain_name(method, epochs)
            rows.append((f"{METHODS[method][0]}, {epochs} epochs",
                         [f"--backbone.weights=__OUT__/{pre}/checkpoints/last.ckpt"], pre))
    return rows


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-").replace("--", "-")


def converged(curve: Sequence[float], tolerance: float = IMPROVEMENT_TOLERANCE) -> bool:
    """The best val mIoU came before the last epoch, or the last epoch beat every epoch before the final fifth
    of the run by less than ``tolerance`` (a plateau the schedule's tail only nudged)."""
    if not curve:
        return False
    last = len(curve) - 1
    best = max(range(len(curve)), key=lambda i: curve[i])  # the first of equal values: main.py's best checkpoint
    if best < last:
        return True
    head = curve[:max(1, len(curve) - max(1, len(curve) // 5))]
    return curve[last] - max(head) < tolerance


@dataclass
class RateOutcome(BestOfCurve):
    lr: float
    epochs: int
    curve: list[float]
    curve_fg: list[float]
    converged: bool


def probe_dir(out: Path, row: str, head: str, lr: float, epochs: int) -> Path:
    return out / "probes" / slug(row) / head / f"lr{lr:g}-e{epochs}"


def read_curve(path: Path) -> Optional[tuple[list[float], list[float]]]:
    rows = read_metrics(path)
    if not rows:
        return None
    return [v for _, _, v in column(rows, "val/mIoU")], [v for _, _, v in column(rows, "val/mIoU_fg")]


Trainer = Callable[[float, int, Path], None]
"""train(lr, epochs, metrics_dir): train one probe and write metrics_dir/metrics.csv."""


def probe_rates(out: Path, row: str, head: str, lrs: Sequence[float], epochs: int, max_epochs: int,
                train: Optional[Trainer]) -> list[RateOutcome]:
    """Every rate of the grid, each trained until :func:`converged` or ``max_epochs`` (doubling the epochs).
    Finished probes are read back; ``train`` None = report only (unfinished rates are left out)."""
    outcomes = []
    for lr in lrs:
        n = epochs
        while True:
            path = probe_dir(out, row, head, lr, n)
            found = read_curve(path)
            if found is None or len(found[0]) < n:
                if train is None:
                    break
                train(lr, n, path)
                found = read_curve(path)
            curve, curve_fg = found
            done = converged(curve)
            if done or n * 2 > max_epochs:
                outcomes.append(RateOutcome(lr, n, curve, curve_fg, done))
                break
            if train is not None:
                print(f"[extend] {row} / {head} / lr {lr:g}: best val mIoU at the last of {n} epochs; "
                      f"training {n * 2}", flush=True)
            n *= 2
    return outcomes


def probe_config(flags: Sequence[str]):
    """The fixed-view probe's config for one feature set (validated as main.py validates it)."""
    with in_repo_root():
        return validate(parse_config(["--config", PROBE, "--config", FIXED_VIEW, *flags]))


def run_probes(out: Path, rows: list[tuple[str, list[str], str]], heads: Sequence[str], lrs: Sequence[float],
               epochs: int, max_epochs: int, extra: Sequence[str] = ()) -> bool:
    """Probe every feature set whose pretraining finished; features are computed once per feature set."""
    from tools import feature_probe  # local: torch and Lightning load only when probes train, not for reports

    ok = True
    for row, flags, pre in rows:
        if pre and not (out / pre / "done").is_file():
            print(f"[skip] probes of {pre}: that pretraining run has not finished", flush=True)
            continue
        flags = [f.replace("__OUT__", str(out)) for f in flags]
        cache = None
        for head in heads:
            cfg = probe_config([*flags, f"--segmentation.head={head}", *extra])

            def train(lr: float, n: int, path: Path) -> None:
                nonlocal cache
                if cache is None:
                    cache = feature_probe.compute_features(cfg)
                    print(f"[features] {row}: {cache.seconds:.0f} s", flush=True)
                result = feature_probe.train_head(feature_probe.with_values(cfg, lr=lr, epochs=n), cache,
                                                  path / "metrics.csv")
                print(f"[probe] {row} / {head} / lr {lr:g} / {n} epochs: best val mIoU {result.best:.4f} at "
                      f"epoch {result.best_epoch} ({result.seconds:.0f} s)", flush=True)

            outcomes = probe_rates(out, row, head, lrs, epochs, max_epochs, train)
            ok &= all(o.converged for o in outcomes)
    return ok


# ------------------------------------------------------------------------------------------------ report
def best_rate(outcomes: Sequence[RateOutcome]) -> Optional[RateOutcome]:
    return max(outcomes, key=lambda o: o.best) if outcomes else None


def probe_cell(outcomes: Sequence[RateOutcome], lrs: Sequence[float]) -> str:
    """'0.123 (0.045) lr 0.01 ep 7/20', with ⚑ when that rate never converged and ↑/↓ when the best rate is
    the largest/smallest of a grid of several."""
    best = best_rate(outcomes)
    if best is None:
        return "–"
    flags = "" if best.converged else " ⚑"
    if len(lrs) > 1 and best.lr == max(lrs):
        flags += " ↑"
    elif len(lrs) > 1 and best.lr == min(lrs):
        flags += " ↓"
    fg = best.curve_fg[best.best_epoch] if best.curve_fg else math.nan
    return f"{best.best:.3f} ({fg:.3f}) lr {best.lr:g} ep {best.best_epoch + 1}/{best.epochs}{flags}"


def write_report(out: Path, methods: Sequence[str], budgets: Sequence[int], heads: Sequence[str],
                 lrs: Sequence[float], probe_epochs: int, max_probe_epochs: int, floors: bool = True,
                 figure: Optional[Path] = None) -> str:
    lines = ["## Pretraining runs", "",
             "| method | epochs | wall s/epoch (median) | final val/loss | attention Jaccard (epoch: value) |",
             "|---|---|---|---|---|"]
    curves: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for method in methods:
        for epochs in budgets:
            run_dir = out / pretrain_name(method, epochs)
            if not (run_dir / "metrics.csv").is_file():
                continue
            s = pretrain_summary(run_dir)
            curves[(method, epochs)] = s.jaccard
            curve = ", ".join(f"{e:g}: {v:.3f}" for e, v in s.jaccard)
            lines.append(f"| {METHODS[method][0]} | {s.epochs}/{epochs} | {s.epoch_seconds:.1f} | "
                         f"{s.final_val_loss:.4f} | {curve} |")
    lines += ["", "## Frozen-backbone probes (fixed-view protocol): best val mIoU over the learning-rate grid",
              "", "Cell: best val mIoU (its foreground-class mIoU) at learning rate lr, epoch e of n. ⚑: still "
              f"improving at the last epoch after {max_probe_epochs} epochs; ↑/↓: the best rate is the grid's "
              "largest/smallest.", "",
              "| features | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    table = []
    for row, _, _ in feature_sets(methods, budgets, floors):
        per_head = {head: probe_rates(out, row, head, lrs, probe_epochs, max_probe_epochs, None) for head in heads}
        if not any(per_head.values()):
            continue
        lines.append(f"| {row} | " + " | ".join(probe_cell(per_head[h], lrs) for h in heads) + " |")
        for head, outcomes in per_head.items():
            for o in outcomes:
                table.append({"features": row, "head": head, "lr": o.lr, "epochs": o.epochs,
                              "best_mIoU": o.best, "best_mIoU_fg": o.curve_fg[o.best_epoch] if o.curve_fg else "",
                              "best_epoch": o.best_epoch, "converged": o.converged})
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["features", "head", "lr", "epochs", "best_mIoU", "best_mIoU_fg",
                                               "best_epoch", "converged"])
        writer.writeheader()
        writer.writerows(table)
    if figure is not None and curves:
        plot_jaccard(curves, figure)
        lines += ["", f"Figure: {figure}"]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def plot_jaccard(curves: dict[tuple[str, int], list[tuple[float, float]]], path: Path) -> None:
    """One panel: each method a colour, each budget a line style; x = epochs trained."""
    from utils.figures import subplots  # local: matplotlib loads only when a figure is drawn

    colours = {"bt-global": "tab:blue", "bt-dense": "tab:orange", "dino": "tab:green"}
    styles = ["--", "-", ":", "-."]
    budgets = sorted({epochs for _, epochs in curves})
    figure, ax = subplots(1, 1, figsize=(6.4, 4.0), layout="constrained")
    for (method, epochs), points in sorted(curves.items()):
        if not points:
            continue
        x, y = zip(*points)
        ax.plot(x, y, styles[budgets.index(epochs) % len(styles)], marker="o", markersize=3,
                color=colours.get(method), label=f"{METHODS[method][0]}, {epochs} epochs")
    ax.set_xlabel("pretraining epochs (0 = random initialisation)")
    ax.set_ylabel("attention Jaccard (strict protocol; DINO: teacher)")
    ax.set_title("Last-block CLS attention vs object masks, 64 val images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------ entry point
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = OneLineParser(prog="python -m tools.method_study", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/method_study")
    parser.add_argument("--budgets", default="4,8", help="pretraining epochs, comma-separated")
    parser.add_argument("--methods", default=",".join(STUDIED), help=f"comma-separated: {', '.join(METHODS)}")
    parser.add_argument("--heads", default="linear,setr_naive")
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in DEFAULT_LRS), help="probe learning-rate grid")
    parser.add_argument("--probe-epochs", type=int, default=8, help="first number of epochs tried per rate")
    parser.add_argument("--max-probe-epochs", type=int, default=16, help="doubling stops here (then flagged)")
    parser.add_argument("--warmup-fraction", type=float, default=0.5,
                        help="learning-rate warmup of every pretraining run, as a fraction of its epochs")
    parser.add_argument("--stage", choices=["all", "pretrain", "probe"], default="all")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--no-floors", action="store_true", help="skip the random-init and raw-pixel rows")
    parser.add_argument("--figure", default=None,
                        help="where the Jaccard figure goes (default: OUTPUT_DIR/method_study_jaccard.png); '' = none")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra flag for every run, pretraining and probe (e.g. --set data.root=/tmp/data; the "
                             "probes' epochs and learning rates are the study's own)")
    try:  # every argument is checked before anything runs: one line, exit 2
        args = parser.parse_args(argv)
        methods = choice_list(args.methods, "--methods", list(METHODS))
        budgets = number_list(args.budgets, "--budgets", int, minimum=1)
        lrs = number_list(args.lrs, "--lrs", float, above=0)
        heads = [h.strip() for h in args.heads.split(",") if h.strip()]
        if not heads:
            raise ToolInputError("--heads: give at least one segmentation head, e.g. linear,setr_naive")
        if args.probe_epochs < 1 or args.max_probe_epochs < args.probe_epochs:
            raise ToolInputError(f"--probe-epochs must be >= 1 and --max-probe-epochs >= it, got {args.probe_epochs} "
                                 f"and {args.max_probe_epochs}")
        if not 0 <= args.warmup_fraction <= 1:
            raise ToolInputError(f"--warmup-fraction must be in [0, 1], got {args.warmup_fraction}")
        extra = main_flags(args.set)
        out = output_folder(args.output_dir, "--output-dir")
    except ToolInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ok = True
    if not args.report_only:
        if args.stage in ("all", "pretrain"):
            ok &= pretrain(methods, budgets, out, extra, args.warmup_fraction)
        if args.stage in ("all", "probe"):
            ok &= run_probes(out, feature_sets(methods, budgets, not args.no_floors), heads, lrs,
                             args.probe_epochs, args.max_probe_epochs, extra)
    figure = out / "method_study_jaccard.png" if args.figure is None else (Path(args.figure) if args.figure else None)
    print(write_report(out, methods, budgets, heads, lrs, args.probe_epochs, args.max_probe_epochs,
                       not args.no_floors, figure))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
