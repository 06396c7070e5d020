"""The synthetic proxy study (docs/results.md), run with the framework itself on CPU.

1. Barlow Twins pretraining of a small ViT on generated VOC-layout data, global objective and global +
   dense with a shared crop (config/proxy/pretrain*.yaml), at several budgets (epochs; the measured
   training wall time of each run is reported beside it — on a shared machine it overstates CPU time).
2. Frozen-backbone segmentation probes (config/proxy/probe.yaml) with several heads on every pretrained
   backbone, on a random-init ViT and on raw pixel patches (backbone 'pixels'): the floor rows.
3. A results table (markdown + CSV) with each probe's best val mIoU / foreground mIoU, each pretraining
   run's CPU time, final losses and emergence Jaccard curve.

Every run is `python main.py --config ...` in a subprocess, in <output-dir>/<name>/; finished runs (a
`done` marker written after a successful exit, or a directory tools.reproduce counts as a finished run of the
same config) are skipped, so the study resumes after an interruption.

    python -m tools.proxy_study --budgets 40,120 --heads linear,setr_naive,attn_fusion
    python -m tools.proxy_study --report-only
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

from tools.cli import OneLineParser, ToolInputError, choice_list, main_flags, number_list, output_folder
from tools.reproduce import existing_run

ROOT = Path(__file__).resolve().parent.parent
OBJECTIVES = {"global": "config/proxy/pretrain.yaml", "dense": "config/proxy/pretrain_dense.yaml"}
PROBE = "config/proxy/probe.yaml"
FLOORS = {"random-init ViT": [], "raw pixels": ["--backbone.name=pixels", "--backbone.depth=0",
                                                 "--backbone.embed_dim=0", "--backbone.num_heads=0"]}


class BestOfCurve:
    """A probe's per-epoch val mIoU ``curve``, read as main.py's best-checkpoint rule reads it."""

    curve: list[float]

    @property
    def best_epoch(self) -> int:
        """0-based epoch of the best val mIoU (the first, on ties)."""
        return max(range(len(self.curve)), key=lambda i: self.curve[i])

    @property
    def best(self) -> float:
        return self.curve[self.best_epoch]


def run(name: str, config: str, flags: list[str], out: Path, extra: list[str]) -> bool:
    run_dir = out / name
    if (run_dir / "done").is_file():
        print(f"[skip] {name} (finished)", flush=True)
        return True
    if run_dir.is_dir() and finished_earlier(run_dir, ["--config", config, *flags, *extra]):
        # finished, but the study was stopped before it could mark it
        (run_dir / "done").write_text("finished earlier\n")
        print(f"[skip] {name} (finished)", flush=True)
        return True
    command = [sys.executable, "main.py", "--config", config, f"--log.output_dir={out}", f"--log.run_name={name}",
               *flags, *extra]
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        command.append("--trainer.resume=auto")
    print(f"[run] {' '.join(command[1:])}", flush=True)
    start = time.time()
    result = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        print(f"[failed] {name}: {result.stderr.strip().splitlines()[-1:]}", flush=True)
        return False
    (run_dir / "done").write_text(f"{time.time() - start:.1f}\n")
    print(f"[done] {name} in {time.time() - start:.0f} s", flush=True)
    return True


def finished_earlier(run_dir: Path, argv: list[str]) -> bool:
    """``run_dir`` holds a finished run of exactly this config (tools.reproduce's definition: same config.yaml,
    bookkeeping aside, and a last.ckpt that processed every epoch)."""
    status, found = existing_run(run_dir.parent, run_dir.name, argv)
    return status == "finished" and found == run_dir


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict], key: str) -> list[tuple[int, int, float]]:
    """(epoch, step, value) of every row that has ``key``."""
    return [(int(float(r["epoch"] or 0)), int(float(r["step"] or 0)), float(r[key])) for r in rows if r.get(key)]


def pretrain_summary(run_dir: Path) -> dict:
    rows = read_metrics(run_dir)
    epochs = column(rows, "time/train_epoch_s")
    jaccard = column(rows, "val/attn_jaccard")
    val = column(rows, "val/loss_per_dim")
    dense = column(rows, "val/dense_loss_per_dim")
    return {
        "epochs": len(epochs),
        "train_wall_min": sum(v for _, _, v in epochs) / 60,
        "val_loss_per_dim": val[-1][2] if val else float("nan"),
        "val_dense_loss_per_dim": dense[-1][2] if dense else float("nan"),
        "jaccard": [(step, v) for _, step, v in jaccard],
    }


def probe_summary(run_dir: Path) -> dict:
    rows = read_metrics(run_dir)
    miou = column(rows, "val/mIoU")
    fg = column(rows, "val/mIoU_fg")
    if not miou:
        return {"mIoU": float("nan"), "mIoU_fg": float("nan"), "epoch": -1}
    best = max(range(len(miou)), key=lambda i: miou[i][2])
    return {"mIoU": miou[best][2], "mIoU_fg": fg[best][2] if fg else float("nan"), "epoch": miou[best][0]}


def backbone_rows(budgets: list[int]) -> list[tuple[str, list[str], str]]:
    """(row name, probe flags, pretraining run name or '') for every feature set."""
    rows = [(name, flags, "") for name, flags in FLOORS.items()]
    for objective in OBJECTIVES:
        for epochs in budgets:
            pre = f"pretrain-{objective}-e{epochs}"
            rows.append((f"BT {objective}, {epochs} epochs", [f"--backbone.weights=__OUT__/{pre}/checkpoints/last.ckpt"], pre))
    return rows


def write_report(out: Path, budgets: list[int], heads: list[str]) -> str:
    lines = ["## Pretraining runs", "",
             "| run | epochs | training wall-min | final val loss/dim | final val dense loss/dim | attention Jaccard (step: value) |",
             "|---|---|---|---|---|---|"]
    for objective in OBJECTIVES:
        for epochs in budgets:
            name = f"pretrain-{objective}-e{epochs}"
            if not (out / name).is_dir():
                continue  # not part of this study
            s = pretrain_summary(out / name)
            curve = ", ".join(f"{step}: {v:.3f}" for step, v in s["jaccard"])
            lines.append(f"| {name} | {s['epochs']} | {s['train_wall_min']:.1f} | {s['val_loss_per_dim']:.4f} | "
                         f"{s['val_dense_loss_per_dim']:.4f} | {curve} |")
    lines += ["", "## Frozen-backbone probes: best val mIoU (foreground-class mIoU)", "",
              "| features | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    table = []
    for row, _, _ in backbone_rows(budgets):
        if not any((out / probe_name(row, head)).is_dir() for head in heads):
            continue  # not part of this study
        cells = []
        for head in heads:
            s = probe_summary(out / probe_name(row, head))
            cells.append(f"{s['mIoU']:.3f} ({s['mIoU_fg']:.3f})")
            table.append({"features": row, "head": head, **s})
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["features", "head", "mIoU", "mIoU_fg", "epoch"])
        writer.writeheader()
        writer.writerows(table)
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def probe_name(row: str, head: str) -> str:
    slug = row.lower().replace(",", "").replace(" ", "-")
    return f"probe-{slug}-{head}"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m tools.proxy_study", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/proxy")
    parser.add_argument("--budgets", default="40,120", help="pretraining epochs, comma-separated")
    parser.add_argument("--heads", default="linear,setr_naive,attn_fusion")
    parser.add_argument("--objectives", default="global,dense")
    parser.add_argument("--stage", choices=["all", "pretrain", "probe"], default="all")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--no-floors", action="store_true", help="skip the random-init and raw-pixel probe rows")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra flag for every run, e.g. --set trainer.max_epochs=1")
    try:  # every argument is checked before anything runs: one line, exit 2
        args = parser.parse_args(argv)
        budgets = number_list(args.budgets, "--budgets", int, minimum=1)
        heads = [h.strip() for h in args.heads.split(",") if h.strip()]
        if not heads:
            raise ToolInputError("--heads: give at least one segmentation head, e.g. linear,setr_naive")
        objectives = choice_list(args.objectives, "--objectives", list(OBJECTIVES))
        extra = main_flags(args.set)
        out = output_folder(args.output_dir, "--output-dir")
    except ToolInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ok = True
    if not args.report_only:
        if args.stage in ("all", "pretrain"):
            for objective in objectives:
                for epochs in budgets:
                    ok &= run(f"pretrain-{objective}-e{epochs}", OBJECTIVES[objective],
                              [f"--trainer.max_epochs={epochs}"], out, extra)
        if args.stage in ("all", "probe"):
            for row, flags, pre in backbone_rows(budgets):
                if pre and pre.split("-")[1] not in objectives:
                    continue
                if (not pre and args.no_floors) or (pre and not (out / pre / "done").is_file()):
                    if pre:
                        print(f"[skip] probes of {pre}: that pretraining run has not finished", flush=True)
                    continue
                flags = [f.replace("__OUT__", str(out)) for f in flags]
                for head in heads:
                    ok &= run(probe_name(row, head), PROBE, [*flags, f"--segmentation.head={head}"], out, extra)
    print(write_report(out, budgets, heads))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
