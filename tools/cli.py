"""What the command-line tools share about a user's input: every mistake is one line ``error: ...`` and exit status
2, never a traceback or argparse's usage block. The tools check their arguments with these before they run
anything, so that a typo is reported at once and not after the first hour of a study."""
from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from config.loading import ConfigError, parse_config

T = TypeVar("T")


class ToolInputError(ValueError):
    """A tool's argument is invalid; the message names the option and what would be valid."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors raised as :class:`ToolInputError` (one line) instead of usage + exit."""

    def error(self, message: str) -> typing.NoReturn:
        raise ToolInputError(f"{message} (see {self.prog} --help)")


def number_list(text: str, option: str, kind: Callable[[str], T] = int, minimum: float | None = None,
                above: float | None = None) -> list[T]:
    """Comma-separated numbers of ``kind``, each >= ``minimum`` / > ``above`` when given."""
    values = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        try:
            value = kind(item)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise ToolInputError(f"{option}: {item!r} is not {noun} (give comma-separated values, e.g. "
                                 f"{option} {'4,8' if kind is int else '0.003,0.03'})") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ToolInputError(f"{option}: {item!r} is not a finite number")
        if minimum is not None and value < minimum:
            raise ToolInputError(f"{option}: every value must be >= {minimum:g}, got {item}")
        if above is not None and value <= above:
            raise ToolInputError(f"{option}: every value must be > {above:g}, got {item}")
        values.append(value)
    if not values:
        raise ToolInputError(f"{option}: give at least one value")
    return values


def choice_list(text: str, option: str, valid: Sequence[str]) -> list[str]:
    """Comma-separated names, each one of ``valid``."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ToolInputError(f"{option}: unknown {', '.join(unknown)}; valid: {', '.join(valid)}")
    if not names:
        raise ToolInputError(f"{option}: give at least one of {', '.join(valid)}")
    return names


def main_flags(items: Sequence[str], option: str = "--set") -> list[str]:
    """``KEY=VALUE`` items as main.py flags (``--KEY=VALUE``), each checked against main.py's parser: the field
    exists and the value has its type."""
    flags = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ToolInputError(f"{option} {item!r}: expected KEY=VALUE, e.g. {option} trainer.max_epochs=1")
        try:
            parse_config([f"--{key}={value}"])
        except ConfigError as err:
            raise ToolInputError(f"{option} {key}={value}: {err}") from None
        flags.append(f"--{key}={value}")
    return flags


def output_folder(path: str | Path, option: str) -> Path:
    """``path`` resolved and created; one line when it is a file or cannot be created."""
    folder = Path(path).resolve()
    if folder.exists() and not folder.is_dir():
        raise ToolInputError(f"{option} {path} is a file; give a folder (created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ToolInputError(f"{option}: cannot create folder {folder}: {err.strerror or err}") from None
    return folder
