"""Reproduce the report's tables in one command: run the experiment configs, skip what already ran, and
write the measured numbers beside the report's.

    python -m tools.reproduce config/experiments/table2/*.yaml
    python -m tools.reproduce --suite pretrain --suite table2        # config/experiments/<suite>/*.yaml
    python -m tools.reproduce --suite table2 --smoke                   # tiny models, synthetic data, minutes
    python -m tools.reproduce --suite table1 --dry-run                 # print the commands only
    options: --output-dir DIR (runs go to DIR/<run-name>, tables to DIR/reproduce/), --set KEY=VALUE (extra
             override for every config, repeatable)

Order: pretraining configs first (``pretrain/`` before ``table1/`` before ``table2/``, then by file name),
and any config whose ``backbone.weights`` points into another given config's run directory after that
config. Such a path (``runs/<run>/checkpoints/last.ckpt``) follows the run wherever it actually is (under
``--output-dir``, with the ``-smoke`` suffix, or renamed ``<run>-1`` by main.py).

Before anything runs, every config is parsed (``config.loading.parse_config``) and validated
(``config.validation.validate``) with the flags it will get; a weight file that an earlier config of the
same invocation will produce is the only thing allowed to be missing. Any problem: nothing runs, exit 2.

Each config then runs as its own process, ``python main.py --config FILE --log.output_dir ...
--log.run_name ...`` in the repository root (output in ``<tables>/logs/``): a crash is recorded as failed
in the table and the next config still runs; the exit status is 1 when any failed.

A run counts as *finished* when a directory ``<output_dir>/<run>`` (or ``<run>-<n>``) holds a
``config.yaml`` equal to the config that would run now (bookkeeping fields aside: ``log.*``,
``trainer.resume``, progress bar — see tools/summarize.py) and a ``checkpoints/last.ckpt`` whose fit loop
processed ``trainer.max_epochs`` epochs (or reached ``trainer.max_steps``). Lightning writes that
checkpoint at the end of the last epoch, after its validation, so the metrics are complete; a run
stopped early (crash, Ctrl-C) is not finished. A finished run is skipped (its numbers still go into the
table), an unfinished one with a checkpoint is resumed (``--trainer.resume``), anything else starts anew.
A config changed since its run (e.g. more epochs) therefore runs again instead of being reported stale.

Tables (per config folder, e.g. ``table2``): ``<output_dir>/reproduce/table2.md`` and ``.csv`` (``-smoke``
appended in smoke mode), one row per config: run, status, the metric (segmentation: best ``val/mIoU``;
pretraining, Barlow Twins or DINO: final ``val/loss``), the report's value (quoted in each config as ``Report's
mIoU (val): 0.1281``) and the difference.

``--smoke`` checks the whole pipeline in minutes on a CPU, not the numbers: synthetic VOC-layout data
(16 train / 8 val images of 32 px), a 2-block ViT of width 32 that keeps the config's patch size,
ResNet-50 at 32 px, DINO's head 32/16/64 wide with 2 local crops, 1 epoch, no workers, wandb disabled, no
pictures. Nothing is downloaded: published weights (DINO, ImageNet, COCO) and weight files that are not
there are replaced by random initialisation, and the table says so. Smoke runs are named ``<run>-smoke``, so
they never pass for real runs.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import re
import shlex
import subprocess
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from config.loading import ConfigError, load_yaml, parse_config, to_dict
from config.validation import validate
from tools.summarize import BOOKKEEPING, _default_config, flatten, read_run, run_progress
from tools.sweep import in_repo_root

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR = REPO_ROOT / "config" / "experiments"
MAIN = REPO_ROOT / "main.py"
SUITE_ORDER = ("pretrain", "table1", "table2")
SMOKE_SUFFIX = "-smoke"
TABLES_DIR = "reproduce"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
PUBLISHED = re.compile(r"Report's mIoU \(val\): ([0-9]*\.?[0-9]+)")
RUN_DIR_LINE = "run directory: "

class TaskMetrics(Mapping):
    """What each task is judged by, task → (metric, which value of its series: 'final' or 'best'): its registry
    entry's ``report_metric()`` (lightningmodules/registry.py), read when asked (torch loads then only)."""

    @staticmethod
    def _tasks():
        from lightningmodules import TASKS  # local: torch loads only to measure a run, never to plan or validate

        return TASKS

    def __getitem__(self, task: str) -> tuple[str, str]:
        tasks = self._tasks()
        if task not in tasks:
            raise KeyError(task)
        return tasks.get(task).report_metric()

    def __iter__(self):
        return iter(self._tasks().names())

    def __len__(self) -> int:
        return len(self._tasks().names())


