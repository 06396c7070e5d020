"""``python main.py --help``: one section per config group, each flag once with its docstring and default.

simple-parsing's own help has a usage block listing every flag (90 lines), group titles made of internal
names (``DataConfig ['hp.data']``), a ``--group.noflag`` twin on every boolean and Python spellings of the
defaults (``False``, an empty string). This module gives the parser a one-line usage, group titles that are
the config groups' names (``data``, as in the YAML files and flags), and defaults as one would type them.
"""
from __future__ import annotations

import argparse
import difflib
import re
import shutil
from typing import Optional

from simple_parsing.help_formatter import SimpleHelpFormatter

USAGE = "%(prog)s [-h] [--config FILE.yaml ...] [--GROUP.FIELD=VALUE ...]"

EPILOG = """\
Later wins: the defaults above < --config files (in the order given) < flags.
A flag is --group.field=VALUE or --group.field VALUE; booleans take true/false.
Example: python main.py --config config/quickstart.yaml --backbone.depth=6 --trainer.max_epochs=30
--task NAME --help shows that task's defaults, marking those it replaced. Before a long run: --print-config
(the resolved config), --dry-run (builds model and data, counts parameters and steps). Every task, backbone,
head, dataset and callback: python -m tools.list"""

# Where simple-parsing puts the config (build_parser's ``dest="hp"``); never shown to the user.
CONFIG_DEST = "hp"
GENERAL_TITLE = "general"
MAX_WIDTH = 118

# simple-parsing's group titles: "<DataclassName> ['<dest>']", e.g. "DataConfig ['hp.data']".
_INTERNAL_TITLE = re.compile(r"^\w+ \['([\w.]+)'\]$")


def _shown_default(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return "empty"
    return str(value)


class HelpFormatter(SimpleHelpFormatter):
    """Each flag once (no ``--group.noflag`` twin), defaults as typed on the command line."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 32, width=None):
        # argparse fills the terminal's width; beyond ~120 columns lines are hard to read.
        width = width or min(shutil.get_terminal_size().columns - 2, MAX_WIDTH)
        super().__init__(prog, indent_increment, max_help_position, width)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        # simple-parsing registers "--data.download" and "--data.nodownload" for a boolean field; the first
        # is the documented one.
        return f"{action.option_strings[0]} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _get_help_string(self, action: argparse.Action) -> str:
        # argparse's BooleanOptionalAction appends its own "(default: %(default)s)": replaced by ours.
        text = (action.help or "").replace(" (default: %(default)s)", "")
        if action.dest.startswith(f"{CONFIG_DEST}.") and action.default is not argparse.SUPPRESS:
            text += f" (default: {_shown_default(action.default)})".replace("%", "%%")
        return text


def retitle_groups(parser: argparse.ArgumentParser) -> None:
    """Name each argument group after its config group (``data``, ``backbone``, ...); the top-level
    fields (``--task``, ``--seed``) become ``general`` (the parser's description already has the
    config's docstring)."""
    for group in parser._action_groups:
        match = _INTERNAL_TITLE.match(group.title or "")
        if not match:
            continue
        dest = match.group(1)
        if dest == CONFIG_DEST:
            group.title, group.description = GENERAL_TITLE, None
        elif dest.startswith(f"{CONFIG_DEST}."):
            group.title = dest[len(CONFIG_DEST) + 1:]


def mark_task_defaults(parser: argparse.ArgumentParser, task: str, replaced: dict[str, object],
                       shared: dict[str, object]) -> None:
    """``--task NAME --help``: the flags whose default the task replaced (``config.hparams.TASK_DEFAULTS``) say
    so, with the shared default they replaced; the shown default is already the task's."""
    for action in parser._actions:
        if not action.dest.startswith(f"{CONFIG_DEST}."):
            continue
        dotted = action.dest[len(CONFIG_DEST) + 1:]
        if dotted in replaced and replaced[dotted] != shared[dotted] and "replaces the shared" not in (action.help or ""):
            note = f"[{task}: replaces the shared default {_shown_default(shared[dotted])}]"
            action.help = f"{action.help} {note}" if action.help else note


def closest_flag(unknown: str, flags: list[str]) -> Optional[str]:
    """The documented flag closest to a mistyped one (``--backbone.dpth`` → ``--backbone.depth``), or None.
    A flag given without its group (``--depth``) is matched on the field name alone."""
    name = unknown.split("=", 1)[0]
    close = difflib.get_close_matches(name, flags, n=1, cutoff=0.75)
    if close:
        return close[0]
    leaf = name.lstrip("-").rsplit(".", 1)[-1]
    leaves = {flag.rsplit(".", 1)[-1] for flag in flags if "." in flag}
    close = difflib.get_close_matches(leaf, sorted(leaves), n=1, cutoff=0.8)
    if not close:
        return None
    return " or ".join(flag for flag in flags if flag.rsplit(".", 1)[-1] == close[0])
