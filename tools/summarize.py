"""Tables and plots for a folder of runs (e.g. a sweep): a metric against the swept parameters, like with like.

    python -m tools.summarize runs/ [--metric val/loss] [--goal min] [--params backbone.depth,barlow.proj_dim]
                                    [--out DIR] [--plot final|best] [--include-unfinished]

Every run directory under the folder (one holding ``config.yaml`` and ``metrics.csv``, see
utils/run_dir.py; nested folders are searched, a run directory's own subfolders are not) gives one row:
the run, its swept parameters, the metric's final value (the last non-empty cell of its metrics.csv
column), its best value (min or max per ``--goal``) and the step it was reached at, and how far it
trained (epochs completed and optimizer steps, from its ``checkpoints/last.ckpt``).

Only like is compared with like:

- **One table per task** (``barlow_twins``, ``segmentation``; evaluation-only runs form their own group):
  a pretraining loss and a segmentation loss are never in one table, mean or plot.
- **Only finished runs** by default. A training run is *finished* when its ``checkpoints/last.ckpt``
  (written at every epoch end) says the fit loop completed ``trainer.max_epochs`` epochs of its
  ``config.yaml`` (the checkpoint's ``loops.fit_loop.epoch_progress.total.processed``; its ``epoch`` field
  when that is absent) or reached ``trainer.max_steps`` optimizer steps (``global_step``), whichever the
  config sets; an evaluation-only run when it wrote ``eval_metrics.yaml``. A run without a readable
  ``last.ckpt`` (killed before its first epoch ended, or cut short while writing) is unfinished. Unfinished
  runs are listed by name and progress below the tables; ``--include-unfinished`` puts them into the tables,
  means and plots too, marked with how far they got.
- **Each task by its own metric** by default: the one that picks its best checkpoint (segmentation
  ``val/mIoU``, higher is better; pretraining ``val/loss``, lower is better); ``--metric``/``--goal`` choose
  another for every task.
- **A copy is not a second sample**: run directories sharing a ``run_id`` (``run.json``; a copied run
  directory, resumed or not) count once, the copy that trained furthest; the others are named in a note.
- **Plots never join unlike runs**: a line joins finished runs of one configuration (every differing config
  field but the x axis and ``seed`` is held fixed along it); runs of different training lengths are points,
  never a line; unfinished runs (``--include-unfinished``) are hollow markers outside lines and means.
- **Training length is never averaged over**: the swept parameters are by default the config fields whose
  values differ between the runs of a task (bookkeeping fields such as ``log.run_name`` excluded), in
  config order, which includes ``trainer.max_epochs``/``max_steps`` when they differ; when ``--params``
  names others, those two are added whenever they differ.

Writes, into ``--out`` (default: the runs folder):

- ``summary.md``: per task the table, the best run, and for two parameters a grid (first parameter ×
  second, the mean when several runs share a cell, with their count); then the runs left out;
- ``summary.csv``: every row of every task (columns ``task`` and ``status`` say which), full precision;
- ``summary.png`` (one task) or ``summary_<task>.png`` (one per task): the metric against the parameters
  — a line per value of the second parameter when there are two (and a heatmap of the grid beside it), a
  line (numeric values) or bars otherwise.

A run whose ``metrics.csv`` or ``config.yaml`` cannot be read (not text, not CSV, a cell that is not a
number, YAML that does not parse) is left out of every table and listed with what is wrong; a last
``metrics.csv`` row without its line end (a writer killed mid-row) is ignored.

Errors (exit status 2, one line): no run directories, no finished run (without ``--include-unfinished``), a metric
that no run logged (the logged ones are listed), a ``--params`` name that is not a config field (the
closest ones are suggested), a runs folder or ``--out`` that is a file or cannot be read or written.
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from config.hparams import Hparams
from config.loading import to_dict
from tools.sweep import config_fields, unknown_name_message

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
LAST_CHECKPOINT = "checkpoints/last.ckpt"
EVAL_METRICS_FILE = "eval_metrics.yaml"
BOOKKEEPING = ("log.", "trainer.resume", "trainer.progress_bar", "trainer.progress_refresh_rate")
"""Config fields (or groups, ending in '.') that differ between runs without changing what is learned: names,
folders, wandb settings, progress bars. ``--params`` can still name them."""
LENGTH_FIELDS = ("trainer.max_epochs", "trainer.max_steps")
"""Training length: runs that differ in it are never averaged together (added to --params when they differ)."""
INDEX_COLUMNS = ("step", "epoch")


class SummaryError(ValueError):
    """Nothing to summarise, or a metric / parameter name that does not exist; the message says which."""


@dataclass
class Progress:
    """How far a run got: from ``checkpoints/last.ckpt`` (training) or ``eval_metrics.yaml`` (evaluation only)."""

    finished: bool
    status: str
    """'finished', 'evaluated', or why not, e.g. 'stopped after epoch 3 of 15', 'no checkpoints/last.ckpt'."""
    epochs: Optional[int] = None
    """Epochs the fit loop completed (None: unknown, e.g. no checkpoint or an evaluation-only run)."""
    steps: Optional[int] = None
    """Optimizer steps taken (the checkpoint's global_step)."""


def run_progress(path: Path, config: dict[str, Any]) -> Progress:
    """Whether the run in ``path`` (flattened ``config``) finished, and how far it got; see the module docstring."""
    if config.get("trainer.eval_only"):
        done = (path / EVAL_METRICS_FILE).is_file()
        return Progress(done, "evaluated" if done else f"evaluation did not finish (no {EVAL_METRICS_FILE})")
    checkpoint = path / LAST_CHECKPOINT
    if not checkpoint.is_file():
        return Progress(False, f"no {LAST_CHECKPOINT}")
    import torch

    try:  # mmap: only the few bookkeeping entries are read, not the weights
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 — a checkpoint cut short by a crash
        return Progress(False, f"{LAST_CHECKPOINT} is unreadable (cut short?)")
    steps = int(state.get("global_step", 0))
    total = state.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("total", {})
    epochs = int(total.get("processed", state.get("epoch", 0)))
    max_epochs, max_steps = int(config.get("trainer.max_epochs") or -1), int(config.get("trainer.max_steps") or -1)
    if (max_steps > 0 and steps >= max_steps) or (max_epochs > 0 and epochs >= max_epochs):
        return Progress(True, "finished", epochs, steps)
    targets = [f"epoch {epochs} of {max_epochs}"] if max_epochs > 0 else []
    targets += [f"step {steps} of {max_steps}"] if max_steps > 0 else []
    return Progress(False, "stopped at " + (" / ".join(targets) or f"step {steps} (no max_epochs/max_steps)"),
                    epochs, steps)


@dataclass
class RunRecord:
    name: str
    """The run directory relative to the summarised folder (its run name for a flat folder)."""
    path: Path
    config: dict[str, Any]
    """The run's config.yaml flattened to dotted names (fields it lacks: their defaults)."""
    columns: list[str]
    rows: list[dict[str, str]]
    _progress: Optional[Progress] = field(default=None, repr=False)
    problem: Optional[str] = None
    """Why its metrics.csv or config.yaml cannot be read (then it has no rows and is left out); None if readable."""

    @property
    def task(self) -> str:
        """The group the run is compared within: its task, evaluation-only runs apart."""
        task = str(self.config.get("task"))
        return f"{task} (eval-only)" if self.config.get("trainer.eval_only") else task

    @property
    def progress(self) -> Progress:
        if self._progress is None:
            self._progress = (Progress(False, self.problem) if self.problem else run_progress(self.path, self.config))
        return self._progress

    def series(self, metric: str) -> list[tuple[Optional[int], float]]:
        """(step, value) of every row where ``metric`` has a value, in file order."""
        out = []
        for row in self.rows:
            cell = row.get(metric)
            if cell not in (None, ""):
                out.append((_int(row.get("step")), float(cell)))
        return out

    def max_index(self, column: str, prefix: str = "") -> Optional[int]:
        """Largest ``column`` value over the rows holding a metric that starts with ``prefix``."""
        rows = [r for r in self.rows if not prefix or any(k.startswith(prefix) and v not in ("", None) for k, v in r.items())]
        values = [v for v in (_int(r.get(column)) for r in rows) if v is not None]
        return max(values) if values else None


@dataclass
class Row:
    run: RunRecord
    params: dict[str, Any]
    final: Optional[float]
    best: Optional[float]
    best_step: Optional[int]
    final_step: Optional[int]
    steps: Optional[int]
    epochs: Optional[int]

    @property
    def finished(self) -> bool:
        return self.run.progress.finished


@dataclass
class Summary:
    """The rows of one task (a group of comparable runs)."""

    task: str
    metric: str
    goal: str
    params: list[str]
    rows: list[Row]
    root: Path
    files: dict[str, Path] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)
    """Config fields that differ between the task's runs beside ``params`` (seed excepted): the plot never joins
    or averages runs that differ in one of them."""

    @property
    def best_row(self) -> Optional[Row]:
        scored = [r for r in self.rows if r.final is not None and math.isfinite(r.final)]
        if not scored:
            return None
        return (min if self.goal == "min" else max)(scored, key=lambda r: r.final)