TASK_METRICS = TaskMetrics()

SMOKE_FLAGS = {
    "data.dataset": "synthetic", "data.synthetic_train": 16, "data.synthetic_val": 8, "data.synthetic_size": 32,
    "data.img_size": 32, "data.batch_size": 8, "data.num_workers": 0, "data.val_max_images": 0,
    "trainer.max_epochs": 1, "trainer.max_steps": -1, "trainer.log_every_n_steps": 1,
    "trainer.tune_batch_size": "false", "trainer.tune_lr": "false", "trainer.progress_bar": "false",
    "log.wandb_mode": "disabled",
    "callbacks.attention": "false", "callbacks.cross_correlation": "false", "callbacks.predictions": "false",
    "callbacks.emergence": "false", "callbacks.erf": "false", "callbacks.views": "false",
    "callbacks.online_probe": "false",
    "barlow.proj_dim": 64, "segmentation.hidden_dim": 16,
    # DINO's head 2048/256/65536 and 8 local crops shrunk; the local crops stay one patch or more
    "dino.out_dim": 64, "dino.hidden_dim": 32, "dino.bottleneck_dim": 16, "dino.local_crops_number": 2,
}
SMOKE_VIT = {"backbone.depth": 2, "backbone.embed_dim": 32, "backbone.num_heads": 2}


class ReproduceError(ValueError):
    """A problem found before anything ran (unknown suite, invalid config); exit status 2."""


@dataclass
class Experiment:
    """One config file, as given (before any override)."""

    path: Path
    group: str
    """Its folder's name (pretrain, table1, table2): one table per group."""
    task: str
    run_name: str
    """The run name without the smoke suffix: the config's log.run_name, else <group>-<file stem>."""
    output_dir: str
    """The config's own log.output_dir: what its backbone.weights references are relative to."""
    weights: str
    published: Optional[float]

    @property
    def label(self) -> str:
        try:
            return self.path.relative_to(EXPERIMENTS_DIR).as_posix()
        except ValueError:
            return self.path.name


@dataclass
class Plan:
    """How one experiment runs now: its main.py flags (after ``--config FILE``) and what they replace."""

    experiment: Experiment
    output_dir: Path
    run_name: str
    flags: list[str]
    notes: list[str] = field(default_factory=list)
    depends_on: Optional[Experiment] = None
    weights_missing: bool = False
    """backbone.weights is not there: not yet (``depends_on`` runs first) or not at all (then the run fails)."""

    def argv(self, resume: Optional[Path] = None) -> list[str]:
        extra = [f"--trainer.resume={resume}"] if resume else []
        return ["--config", str(self.experiment.path), *self.flags, *extra]

    def command(self, resume: Optional[Path] = None) -> list[str]:
        return [sys.executable, str(MAIN), *self.argv(resume)]


@dataclass
class Row:
    experiment: Experiment
    run: str
    status: str
    metric: str
    measured: Optional[float]
    notes: list[str]
    failed: bool = False

    @property
    def difference(self) -> Optional[float]:
        if self.measured is None or self.experiment.published is None:
            return None
        return self.measured - self.experiment.published


