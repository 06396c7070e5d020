"""One self-contained HTML page for one run: what was run, how it went, what it drew.

    python -m tools.report RUN [--out FILE.html]

Writes ``<run>/report.html`` (or ``--out``): a single file with everything embedded (pictures as data URIs,
no script, no network), which opens in any browser and can be mailed or archived on its own. It shows

- the run: name, task, id, creation time, how far it trained (from ``checkpoints/last.ckpt``);
- the scores: the task's monitored metric (best and final, with the step and epoch), the references trained
  beside a segmentation run (``val/mIoU_random_init``, ``val/mIoU_pixels``), the last value of every
  validation metric, and ``eval_metrics.yaml`` for an evaluation-only run;
- the commands: to resume or extend the run, and to reproduce it from its ``config.yaml``;
- the curves of every logged metric (one small plot each, against the optimizer step; losses first);
- every picture of ``media/`` with its caption (what it shows, the epoch it was drawn at), in order;
- the full resolved config, the values that differ from the task's defaults marked and listed first.

Errors are one line and exit status 2: a path that is not a run directory (no ``config.yaml``).
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
REPORT_FILE = "report.html"
INDEX_COLUMNS = ("step", "epoch")

PICTURES = {
    "attention": "CLS-token attention of every head, their mean and DINO's mass-threshold masks; one logarithmic "
                 "colour scale relative to uniform attention (1 = flat), each panel's max / mean printed",
    "cross_correlation": "Barlow Twins cross-correlation of the two views' embeddings (train: latest batch, val: "
                         "epoch mean) on a fixed scale from -1 (blue) through 0 (white) to 1 (red); the target is "
                         "the identity",
    "teacher_entropy": "DINO collapse monitor: the teacher's entropy against the entropy of its batch mean "
                       "(both near 0 or both near log K: collapse)",
    "erf": "effective receptive fields of the chosen layers (gradient of the centre output w.r.t. the input)",
    "views": "augmented views of the same images, as the objective sees them",
    "predictions": "validation images, ground truth and the model's prediction, in VOC colours",
    "lr_find": "learning-rate finder: loss against learning rate, the suggestion marked",
}
"""What each picture family of media/ shows (the file stem without its role, block and epoch parts)."""


REFERENCES = {"random_init": "random-init backbone", "pixels": "raw pixel patches"}
"""The references a segmentation run can train beside itself (--segmentation.baselines), by metric suffix."""


class ReportError(ValueError):
    """A path that is not a run directory; the message says what would be valid."""


@dataclass
class RunData:
    path: Path
    config: dict
    columns: list[str]
    rows: list[dict[str, str]]
    meta: dict = field(default_factory=dict)

    def series(self, name: str) -> list[tuple[int, float]]:
        out = []
        for row in self.rows:
            cell, step = row.get(name), row.get("step")
            if cell not in (None, "") and step not in (None, ""):
                try:
                    out.append((int(float(step)), float(cell)))
                except ValueError:
                    continue
        return out

    def epoch_at(self, step: int) -> Optional[int]:
        epochs = [int(float(r["epoch"])) for r in self.rows if r.get("epoch") not in (None, "")
                  and r.get("step") not in (None, "") and int(float(r["step"])) == step]
        return max(epochs) if epochs else None


def read_run(path: Path) -> RunData:
    if not path.is_dir():
        raise ReportError(f"{path}: no such run directory (give runs/<run>, the folder holding {CONFIG_FILE})")
    if not (path / CONFIG_FILE).is_file():
        raise ReportError(f"{path} is not a run directory: it holds no {CONFIG_FILE} (give runs/<run>)")
    try:
        config = yaml.safe_load((path / CONFIG_FILE).read_text()) or {}
    except yaml.YAMLError as err:
        raise ReportError(f"{path / CONFIG_FILE} is not valid YAML ({str(err).splitlines()[0]})") from None
    rows: list[dict[str, str]] = []
    columns: list[str] = []
    if (path / METRICS_FILE).is_file():
        with (path / METRICS_FILE).open(newline="") as f:
            reader = csv.DictReader(f)
            rows, columns = list(reader), list(reader.fieldnames or [])
    meta = {}
    try:
        meta = json.loads((path / "run.json").read_text())
    except (OSError, ValueError):
        pass
    return RunData(path, config if isinstance(config, dict) else {}, columns, rows, meta)


# ------------------------------------------------------------------------------------------------ pieces
def progress(run: RunData) -> str:
    """'15 of 15 epochs, 120 optimizer steps (finished)', from last.ckpt; or why it is unknown."""
    checkpoint = run.path / LAST_CHECKPOINT
    if not checkpoint.is_file():
        return "no checkpoints/last.ckpt (stopped before its first epoch ended, or evaluation only)"
    import torch

    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a checkpoint cut short
        return "checkpoints/last.ckpt is unreadable"
    steps = int(state.get("global_step", 0))
    total = state.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("total", {})
    epochs = int(total.get("processed", state.get("epoch", 0)))
    max_epochs = int((run.config.get("trainer") or {}).get("max_epochs") or -1)
    done = max_epochs > 0 and epochs >= max_epochs
    return (f"{epochs} of {max_epochs} epochs, {steps} optimizer steps" if max_epochs > 0 else
            f"{epochs} epochs, {steps} optimizer steps") + (" (finished)" if done else " (not finished)")


def monitor_of(task: str) -> tuple[str, str]:
    from lightningmodules import TASKS  # local: the registry imports torch; a bad path needs none of it

    return (TASKS.get(task).monitor, TASKS.get(task).mode) if task in TASKS else ("val/loss", "min")


def scores(run: RunData) -> list[tuple[str, str, str]]:
    """(metric, best, final) rows: the monitored metric first, then the references, then every val/ metric."""
    task = str(run.config.get("task", ""))
    monitor, mode = monitor_of(task)
    rows = []

    def describe(name: str, pick) -> tuple[str, str]:
        values = [(s, v) for s, v in run.series(name) if math.isfinite(v)]
        if not values:
            return "", ""
        best = pick(values, key=lambda sv: sv[1])
        epoch = run.epoch_at(best[0])
        where = f" (step {best[0]}" + (f", epoch {epoch})" if epoch is not None else ")")
        return f"{best[1]:.4f}{where}", f"{values[-1][1]:.4f} (step {values[-1][0]})"

    pick = max if mode == "max" else min
    references = {f"{monitor}_{name}": label for name, label in REFERENCES.items()}
    names = [monitor] + [c for c in references if c in run.columns]
    names += [c for c in run.columns if c.startswith("val/") and c not in names]
    for name in names:
        goal = mode if (name == monitor or name in references) else None
        best, final = describe(name, pick if goal else (min if "loss" in name else max))
        if final:
            label = name + {"max": " (higher is better)", "min": " (lower is better)"}.get(goal or "", "")
            if name in references:
                label += f" — reference: {references[name]}, same probe, same run"
            rows.append((label, best, final))
    evaluated = run.path / "eval_metrics.yaml"
    if evaluated.is_file():
        for name, value in (yaml.safe_load(evaluated.read_text()) or {}).items():
            rows.append((f"{name} (evaluation only)", "", f"{float(value):.4f}"))
    return rows


def commands(run: RunData) -> list[tuple[str, str]]:
    name = run.path.name
    out = []
    if (run.path / LAST_CHECKPOINT).is_file():
        out.append(("resume it (or continue it after a stop)", f"python main.py --trainer.resume {run.path}"))
        epochs = int((run.config.get("trainer") or {}).get("max_epochs") or 0)
        if epochs > 0:
            out.append(("extend it", f"python main.py --trainer.resume {run.path} --trainer.max_epochs {2 * epochs}"))
    out.append(("reproduce it as a new run (same seed and machine: the same numbers)",
                f"python main.py --config {run.path / CONFIG_FILE} --log.run_name {name}-again"))
    return out


def config_lines(run: RunData) -> list[tuple[str, bool]]:
    """The resolved config as YAML lines, each with whether it differs from the task's default."""
    try:
        from config.loading import format_config, from_dict  # local: only the report needs the marked YAML

        text = format_config(from_dict(run.config, source=str(run.path / CONFIG_FILE)))
    except Exception:  # noqa: BLE001 - a config of another version: show it as it is, unmarked
        text = yaml.safe_dump(run.config, sort_keys=False)
    return [(line, "# default:" in line) for line in text.splitlines()]


