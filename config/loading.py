"""Building an :class:`Hparams` from defaults, YAML files and command-line flags.

Precedence, later wins: dataclass defaults < the chosen task's defaults (``config.hparams.TASK_DEFAULTS``)
< a resumed run's ``config.yaml`` < ``--config`` YAML files
(in the order given) < ``--group.field=VALUE`` flags. YAML files are checked strictly (unknown keys and
wrongly typed values are errors) because simple-parsing silently ignores a YAML of the wrong shape.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml
from simple_parsing import ArgumentGenerationMode, ArgumentParser, NestedMode

from config.errors import ConfigError  # re-exported: callers import it from here
from config.help import EPILOG, USAGE, HelpFormatter, closest_flag, mark_task_defaults, retitle_groups
from config.hparams import TASK_DEFAULTS, Hparams
from config.resume import check_resume, checkpoint_run_dir, find_resume_checkpoint, read_checkpoint


class _Parser(ArgumentParser):
    """simple-parsing parser whose errors are one line (the default prints a 40-line usage first)."""

    task: str = Hparams.task  # whose defaults the parser holds (build_parser), for marking them in --help

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message}{self._did_you_mean(message)} (see python main.py --help)")

    def _did_you_mean(self, message: str) -> str:
        """``; did you mean --backbone.depth?`` for each mistyped flag of an 'unrecognized arguments' error."""
        if not message.startswith(UNRECOGNIZED):
            return ""
        self._preprocessing()  # simple-parsing adds the dataclass flags here
        flags = [a.option_strings[0] for a in self._actions if a.option_strings]
        unknown = [arg for arg in message[len(UNRECOGNIZED):].split() if arg.startswith("--")]
        guesses = [(arg.split("=", 1)[0], closest_flag(arg, flags)) for arg in unknown]
        return "".join(f"; {arg}: did you mean {guess}?" if len(unknown) > 1 else f"; did you mean {guess}?"
                       for arg, guess in guesses if guess)

    def format_help(self) -> str:
        self._preprocessing()  # simple-parsing adds the dataclass groups here; name them before printing
        retitle_groups(self)
        if TASK_DEFAULTS.get(self.task):
            shared = _flat(to_dict(Hparams()))
            mark_task_defaults(self, self.task, TASK_DEFAULTS[self.task], shared)
        return super().format_help()


UNRECOGNIZED = "unrecognized arguments: "  # argparse's message for flags no parser argument takes

# Actions of main.py that are not config fields (``--print-config``, ``--dry-run``): read by main.py.
ACTION_FLAGS = {
    "--print-config": "print the resolved config as YAML (task defaults applied; every value that differs from its "
                      "default marked '# default: X') and exit",
    "--dry-run": "check the config, build the model and the data, print parameter counts and the number of "
                 "training steps, and exit without creating a run directory",
}


def _flat(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` → ``{"optim.lr": 1}``."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, expected: Any, where: str) -> Any:
    """Check a YAML scalar against the field type; ints are accepted for floats."""
    origin = typing.get_origin(expected)
    if origin is Literal:
        choices = typing.get_args(expected)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {expected}")  # pragma: no cover - guards new fields


def apply_mapping(cfg: Any, mapping: dict, source: str, prefix: str = "") -> None:
    """Write a nested mapping into a dataclass instance in place, rejecting unknown keys."""
    if not isinstance(mapping, dict):
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{source}: {where} must be a mapping of field names to values, got {mapping!r}")
    types = _field_types(type(cfg))
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if key not in types:
            valid = ", ".join(f"{prefix}{k}" for k in types)
            raise ConfigError(f"{source}: unknown key {name!r}; valid keys here: {valid}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            apply_mapping(current, value, source, prefix=f"{name}.")
        else:
            setattr(cfg, key, _coerce(value, types[key], f"{source}: {name}"))


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"--config: {path} is not valid YAML: {err}".replace("\n", " ")) from None
    return data or {}


def to_dict(cfg: Hparams) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(mapping: dict, source: str = "config") -> Hparams:
    cfg = Hparams()
    apply_mapping(cfg, mapping, source)
    return cfg


def save_config(cfg: Hparams, path: str | Path, comment: str = "") -> None:
    """Write the resolved config. ``trainer.resume`` is left out (empty): a config file describes a run, and
    giving it back with ``--config`` must start a new run with it, never continue the old one. ``log.verbose``
    too (false): it chose this command's console output only."""
    data = to_dict(cfg)
    data["trainer"]["resume"] = ""
    data["log"]["verbose"] = False  # how this command's console looked, not part of the run (a resume chooses anew)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    tmp.write_text(header + yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)  # a kill mid-write never leaves a half config.yaml


def build_parser(default: Optional[Hparams] = None) -> ArgumentParser:
    parser = _Parser(
        prog="main.py",
        usage=USAGE,
        description=Hparams.__doc__,
        epilog=EPILOG,
        formatter_class=HelpFormatter,
        argument_generation_mode=ArgumentGenerationMode.NESTED,
        nested_mode=NestedMode.WITHOUT_ROOT,
        add_help=True,
        allow_abbrev=False,  # a misspelt flag must be an error, not a silent prefix match
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE.yaml",
        help="YAML file nested like the groups below; may be given several times (later wins); "
        "flags override it.",
    )
    for flag, text in ACTION_FLAGS.items():
        parser.add_argument(flag, action="store_true", help=text)
    parser.add_arguments(Hparams, dest="hp", default=default or Hparams())
    parser.task = (default or Hparams()).task
    return parser


