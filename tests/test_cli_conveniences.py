"""What a new user expects of the command line, each through a real ``python main.py`` (or tool) process:
the closest flag for a typo, ``--print-config``, ``--dry-run``, ``--task X --help`` marking the defaults the task
replaced, ``python -m tools.list``, a quiet log when the output is a file (``--log.verbose`` brings everything
back), and Ctrl-C interrupting at once after a training run ended in an exception."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import tools.list
from datamodules.registry import DATASETS
from lightningmodules import TASKS
from models.backbones.registry import BACKBONES
from models.heads.registry import HEADS
from tests.conftest import TINY_DATA, tiny_args

ROOT = Path(__file__).resolve().parent.parent


def run(*argv: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def main_py(*flags: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    return run(str(ROOT / "main.py"), *flags, cwd=cwd, timeout=timeout)


# --- did you mean -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("typo, meant", [
    (["--backbone.dpth", "6"], "--backbone.depth"),
    (["--backbone.dpth=6"], "--backbone.depth"),
    (["--optim.lrr", "0.1"], "--optim.lr"),
    (["--depth", "6"], "--backbone.depth"),  # the group left out
    (["--trainer.max_epoch", "3"], "--trainer.max_epochs"),
])
def test_a_mistyped_flag_names_the_closest_one(typo, meant):
    result = main_py(*typo)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: unrecognized arguments: {typo[0]}")
    assert f"did you mean {meant}?" in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_flag_far_from_every_flag_gets_no_guess():
    result = main_py("--completely-unrelated-thing", "1")
    assert result.returncode == 2
    assert "did you mean" not in result.stderr
    assert result.stderr.startswith("error: unrecognized arguments: --completely-unrelated-thing 1")


# --- --print-config ---------------------------------------------------------------------------------------------

def test_print_config_is_the_resolved_yaml_with_differences_marked(tmp_path):
    out = tmp_path / "runs"
    result = main_py("--config", "config/quickstart.yaml", "--task", "dino", "--optim.lr", "0.001",
                     "--log.output_dir", str(out), "--print-config")
    assert result.returncode == 0, result.stderr
    assert not out.exists()  # nothing is run or written
    text = result.stdout
    config = yaml.safe_load(text)
    # Layers by hand: the flag, the quickstart file, DINO's own defaults (its paper's recipe), the shared defaults.
    assert config["task"] == "dino"
    assert config["optim"]["lr"] == 0.001  # flag
    assert config["trainer"]["max_epochs"] == 15  # config/quickstart.yaml
    assert config["backbone"]["depth"] == 4  # config/quickstart.yaml
    assert config["aug"]["crop_scale_min"] == 0.4  # DINO's global crops 0.4-1
    assert config["optim"]["weight_decay"] == 0.04  # DINO's starting weight decay
    assert config["barlow"]["lambd"] == 0.0051  # shared default, untouched
    lines, group = {}, ""
    for line in text.splitlines():
        key = line.strip().split(":")[0]
        if not line.startswith(" "):
            group = key
        lines[f"{group}.{key}" if line.startswith(" ") else key] = line
    assert lines["task"].endswith("# default: barlow_twins")
    assert lines["optim.lr"].endswith("# default: 0.0005")  # DINO's default, replaced by the flag
    # DINO's 100 epochs (replacing the shared 400), replaced by the file
    assert lines["trainer.max_epochs"].endswith("# default: 100 (dino's; shared default: 400)")
    assert lines["aug.crop_scale_min"].endswith("# dino's default; shared default: 0.08")
    assert lines["optim.weight_decay"].endswith("# dino's default; shared default: 0.05")
    assert "#" not in lines["barlow.lambd"] and "#" not in lines["segmentation.crop_scale_min"]


def test_print_config_output_given_back_prints_the_same(tmp_path):
    first = main_py("--config", "config/quickstart.yaml", "--backbone.depth", "6", "--print-config")
    assert first.returncode == 0, first.stderr
    saved = tmp_path / "printed.yaml"
    saved.write_text(first.stdout)
    again = main_py("--config", str(saved), "--print-config")
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout


def test_print_config_validates_first():
    result = main_py("--backbone.embed_dim", "100", "--backbone.num_heads", "6", "--print-config")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: --backbone.embed_dim=100 is not divisible by --backbone.num_heads=6")


# --- --dry-run --------------------------------------------------------------------------------------------------

def vit_parameters(depth: int, dim: int, patch: int, img: int, mlp_ratio: int = 4) -> int:
    """A timm ViT's parameters, written out: patch embedding, CLS token, position embedding (CLS included),
    per block two LayerNorms, qkv, output projection and the MLP, then the final LayerNorm; no classifier."""
    tokens = (img // patch) ** 2 + 1
    block = 2 * 2 * dim + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + (dim * mlp_ratio * dim + mlp_ratio * dim) \
        + (mlp_ratio * dim * dim + dim)
    return (3 * patch * patch * dim + dim) + dim + tokens * dim + depth * block + 2 * dim


def projector_parameters(dim: int, width: int, layers: int) -> int:
    """Barlow Twins' projector: bias-free Linear layers, BatchNorm (weight and bias) after all but the last."""
    return dim * width + (layers - 1) * (2 * width + width * width)