def family(stem: str) -> str:
    """'attention_teacher_b02_e010' → 'attention'; 'cross_correlation_start' → 'cross_correlation'."""
    for name in sorted(PICTURES, key=len, reverse=True):
        if stem == name or stem.startswith(name + "_"):
            return name
    return stem.rsplit("_", 1)[0]


def caption(stem: str) -> str:
    base = family(stem)
    rest = stem[len(base):].strip("_").split("_") if stem != base else []
    parts = []
    for part in rest:
        if re.fullmatch(r"e\d+", part):
            parts.append(f"epoch {int(part[1:])}")
        elif re.fullmatch(r"b\d+", part):
            parts.append(f"block {int(part[1:])}")
        elif part == "start":
            parts.append("before training")
        elif part:
            parts.append(part)
    what = PICTURES.get(base, base.replace("_", " "))
    return f"{', '.join(parts) or stem}: {what}"


def picture_order(path: Path) -> tuple:
    stem = path.stem
    epoch = re.search(r"_e(\d+)$", stem)
    return (family(stem), 0 if stem.endswith("_start") else 1, int(epoch.group(1)) if epoch else -1, stem)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def curve_groups(run: RunData) -> list[list[str]]:
    """Metric columns to plot, grouped into panels: losses first, then the monitored metric and the rest."""
    names = [c for c in run.columns if c not in INDEX_COLUMNS and len(run.series(c)) > 0]
    names = [c for c in names if not re.search(r"_head\d+$", c)]  # per-head Jaccard: the mean is plotted
    losses = [c for c in names if "loss" in c]
    rest = [c for c in names if c not in losses]
    return [[c] for c in losses + rest]


