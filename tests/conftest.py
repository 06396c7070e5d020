"""Shared fixtures: tiny generated VOC-layout data and tiny-model command lines. Nothing touches the network."""
from __future__ import annotations

import inspect
import os
import re
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


# --- test tiers ------------------------------------------------------------------------------------------------
# `pytest -m "not e2e"` is the fast tier: in-process unit tests only, no training run and no child process. A
# test is end-to-end (`e2e`) when it or its module carries the mark (`pytestmark = pytest.mark.e2e`), or when, as
# read from the source of its own body, of a fixture it uses (directly or not) or of a helper function of its
# module (to any depth), it calls main.py or a tool in-process (`main.main(...)`, `sweep.main(...)`), fits a
# Lightning Trainer (also through the tuner), uses the `tiny` fixture (flags for a training run) or starts a
# child process (`subprocess.*`, `sys.executable`, `run_main(...)`): each costs seconds of imports at least.
# `slow` tests are e2e too: `-m "not e2e"` replaces pytest.ini's `-m "not slow"` and must still leave them out.
# The modules of E2E_MODULES are e2e whole (they train in child processes: main.py, torchrun, DDP workers). A fit
# this reading misses fails in the fast tier at run time (`_no_training_in_the_fast_tier` below).
E2E_MODULES = {"test_crash_safety", "test_distributed", "test_main", "test_method_study", "test_multinode",
               "test_proxy_study", "test_readme_commands", "test_reproduce", "test_resume_matrix", "test_resume_process"}
# In-process tests that still take about a second or more each on the 2-core machine (measured with
# `pytest -m "not e2e" --durations=30`): they run with the e2e tier so that the fast tier stays under a minute.
HEAVY_UNIT_TESTS = {
    "tests/test_layout.py::test_the_checker_sees_an_injected_violation_in_a_copy_of_this_project",
    "tests/test_user_errors.py::test_deeplabv3_pretrained_head_equals_its_offline_alternative",
    "tests/test_barlow_twins.py::test_batch_independent_resnet_norms_make_chunking_exact",
    "tests/test_barlow_twins.py::test_resnet_batchnorm_statistics_are_counted_once_per_chunk",
    "tests/test_gpu_augment.py::test_sampled_parameters_follow_the_config",
    "tests/test_multicrop.py::test_crop_areas_cover_the_scale_ranges",
    "tests/test_multicrop.py::test_per_view_probabilities_are_the_official_ones",
    "tests/test_multicrop.py::test_batches_depend_on_the_seed_only",
    "tests/test_multicrop.py::test_pixels_are_the_official_recipe_written_with_torchvision",
    "tests/test_multicrop.py::test_device_mode_batches_are_worker_independent_and_close_to_the_cpu_modes",
    "tests/test_sweep.py::test_learning_rate_samples_are_log_uniform_in_bounds_and_seeded",
}
TRAINS = re.compile(r"\b\w+\.main\(|\brun_main\(|\.fit\(|\.lr_find\(|\.scale_batch_size\(|\btrainer\.run\(|\btiny\("
                    r"|\bsubprocess\.|\bsys\.executable\b")


def _source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _training_helpers(module) -> set[str]:
    """Names of the module's own functions that train, directly or through each other."""
    functions = {name: _source(obj) for name, obj in vars(module).items()
                 if inspect.isfunction(obj) and obj.__module__ == module.__name__ and not name.startswith("test_")}
    training = {name for name, src in functions.items() if TRAINS.search(src.split("\n", 1)[-1])}
    while True:
        calls = re.compile(r"\b(" + "|".join(map(re.escape, training)) + r")\(") if training else None
        more = {name for name, src in functions.items()
                if name not in training and calls is not None and calls.search(src.split("\n", 1)[-1])}
        if not more:
            return training
        training |= more


def _trains(item, helpers: set[str]) -> bool:
    calls = re.compile(r"\b(" + "|".join(map(re.escape, helpers)) + r")\(") if helpers else None
    sources = [_source(getattr(item, "function", None))]
    for defs in getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {}).values():
        sources += [_source(d.func) for d in defs if not d.baseid.endswith("conftest.py") or d.argname == "tiny"]
    return "tiny" in getattr(item, "fixturenames", ()) or any(
        TRAINS.search(src) or (calls is not None and calls.search(src)) for src in sources if src)


def pytest_collection_modifyitems(config, items):
    helpers: dict[str, set[str]] = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__ not in helpers:
            helpers[module.__name__] = _training_helpers(module)
        name = getattr(module, "__name__", "")
        heavy = item.nodeid.split("[", 1)[0] in HEAVY_UNIT_TESTS
        if (heavy or item.get_closest_marker("slow") or name.rsplit(".", 1)[-1] in E2E_MODULES
                or _trains(item, helpers.get(name, set()))):
            item.add_marker(pytest.mark.e2e)


def _fast_tier(config) -> bool:
    return "not e2e" in (config.option.markexpr or "")


@pytest.fixture(autouse=True)
def _no_training_in_the_fast_tier(request, monkeypatch):
    """In the fast tier, a test that starts a Lightning fit without the e2e mark fails with one line saying how to
    mark it (a fast tier that silently trains is no longer fast). The full run is unaffected."""
    if not _fast_tier(request.config) or request.node.get_closest_marker("e2e"):
        yield
        return
    import pytorch_lightning as pl

    def refuse(*args, **kwargs):
        raise pytest.fail.Exception(f"{request.node.nodeid} trains a model (Trainer.fit) but is not marked e2e: "
                                    f"add `pytestmark = pytest.mark.e2e` to its module or @pytest.mark.e2e to it")

    monkeypatch.setattr(pl.Trainer, "fit", refuse)
    yield


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """Each test leaves SIGINT and SIGTERM as it found them, so Ctrl-C always stops the test run at once (a
    training run inside a test installs the run's own handlers, callbacks/checkpointing.py: StopOnSignal)."""
    import signal

    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in before.items():
        if signal.getsignal(signum) is not handler and handler is not None:
            signal.signal(signum, handler)