# ------------------------------------------------------------------------------------------ configs
def suite_files(suite: str) -> list[Path]:
    folder = EXPERIMENTS_DIR / suite
    files = sorted(folder.glob("*.yaml"))
    if not files:
        valid = sorted(p.name for p in EXPERIMENTS_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml")))
        raise ReproduceError(f"--suite {suite}: no configs in {folder}; valid suites: {', '.join(valid)}")
    return files


def published_value(text: str) -> Optional[float]:
    """The report's number a config quotes (``Report's mIoU (val): 0.1281``), or None (pretraining)."""
    found = PUBLISHED.search(text)
    return float(found.group(1)) if found else None


def load_experiment(path: Path) -> Experiment:
    try:
        with in_repo_root():
            cfg = parse_config(["--config", str(path)])
    except ConfigError as err:
        raise ReproduceError(f"{path}: {err}") from None
    group = path.parent.name
    return Experiment(path=path, group=group, task=cfg.task, run_name=cfg.log.run_name or f"{group}-{path.stem}",
                      output_dir=cfg.log.output_dir, weights=cfg.backbone.weights,
                      published=published_value(path.read_text()))


def run_reference(weights: str, output_dir: str) -> Optional[tuple[str, Path]]:
    """(run name, path inside the run directory) when ``weights`` points into ``<output_dir>/<run>/``."""
    if not weights or Path(weights).is_absolute():
        return None
    base, parts = Path(output_dir).parts, Path(weights).parts
    if len(parts) < len(base) + 2 or parts[:len(base)] != base:
        return None
    return parts[len(base)], Path(*parts[len(base) + 1:])


def order(experiments: Sequence[Experiment]) -> list[Experiment]:
    """pretrain/ < table1/ < table2/ < other folders, then by file name; a config whose weights come from
    another given config's run moves after it."""
    rank = {name: i for i, name in enumerate(SUITE_ORDER)}
    pending = sorted(experiments, key=lambda e: (rank.get(e.group, len(rank)), e.group, e.path.name))
    by_run = {e.run_name: e for e in pending}

    def dependency(e: Experiment) -> Optional[Experiment]:
        ref = run_reference(e.weights, e.output_dir)
        dep = by_run.get(ref[0]) if ref else None
        return dep if dep is not e else None

    placed: list[Experiment] = []
    while pending:
        ready = next((e for e in pending if dependency(e) is None or dependency(e) in placed), pending[0])
        placed.append(ready)
        pending.remove(ready)
    return placed


# ------------------------------------------------------------------------------------- run directories
def config_matches(run_dir: Path, wanted: dict) -> bool:
    """The run's config.yaml is ``wanted`` (flattened), bookkeeping fields aside."""
    import yaml

    try:
        found = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(found, dict):
        return False
    found = {**_default_config(), **flatten(found)}

    def kept(name: str) -> bool:
        return not any(name == b or (b.endswith(".") and name.startswith(b)) for b in BOOKKEEPING)

    return {k: v for k, v in found.items() if kept(k)} == {k: v for k, v in wanted.items() if kept(k)}


def training_finished(run_dir: Path, max_epochs: int, max_steps: int) -> bool:
    """last.ckpt says the fit loop processed max_epochs epochs (or took max_steps steps); the one definition of a
    finished run is tools.summarize.run_progress."""
    return run_progress(run_dir, {"trainer.max_epochs": max_epochs, "trainer.max_steps": max_steps}).finished


def candidate_dirs(output_dir: Path, run_name: str) -> list[Path]:
    """``<run>`` and main.py's renamed ``<run>-<n>`` directories, in that order."""
    found = [output_dir / run_name] if (output_dir / run_name).is_dir() else []
    pattern = re.compile(re.escape(run_name) + r"-(\d+)")
    numbered = [(int(m.group(1)), p) for p in output_dir.glob(f"{glob_escape(run_name)}-*")
                if p.is_dir() and (m := pattern.fullmatch(p.name))]
    return found + [p for _, p in sorted(numbered)]


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def existing_run(output_dir: Path, run_name: str, argv: Sequence[str]) -> tuple[str, Optional[Path]]:
    """('finished' | 'partial', run directory) for a run of exactly this config, or ('new', None)."""
    with in_repo_root():
        cfg = parse_config(list(argv))
    wanted = flatten(to_dict(cfg))
    partial = None
    for run_dir in candidate_dirs(output_dir, run_name):
        if not config_matches(run_dir, wanted):
            continue
        if training_finished(run_dir, cfg.trainer.max_epochs, cfg.trainer.max_steps):
            return "finished", run_dir
        if (run_dir / LAST_CHECKPOINT).is_file():
            partial = run_dir
    return ("partial", partial) if partial else ("new", None)


def measure(run_dir: Optional[Path], task: str) -> tuple[str, Optional[float]]:
    """(metric name, value) of a run directory: the task's metric, best or final per TASK_METRICS."""
    from lightningmodules import TASKS  # local: torch loads only to measure a run, never to plan or validate

    metric, which = TASK_METRICS[task]
    if run_dir is None or not (run_dir / "metrics.csv").is_file() or not (run_dir / "config.yaml").is_file():
        return metric, None
    values = [v for _, v in read_run(run_dir, run_dir.parent).series(metric) if math.isfinite(v)]
    if not values:
        return metric, None
    if which == "final":
        return metric, values[-1]
    mode = TASKS.get(task).mode if task in TASKS else "max"
    return metric, (max if mode == "max" else min)(values)


# -------------------------------------------------------------------------------------------- planning
def _flags(values: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in values.items()]


def smoke_flags(experiment: Experiment, tables_dir: Path) -> tuple[list[str], list[str]]:
    """(flags, notes) that shrink a config to a smoke test; notes say what was replaced."""
    # local: torch loads only for --smoke
    from lightningmodules import TASKS
    from models.backbones import is_vit

    with in_repo_root():
        cfg = parse_config(["--config", str(experiment.path)])
    values = {**SMOKE_FLAGS, "data.root": str(tables_dir / "smoke-data")}
    notes = []
    if is_vit(cfg.backbone.name):
        values.update(SMOKE_VIT)
    if cfg.backbone.pretrained:
        values["backbone.pretrained"] = "false"
        notes.append(f"published {cfg.backbone.name} weights not downloaded: random init")
    if cfg.segmentation.pretrained_head and not TASKS.get(cfg.task).pretraining:  # a task with a segmentation head
        values["segmentation.pretrained_head"] = "false"
        notes.append("COCO DeepLabV3 head not downloaded: random init")
    return _flags(values), notes


def plan_experiment(experiment: Experiment, planned: dict[str, Plan], output_dir: Optional[Path], smoke: bool,
                    tables_dir: Path, overrides: Sequence[str], before_running: bool = False) -> Plan:
    """The flags of one experiment given the plans of the experiments before it (``planned`` by run name).
    ``before_running``: the plan is made before anything ran (validation, dry run), so an earlier
    experiment's run may legitimately not exist yet (see :func:`resolve_weights`)."""
    out = output_dir if output_dir is not None else REPO_ROOT / experiment.output_dir
    run_name = experiment.run_name + (SMOKE_SUFFIX if smoke else "")
    flags, notes = smoke_flags(experiment, tables_dir) if smoke else ([], [])
    if output_dir is not None:
        flags.append(f"--log.output_dir={out}")
    if run_name != experiment.run_name or not _config_names_run(experiment):
        flags.append(f"--log.run_name={run_name}")
    plan = Plan(experiment, out, run_name, flags, notes)
    resolve_weights(plan, planned, smoke, before_running)
    plan.flags += [f"--{o}" for o in overrides]
    return plan


def _config_names_run(experiment: Experiment) -> bool:
    """The config file sets log.run_name itself (else the run name is passed as a flag)."""
    log = load_yaml(experiment.path).get("log") or {}
    return bool(isinstance(log, dict) and log.get("run_name"))


def resolve_weights(plan: Plan, planned: dict[str, Plan], smoke: bool, before_running: bool) -> None:
    """Point backbone.weights at the run it references.

    Into the run of an earlier experiment of this invocation: that run's actual directory once it finished
    (an unfinished one is never used: before running it is still to come, afterwards the experiment is
    reported failed — in smoke mode it gets random initialisation instead). Into another run: the same run
    name under this invocation's output directory (with the smoke suffix). In smoke mode a file that is not
    there becomes random initialisation, and the notes say so.
    """
    e = plan.experiment
    if not e.weights:
        return
    ref = run_reference(e.weights, e.output_dir)
    weights, dep_finished = e.weights, True
    if ref is not None:
        run, inside = ref
        dep = planned.get(run)
        if dep is not None:
            plan.depends_on = dep.experiment
            status, run_dir = existing_run(dep.output_dir, dep.run_name, dep.argv())
            dep_finished = status == "finished"
            run_dir = run_dir if dep_finished else dep.output_dir / dep.run_name
            weights = str(run_dir / inside)
            if dep_finished or before_running:
                plan.notes.append(f"backbone from run {run_dir.name} ({dep.experiment.label})")
        else:
            weights = str(plan.output_dir / (run + (SMOKE_SUFFIX if smoke else "")) / inside)
    available = dep_finished and (REPO_ROOT / weights).is_file()
    if not available and smoke and not (before_running and plan.depends_on is not None):
        why = f"{plan.depends_on.label} did not finish" if plan.depends_on else f"{e.weights} not present"
        plan.flags.append("--backbone.weights=")
        plan.notes.append(f"{why}: random init")
        return
    plan.weights_missing = not available
    if (REPO_ROOT / weights).resolve() != (REPO_ROOT / e.weights).resolve():
        plan.flags.append(f"--backbone.weights={weights}")
    if available and ref is not None and plan.depends_on is None:
        unfinished = _unfinished_run(REPO_ROOT / weights)
        if unfinished:
            plan.notes.append(unfinished)


def _unfinished_run(weights: Path) -> Optional[str]:
    """A note when ``weights`` is the checkpoint of a run directory whose training did not finish."""
    import yaml

    run_dir = weights.parent.parent
    try:
        trainer = yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]
        max_epochs, max_steps = int(trainer.get("max_epochs", 0)), int(trainer.get("max_steps", -1))
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None
    if training_finished(run_dir, max_epochs, max_steps):
        return None
    return f"backbone from {run_dir.name}, whose training did not finish"