def curves_png(run: RunData) -> Optional[bytes]:
    """One small panel per metric against the optimizer step (points when a metric has few values)."""
    groups = curve_groups(run)
    if not groups:
        return None
    from matplotlib.figure import Figure

    cols = 3
    rows = math.ceil(len(groups) / cols)
    figure = Figure(figsize=(4.2 * cols, 2.6 * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    for ax, names in zip(axes.flat, groups):
        for name in names:
            series = run.series(name)
            ax.plot([s for s, _ in series], [v for _, v in series], marker="o" if len(series) <= 30 else None,
                    markersize=3, linewidth=1.2)
            ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("step", fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_axis_off()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ the page
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
th { background: #f4f4f4; } code, pre { background: #f6f6f6; } pre { padding: 0.6em; overflow-x: auto; }
pre.config span.changed { background: #fff3bf; font-weight: 600; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; } .muted { color: #666; }
"""


def render(run: RunData) -> str:
    esc = html.escape
    task = str(run.config.get("task", "?"))
    name = run.path.name
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(name)} — vitssl run report"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>{esc(name)}</h1>",
             f"<p class='muted'>task <b>{esc(task)}</b> · run id {esc(str(run.meta.get('run_id', '?')))} · created "
             f"{esc(str(run.meta.get('created', '?')))} · {esc(progress(run))} · folder <code>{esc(str(run.path))}"
             f"</code></p>"]

    parts.append("<h2>Scores</h2>")
    rows = scores(run)
    if rows:
        parts.append("<table><tr><th>metric</th><th>best (where)</th><th>final</th></tr>" + "".join(
            f"<tr><td>{esc(m)}</td><td>{esc(b)}</td><td>{esc(f)}</td></tr>" for m, b, f in rows) + "</table>")
    else:
        parts.append("<p>No validation metric was logged.</p>")

    parts.append("<h2>Commands</h2><table>" + "".join(
        f"<tr><td>{esc(what)}</td><td><code>{esc(cmd)}</code></td></tr>" for what, cmd in commands(run)) + "</table>")

    parts.append("<h2>Curves</h2>")
    png = curves_png(run)
    parts.append(f"<figure><img src='{data_uri(png)}' alt='metric curves'><figcaption>Every logged metric "
                 f"against the optimizer step ({esc(METRICS_FILE)}).</figcaption></figure>" if png else
                 f"<p>No metrics were logged ({esc(METRICS_FILE)} missing or empty).</p>")

    pictures = sorted((run.path / "media").glob("*.png"), key=picture_order) if (run.path / "media").is_dir() else []
    parts.append(f"<h2>Pictures ({len(pictures)})</h2>")
    if not pictures:
        parts.append("<p>No pictures in media/.</p>")
    for path in pictures:
        parts.append(f"<figure><img src='{data_uri(path.read_bytes())}' alt='{esc(path.stem)}'>"
                     f"<figcaption><b>{esc(path.name)}</b> — {esc(caption(path.stem))}</figcaption></figure>")

    lines = config_lines(run)
    changed = [line.strip() for line, differs in lines if differs]
    parts.append(f"<h2>Configuration</h2><p>{len(changed)} values differ from the defaults of task {esc(task)}"
                 + (":</p><ul>" + "".join(f"<li><code>{esc(c)}</code></li>" for c in changed) + "</ul>"
                    if changed else ".</p>"))
    parts.append("<pre class='config'>" + "\n".join(
        f"<span class='changed'>{esc(line)}</span>" if differs else esc(line) for line, differs in lines) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run_dir: str | Path, out: Optional[str | Path] = None) -> Path:
    run = read_run(Path(run_dir))
    target = Path(out) if out is not None else run.path / REPORT_FILE
    if target.exists() and target.is_dir():
        raise ReportError(f"--out {target} is a folder; give a file name such as {target / REPORT_FILE}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(render(run), encoding="utf-8")
    tmp.replace(target)
    return target


class _ArgParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ReportError(f"{message} (see python -m tools.report --help)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _ArgParser(prog="python -m tools.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", metavar="RUN", help="run directory (runs/<run>)")
    parser.add_argument("--out", default=None, help=f"HTML file to write (default: <run>/{REPORT_FILE})")
    try:
        args = parser.parse_args(argv)
        path = write_report(args.run, args.out)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write the report: {err.strerror or err} ({err.filename})", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
