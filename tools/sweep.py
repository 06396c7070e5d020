"""wandb sweep files, checked and expanded offline, and run locally.

    python -m tools.sweep sweeps/FILE.yaml --dry-run [--count N] [--seed S] [--set KEY=VALUE ...]
    python -m tools.sweep sweeps/FILE.yaml --local   [--count N] [--seed S] [--set KEY=VALUE ...]
    python -m tools.sweep sweeps/FILE.yaml           # check it, then print how to launch it on wandb

A sweep file is a standard wandb sweep (``program``, ``method``, ``metric``, ``parameters``,
``command``). Parameter names are config fields without dashes (``backbone.depth``, ``barlow.proj_dim``,
``task``, ``seed``; ``config`` passes ``--config=FILE.yaml``); wandb's agent passes them to main.py as
``--backbone.depth=6``, so main.py never needs to know it runs inside a sweep.

The expansion reproduces wandb's: ``grid`` is the cartesian product of the ``values`` lists (parameters in
sorted name order, as wandb's controller iterates them; ``int_uniform`` → every integer, ``q_uniform`` →
``arange(min, max, q)``); ``random`` draws every parameter independently from its distribution. ``bayes``
cannot be reproduced offline (it adapts to results), so it is drawn like ``random`` — the same
distributions wandb's first suggestions come from. Commands are built with the agent's macros: ``${env}``
→ ``/usr/bin/env``, ``${interpreter}`` → ``python``, ``${program}``, ``${args}`` → ``--name=value``,
``${args_no_hyphens}``, ``${args_no_boolean_flags}``, ``${args_no_equals}``, ``${args_json}``,
``${envvar:NAME}``; without ``command``: ``${env} ${interpreter} ${program} ${args}``.

Everything is checked before anything runs, and a problem is one :class:`SweepError` (exit status 2 from
the command line): the file's structure, parameter names (closest config fields suggested), each value
against its field's type (through main.py's own parser), the metric against the names the task logs
(``lightningmodules.TASKS``, plus what the run's callbacks log: ``val/attn_jaccard``, the online
probe's ``val/probe_mIoU``, ...), then every generated command with ``config.loading.parse_config`` +
``config.validation.validate``, in the repository root, as the agent would run it.

Data that is only missing *on this machine* (VOC not under ``--data.root``: a problem that
``--data.download=true`` would fix) is reported as a note by ``--dry-run``, not as an error: sweeps are
usually checked on a laptop and run on a machine that has the data. Every other check still runs (the
config is re-validated as if the data were there). ``--strict-data`` makes it an error; ``--local``
always does, since the runs start right here. ``--set data.dataset=synthetic`` (or
``--set data.root=/datasets/voc``) validates everything, data included, offline.

``--local`` runs the commands one after the other, each as its own process (``sys.executable main.py
...`` in the repository root), exactly as the agent does: wandb, Lightning, logging and CUDA state cannot
leak from one run into the next, a run that crashes or calls ``sys.exit`` cannot take the sweep down with
it, and a run gets exactly the argv it would get on wandb. Each run is named ``<sweep-name>-<i>`` (through
``--log.run_name``) unless the sweep sets a name. The first failing run stops the sweep with its exit
status and the tail of its output.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import difflib
import itertools
import json
import math
import os
import random
import re
import secrets
import shlex
import statistics
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import yaml

from config.hparams import Hparams
from config.loading import ConfigError, build_parser, parse_config
from config.validation import validate

REPO_ROOT = Path(__file__).resolve().parent.parent
MAIN_PROGRAM = "main.py"
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
DEFAULT_COUNT = 5
"""Runs drawn by random/bayes sweeps when neither --count nor the file's run_cap says how many."""
METHODS = ("grid", "random", "bayes")
GOALS = ("minimize", "maximize")
TOP_LEVEL_KEYS = ("apiVersion", "kind", "controller", "description", "program", "job", "image_uri", "entity",
                  "project", "method", "command", "name", "run_cap", "metric", "metrics", "scheduler",
                  "early_terminate", "parameters")
"""The keys wandb's sweep schema allows (it rejects any other)."""
METRIC_KEYS = ("name", "goal", "target", "impute", "impute_while_running")
SPECIAL_PARAMETERS = {"config": "a --config=FILE.yaml of main.py"}
"""Parameters that are main.py flags without being config fields."""

# Keys each distribution accepts (wandb's schema: anything else is rejected).
_DIST_KEYS: dict[str, tuple[str, ...]] = {
    "constant": ("value",),
    "categorical": ("values",),
    "categorical_w_probabilities": ("values", "probabilities"),
    "int_uniform": ("min", "max"),
    "uniform": ("min", "max"),
    "q_uniform": ("min", "max", "q"),
    "log_uniform": ("min", "max"),
    "log_uniform_values": ("min", "max"),
    "q_log_uniform": ("min", "max", "q"),
    "q_log_uniform_values": ("min", "max", "q"),
    "inv_log_uniform": ("min", "max"),
    "inv_log_uniform_values": ("min", "max"),
    "normal": ("mu", "sigma"),
    "q_normal": ("mu", "sigma", "q"),
    "log_normal": ("mu", "sigma"),
    "q_log_normal": ("mu", "sigma", "q"),
    "beta": ("a", "b"),
    "q_beta": ("a", "b", "q"),
}
_DEFAULTS = {"q": 1.0, "mu": 0.0, "sigma": 1.0, "a": 1.0, "b": 1.0}  # wandb's schema defaults
_GRID_KINDS = ("constant", "categorical", "int_uniform", "q_uniform")
_MACROS = ("env", "interpreter", "program", "args", "args_no_equals", "args_no_hyphens", "args_no_boolean_flags",
           "args_json", "args_json_file", "args_append_hydra", "args_override_hydra")
