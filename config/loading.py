"""Building an :class:`Hparams` from defaults, YAML files and command-line flags.

Precedence, later wins: dataclass defaults < a resumed run's ``config.yaml`` < ``--config`` YAML files
(in the order given) < ``--group.field=VALUE`` flags. YAML files are checked strictly (unknown keys and
wrongly typed values are errors) because simple-parsing silently ignores a YAML of the wrong shape.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml
from simple_parsing import ArgumentGenerationMode, ArgumentParser, NestedMode

from config.hparams import Hparams


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field and what would be valid."""


class _Parser(ArgumentParser):
    """simple-parsing parser whose errors are one line (the default prints a 40-line usage first)."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message} (see python main.py --help)")


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


def save_config(cfg: Hparams, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def build_parser(default: Optional[Hparams] = None) -> ArgumentParser:
    parser = _Parser(
        prog="main.py",
        description=Hparams.__doc__,
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
    parser.add_arguments(Hparams, dest="hp", default=default or Hparams())
    return parser


def _config_files(argv: Sequence[str]) -> list[str]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", action="append", default=[])
    known, _ = pre.parse_known_args(list(argv))
    return known.config


def _layered(argv: Sequence[str], base: Optional[dict]) -> Hparams:
    default = Hparams()
    if base is not None:
        apply_mapping(default, base, "resumed run's config.yaml")
    for path in _config_files(argv):
        apply_mapping(default, load_yaml(path), str(path))
    return build_parser(default).parse_args(list(argv)).hp


def parse_config(argv: Optional[Sequence[str]] = None) -> Hparams:
    """Parse the layers into a config (not yet validated: see :func:`config.validation.validate`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = _layered(argv, base=None)
    if cfg.trainer.resume:
        from utils.run_dir import resolve_resume  # local: keeps config importable on its own

        ckpt = resolve_resume(cfg)
        if ckpt is not None:
            run_config = ckpt.parent.parent / "config.yaml"
            if run_config.is_file():
                cfg = _layered(argv, base=load_yaml(run_config))
            cfg.trainer.resume = str(ckpt)
    return cfg