@dataclass
class Report:
    """Everything ``summarize`` found: one :class:`Summary` per task, and the runs it left out."""

    metric: str
    goal: str
    root: Path
    groups: list[Summary]
    include_unfinished: bool
    left_out: list[RunRecord] = field(default_factory=list)
    """Unfinished runs (without --include-unfinished)."""
    unreadable: list[RunRecord] = field(default_factory=list)
    """Runs whose metrics.csv or config.yaml cannot be read (always left out; ``problem`` says why)."""
    notes: list[str] = field(default_factory=list)
    """Tasks whose runs did not log the metric, and similar."""
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def warnings(self) -> list[str]:
        unreadable = [f"{r.name} left out: {r.problem}" for r in self.unreadable]
        return [w for g in self.groups for w in g.warnings] + self.notes + unreadable

    def group(self, task: str) -> Summary:
        return next(g for g in self.groups if g.task == task)


def _int(cell: Any) -> Optional[int]:
    if cell in (None, ""):
        return None
    try:
        return int(float(cell))
    except ValueError:
        return None


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def find_run_dirs(root: Path) -> list[Path]:
    """Directories holding config.yaml and metrics.csv, under ``root`` (not inside another run directory)."""
    found: list[Path] = []

    def walk(folder: Path) -> None:
        if (folder / CONFIG_FILE).is_file() and (folder / METRICS_FILE).is_file():
            found.append(folder)
            return
        try:
            children = sorted(folder.iterdir())
        except OSError as err:
            raise SummaryError(f"cannot read folder {folder}: {err.strerror or err}") from None
        for child in children:
            if child.is_dir() and not child.name.startswith(".") and not child.is_symlink():
                walk(child)

    walk(root)
    return found


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def read_metrics(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a metrics.csv; ValueError saying what is wrong when it is not text, not CSV, or holds a
    cell that is not a number. A last row without its line end (its writer was killed mid-row) is dropped."""
    try:
        with path.open(newline="") as f:  # line ends kept as written: a torn last row is told by its missing end
            text = f.read()
    except UnicodeDecodeError:
        raise ValueError(f"{METRICS_FILE} is not text (it holds bytes that are not UTF-8)") from None
    except OSError as err:
        raise ValueError(f"{METRICS_FILE} cannot be read ({err.strerror or err})") from None
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines = lines[:-1]
    try:
        reader = csv.DictReader(lines)
        rows = list(reader)
    except csv.Error as err:
        raise ValueError(f"{METRICS_FILE} is not valid CSV ({err})") from None
    columns = list(reader.fieldnames or [])
    for line, row in enumerate(rows, start=2):
        if None in row:
            raise ValueError(f"{METRICS_FILE} line {line} has more cells than its header has columns")
        bad = next(((k, v) for k, v in row.items() if v not in (None, "") and not _is_number(v)), None)
        if bad is not None:
            raise ValueError(f"{METRICS_FILE} line {line}, column {bad[0]!r}: {bad[1][:40]!r} is not a number")
    return columns, rows


def read_config(path: Path) -> dict[str, Any]:
    """A run's config.yaml as a mapping; ValueError saying what is wrong when it cannot be read as one."""
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError:
        raise ValueError(f"{CONFIG_FILE} is not text (it holds bytes that are not UTF-8)") from None
    except OSError as err:
        raise ValueError(f"{CONFIG_FILE} cannot be read ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{CONFIG_FILE} is not valid YAML ({' '.join(str(err).split())[:120]})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{CONFIG_FILE} is not a mapping of config groups (it holds a {type(config).__name__})")
    return config


def read_run(path: Path, root: Path) -> RunRecord:
    """The run in ``path``; a run whose files cannot be read comes back with ``problem`` set and no rows."""
    name = path.relative_to(root).as_posix() if path != root else path.name
    try:
        config = read_config(path / CONFIG_FILE)
        columns, rows = read_metrics(path / METRICS_FILE)
    except ValueError as err:
        return RunRecord(name, path, _default_config(), [], [], problem=str(err))
    # A field missing from an older run's config.yaml is read as its default, so that runs made before a
    # field existed do not all "differ" in it.
    return RunRecord(name, path, {**_default_config(), **flatten(config)}, columns, rows)


def _default_config() -> dict[str, Any]:
    return flatten(to_dict(Hparams()))


def _sort_key(value: Any) -> tuple:
    if isinstance(value, bool) or value is None:
        return (1, str(value))
    if isinstance(value, (int, float)):
        return (0, value)
    return (1, str(value))


def differing_fields(runs: Sequence[RunRecord]) -> list[str]:
    def bookkeeping(name: str) -> bool:
        return any(name == b or (b.endswith(".") and name.startswith(b)) for b in BOOKKEEPING)

    names = [n for n in config_fields() if not bookkeeping(n)]
    extra = sorted({k for r in runs for k in r.config if k not in names and not bookkeeping(k)})  # removed fields
    missing = object()
    return [n for n in names + extra if len({repr(r.config.get(n, missing)) for r in runs}) > 1]


def check_params(params: Sequence[str]) -> None:
    valid = list(config_fields())
    bad = [p for p in params if p not in valid]
    if bad:
        raise SummaryError("--params: " + "; ".join(unknown_name_message(p, valid) for p in bad))


def _goal(goal: str) -> str:
    aliases = {"min": "min", "minimize": "min", "max": "max", "maximize": "max"}
    if goal not in aliases:
        raise SummaryError(f"--goal must be min or max, got {goal!r}")
    return aliases[goal]


def task_target(task: str, metric: Optional[str], goal: Optional[str]) -> tuple[str, str]:
    """(metric, goal) a task's table uses: ``metric`` when given, else the task's own monitored metric (the one
    that picks its best checkpoint: segmentation val/mIoU, pretraining val/loss); ``goal`` when given, else the
    task's mode for its monitored metric and min for any other."""
    from lightningmodules import TASKS  # local: the registry imports torch; errors above need none of it

    name = task.split(" (")[0]  # "segmentation (eval-only)" is compared by segmentation's metric
    monitor, mode = (TASKS.get(name).monitor, TASKS.get(name).mode) if name in TASKS else ("val/loss", "min")
    chosen = metric or monitor
    return chosen, goal or (mode if chosen == monitor else "min")


TASK_METRIC = "each task's monitored metric"
"""What the report says when no --metric was given (every task table names its own)."""


def drop_copies(runs: list[RunRecord]) -> tuple[list[RunRecord], list[str]]:
    """One run per ``run_id`` (run.json): a copied run directory, resumed or not, repeats its original's
    numbers and must not count as a second sample. Keeps the copy that trained furthest (then the first by
    name); returns the kept runs and one note per dropped copy."""
    import json

    by_id: dict[str, list[RunRecord]] = {}
    kept: list[RunRecord] = []
    for run in runs:
        try:
            run_id = json.loads((run.path / "run.json").read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            run_id = None
        if run_id:
            by_id.setdefault(run_id, []).append(run)
        else:
            kept.append(run)
    notes = []
    for run_id, same in by_id.items():
        same.sort(key=lambda r: (-(r.progress.steps or 0), r.name))
        kept.append(same[0])
        notes += [f"{r.name} is a copy of run {same[0].name} (same run_id {run_id} in run.json) and is left out: "
                  f"it repeats that run, it is no second sample" for r in same[1:]]
    order = {id(r): i for i, r in enumerate(runs)}
    return sorted(kept, key=lambda r: order[id(r)]), notes


def summarize(root: str | Path, metric: Optional[str] = None, params: Optional[Sequence[str]] = None,
              goal: Optional[str] = None, out: Optional[str | Path] = None, plot: str = "final",
              include_unfinished: bool = False) -> Report:
    """Read the runs under ``root`` and write summary.md, summary.csv and the plot(s) into ``out``. Without
    ``metric``, each task is summarised by its own monitored metric and mode (:func:`task_target`)."""
    root = Path(root)
    goal = _goal(goal) if goal is not None else None
    if plot not in ("final", "best"):
        raise SummaryError(f"--plot must be final or best, got {plot!r}")
    if root.exists() and not root.is_dir():
        raise SummaryError(f"{root} is a file, not a folder of run directories")
    if not root.is_dir():
        raise SummaryError(f"{root}: no such folder")
    out_dir = Path(out) if out is not None else root
    if out_dir.exists() and not out_dir.is_dir():
        raise SummaryError(f"--out {out_dir} is a file; give a folder (it is created if missing) for summary.md, "
                           f"summary.csv and the plots")
    if params is not None:
        check_params(params)
    everything = [read_run(p, root) for p in find_run_dirs(root)]
    if not everything:
        raise SummaryError(f"{root}: no run directories (folders holding {CONFIG_FILE} and {METRICS_FILE}) under it")
    found = [r for r in everything if r.problem is None]
    report = Report(metric or TASK_METRIC, goal or "the task's own", root, [], include_unfinished,
                    unreadable=[r for r in everything if r.problem])
    if not found:
        raise SummaryError(f"none of the {len(everything)} runs under {root} can be read ({_left_out_text(everything)})")
    runs = found if include_unfinished else [r for r in found if r.progress.finished]
    report.left_out = [] if include_unfinished else [r for r in found if not r.progress.finished]
    if not runs:
        raise SummaryError(f"none of the {len(found)} runs under {root} finished ({_left_out_text(found)}); "
                           "--include-unfinished summarises them anyway")
    runs, copies = drop_copies(runs)
    report.notes += copies
    logged = sorted({c for r in runs for c in r.columns if c not in INDEX_COLUMNS and r.series(c)})
    if metric is not None and not any(r.series(metric) for r in runs):
        import difflib

        close = difflib.get_close_matches(metric, logged, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        which = "" if include_unfinished or not report.left_out else "finished "
        raise SummaryError(f"--metric {metric!r} was not logged by any of the {len(runs)} {which}runs under {root}{hint}; "
                           f"logged metrics: {', '.join(logged) or 'none'}")
    tasks: dict[str, list[RunRecord]] = {}
    for run in runs:
        tasks.setdefault(run.task, []).append(run)
    for task in sorted(tasks):
        members = tasks[task]
        task_metric, task_goal = task_target(task, metric, goal)
        if not any(r.series(task_metric) for r in members):
            report.notes.append(f"the {len(members)} {task} runs logged no {task_metric} and are not tabulated")
            continue
        report.groups.append(_summarize_task(task, members, task_metric, task_goal, params, root))
    report.files = {"md": out_dir / "summary.md", "csv": out_dir / "summary.csv"}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for g in report.groups:
            stem = "summary" if len(report.groups) == 1 else f"summary_{_slug(g.task)}"
            g.files["png"] = out_dir / f"{stem}.png"
            write_plot(g, g.files["png"], value=plot)
        write_csv(report, report.files["csv"])
        write_markdown(report, report.files["md"])
    except OSError as err:  # a read-only or full file system, a file where a folder should be
        where = err.filename or out_dir
        raise SummaryError(f"--out: cannot write {where}: {err.strerror or err}") from None
    return report


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in text).strip("_").replace("__", "_")


def _left_out_text(runs: Sequence[RunRecord]) -> str:
    return ", ".join(f"{r.name}: {r.progress.status}" for r in runs)


def _summarize_task(task: str, runs: list[RunRecord], metric: str, goal: str, params: Optional[Sequence[str]],
                    root: Path) -> Summary:
    differing = differing_fields(runs)
    names = list(params) if params is not None else differing
    summary = Summary(task, metric, goal, names, [], root)
    lengths = [f for f in LENGTH_FIELDS if f in differing and f not in names]
    if lengths:  # never average runs of different lengths together
        names += lengths
        summary.warnings.append(f"{task} runs differ in {' and '.join(lengths)}: added to the parameters, so that "
                                "runs of different lengths are not averaged together")
    summary.others = [f for f in differing if f not in names and f != "seed"]
    if summary.others:
        summary.warnings.append(f"{task} runs also differ in {', '.join(summary.others[:4])}"
                                f"{', ...' if len(summary.others) > 4 else ''} (not in --params): the plot draws each "
                                "of their settings as its own series")
    if params is None and len(names) > 4:
        summary.warnings.append(f"{len(names)} config fields differ between the {task} runs ({', '.join(names[:6])}"
                                f"{', ...' if len(names) > 6 else ''}); --params picks the ones that were swept")
    pick = min if goal == "min" else max
    for run in runs:
        series = run.series(metric)
        finite = [(s, v) for s, v in series if math.isfinite(v)]
        best = pick(finite, key=lambda sv: sv[1]) if finite else None
        if not series:
            summary.warnings.append(f"{run.name} logged no {metric}")
        progress = run.progress
        steps, epochs = progress.steps, progress.epochs
        if steps is None and not run.config.get("trainer.eval_only"):  # no checkpoint: what metrics.csv shows
            # Steps trained: from the training rows (callbacks may log after the last step, at step = steps done).
            last_step = run.max_index("step", prefix="train/")
            last_step = run.max_index("step") if last_step is None else last_step
            last_epoch = run.max_index("epoch")
            steps = None if last_step is None else last_step + 1
            epochs = None if last_epoch is None else last_epoch + 1
        summary.rows.append(Row(
            run=run, params={n: run.config.get(n) for n in names},
            final=series[-1][1] if series else None, final_step=series[-1][0] if series else None,
            best=best[1] if best else None, best_step=best[0] if best else None, steps=steps, epochs=epochs,
        ))
    summary.rows.sort(key=lambda r: (*(_sort_key(r.params[n]) for n in names), r.run.name))
    return summary


# --------------------------------------------------------------------------------------------- writers


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def write_csv(report: Report, path: Path) -> None:
    params = list(dict.fromkeys(n for g in report.groups for n in g.params))  # every task's, in order
    header = ["run", "task", "status", *params, "final", "best", "best_step", "final_step", "steps", "epochs",
              "metric", "goal", "run_dir"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for g in report.groups:
            for r in g.rows:
                writer.writerow([r.run.name, g.task, r.run.progress.status, *(r.params.get(n, "") for n in params),
                                 "" if r.final is None else repr(r.final), "" if r.best is None else repr(r.best),
                                 _fmt(r.best_step), _fmt(r.final_step), _fmt(r.steps), _fmt(r.epochs),
                                 g.metric, g.goal, str(r.run.path)])


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return lines


def _is_numeric(values: Sequence[Any]) -> bool:
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _cell_means(summary: Summary, value: str = "final") -> dict[tuple, list[float]]:
    return {key: [v for v, _ in cell] for key, cell in _cells(summary, value).items()}


def _cells(summary: Summary, value: str = "final") -> dict[tuple, list[tuple[float, bool]]]:
    """(value, finished) of the rows of each parameter setting."""
    cells: dict[tuple, list[tuple[float, bool]]] = {}
    for r in summary.rows:
        v = getattr(r, value)
        if v is not None and math.isfinite(v):
            cells.setdefault(tuple(r.params[n] for n in summary.params), []).append((v, r.finished))
    return cells


def _trained(r: Row) -> str:
    """'15/15' epochs (completed/asked), or just what is known."""
    target = r.run.config.get("trainer.max_epochs")
    if r.epochs is None:
        return ""
    return f"{r.epochs}/{target}" if isinstance(target, int) and target > 0 else str(r.epochs)


def _task_markdown(summary: Summary) -> list[str]:
    m, goal = summary.metric, summary.goal
    unfinished = sum(not r.finished for r in summary.rows)
    count = f"{len(summary.rows)} run{'s' * (len(summary.rows) != 1)}" + (f", {unfinished} of them unfinished" if unfinished else "")
    lines = [f"## {summary.task}: {count}", "",
             f"Swept: {', '.join(f'`{p}`' for p in summary.params) or 'nothing (all configs equal)'}.", ""]
    header = ["run", *summary.params, f"final {m}", f"best {m}", "best at step", "epochs", "steps"]
    header += ["status"] if unfinished else []
    best = summary.best_row
    rows = []
    for r in summary.rows:
        name = f"**{r.run.name}**" if r is best else r.run.name
        rows.append([name, *(_fmt(r.params[n]) for n in summary.params), _fmt(r.final), _fmt(r.best),
                     _fmt(r.best_step), _trained(r), _fmt(r.steps)] + ([r.run.progress.status] if unfinished else []))
    lines += _md_table(header, rows, ["l"] * (1 + len(summary.params)) + ["r"] * 5 + ["l"] * bool(unfinished))
    if best is not None:
        setting = ", ".join(f"{n}={_fmt(best.params[n])}" for n in summary.params[:4])
        setting += ", ..." if len(summary.params) > 4 else ""
        lines += ["", f"Best final {m} ({goal}): **{_fmt(best.final)}** — {best.run.name}"
                  + (f" ({setting})" if setting else "") + ("" if best.finished else " (unfinished)")]
    if len(summary.params) == 2:
        a, b = summary.params
        cells = _cells(summary)
        avals = sorted({r.params[a] for r in summary.rows}, key=_sort_key)
        bvals = sorted({r.params[b] for r in summary.rows}, key=_sort_key)
        grid_rows = []
        for av in avals:
            row = [f"{a}={_fmt(av)}"]
            for bv in bvals:
                cell = cells.get((av, bv), [])
                if not cell:
                    row.append("")
                    continue
                notes = [f"mean of {len(cell)}"] if len(cell) > 1 else []
                stopped = sum(not done for _, done in cell)
                notes += [f"{stopped} unfinished"] if stopped else []
                row.append(_fmt(statistics.fmean(v for v, _ in cell)) + (f" ({', '.join(notes)})" if notes else ""))
            grid_rows.append(row)
        lines += ["", f"Final {m}, {a} (rows) × {b} (columns):", ""]
        lines += _md_table(["", *(f"{b}={_fmt(v)}" for v in bvals)], grid_rows, ["l"] + ["r"] * len(bvals))
    if "png" in summary.files:
        lines += ["", f"![{summary.task}]({summary.files['png'].name})"]
    for w in summary.warnings:
        lines += ["", f"Note: {w}."]
    return lines


def write_markdown(report: Report, path: Path) -> None:
    m, goal = report.metric, report.goal
    total = sum(len(g.rows) for g in report.groups)
    which = "runs" if report.include_unfinished else "finished runs"
    tasks = ", ".join(g.task for g in report.groups)
    lines = [f"# {m} over {total} {which} ({tasks})", "",
             f"Runs under `{report.root}`, compared within their task; final = last logged value, best = {goal} "
             f"over the run (at that step); epochs = completed/asked (`trainer.max_epochs`), steps = optimizer steps, "
             f"both from `{LAST_CHECKPOINT}`. "
             + ("Unfinished runs included (status column)." if report.include_unfinished else
                f"Only finished runs: `{LAST_CHECKPOINT}` at `trainer.max_epochs` or `trainer.max_steps` "
                f"(evaluation-only runs: `{EVAL_METRICS_FILE}` written)."), ""]
    for g in report.groups:
        lines += _task_markdown(g) + [""]
    for note in report.notes:
        lines += [f"Note: {note}.", ""]
    if report.left_out:
        lines += [f"Left out, unfinished ({len(report.left_out)}; `--include-unfinished` includes them): "
                  + "; ".join(f"{r.name} ({r.task}, {r.progress.status})" for r in report.left_out) + ".", ""]
    if report.unreadable:
        lines += [f"Left out, unreadable ({len(report.unreadable)}): "
                  + "; ".join(f"{r.name} ({r.problem})" for r in report.unreadable) + ".", ""]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def write_plot(summary: Summary, path: Path, value: str = "final") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, params = summary.metric, summary.params
    label = f"{value} {m}"
    arrow = "lower is better" if summary.goal == "min" else "higher is better"
    rows = [r for r in summary.rows if getattr(r, value) is not None and math.isfinite(getattr(r, value))]
    two_d = len(params) == 2 and not summary.others  # a heatmap cell would average different configurations
    fig, axes = plt.subplots(1, 2 if two_d else 1, figsize=(12 if two_d else 7, 4.8), squeeze=False,
                             layout="constrained")
    ax = axes[0][0]
    if not params or len(params) > 2:  # nothing swept, or too many axes: one bar per run
        names = [r.run.name for r in rows]
        ax.bar(range(len(rows)), [getattr(r, value) for r in rows], color="tab:blue")
        ax.set_xticks(range(len(rows)), names, rotation=30 if len(rows) > 3 else 0, ha="right" if len(rows) > 3 else "center")
        ax.set_xlabel("run")
        _label_bars(ax, [getattr(r, value) for r in rows])
    else:
        x_name, groups = params[0], params[1:]
        xs = [r.params[x_name] for r in rows]
        numeric = _is_numeric(xs)
        categories = sorted(set(xs), key=_sort_key)
        series: dict[tuple, list[Row]] = {}
        others = summary.others  # never joined by a line nor averaged: each setting of them is its own series
        for r in rows:
            key = tuple(r.params[g] for g in groups) + tuple(_fmt(r.run.config.get(f)) for f in others)
            series.setdefault(key, []).append(r)
        # A line joins runs of one configuration (but x) that finished, never runs of different training lengths.
        joined = x_name not in LENGTH_FIELDS
        for key in sorted(series, key=lambda k: tuple(_sort_key(v) for v in k)):
            members = series[key]
            name = ", ".join(f"{g.rsplit('.', 1)[-1] if g in others else g}={_fmt(v)}"
                             for g, v in zip([*groups, *others], key)) or None
            if not numeric and not groups and not others:  # one categorical parameter: bars
                means = [statistics.fmean(getattr(r, value) for r in members if r.params[x_name] == c)
                         for c in categories]
                ax.bar(range(len(categories)), means, color="tab:blue")
                ax.set_xticks(range(len(categories)), [_fmt(c) for c in categories])
                _label_bars(ax, means)
                continue
            pos = (lambda v: v) if numeric else (lambda v: categories.index(v))
            by_x: dict[Any, list[float]] = {}
            for r in members:
                if r.finished:  # unfinished runs: hollow markers below, never part of a line or a mean
                    by_x.setdefault(r.params[x_name], []).append(getattr(r, value))
            line_x = sorted(by_x, key=_sort_key)
            line_y = [statistics.fmean(by_x[v]) for v in line_x]
            (line,) = ax.plot([pos(v) for v in line_x], line_y, marker="o", label=name,
                              linestyle="-" if joined else "none")
            if any(len(v) > 1 for v in by_x.values()):  # repeated settings (seeds): every run as a dot
                done = [r for r in members if r.finished]
                ax.scatter([pos(r.params[x_name]) for r in done], [getattr(r, value) for r in done],
                           s=12, alpha=0.5, color=line.get_color())
            stopped = [r for r in members if not r.finished]
            if stopped:
                ax.scatter([pos(r.params[x_name]) for r in stopped], [getattr(r, value) for r in stopped], s=40,
                           facecolors="none", edgecolors=line.get_color(), label=f"{name or 'runs'}, unfinished")
            if len(series) == 1:
                for xv, yv in zip(line_x, line_y):
                    ax.annotate(_fmt(yv), (pos(xv), yv), textcoords="offset points", xytext=(0, 6),
                                ha="center", fontsize=8)
        if numeric:
            positive = [v for v in categories if v > 0]
            if len(positive) == len(categories) and max(categories) / min(categories) >= 100:
                ax.set_xscale("log")
            elif len(categories) <= 12:
                ax.set_xticks(categories, [_fmt(c) for c in categories])
        elif groups:
            ax.set_xticks(range(len(categories)), [_fmt(c) for c in categories])
        ax.set_xlabel(x_name + ("" if joined else " (points: runs of different lengths are not joined)"))
        if groups or others or any(not r.finished for r in rows):
            ax.legend(fontsize=8)
    ax.set_ylabel(label)
    ax.margins(x=0.08, y=0.12)
    ax.grid(alpha=0.3)
    swept = " and ".join(params) if 0 < len(params) <= 2 else "run"
    unfinished = sum(not r.finished for r in rows)
    count = f"{len(rows)} {summary.task} runs" + (f", {unfinished} unfinished" if unfinished else "")
    ax.set_title(f"{label} vs {swept} ({count}; {arrow})", fontsize=10)
    if len(params) > 2:
        ax.text(0.5, -0.32 if len(rows) > 3 else -0.18, f"{len(params)} parameters: "
                f"{', '.join(params[:4])}{', ...' if len(params) > 4 else ''} (--params with one or two for a "
                f"line plot)",
                transform=ax.transAxes, ha="center", fontsize=8, color="dimgray")
    if two_d:
        _heatmap(axes[0][1], summary, value)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _label_bars(ax: Any, values: Sequence[float]) -> None:
    for i, v in enumerate(values):
        ax.annotate(_fmt(v), (i, v), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)


def _heatmap(ax: Any, summary: Summary, value: str) -> None:
    import numpy as np

    a, b = summary.params
    avals = sorted({r.params[a] for r in summary.rows}, key=_sort_key)
    bvals = sorted({r.params[b] for r in summary.rows}, key=_sort_key)
    cells = _cell_means(summary, value)
    grid = np.full((len(avals), len(bvals)), np.nan)
    for i, av in enumerate(avals):
        for j, bv in enumerate(bvals):
            if (av, bv) in cells:
                grid[i, j] = statistics.fmean(cells[(av, bv)])
    cmap = "viridis_r" if summary.goal == "min" else "viridis"  # bright = better either way
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(bvals)), [_fmt(v) for v in bvals])
    ax.set_yticks(range(len(avals)), [_fmt(v) for v in avals])
    ax.set_xlabel(b)
    ax.set_ylabel(a)
    finite = grid[np.isfinite(grid)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(len(avals)):
        for j in range(len(bvals)):
            if np.isfinite(grid[i, j]):
                dark = grid[i, j] > mid if summary.goal == "min" else grid[i, j] < mid
                ax.text(j, i, _fmt(float(grid[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
            else:
                ax.text(j, i, "—", ha="center", va="center", fontsize=8, color="grey")
    ax.figure.colorbar(image, ax=ax, label=f"{value} {summary.metric}")
    ax.set_title(f"{value} {summary.metric}: {a} × {b}", fontsize=10)


# --------------------------------------------------------------------------------------------- command line


class _ArgParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise SummaryError(f"{message} (see python -m tools.summarize --help)")


def build_arg_parser() -> argparse.ArgumentParser:
    p = _ArgParser(prog="python -m tools.summarize", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", help="folder holding run directories (e.g. runs/ or the --log.output_dir of a sweep)")
    p.add_argument("--metric", default=None,
                   help="metrics.csv column to summarise (default: each task's own monitored metric, the one that "
                        "picks its best checkpoint: val/mIoU for segmentation, val/loss for pretraining)")
    p.add_argument("--goal", default=None, help="min or max: which value is best (default: the task's own for its "
                                                "monitored metric, min for any other)")
    p.add_argument("--params", default=None,
                   help="comma-separated config fields to tabulate and plot against, e.g. "
                        "backbone.depth,barlow.proj_dim (default: the fields that differ between runs)")
    p.add_argument("--out", default=None, help="where to write summary.md/.csv/.png (default: the runs folder)")
    p.add_argument("--plot", default="final", choices=("final", "best"), help="value plotted (default: final)")
    p.add_argument("--include-unfinished", action="store_true",
                   help="also summarise runs that did not finish (last.ckpt short of trainer.max_epochs/max_steps, "
                        "or none); by default they are only listed")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_arg_parser().parse_args(argv)
        params = None if args.params is None else [p.strip() for p in args.params.split(",") if p.strip()]
        report = summarize(args.runs, metric=args.metric, params=params, goal=args.goal, out=args.out,
                           plot=args.plot, include_unfinished=args.include_unfinished)
    except SummaryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(report.files["md"].read_text(), end="")
    written = [report.files["md"], report.files["csv"], *(g.files["png"] for g in report.groups)]
    print(f"\nwrote {', '.join(str(f) for f in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