_FLAG_MACROS = ("args", "args_no_equals", "args_no_boolean_flags")
"""Macros whose expansion main.py can parse (the others are for hydra / JSON programs)."""


class SweepError(ValueError):
    """A sweep file (or an override) that cannot run; the one-line message names the problem."""


class SweepRunError(RuntimeError):
    """A run of a local sweep exited with a non-zero status."""

    def __init__(self, message: str, returncode: int, output_tail: str):
        super().__init__(message)
        self.returncode, self.output_tail = returncode, output_tail


# --------------------------------------------------------------------------------------------- config fields


def config_fields() -> dict[str, Any]:
    """Every config field as ``dotted.name → type`` (``task``, ``seed``, ``data.root``, ...), in config order."""
    out: dict[str, Any] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = hints[f.name]

    walk(Hparams, "")
    return out


def unknown_name_message(name: str, valid: Sequence[str], what: str = "config field") -> str:
    """'unknown ... 'x'; did you mean ...? valid ...: ...' — the group's fields when the group exists."""
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    message = f"{name!r} is not a {what}"
    if close:
        message += f" (did you mean {' or '.join(close)}?)"
    group = name.split(".")[0] + "." if "." in name else None
    in_group = [v for v in valid if group and v.startswith(group)]
    if in_group:
        message += f"; valid names in {group[:-1]}: {', '.join(in_group)}"
    else:
        message += f"; valid names: {', '.join(valid)}"
    return message


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# --------------------------------------------------------------------------------------------- the file


@dataclass
class Param:
    """One sweep parameter, its distribution resolved the way wandb's schema fills it in."""

    name: str
    kind: str
    spec: dict
    origin: str = "file"
    """'file' or '--set'."""

    @property
    def swept(self) -> bool:
        return self.kind != "constant" and not (self.kind == "categorical" and len(self.spec["values"]) == 1)

    def output_kind(self) -> Optional[type]:
        """int or float for distributions; None for value lists (their values speak for themselves)."""
        if self.kind in ("constant", "categorical", "categorical_w_probabilities"):
            return None
        if self.kind == "int_uniform":
            return int
        if self.kind.startswith("q_"):
            return int if isinstance(self.spec["q"], int) else float  # wandb: int only for an integer q
        return float


@dataclass
class Sweep:
    path: Path
    name: str
    method: str
    program: str
    command: list
    parameters: dict[str, Param]
    metric: Optional[dict]
    run_cap: Optional[int]
    raw: dict

    @property
    def swept(self) -> list[str]:
        return [n for n, p in self.parameters.items() if p.swept]


@dataclass
class SweepRun:
    index: int
    """1-based position in the sweep."""
    params: dict[str, Any]
    """The parameter values of this run, as wandb's agent receives them (sorted by name)."""
    command: list[str]
    """The full command line, as wandb's agent would run it (or as --local runs it)."""
    argv: list[str]
    """The arguments main.py receives."""
    config: Any = None
    """The parsed :class:`config.hparams.Hparams`."""
    auto_named: bool = False
    """--local gave it the name <sweep-name>-<i>."""

    @property
    def run_dir(self) -> Optional[Path]:
        if self.config is None or not self.config.log.run_name:
            return None
        out = Path(self.config.log.output_dir)
        return (out if out.is_absolute() else REPO_ROOT / out) / self.config.log.run_name


@dataclass
class SweepPlan:
    sweep: Sweep
    runs: list[SweepRun]
    seed: Optional[int] = None
    """The seed random/bayes values were drawn with (None for grids)."""
    notes: list[str] = field(default_factory=list)
    """Things worth knowing that are not errors (data missing on this machine, truncation by run_cap, ...)."""


def _where(path: Path) -> str:
    return str(path)


def _number(value: Any, what: str, src: str) -> float:
    if _is_number(value):
        return value
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            pass
        else:
            raise SweepError(f"{src}: {what} is the text {value!r}, not a number — YAML reads numbers like 1e-5 "
                             f"as text; write 1.0e-5")
    raise SweepError(f"{src}: {what} must be a number, got {value!r}")