@pytest.mark.e2e
def test_dry_run_counts_parameters_and_steps_and_writes_no_run(data_cache, tmp_path):
    out = tmp_path / "runs"
    result = main_py(*tiny_args(data_cache, out), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert not out.exists()
    backbone = vit_parameters(depth=2, dim=32, patch=8, img=32)  # tiny_args' ViT
    projector = projector_parameters(dim=32, width=64, layers=3)
    assert backbone == 32224 and projector == 10496  # the formulas above, evaluated by hand
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "task barlow_twins: 42.7 K parameters, 42.7 K trainable (backbone 32.2 K, projector 10.5 K)"
    # 32 generated training images, batch 8, incomplete batches dropped: 4 steps per epoch, 2 epochs.
    train, batch, epochs = TINY_DATA["synthetic_train"], 8, 2
    assert f"training data: {train} images, batch {batch}: {train // batch} steps per epoch, " \
           f"{train // batch * epochs} optimizer steps in all ({epochs} epochs)" == lines[1]
    assert lines[2].startswith("dry run: ")


@pytest.mark.e2e
def test_dry_run_reports_bad_weights_in_one_line(data_cache, tmp_path):
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(b"not a weight file")
    result = main_py(*tiny_args(data_cache, tmp_path / "runs"), f"--backbone.weights={garbage}", "--dry-run")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and str(garbage) in lines[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


# --- --task X --help --------------------------------------------------------------------------------------------

def _help_entry(text: str, flag: str) -> str:
    """The lines of one flag's entry in --help (up to the next flag)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{flag} "))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip().startswith("--")), len(lines))
    return " ".join(" ".join(lines[start:end]).split())


def test_task_help_marks_the_defaults_the_task_replaced():
    dino = run("main.py", "--task", "dino", "--help")
    shared = run("main.py", "--help")
    assert dino.returncode == 0 and shared.returncode == 0
    # DINO's recipe: global crops 0.4-1 (shared: 0.08), stochastic depth 0.1 (shared: 0), 100 epochs (shared: 400).
    assert _help_entry(dino.stdout, "--aug.crop_scale_min").endswith(
        "[dino: replaces the shared default 0.08] (default: 0.4)")
    assert _help_entry(dino.stdout, "--backbone.drop_path_rate").endswith(
        "[dino: replaces the shared default 0.0] (default: 0.1)")
    assert _help_entry(dino.stdout, "--trainer.max_epochs").endswith(
        "[dino: replaces the shared default 400] (default: 100)")
    # a default DINO keeps, and the shared help, carry no mark
    assert "replaces" not in _help_entry(dino.stdout, "--barlow.lambd")
    assert "replaces the shared default" not in shared.stdout
    assert _help_entry(shared.stdout, "--aug.crop_scale_min").endswith("(default: 0.08)")
    for text in (dino.stdout, shared.stdout):
        assert "--print-config" in text and "--dry-run" in text and "python -m tools.list" in text


# --- tools.list -------------------------------------------------------------------------------------------------

def test_tools_list_names_every_component_with_a_description():
    result = run("-m", "tools.list")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for heading in ("tasks (--task NAME):", "backbones (--backbone.name NAME):",
                    "segmentation heads (--segmentation.head NAME", "datasets (--data.dataset NAME):",
                    "callbacks (--callbacks.NAME true|false"):
        assert heading in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    # The components the README documents, by hand; each row carries a description after its name.
    for name in ("barlow_twins", "dino", "segmentation", "vit", "resnet50", "pixels", "linear", "setr_naive",
                 "setr_pup", "setr_mla", "attn_fusion", "deeplabv3", "voc", "synthetic", "attention", "erf",
                 "cross_correlation", "teacher_entropy", "predictions", "emergence", "online_probe"):
        assert name in rows, f"{name} missing from python -m tools.list"
        assert len(rows[name].split(maxsplit=1)[1]) > 10, rows[name]
    assert "erf_log_scale" not in rows  # a setting of the erf callback, not a callback
    only = run("-m", "tools.list", "heads")
    assert only.returncode == 0 and "tasks (" not in only.stdout and "setr_naive" in only.stdout
    bad = run("-m", "tools.list", "models")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: unknown section 'models'; valid: tasks, backbones, heads, datasets, callbacks"


def test_tools_list_reads_the_registries():
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert tools.list.main([]) == 0
    listed = {line.split()[0] for line in buffer.getvalue().splitlines() if line.startswith("  ")}
    for registry in (TASKS, BACKBONES, HEADS, DATASETS):
        assert set(registry.names()) <= listed


# --- quiet logs -------------------------------------------------------------------------------------------------

def _run_to_file(cwd: Path, log: Path, flags: list[str]) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_SILENT", None)  # the tests' conftest silences wandb; a user's shell does not
    with log.open("w") as f:
        return subprocess.run([sys.executable, str(ROOT / "main.py"), *flags], cwd=cwd, env=env, stdout=f,
                              stderr=subprocess.STDOUT, timeout=600).returncode


def _quiet_flags(data_cache: Path, **extra) -> list[str]:
    flags = [f for f in tiny_args(data_cache, Path("runs"), "quiet", **extra)
             if not f.startswith(("--trainer.progress_bar", "--trainer.log_every_n_steps"))]
    return flags + ["--trainer.log_every_n_steps=50"]  # an epoch of 4 steps: Lightning's logging-interval notice


NOISE = ("\r", "\x1b[", "weights_only", "smaller than the logging interval", "exists and is not empty",
         "Run summary", "Run history", "Tracking run with wandb", "%|")


@pytest.mark.e2e
def test_a_run_written_to_a_file_is_quiet_and_verbose_brings_everything_back(data_cache, tmp_path):
    log = tmp_path / "log.txt"
    assert _run_to_file(tmp_path, log, _quiet_flags(data_cache, trainer__max_epochs=1)) == 0, log.read_text()
    # resumed for one more epoch: Lightning's resume notices (checkpoint loading, existing checkpoint folder)
    resumed = tmp_path / "resumed.txt"
    assert _run_to_file(tmp_path, resumed, ["--trainer.resume", "runs/quiet", "--trainer.max_epochs", "2"]) == 0, \
        resumed.read_text()
    for path in (log, resumed):
        text = path.read_bytes().decode()  # read_text() would turn the bars' \r into \n
        for noise in NOISE:
            assert noise not in text, f"{noise!r} in {path.name}:\n{text}"
        last = text.strip().splitlines()[-3:]
        # relative output directory, so every path of the last lines is relative, the same way
        assert last[0].startswith("best val/loss ") and ", checkpoint runs/quiet/checkpoints/best-e" in last[0], last
        assert last[1] == "run directory: runs/quiet"
        assert last[2] == "wandb: logged offline; upload with: wandb sync runs/quiet/wandb/offline-run-*"
        assert str(tmp_path) not in "\n".join(last)

    verbose = tmp_path / "verbose.txt"
    flags = ["--trainer.resume", "runs/quiet", "--trainer.max_epochs", "3", "--log.verbose", "true"]
    assert _run_to_file(tmp_path, verbose, flags) == 0, verbose.read_text()
    text = verbose.read_bytes().decode()
    for noise in ("\r", "%|", "smaller than the logging interval", "exists and is not empty", "Run summary"):
        assert noise in text, f"--log.verbose true: {noise!r} missing"


# --- Ctrl-C -----------------------------------------------------------------------------------------------------

FAILED_FIT_THEN_WAIT = """
import signal, sys, time
import pytorch_lightning as pl
from pytorch_lightning.demos.boring_classes import BoringModel
from callbacks.checkpointing import StopOnSignal

class Failing(BoringModel):
    def training_step(self, batch, batch_idx):
        raise RuntimeError("the step failed")

trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[StopOnSignal()])
try:
    trainer.fit(Failing())
except RuntimeError:
    pass
print("waiting", flush=True)
for _ in range(600):
    time.sleep(0.1)
print("still running after Ctrl-C", flush=True)
"""


@pytest.mark.e2e
def test_ctrl_c_interrupts_at_once_after_a_fit_that_failed():
    """Lightning's teardown of a failed fit puts back the handlers it found, StopOnSignal's SIGINT handler among
    them; that handler used to take the next Ctrl-C as "stop the run at the next step" with no run left."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", FAILED_FIT_THEN_WAIT], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "waiting", proc.stderr.read()
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "still running" not in out
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err


# --- the fast tier's reading of the tests (tests/conftest.py) ----------------------------------------------------

HELPERS_SOURCE = """
def build_flags():
    return ["--x"]

def train_it(flags):
    return main.main(flags)

def through_another(flags):
    return train_it(flags) + 1

def spawn(args):
    return subprocess.run([sys.executable, *args])

def harmless(values):
    return sorted(values)
"""


def test_the_fast_tier_reads_which_helpers_train_through_each_other(tmp_path):
    import importlib.util

    from tests.conftest import TRAINS, _training_helpers

    path = tmp_path / "helpers_module.py"
    path.write_text(HELPERS_SOURCE)
    spec = importlib.util.spec_from_file_location("helpers_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert _training_helpers(module) == {"train_it", "through_another", "spawn"}
    for trains in ("main.main(args)", "sweep.main([...])", "trainer.fit(model)", "Tuner(t).lr_find(m)", "tiny('x')",
                   "subprocess.run(cmd)", "[sys.executable, 'main.py']", "run_main(flags)"):
        assert TRAINS.search(trains), trains
    for unit in ("domain(x)", "fit_line(x)", "tiny_args(root, out)", "the tiny tensors", "main_loop()"):
        assert not TRAINS.search(unit), unit
