"""The model summary printed when training starts, without Lightning's misleading parts.

Lightning's summary (2.6) has a FLOPs column and a "Total Flops" line that read 0 unless the module defines
``example_input_array`` (ours do not: a forward pass just for the table would cost a batch), and a
"Modules in eval mode" count; the fit loop then warns "Found N module(s) in eval mode at the start of
training". For a deliberately frozen backbone (``eval()`` and no trainable parameter, as
``--segmentation.freeze_backbone`` does) both are expected, so this summary reports those modules as
frozen, and that one warning is silenced for that exact count. Modules in eval mode that still have
trainable parameters are reported, and warned about, as Lightning does.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelSummary
from pytorch_lightning.utilities.model_summary import get_formatted_model_size, get_human_readable_count
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torch import nn

log = logging.getLogger(__name__)

FLOPS_COLUMN = "FLOPs"


def eval_mode_modules(module: nn.Module) -> list[str]:
    """Names of the submodules in eval mode, as Lightning's fit loop counts them (the module itself included)."""
    return [name for name, m in module.named_modules() if not m.training]


def frozen_modules(module: nn.Module) -> set[str]:
    """Names of the submodules inside a deliberately frozen part: a module in eval mode that holds
    parameters, none of them trainable (the part itself and everything below it)."""
    roots = [name for name, m in module.named_modules()
             if not m.training and any(True for _ in m.parameters())
             and not any(p.requires_grad for p in m.parameters())]
    return {name for name, _ in module.named_modules()
            if any(name == root or name.startswith(f"{root}.") or root == "" for root in roots)}


def only_frozen_in_eval_mode(module: nn.Module) -> bool:
    """True when some modules are in eval mode and all of them are deliberately frozen."""
    in_eval = eval_mode_modules(module)
    return bool(in_eval) and set(in_eval) <= frozen_modules(module)


def format_summary(columns: list[tuple[str, list[str]]], totals: list[tuple[str, str]]) -> str:
    """A table with one row per layer, then one ``value  label`` line per total."""
    widths = [max([len(header)] + [len(cell) for cell in cells]) for header, cells in columns]
    rows = [" | ".join(header.ljust(w) for (header, _), w in zip(columns, widths))]
    divider = "-" * (sum(widths) + 3 * len(widths))
    rows.append(divider)
    for i in range(len(columns[0][1]) if columns else 0):
        rows.append(" | ".join(cells[i].ljust(w) for (_, cells), w in zip(columns, widths)))
    rows.append(divider)
    rows += [f"{value:<10}{label}" for value, label in totals]
    return "\n".join(rows)


class RunModelSummary(ModelSummary):
    """Lightning's summary table with FLOPs only when they were measured, and a frozen backbone reported
    as frozen instead of as modules in eval mode (see the module docstring)."""

    def __init__(self, max_depth: int = 1) -> None:
        super().__init__(max_depth=max_depth)
        self._frozen_only = False
        self._eval_warning_filter: Optional[warnings.catch_warnings] = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._frozen_only = only_frozen_in_eval_mode(pl_module)
        super().on_fit_start(trainer, pl_module)
        if self._frozen_only:
            # The fit loop's warning comes between on_fit_start and on_train_start; only that message with
            # exactly this count is silenced, and only until training starts.
            self._eval_warning_filter = warnings.catch_warnings()
            self._eval_warning_filter.__enter__()
            count = len(eval_mode_modules(pl_module))
            warnings.filterwarnings("ignore", category=PossibleUserWarning,
                                    message=rf"Found {count} module\(s\) in eval mode at the start of training")

    def _restore_warnings(self) -> None:
        if self._eval_warning_filter is not None:
            self._eval_warning_filter.__exit__(None, None, None)
            self._eval_warning_filter = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_warnings()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_warnings()

    def summarize(self, summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        columns = [(h, c) for h, c in summary_data if h != FLOPS_COLUMN or total_flops > 0]
        totals = [
            (get_human_readable_count(trainable_parameters), "Trainable params"),
            (get_human_readable_count(total_parameters - trainable_parameters), "Non-trainable params"),
            (get_human_readable_count(total_parameters), "Total params"),
            (get_formatted_model_size(model_size), "Total estimated model params size (MB)"),
            (str(total_training_modes["train"]), "Modules in train mode"),
        ]
        if self._frozen_only:
            totals.append((str(total_training_modes["eval"]), "Modules frozen (eval mode, no gradients)"))
        elif total_training_modes["eval"]:
            totals.append((str(total_training_modes["eval"]), "Modules in eval mode"))
        if total_flops > 0:
            totals.append((get_human_readable_count(total_flops), "Total FLOPs"))
        log.info("\n%s", format_summary(columns, totals))
