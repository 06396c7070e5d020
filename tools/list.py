"""What a config can name, read from the registries: tasks, backbones, segmentation heads, datasets and the
callbacks (pictures and measurements), each with the first line of its own docstring.

    python -m tools.list                 # everything
    python -m tools.list heads tasks     # some sections only

Each section says which flag takes its names. Registering a component (one ``REGISTRY.register("name", ...)``
line) is enough for it to appear here.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from typing import Callable, Iterable, Optional, Sequence

from simple_parsing.docstring import get_attribute_docstring

import datamodules  # noqa: F401  (importing the package registers every dataset)
import models.heads  # noqa: F401  (importing the package registers every head)
from config.hparams import CallbacksConfig
from datamodules.registry import DATASETS
from lightningmodules import TASKS
from models.backbones.registry import BACKBONES
from models.heads.registry import HEADS

SECTIONS = ("tasks", "backbones", "heads", "datasets", "callbacks")


def first_line(text: Optional[str]) -> str:
    """The first sentence of a docstring on one line, without reST markup and quoted-title citations."""
    paragraph = " ".join(inspect.cleandoc(text or "").split("\n\n", 1)[0].split()).replace("``", "")
    paragraph = re.sub(r' \([^()]*"[^()]*\)', "", paragraph)  # (Zheng et al., "Rethinking ...", CVPR 2021)
    sentence = re.match(r"(.+?[.;])(?= [A-Z]|$)", paragraph)
    return (sentence.group(1) if sentence else paragraph).removesuffix(";").removesuffix(".") + "." if paragraph else ""


def _describe(entry: object, own_doc: bool = True) -> str:
    """What an entry says about itself: its own docstring (``own_doc``), else its module's."""
    doc = entry.__doc__ if own_doc and (isinstance(entry, type) or inspect.isfunction(entry)) else None
    if not doc:
        module = inspect.getmodule(entry)
        doc = module.__doc__ if module is not None else None
    return first_line(doc)


def _table(rows: Iterable[tuple[str, str]]) -> list[str]:
    rows = list(rows)
    width = max((len(name) for name, _ in rows), default=0)
    return [f"  {name.ljust(width)}  {text}".rstrip() for name, text in rows]


def _tasks() -> list[str]:
    rows = []
    for name, task in TASKS.items():
        kind = "pretraining" if task.pretraining else "supervised"
        rows.append((name, f"{_describe(task.module, own_doc=False)} [{kind}; best checkpoint by {task.monitor}]"))
    return ["tasks (--task NAME):", *_table(rows)]


def _backbones() -> list[str]:
    rows = [(name, f"{_describe(entry)} [{getattr(entry, 'kind', 'vit')}"
                   f"{', attention maps' if getattr(entry, 'attention', True) else ''}]")
            for name, entry in BACKBONES.items()]
    rows.append(("<timm ViT name>", "any timm ViT, e.g. vit_small_patch16_224, vit_small_patch8_224.dino "
                                    "(--backbone.pretrained true: published weights) [vit, attention maps]"))
    return ["backbones (--backbone.name NAME):", *_table(rows)]


def _heads() -> list[str]:
    rows = []
    for name, entry in HEADS.items():
        notes = [label for attribute, label in (("aux_heads", "auxiliary heads"), ("needs_attention", "reads attention"))
                 if getattr(entry, attribute, False)]
        rows.append((name, _describe(entry) + (f" [{', '.join(notes)}]" if notes else "")))
    rows.append(("deeplabv3", "torchvision DeepLabV3 on a ResNet-50 backbone (chosen by --backbone.name resnet50)"))
    return ["segmentation heads (--segmentation.head NAME, ViT backbones):", *_table(rows)]


def _datasets() -> list[str]:
    return ["datasets (--data.dataset NAME):", *_table((name, _describe(entry)) for name, entry in DATASETS.items())]


def _callbacks() -> list[str]:
    rows = []
    switches = [f for f in dataclasses.fields(CallbacksConfig) if f.type in (bool, "bool")]
    for f in switches:
        if any(f.name.startswith(f"{other.name}_") for other in switches):
            continue  # a setting of another callback (erf_log_scale), not a callback of its own
        doc = get_attribute_docstring(CallbacksConfig, f.name)
        text = first_line(doc.docstring_below or doc.comment_inline or doc.comment_above)
        rows.append((f.name, f"{text} [default: {'on' if f.default else 'off'}]"))
    return ["callbacks (--callbacks.NAME true|false; their settings: python main.py --help):", *_table(rows)]


BUILDERS: dict[str, Callable[[], list[str]]] = {
    "tasks": _tasks, "backbones": _backbones, "heads": _heads, "datasets": _datasets, "callbacks": _callbacks,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.list", description=first_line(__doc__))
    parser.add_argument("sections", nargs="*", metavar="SECTION", help=f"any of {', '.join(SECTIONS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in BUILDERS]
    if unknown:
        print(f"error: unknown section {unknown[0]!r}; valid: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    blocks = ["\n".join(BUILDERS[section]()) for section in (args.sections or SECTIONS)]
    print("\n\n".join(blocks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