def parse_param(name: str, spec: Any, src: str) -> Param:
    """Resolve a parameter spec into its distribution, rejecting what wandb's schema rejects."""
    where = f"{src}: parameter {name!r}"
    if not isinstance(spec, dict):
        raise SweepError(f"{where} must be a mapping such as {{values: [...]}} or {{value: ...}} or "
                         f"{{distribution: ..., min: ..., max: ...}}, got {spec!r}")
    if "parameters" in spec:
        raise SweepError(f"{where}: nested parameters reach main.py as one --{name}={{...}} flag it cannot parse; "
                         f"use dotted names instead (e.g. backbone.depth)")
    dist = spec.get("distribution")
    if dist is None:
        if "value" in spec:
            dist = "constant"
        elif "values" in spec:
            dist = "categorical_w_probabilities" if "probabilities" in spec else "categorical"
        elif "min" in spec and "max" in spec:
            dist = "int_uniform" if all(isinstance(spec[k], int) and not isinstance(spec[k], bool)
                                        for k in ("min", "max")) else "uniform"
        else:
            raise SweepError(f"{where} needs 'value', 'values', or 'min' and 'max' (with an optional "
                             f"'distribution'), got keys {', '.join(map(str, spec)) or 'none'}")
    elif dist == "categorical" and "probabilities" in spec:
        dist = "categorical_w_probabilities"
    if dist not in _DIST_KEYS:
        raise SweepError(f"{where}: unsupported distribution {dist!r}; supported: {', '.join(_DIST_KEYS)}")
    allowed = set(_DIST_KEYS[dist]) | {"distribution"}
    extra = [k for k in spec if k not in allowed]
    if extra:
        raise SweepError(f"{where}: unknown key {extra[0]!r} for distribution {dist!r}; allowed: "
                         f"{', '.join(sorted(allowed))}")
    required = [k for k in _DIST_KEYS[dist] if k not in _DEFAULTS]
    missing = [k for k in required if k not in spec]
    if missing:
        raise SweepError(f"{where}: distribution {dist!r} needs {' and '.join(missing)}")
    filled = {k: spec.get(k, _DEFAULTS.get(k)) for k in _DIST_KEYS[dist]}
    if dist in ("categorical", "categorical_w_probabilities"):
        values = filled["values"]
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}: 'values' must be a non-empty list, got {values!r}")
        if dist == "categorical_w_probabilities":
            probs = filled["probabilities"]
            if (not isinstance(probs, list) or len(probs) != len(values)
                    or not all(_is_number(p) and p >= 0 for p in probs)):
                raise SweepError(f"{where}: 'probabilities' must be one number >= 0 per value")
            if abs(sum(probs) - 1) > 1e-6:
                raise SweepError(f"{where}: 'probabilities' must sum to 1, got {sum(probs)}")
    elif dist != "constant":
        for key in _DIST_KEYS[dist]:
            filled[key] = _number(filled[key], f"{key}", where)
        if dist == "int_uniform" and not all(isinstance(filled[k], int) for k in ("min", "max")):
            raise SweepError(f"{where}: int_uniform needs integer min and max, got {filled['min']!r} and "
                             f"{filled['max']!r}")
        if "min" in filled and filled["min"] >= filled["max"]:
            raise SweepError(f"{where}: min {filled['min']} is not less than max {filled['max']}")
        if dist.endswith("_values") and filled["min"] <= 0:
            raise SweepError(f"{where}: {dist} needs min > 0 (it is the smallest value), got {filled['min']}")
        if "q" in filled and filled["q"] <= 0:
            raise SweepError(f"{where}: q must be > 0, got {filled['q']}")
        if "sigma" in filled and filled["sigma"] < 0:
            raise SweepError(f"{where}: sigma must be >= 0, got {filled['sigma']}")
    return Param(name, dist, filled)


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise SweepError(f"--set {item!r}: expected KEY=VALUE, e.g. --set data.dataset=synthetic")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if value is None or isinstance(value, (list, dict)):
        value = raw  # passed through as typed
    return key, value