def validate_plan(plan: Plan) -> Optional[str]:
    """main.py's own checks on the flags the run will get (None when valid). A weight file an earlier
    experiment will produce is validated as absent."""
    argv = plan.argv() + (["--backbone.weights="] if plan.weights_missing and plan.depends_on else [])
    try:
        with in_repo_root():
            validate(parse_config(argv))
    except ConfigError as err:
        hint = ""
        if plan.weights_missing and plan.depends_on is None and "backbone.weights" in str(err):
            producer = _producer_hint(plan.experiment)
            hint = f" ({producer})" if producer else ""
        return f"{err}{hint}"
    return None


def _producer_hint(experiment: Experiment) -> Optional[str]:
    ref = run_reference(experiment.weights, experiment.output_dir)
    if ref is None:
        return None
    for path in sorted(EXPERIMENTS_DIR.rglob("*.yaml")):
        try:
            other = load_experiment(path)
        except ReproduceError:
            continue
        if other.run_name == ref[0]:
            return f"run {other.label} first, or give it in the same command"
    return None


# --------------------------------------------------------------------------------------------- running
def run_plan(plan: Plan, logs_dir: Path, index: int, total: int) -> Row:
    """Skip, resume or run one experiment in its own process; the table row of the outcome."""
    e = plan.experiment
    status, run_dir = existing_run(plan.output_dir, plan.run_name, plan.argv())
    prefix = f"[{index}/{total}] {e.label}"
    if status == "finished":
        print(f"{prefix}: finished earlier in {run_dir}, skipped", flush=True)
        metric, value = measure(run_dir, e.task)
        return Row(e, run_dir.name, "finished earlier (skipped)", metric, value, plan.notes)
    if plan.weights_missing:
        why = f"{plan.depends_on.label} did not finish" if plan.depends_on else f"{e.weights} not present"
        print(f"{prefix}: not run, its backbone weights are missing ({why})", flush=True)
        return Row(e, plan.run_name, "failed (no backbone weights)", measure(None, e.task)[0], None,
                   [*plan.notes, why], failed=True)
    resume = run_dir if status == "partial" else None
    command = plan.command(resume)
    log_path = logs_dir / f"{e.group}-{e.path.stem}{SMOKE_SUFFIX if plan.run_name.endswith(SMOKE_SUFFIX) else ''}.log"
    print(f"{prefix}: {'resuming' if resume else 'running'} (log: {log_path})\n  {shlex.join(command)}", flush=True)
    rc, printed_dir = _run_logged(command, log_path)
    run_dir = printed_dir or resume or (plan.output_dir / plan.run_name)
    metric, value = measure(run_dir if run_dir.is_dir() else None, e.task)
    if rc != 0:
        print(f"{prefix}: FAILED with exit status {rc}; last lines of {log_path}:\n{_tail(log_path)}", flush=True)
        return Row(e, run_dir.name, f"failed (exit {rc})", metric, None, [*plan.notes, f"log: {log_path}"], failed=True)
    with in_repo_root():
        cfg = parse_config(plan.argv())
    if not training_finished(run_dir, cfg.trainer.max_epochs, cfg.trainer.max_steps):
        return Row(e, run_dir.name, "failed (stopped before the end)", metric, value, [*plan.notes, f"log: {log_path}"],
                   failed=True)
    return Row(e, run_dir.name, "resumed" if resume else "ran", metric, value, plan.notes)