def chosen_actions(argv: Sequence[str]) -> set[str]:
    """The action flags (``ACTION_FLAGS``) among ``argv``."""
    return {arg for arg in argv if arg in ACTION_FLAGS}


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def format_config(cfg: Hparams) -> str:
    """The resolved config as the YAML ``config.yaml`` records (``--config`` takes it back), every value that
    differs from its default followed by ``# default: X``; under a task with its own defaults, the values that
    task replaced say so (``# dino's default; shared default: X``)."""
    task_default = _flat(to_dict(task_defaults(cfg.task)))
    shared = _flat(to_dict(Hparams()))
    task_default["task"] = shared["task"]
    replaced = {k for k in TASK_DEFAULTS.get(cfg.task, {}) if task_default[k] != shared[k]}
    lines: list[str] = []

    def emit(mapping: dict, prefix: str, indent: str) -> None:
        for key, value in mapping.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                lines.append(f"{indent}{key}:")
                emit(value, f"{dotted}.", indent + "  ")
                continue
            line = f"{indent}{key}: {_yaml_scalar(value)}"
            if value != task_default[dotted]:
                line += f"  # default: {_yaml_scalar(task_default[dotted])}"
                if dotted in replaced:
                    line += f" ({cfg.task}'s; shared default: {_yaml_scalar(shared[dotted])})"
            elif dotted in replaced:
                line += f"  # {cfg.task}'s default; shared default: {_yaml_scalar(shared[dotted])}"
            lines.append(line)

    data = to_dict(cfg)
    data["trainer"]["resume"] = ""  # as in config.yaml: a config describes a run, never continues one
    emit(data, "", "")
    return "\n".join(lines) + "\n"


def _config_files(argv: Sequence[str]) -> list[str]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", action="append", default=[])
    known, _ = pre.parse_known_args(list(argv))
    return known.config


def _chosen_task(argv: Sequence[str], base: Optional[dict], files: list[dict]) -> str:
    """The task the layers choose (flag > YAML files > resumed config > default), to pick its defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", default=None)
    flag, _ = pre.parse_known_args(list(argv))
    if flag.task is not None:
        return flag.task
    for mapping in reversed([base or {}, *files]):
        if isinstance(mapping, dict) and isinstance(mapping.get("task"), str):
            return mapping["task"]
    return Hparams().task


def task_defaults(task: str) -> Hparams:
    """The dataclass defaults with ``task`` set and that task's own defaults applied."""
    default = Hparams()
    default.task = task
    for dotted, value in TASK_DEFAULTS.get(task, {}).items():
        apply_mapping(default, _nested(dotted, value), f"task defaults of {task!r}")
    return default


def _nested(dotted: str, value: Any) -> dict:
    group, _, name = dotted.rpartition(".")
    mapping: dict = {name: value}
    for part in reversed(group.split(".") if group else []):
        mapping = {part: mapping}
    return mapping


def _layered(argv: Sequence[str], base: Optional[dict]) -> Hparams:
    files = [load_yaml(path) for path in _config_files(argv)]
    default = task_defaults(_chosen_task(argv, base, files))
    if base is not None:
        apply_mapping(default, base, "resumed run's config.yaml")
    for path, mapping in zip(_config_files(argv), files):
        apply_mapping(default, mapping, str(path))
    return build_parser(default).parse_args(list(argv)).hp


def _explicit_flags(argv: Sequence[str]) -> set[str]:
    """The dotted field names given as command-line flags (``--log.run_name=x`` or ``--log.run_name x``)."""
    return {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--") and "." in arg.split("=", 1)[0]}


def check_finite(cfg: Any, prefix: str = "") -> None:
    """Every float field must be a finite number: NaN/inf would otherwise pass every range check
    (comparisons with NaN are False) and surface later as a traceback or a misleading message."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{prefix}{f.name} must be a finite number, got {value}")


def parse_config(argv: Optional[Sequence[str]] = None) -> Hparams:
    """Parse the layers into a config (not yet validated: see :func:`config.validation.validate`).

    Resuming (``--trainer.resume``): the checkpoint's run directory is the run directory, and its
    ``config.yaml`` the base layer; ``--log.run_name``/``--log.output_dir`` naming another directory, an
    unreadable checkpoint, another run's checkpoint or another task's are one-line errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = _layered(argv, base=None)
    check_finite(cfg)
    if cfg.trainer.resume:
        ckpt_path = find_resume_checkpoint(cfg)
        if ckpt_path is None:  # 'auto' and the named run does not exist yet: a new run
            cfg.trainer.resume = ""
            return cfg
        run_dir = checkpoint_run_dir(ckpt_path)
        explicit = _explicit_flags(argv)
        if "log.run_name" in explicit and cfg.log.run_name != run_dir.name:
            raise ConfigError(f"--log.run_name={cfg.log.run_name} differs from the run being resumed ({run_dir}); "
                              f"a resumed run writes only into its own directory (drop --log.run_name)")
        if "log.output_dir" in explicit and Path(cfg.log.output_dir).resolve() != run_dir.parent:
            raise ConfigError(f"--log.output_dir={cfg.log.output_dir} is not where the resumed run lives "
                              f"({run_dir.parent}); a resumed run writes only into its own directory")
        ckpt = read_checkpoint(ckpt_path)
        cfg = _layered(argv, base=load_yaml(run_dir / "config.yaml"))
        check_finite(cfg)
        if Path(cfg.log.output_dir).resolve() != run_dir.parent:  # e.g. the run directory was moved
            cfg.log.output_dir = str(run_dir.parent)
        cfg.log.run_name = run_dir.name
        cfg.trainer.resume = str(ckpt_path)
        check_resume(cfg, ckpt_path, ckpt)
    return cfg