def load_sweep(path: str | Path, overrides: Mapping[str, Any] | Sequence[str] = ()) -> Sweep:
    """Read and check a sweep file; ``overrides`` (``{"data.dataset": "synthetic"}`` or ``["KEY=VALUE"]``)
    become constant parameters, replacing the file's fixed values."""
    path = Path(path)
    src = _where(path)
    if path.is_dir():
        raise SweepError(f"{src} is a folder; give a sweep file (e.g. sweeps/learning_rate.yaml)")
    if not path.is_file():
        raise SweepError(f"{src}: no such sweep file")
    try:
        raw = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise SweepError(f"{src} is not a text file (it holds bytes that are not UTF-8); give a sweep YAML file") from None
    except OSError as err:
        raise SweepError(f"{src}: cannot read it: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        hint = ""
        if "${" in path.read_text():
            hint = " — a ${macro} inside [...] must be quoted ('${args}'), or write the command as a block list"
        detail = " ".join(str(err).split())
        raise SweepError(f"{src}: not valid YAML{hint}: {detail}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{src}: a sweep file is a mapping with program, method, metric, parameters; got {raw!r}")
    unknown = [k for k in raw if k not in TOP_LEVEL_KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), TOP_LEVEL_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SweepError(f"{src}: unknown key {unknown[0]!r}{hint}; wandb sweep files may have: "
                         f"{', '.join(TOP_LEVEL_KEYS)}")
    method = raw.get("method")
    if method is None:
        raise SweepError(f"{src}: missing 'method' (one of {', '.join(METHODS)})")
    if method not in METHODS:
        raise SweepError(f"{src}: method {method!r} is not one of {', '.join(METHODS)}"
                         + (" (custom schedulers cannot be expanded offline)" if method == "custom" else ""))
    if "scheduler" in raw or "metrics" in raw:
        raise SweepError(f"{src}: 'scheduler' and 'metrics' need method: custom, which cannot be expanded offline")
    params = raw.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{src}: missing 'parameters' (a mapping of config fields, e.g. "
                         f"backbone.depth: {{values: [4, 6]}})")
    program = raw.get("program")
    if not isinstance(program, str) or not program:
        raise SweepError(f"{src}: missing 'program: {MAIN_PROGRAM}'")
    if (REPO_ROOT / program).resolve() != (REPO_ROOT / MAIN_PROGRAM).resolve():
        raise SweepError(f"{src}: program {program!r} is not this project's {MAIN_PROGRAM} (run from the repository "
                         f"root); sweep commands are checked against main.py's parser")
    command = raw.get("command", DEFAULT_COMMAND)
    if not isinstance(command, list) or not command:
        raise SweepError(f"{src}: 'command' must be a list such as [${{env}}, ${{interpreter}}, ${{program}}, "
                         f"${{args}}], got {command!r}")
    metric = raw.get("metric")
    if metric is not None:
        if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
            raise SweepError(f"{src}: 'metric' must be {{name: val/loss, goal: minimize}}, got {metric!r}")
        bad = [k for k in metric if k not in METRIC_KEYS]
        if bad:
            raise SweepError(f"{src}: unknown metric key {bad[0]!r}; allowed: {', '.join(METRIC_KEYS)}")
        goal = metric.get("goal", "minimize")
        if goal not in GOALS:  # wandb would silently replace it by 'minimize'
            raise SweepError(f"{src}: metric goal {goal!r} is not minimize or maximize (wandb would silently "
                             f"minimize)")
        metric = {**metric, "goal": goal}
    elif method == "bayes":
        raise SweepError(f"{src}: method bayes needs a 'metric' to optimise, e.g. {{name: val/loss, goal: minimize}}")
    run_cap = raw.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or isinstance(run_cap, bool) or run_cap <= 0):
        raise SweepError(f"{src}: run_cap must be a positive integer, got {run_cap!r}")
    name = raw.get("name") or path.stem
    if not isinstance(name, str):
        raise SweepError(f"{src}: 'name' must be a string, got {name!r}")

    parsed = {str(k): parse_param(str(k), v, src) for k, v in params.items()}
    items = list(overrides.items()) if isinstance(overrides, Mapping) else [_parse_override(s) for s in overrides]
    for key, value in items:
        if key in parsed and parsed[key].swept:
            raise SweepError(f"--set {key}: the sweep varies this parameter; --set only fixes parameters it "
                             f"does not vary (edit the file to change what is swept)")
        parsed[key] = Param(key, "constant", {"value": value}, origin="--set")
    sweep = Sweep(path=path, name=name, method=method, program=program, command=list(command),
                  parameters=dict(sorted(parsed.items())), metric=metric, run_cap=run_cap, raw=raw)
    check_parameters(sweep)
    check_command_template(sweep)
    return sweep


def check_parameters(sweep: Sweep) -> None:
    """Names against the config fields, then every value (or distribution) against the field's type."""
    src = _where(sweep.path)
    fields = config_fields()
    valid = [*fields, *SPECIAL_PARAMETERS]
    problems = [f"unknown parameter{' (from --set)' if p.origin == '--set' else ''} {unknown_name_message(n, valid)}"
                for n, p in sweep.parameters.items() if n not in valid]
    if problems:
        raise SweepError(f"{src}: " + "; ".join(problems))
    parser = build_parser()
    for name, param in sweep.parameters.items():
        where = f"{src}: parameter {name!r}" if param.origin == "file" else f"--set {name}"
        if sweep.method == "grid" and param.kind not in _GRID_KINDS:
            raise SweepError(f"{where}: grid search needs values, value, int_uniform or q_uniform, not "
                             f"{param.kind!r} (use method: random or bayes for distributions)")
        if sweep.method == "grid" and param.kind == "categorical_w_probabilities":
            raise SweepError(f"{where}: grid search does not take probabilities")
        if name in SPECIAL_PARAMETERS:
            continue
        tp = fields[name]
        out = param.output_kind()
        if out is not None:
            if tp is int and out is float:
                hint = " (q defaults to 1.0: set q: 1)" if param.kind.startswith("q_") else " (use int_uniform)"
                raise SweepError(f"{where}: {name} is an int field but distribution {param.kind!r} draws floats"
                                 f"{hint}")
            if tp not in (int, float):
                raise SweepError(f"{where}: {name} is {_type_name(tp)}, but distribution {param.kind!r} draws numbers")
            candidates = [out(param.spec[k]) for k in ("min", "max") if k in param.spec and param.kind in (
                "int_uniform", "uniform", "q_uniform", "log_uniform_values", "q_log_uniform_values",
                "inv_log_uniform_values")]
        else:
            candidates = [param.spec["value"]] if param.kind == "constant" else list(param.spec["values"])
        for value in candidates:
            if value is None:
                raise SweepError(f"{where}: null reaches main.py as the text 'None'; give a value")
            if isinstance(value, (list, dict)):
                raise SweepError(f"{where}: {value!r} cannot be passed as --{name}=VALUE (wandb writes lists "
                                 f"and mappings as Python text); sweep scalars")
            if tp is int and isinstance(value, float):
                raise SweepError(f"{where}: value {value!r} is not an int (reaches main.py as --{name}={value})")
            try:
                parser.parse_args([f"--{name}={value}"])
            except ConfigError as err:
                detail = str(err).replace(" (see python main.py --help)", "")
                raise SweepError(f"{where}: value {value!r} is not valid for this field of type {_type_name(tp)} "
                                 f"({detail})") \
                    from None