def _run_logged(command: Sequence[str], log_path: Path) -> tuple[int, Optional[Path]]:
    """Run ``command`` in the repository root with its output in ``log_path``; (exit status, run directory
    main.py printed)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        rc = subprocess.run(list(command), cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    run_dir = None
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith(RUN_DIR_LINE):
            run_dir = Path(line[len(RUN_DIR_LINE):].strip())
            run_dir = run_dir if run_dir.is_absolute() else REPO_ROOT / run_dir
    return rc, run_dir


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join(f"    {line}" for line in text[-lines:])


# ---------------------------------------------------------------------------------------------- tables
COLUMNS = ("config", "run", "status", "metric", "measured", "report", "difference", "notes")


def _fmt(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def write_tables(rows: Sequence[Row], tables_dir: Path, smoke: bool) -> list[Path]:
    """``<group>.md`` and ``<group>.csv`` per config folder (``-smoke`` appended in smoke mode)."""
    tables_dir.mkdir(parents=True, exist_ok=True)
    written = []
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.experiment.group, []).append(row)
    for group, group_rows in groups.items():
        stem = tables_dir / f"{group}{SMOKE_SUFFIX if smoke else ''}"
        with stem.with_suffix(".csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            for r in group_rows:
                writer.writerow([r.experiment.label, r.run, r.status, r.metric,
                                 "" if r.measured is None else repr(r.measured),
                                 "" if r.experiment.published is None else repr(r.experiment.published),
                                 "" if r.difference is None else repr(r.difference), "; ".join(r.notes)])
        lines = [f"# {group}: measured vs the report", "",
                 f"Written by `python -m tools.reproduce` on {_dt.datetime.now():%Y-%m-%d %H:%M}. Segmentation: best "
                 "val/mIoU over the epochs; pretraining: final val/loss; difference = measured − report.", ""]
        if smoke:
            lines += ["**Smoke mode**: tiny models, 1 epoch on synthetic data — checks the pipeline, the numbers "
                      "are not comparable with the report's.", ""]
        lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for r in group_rows:
            cells = [f"`{r.experiment.label}`", r.run, r.status, r.metric, _fmt(r.measured),
                     _fmt(r.experiment.published), _fmt(r.difference, signed=True), "; ".join(r.notes) or ""]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
        written += [stem.with_suffix(".md"), stem.with_suffix(".csv")]
    return written


# ------------------------------------------------------------------------------------------ entry point
class _ArgParser(argparse.ArgumentParser):
    """Its errors are one line (argparse's default prints the usage first)."""

    def error(self, message: str) -> typing.NoReturn:
        raise ReproduceError(f"{message} (see python -m tools.reproduce --help)")


def build_arg_parser() -> argparse.ArgumentParser:
    p = _ArgParser(prog="python -m tools.reproduce", description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", type=Path, help="experiment configs (config/experiments/*/*.yaml)")
    p.add_argument("--suite", action="append", default=[], metavar="NAME",
                   help=f"every config of config/experiments/NAME/ ({', '.join(SUITE_ORDER)}); repeatable")
    p.add_argument("--smoke", action="store_true",
                   help="tiny models, synthetic data, 1 epoch, nothing downloaded: checks the pipeline in minutes")
    p.add_argument("--dry-run", action="store_true", help="print what would run (and what is skipped); run nothing")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="parent of the run directories (default: each config's log.output_dir, runs/); tables go "
                        "to OUTPUT_DIR/reproduce/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="extra override for every config, e.g. --set trainer.max_epochs=100; repeatable")
    return p


def collect(args: argparse.Namespace) -> list[Experiment]:
    paths = [p.resolve() for p in args.configs] + [p for s in args.suite for p in suite_files(s)]
    if not paths:
        raise ReproduceError("give config files or --suite NAME (e.g. --suite table2)")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ReproduceError(f"config file(s) not found: {', '.join(missing)}")
    unique = list(dict.fromkeys(paths))
    experiments = order([load_experiment(p) for p in unique])
    names: dict[str, Path] = {}
    for e in experiments:
        if e.run_name in names:
            raise ReproduceError(f"{e.path} and {names[e.run_name]} have the same run name {e.run_name!r}")
        names[e.run_name] = e.path
    return experiments


def check_overrides(overrides: Sequence[str]) -> list[str]:
    """``KEY=VALUE`` items, each a field main.py knows with a value of its type (checked alone, once, before any
    config is read: one error for the flag, not one per config)."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ReproduceError(f"--set {item!r}: expected KEY=VALUE, e.g. --set trainer.max_epochs=100")
        if key != "trainer.resume":  # resolving a checkpoint is each run's business, not a type check
            try:
                with in_repo_root():
                    parse_config([f"--{key}={value}"])
            except ConfigError as err:
                raise ReproduceError(f"--set {key}={value}: {err}") from None
        out.append(f"{key}={value}")
    return out


def check_output_dir(output_dir: Optional[Path]) -> None:
    if output_dir is not None and output_dir.exists() and not output_dir.is_dir():
        raise ReproduceError(f"--output-dir {output_dir} is a file; give a folder (created if missing) for the runs "
                             f"and {TABLES_DIR}/")


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_arg_parser().parse_args(argv)
        overrides = check_overrides(args.overrides)
        check_output_dir(args.output_dir)
        experiments = collect(args)
        output_dir = args.output_dir.resolve() if args.output_dir else None
        tables_dir = (output_dir or REPO_ROOT / "runs") / TABLES_DIR
        plans: list[Plan] = []
        planned: dict[str, Plan] = {}
        for e in experiments:
            plan = plan_experiment(e, planned, output_dir, args.smoke, tables_dir, overrides, before_running=True)
            plans.append(plan)
            planned[e.run_name] = plan
    except ReproduceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ConfigError as err:  # a config that does not parse with the flags it gets (found while planning)
        print(f"error: {err}", file=sys.stderr)
        return 2
    problems = [(plan, validate_plan(plan)) for plan in plans]
    problems = [(plan, why) for plan, why in problems if why]
    if args.dry_run:
        return dry_run(plans, dict((id(p), w) for p, w in problems))
    if problems:
        for plan, why in problems:
            print(f"error: {plan.experiment.label}: {why}", file=sys.stderr)
        print(f"error: {len(problems)} invalid config(s); nothing was run", file=sys.stderr)
        return 2
    rows: list[Row] = []
    planned: dict[str, Plan] = {}
    try:
        for i, e in enumerate(experiments, 1):  # planned again: the runs before it have happened now
            plan = plan_experiment(e, planned, output_dir, args.smoke, tables_dir, overrides)
            planned[e.run_name] = plan
            rows.append(run_plan(plan, tables_dir / "logs", i, len(experiments)))
    finally:  # Ctrl-C: the rows done so far still reach the table (the interrupted run resumes next time)
        for path in write_tables(rows, tables_dir, args.smoke):
            print(f"wrote {path}")
    failed = [r for r in rows if r.failed]
    if failed:
        print(f"{len(failed)} of {len(rows)} config(s) failed: {', '.join(r.experiment.label for r in failed)}",
              file=sys.stderr)
        return 1
    return 0


def dry_run(plans: Sequence[Plan], problems: dict[int, str]) -> int:
    for i, plan in enumerate(plans, 1):
        status, run_dir = existing_run(plan.output_dir, plan.run_name, plan.argv())
        what = {"finished": f"skip: finished in {run_dir}", "partial": f"resume {run_dir}", "new": "run"}[status]
        print(f"[{i}/{len(plans)}] {plan.experiment.label}: {what}")
        if status != "finished":
            print(f"  {shlex.join(plan.command(run_dir if status == 'partial' else None))}")
        for note in plan.notes:
            print(f"  note: {note}")
        if id(plan) in problems:
            print(f"  error: {problems[id(plan)]}")
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
