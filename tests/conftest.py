"""Shared fixtures: tiny generated VOC-layout data and tiny-model command lines. Nothing touches the network."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Real wandb, offline: files land in each run directory. No server, no prompts.
os.environ["WANDB_SILENT"] = "true"
os.environ.pop("WANDB_API_KEY", None)
os.environ.setdefault("WANDB_DISABLE_CODE", "true")
os.environ["HF_HUB_OFFLINE"] = "1"

TINY_DATA = {"synthetic_train": 32, "synthetic_val": 16, "synthetic_size": 32}


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """A cache folder holding one tiny synthetic VOC set (generated once per test session)."""
    from datamodules.synthetic_voc import ensure_synthetic_voc

    cache = tmp_path_factory.mktemp("data")
    ensure_synthetic_voc(cache, TINY_DATA["synthetic_train"], TINY_DATA["synthetic_val"], TINY_DATA["synthetic_size"], 0)
    return cache


@pytest.fixture(scope="session")
def voc_root(data_cache) -> Path:
    """The root (holding VOCdevkit/VOC2012) of the tiny synthetic set."""
    from datamodules.synthetic_voc import ensure_synthetic_voc

    return ensure_synthetic_voc(data_cache, TINY_DATA["synthetic_train"], TINY_DATA["synthetic_val"],
                                TINY_DATA["synthetic_size"], 0)


def tiny_args(data_root: Path, output_dir: Path, run_name: str = "tiny", **overrides) -> list[str]:
    """Command-line flags for a tiny ViT Barlow Twins run on the tiny synthetic set (seconds on CPU)."""
    values = {
        "data.dataset": "synthetic", "data.root": str(data_root),
        **{f"data.{k}": v for k, v in TINY_DATA.items()},
        "data.img_size": 32, "data.batch_size": 8, "data.num_workers": 0,
        "backbone.name": "vit", "backbone.depth": 2, "backbone.embed_dim": 32, "backbone.num_heads": 2,
        "backbone.patch_size": 8, "barlow.proj_dim": 64, "optim.warmup_epochs": 1,
        "callbacks.emergence_img_size": 32,
        "trainer.max_epochs": 2, "trainer.log_every_n_steps": 1, "trainer.progress_bar": "false",
        "log.output_dir": str(output_dir), "log.run_name": run_name, "log.wandb_mode": "offline",
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return [f"--{k}={v}" for k, v in values.items()]


@pytest.fixture
def tiny(data_cache, tmp_path):
    """``tiny(run_name, **overrides)`` → flags; overrides use '__' for '.', e.g. trainer__max_epochs=1."""
    return lambda run_name="tiny", **overrides: tiny_args(data_cache, tmp_path / "runs", run_name, **overrides)


@pytest.fixture
def one_thread():
    """One torch thread for the test: with tiny tensors thread start-up dominates (and costs seconds when other
    processes share the CPUs). Files of such tests say ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