def check_command_template(sweep: Sweep) -> None:
    src = _where(sweep.path)
    macros = []
    for chunk in sweep.command:
        text = _expand_envvars(str(chunk))
        if text.startswith("${") and text.endswith("}"):
            macro = text[2:-1]
            if macro not in _MACROS:
                raise SweepError(f"{src}: command: unknown macro {text} (wandb silently drops it); known: "
                                 + ", ".join("${" + m + "}" for m in _MACROS))
            macros.append(macro)
        elif "${" in text:
            raise SweepError(f"{src}: command: {text!r}: wandb only expands a macro that is a whole list item")
    if not any(m in _FLAG_MACROS for m in macros):
        raise SweepError(f"{src}: command passes no parameters to main.py: add ${{args}} (main.py reads flags, "
                         f"not wandb.config)")


# --------------------------------------------------------------------------------------------- expansion


def _ppf_categorical(u: float, n: int) -> int:
    return min(n - 1, max(0, math.ceil(u * n) - 1))


def _quantize(x: float, q: float) -> Any:
    r = round(x / q) * q
    return int(r) if isinstance(q, int) else float(r)


def sample(param: Param, rng: random.Random) -> Any:
    """One value drawn as wandb's random search draws it (inverse CDF of one uniform number)."""
    s, kind = param.spec, param.kind
    if kind == "constant":
        return s["value"]
    if kind == "categorical_w_probabilities":
        return rng.choices(s["values"], weights=s["probabilities"])[0]
    if kind in ("beta", "q_beta"):
        x = rng.betavariate(s["a"], s["b"])
        return x if kind == "beta" else _quantize(x, s["q"])
    u = rng.random()
    if kind == "categorical":
        return s["values"][_ppf_categorical(u, len(s["values"]))]
    if kind == "int_uniform":
        return s["min"] + _ppf_categorical(u, s["max"] - s["min"] + 1)
    if kind in ("uniform", "q_uniform"):
        x = s["min"] + u * (s["max"] - s["min"])
        return x if kind == "uniform" else _quantize(x, s["q"])
    if kind in ("log_uniform", "q_log_uniform"):  # min and max are exponents
        x = math.exp(s["min"] + u * (s["max"] - s["min"]))
        return x if kind == "log_uniform" else _quantize(x, s["q"])
    if kind in ("log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values"):
        lo, hi = math.log(s["min"]), math.log(s["max"])
        x = min(s["max"], max(s["min"], math.exp(lo + u * (hi - lo))))
        return _quantize(x, s["q"]) if kind == "q_log_uniform_values" else x
    if kind == "inv_log_uniform":  # exp(-U(min, max))
        return math.exp(-(s["min"] + (1 - u) * (s["max"] - s["min"])))
    u = min(max(u, 1e-12), 1 - 1e-12)
    z = statistics.NormalDist(s["mu"], s["sigma"]).inv_cdf(u) if s["sigma"] > 0 else s["mu"]
    if kind in ("normal", "q_normal"):
        return z if kind == "normal" else _quantize(z, s["q"])
    if kind in ("log_normal", "q_log_normal"):
        return math.exp(z) if kind == "log_normal" else _quantize(math.exp(z), s["q"])
    raise SweepError(f"parameter {param.name!r}: cannot draw from {kind!r}")  # pragma: no cover


def _grid_values(param: Param) -> list:
    s = param.spec
    if param.kind == "constant":
        return [s["value"]]
    if param.kind == "int_uniform":
        return list(range(s["min"], s["max"] + 1))
    if param.kind == "q_uniform":  # wandb: numpy.arange(min, max, q) — max itself is excluded
        n = max(0, math.ceil((s["max"] - s["min"]) / s["q"]))
        values = [s["min"] + i * s["q"] for i in range(n)]
        return values if all(isinstance(v, int) for v in (s["min"], s["q"])) else [float(v) for v in values]
    return list(s["values"])


def expand(sweep: Sweep, count: Optional[int] = None, seed: Optional[int] = None) -> list[dict[str, Any]]:
    """The parameter values of each run, in the order wandb would hand them out."""
    if count is not None and count <= 0:
        raise SweepError(f"--count must be >= 1, got {count}")
    names = list(sweep.parameters)
    if sweep.method == "grid":
        grid = [dict(zip(names, combo)) for combo in itertools.product(*(_grid_values(sweep.parameters[n])
                                                                          for n in names))]
        limit = min(x for x in (count, sweep.run_cap, len(grid)) if x is not None)
        return grid[:limit]
    n = count or sweep.run_cap or DEFAULT_COUNT
    rng = random.Random(seed)
    return [{name: sample(sweep.parameters[name], rng) for name in names} for _ in range(n)]


# --------------------------------------------------------------------------------------------- commands


def _expand_envvars(chunk: str) -> str:
    return re.sub(r"\$\{envvar:([A-Z0-9_]*)\}", lambda m: os.environ.get(m.group(1), m.group(1)), chunk)


def command_args(params: Mapping[str, Any]) -> dict[str, list[str]]:
    """The argument lists of wandb's agent macros (wandb.sdk.launch.sweeps.utils.create_sweep_command_args)."""
    flags, no_equals, no_hyphens, no_booleans = [], [], [], []
    for name, value in params.items():
        flags.append(f"--{name}={value}")
        no_hyphens.append(f"{name}={value}")
        no_equals += [f"--{name}", str(value)]
        if isinstance(value, bool):
            if value:
                no_booleans.append(f"--{name}")
        else:
            no_booleans.append(f"--{name}={value}")
    return {
        "args": flags, "args_no_equals": no_equals, "args_no_hyphens": no_hyphens,
        "args_no_boolean_flags": no_booleans, "args_json": [json.dumps(dict(params))],
        "args_append_hydra": [f"+{a}" for a in no_hyphens], "args_override_hydra": [f"++{a}" for a in no_hyphens],
    }


def build_command(sweep: Sweep, params: Mapping[str, Any], interpreter: str = "python",
                  args_json_file: str = "wandb/sweep-<id>/config-<run>.json") -> list[str]:
    """The command wandb's agent runs for these parameter values (wandb_agent.Agent._command_run)."""
    variables = {**command_args(params), "env": ["/usr/bin/env"], "interpreter": [interpreter],
                 "program": [sweep.program], "args_json_file": [args_json_file]}
    out: list[str] = []
    for chunk in sweep.command:
        text = _expand_envvars(str(chunk))
        if text.startswith("${") and text.endswith("}"):
            out += variables.get(text[2:-1]) or []
        else:
            out.append(text)
    return out


def program_argv(sweep: Sweep, command: Sequence[str]) -> list[str]:
    """What main.py receives: everything after the program in the command."""
    for i, token in enumerate(command):
        if token == sweep.program or (token.endswith(".py") and (REPO_ROOT / token).resolve()
                                      == (REPO_ROOT / MAIN_PROGRAM).resolve()):
            return list(command[i + 1:])
    raise SweepError(f"{_where(sweep.path)}: command {shlex.join(command)!r} does not run {sweep.program}")


# --------------------------------------------------------------------------------------------- validation


@contextlib.contextmanager
def in_repo_root() -> Iterator[None]:
    """Relative paths (--config config/x.yaml, data roots, runs/...) mean what they mean to main.py, which
    runs in the repository root."""
    before = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        yield
    finally:
        os.chdir(before)


def _data_missing_here(cfg: Any, message: str) -> bool:
    """True when ``message`` is the dataset's own availability check, and fetching the data would fix it."""
    from datamodules import DATASETS  # local: torch loads only after the sweep file's own errors are reported

    if cfg.data.dataset not in DATASETS:
        return False
    source = DATASETS.get(cfg.data.dataset)
    fetched = dataclasses.replace(cfg.data, download=True)
    return source.check(cfg.data) == message and source.check(fetched) is None


def logged_metrics(cfg: Any) -> list[str]:
    """Every scalar a run of ``cfg`` logs: its task's own (``lightningmodules.TASKS``) and those of the
    callbacks it turns on (``callbacks.callback_metrics``: emergence Jaccard, online probe, ...)."""
    # local: torch loads only after the sweep file's own errors are reported
    from callbacks import callback_metrics
    from lightningmodules import TASKS

    own = list(TASKS.get(cfg.task).metrics)
    return own + [m for m in callback_metrics(cfg) if m not in own]


def check_metric(sweep: Sweep, configs: Iterable[Any]) -> None:
    """The sweep's metric is logged by every run (its task's metrics and its callbacks')."""
    if sweep.metric is None:
        return
    from lightningmodules import TASKS  # local: torch loads only after the sweep file's own errors are reported

    name = sweep.metric["name"]
    for cfg in configs:
        if cfg.task not in TASKS:
            continue  # validate() names the unknown task
        logged = logged_metrics(cfg)
        if name not in logged:
            close = difflib.get_close_matches(name, logged, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SweepError(f"{_where(sweep.path)}: metric {name!r} is never logged by task {cfg.task!r} with "
                             f"these callbacks{hint}; logged metrics: {', '.join(logged)}")


def _swept_values(run: SweepRun, sweep: Sweep) -> str:
    return ", ".join(f"{k}={run.params[k]}" for k in sweep.swept if k in run.params)


def _describe(run: SweepRun, sweep: Sweep) -> str:
    values = _swept_values(run, sweep)
    return f"run {run.index}" + (f" ({values})" if values else "")


def validate_runs(sweep: Sweep, runs: Sequence[SweepRun], strict_data: bool = True) -> list[str]:
    """Parse and validate every run's arguments with main.py's parser; returns notes (data missing here)."""
    src = _where(sweep.path)
    notes: list[str] = []
    failures: dict[str, list[SweepRun]] = collections.OrderedDict()
    with in_repo_root():
        for run in runs:
            try:
                run.config = parse_config(run.argv)
            except ConfigError as err:
                failures.setdefault(str(err), []).append(run)
        if not failures:
            check_metric(sweep, (r.config for r in runs))
        for run in runs:
            if run.config is None:
                continue
            try:
                validate(run.config)
            except ConfigError as err:
                if strict_data or not _data_missing_here(run.config, str(err)):
                    failures.setdefault(str(err), []).append(run)
                    continue
                fetched = copy.deepcopy(run.config)
                fetched.data.download = True
                try:
                    validate(fetched)  # every other check, as if the data were there
                except ConfigError as other:
                    failures.setdefault(str(other), []).append(run)
                    continue
                if str(err) not in notes:
                    notes.append(str(err))
    if failures:
        message, bad = next(iter(failures.items()))
        total = sum(len(v) for v in failures.values())
        count = "" if len(runs) == 1 else f"{total} of {len(runs)} runs are invalid, e.g. "
        raise SweepError(f"{src}: {count}{_describe(bad[0], sweep)}: {message}")
    return [f"data not available on this machine ({n}); the runs need it where they run — "
            f"--strict-data makes this an error, --set data.root=... points at a copy" for n in notes]


# --------------------------------------------------------------------------------------------- the plan


def plan(path: str | Path, overrides: Mapping[str, Any] | Sequence[str] = (), count: Optional[int] = None,
         seed: Optional[int] = None, local: bool = False, strict_data: bool = False) -> SweepPlan:
    """Load, expand, build and validate a sweep; raises :class:`SweepError` before anything runs.

    ``local=True`` builds the commands --local runs: ``sys.executable`` as the interpreter, each run named
    ``<sweep-name>-<i>`` unless the sweep names it, data checked strictly, existing run directories refused.
    """
    sweep = load_sweep(path, overrides)
    if sweep.method != "grid" and seed is None:
        seed = secrets.randbelow(2**31)
    values = expand(sweep, count, seed)
    interpreter = sys.executable if local else "python"
    runs = []
    for i, params in enumerate(values, start=1):
        command = build_command(sweep, params, interpreter)
        runs.append(SweepRun(i, dict(params), command, program_argv(sweep, command)))
    if local:
        _name_local_runs(sweep, runs, interpreter)
    notes = validate_runs(sweep, runs, strict_data=strict_data or local)
    if sweep.method == "bayes":
        notes.append("bayes is drawn like random offline: wandb's bayes search adapts to the results of earlier runs")
    grid_size = math.prod(len(_grid_values(p)) for p in sweep.parameters.values()) if sweep.method == "grid" else 0
    if sweep.method == "grid" and len(runs) < grid_size:
        notes.append(f"the grid has {grid_size} points; {len(runs)} kept (--count / run_cap)")
    if local:
        existing = [r.run_dir for r in runs if r.auto_named and (r.run_dir / "config.yaml").exists()]
        if existing:
            raise SweepError(f"{_where(sweep.path)}: {len(existing)} run director{'y' if len(existing) == 1 else 'ies'}"
                             f" already exist, e.g. {existing[0]}; use another --set log.output_dir=... (or remove "
                             f"them) so the sweep's runs are not mixed with earlier ones")
    return SweepPlan(sweep, runs, seed if sweep.method != "grid" else None, notes)


def _name_local_runs(sweep: Sweep, runs: list[SweepRun], interpreter: str) -> None:
    if "log.run_name" in sweep.parameters:
        return
    for run in runs:
        try:
            with in_repo_root():
                named = bool(parse_config(run.argv).log.run_name)  # e.g. by a --config file in the command
        except ConfigError:
            named = False  # validate_runs reports it
        if named:
            continue
        run.params = dict(sorted({**run.params, "log.run_name": f"{sweep.name}-{run.index}"}.items()))
        run.command = build_command(sweep, run.params, interpreter)
        run.argv = program_argv(sweep, run.command)
        run.auto_named = True


def run_local(sweep_plan: SweepPlan, echo: bool = True, tail_lines: int = 40) -> list[Path]:
    """Run the plan's commands one after the other, each its own process in the repository root.

    Output is streamed (``echo``) and the last ``tail_lines`` lines kept; the first failing run raises
    :class:`SweepRunError`. Returns the run directories.
    """
    done: list[Path] = []
    n = len(sweep_plan.runs)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for run in sweep_plan.runs:
        print(f"[{run.index}/{n}] {shlex.join(run.command)}", flush=True)
        tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        run_dir: Optional[Path] = run.run_dir
        with subprocess.Popen(run.command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    tail.append(line.rstrip("\n"))
                    if echo:
                        sys.stderr.write(line)
                    if line.startswith("run directory: "):
                        run_dir = Path(line[len("run directory: "):].strip())
                        run_dir = run_dir if run_dir.is_absolute() else REPO_ROOT / run_dir
                rc = proc.wait()
            except KeyboardInterrupt:
                proc.wait()
                raise
        if rc != 0:
            output = "\n".join(tail)
            values = _swept_values(run, sweep_plan.sweep)
            raise SweepRunError(f"run {run.index}/{n}{f' ({values})' if values else ''} failed with exit status {rc}; "
                                f"the sweep stops here (runs {run.index + 1}-{n} not started). "
                                f"Command: {shlex.join(run.command)}", rc, output)
        if run_dir is not None:
            done.append(run_dir)
    return done


# --------------------------------------------------------------------------------------------- command line


class _ArgParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise SweepError(f"{message} (see python -m tools.sweep --help)")


def build_arg_parser() -> argparse.ArgumentParser:
    p = _ArgParser(prog="python -m tools.sweep", description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter,
                   epilog="Without --dry-run or --local: check the file and print how to launch it on wandb.")
    p.add_argument("sweep", help="wandb sweep file (sweeps/*.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and validate them; run nothing")
    p.add_argument("--local", action="store_true", help="run the commands here, one after the other")
    p.add_argument("--count", type=int, default=None,
                   help=f"random/bayes: runs to draw (default: the file's run_cap, else {DEFAULT_COUNT}); "
                        f"grid: keep the first N points")
    p.add_argument("--seed", type=int, default=None, help="random/bayes: seed of the draws (default: a new one, printed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="fix a parameter (added, or replacing a fixed one), e.g. --set data.dataset=synthetic; "
                        "repeatable")
    p.add_argument("--strict-data", action="store_true",
                   help="dry-run: data missing on this machine is an error, not a note (--local always is strict)")
    p.add_argument("--quiet", action="store_true", help="--local: do not echo the runs' output")
    return p


def _print_plan(sweep_plan: SweepPlan, args: argparse.Namespace) -> None:
    s = sweep_plan.sweep
    metric = f"{s.metric['name']} ({s.metric['goal']})" if s.metric else "none"
    seed = f", --seed {sweep_plan.seed}" if sweep_plan.seed is not None else ""
    print(f"sweep {s.name} ({s.path}): method {s.method}{seed}, {len(sweep_plan.runs)} runs, metric {metric}, "
          f"swept: {', '.join(s.swept) or 'nothing'}")
    for run in sweep_plan.runs:
        print(f"[{run.index}] {shlex.join(run.command)}")
    data_note = " (data aside: see the note)" if any(n.startswith("data not available") for n in sweep_plan.notes) else ""
    print(f"ok: all {len(sweep_plan.runs)} commands parse and validate with main.py's parser{data_note}")
    for note in sweep_plan.notes:
        print(f"note: {note}")


def _print_wandb_howto(sweep_plan: SweepPlan, args: argparse.Namespace) -> None:
    s = sweep_plan.sweep
    cfg = sweep_plan.runs[0].config
    where = []
    if "project" not in s.raw:
        where.append(f"--project {cfg.log.wandb_project}")
    if "entity" not in s.raw and cfg.log.wandb_entity:
        where.append(f"--entity {cfg.log.wandb_entity}")
    sweep_path = os.path.relpath(s.path, REPO_ROOT) if s.path.resolve().is_relative_to(REPO_ROOT) else str(s.path)
    count = "" if s.method == "grid" or s.run_cap else " --count 20"
    print(f"{s.path} is valid ({s.method}, {len(sweep_plan.runs)} runs checked). Nothing was run.")
    print("To run it on wandb, from the repository root:")
    print(f"  wandb sweep {' '.join(where) + ' ' if where else ''}{sweep_path}")
    print(f"  wandb agent{count} <entity>/<project>/<sweep-id>      # the id `wandb sweep` prints; one agent per GPU")
    if count:
        print(f"  ({s.method} sweeps without run_cap never end by themselves: --count bounds each agent)")
    print(f"Offline: python -m tools.sweep {sweep_path} --dry-run   (the commands)   |   --local   (run them here)")
    if args.overrides:
        print("note: --set applies to --dry-run and --local only; wandb runs the file as written")
    for note in sweep_plan.notes:
        print(f"note: {note}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_arg_parser().parse_args(argv)
        local_run = args.local and not args.dry_run
        sweep_plan = plan(args.sweep, overrides=args.overrides, count=args.count, seed=args.seed,
                          local=args.local, strict_data=args.strict_data)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        _print_plan(sweep_plan, args)
        return 0
    if not local_run:
        _print_wandb_howto(sweep_plan, args)
        return 0
    s = sweep_plan.sweep
    seed = f" (--seed {sweep_plan.seed})" if sweep_plan.seed is not None else ""
    print(f"sweep {s.name}: running {len(sweep_plan.runs)} runs locally{seed}", flush=True)
    for note in sweep_plan.notes:
        print(f"note: {note}")
    try:
        run_dirs = run_local(sweep_plan, echo=not args.quiet)
    except SweepRunError as err:
        print(f"error: {err}\n--- last lines of its output ---\n{err.output_tail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    out_dirs = sorted({str(d.parent) for d in run_dirs})
    print(f"done: {len(run_dirs)} runs: {', '.join(d.name for d in run_dirs)}")
    for out in out_dirs:
        metric = f" --metric {s.metric['name']}" if s.metric else ""
        print(f"summarise: python -m tools.summarize {out}{metric}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
