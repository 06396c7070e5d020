"""Config: defaults, YAML, command-line precedence, --help, and every validation error."""
from __future__ import annotations

import ast
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from config.hparams import Hparams
from config.loading import ConfigError, build_parser, parse_config, save_config, to_dict
from config.validation import validate

ROOT = Path(__file__).resolve().parent.parent


def write_yaml(tmp_path: Path, data: dict, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_are_the_reports_setup():
    cfg = parse_config([])
    assert cfg == Hparams()
    assert cfg.task == "barlow_twins" and cfg.trainer.max_epochs == 400
    assert cfg.barlow.proj_dim == 512 and cfg.barlow.proj_layers == 3 and cfg.barlow.lambd == 0.0051
    assert cfg.optim.name == "adamw" and cfg.data.img_size == 224


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    path = write_yaml(tmp_path, {"backbone": {"depth": 6, "embed_dim": 192}, "optim": {"lr": 0.01}, "seed": 3})
    cfg = parse_config(["--config", path, "--backbone.depth=8", "--barlow.proj_dim=1024"])
    assert cfg.backbone.depth == 8  # flag beats YAML
    assert cfg.backbone.embed_dim == 192  # YAML beats default
    assert cfg.optim.lr == 0.01 and cfg.seed == 3
    assert cfg.barlow.proj_dim == 1024
    assert cfg.barlow.lambd == Hparams().barlow.lambd  # untouched default


def test_later_yaml_wins(tmp_path):
    a = write_yaml(tmp_path, {"data": {"batch_size": 16, "img_size": 96}}, "a.yaml")
    b = write_yaml(tmp_path, {"data": {"batch_size": 32}}, "b.yaml")
    cfg = parse_config([f"--config={a}", "--config", b])
    assert (cfg.data.batch_size, cfg.data.img_size) == (32, 96)


def test_sweep_style_flags_parse():
    # wandb sweeps pass every parameter as --name=value
    cfg = parse_config(["--task=barlow_twins", "--backbone.depth=6", "--barlow.proj_dim=1024", "--optim.lr=3e-4",
                        "--data.download=false", "--log.wandb_mode=disabled", "--data.pretrain_images=train+val"])
    assert cfg.backbone.depth == 6 and cfg.barlow.proj_dim == 1024 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.download is False and cfg.data.pretrain_images == "train+val"


def test_every_sweepable_field_is_a_scalar():
    def walk(obj):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from walk(value)
            else:
                yield f.name, value

    for name, value in walk(Hparams()):
        assert isinstance(value, (int, float, str, bool)), name


def field_docstrings() -> dict[str, tuple[str, object]]:
    """``--group.field`` → (docstring, default), read from config/hparams.py's source with ``ast`` (not
    through simple-parsing, which builds the help text)."""
    tree = ast.parse((ROOT / "config" / "hparams.py").read_text())
    docs: dict[str, dict[str, str]] = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = cls.body
        docs[cls.name] = {
            node.target.id: body[i + 1].value.value
            for i, node in enumerate(body[:-1])
            if isinstance(node, ast.AnnAssign) and isinstance(body[i + 1], ast.Expr)
            and isinstance(body[i + 1].value, ast.Constant) and isinstance(body[i + 1].value.value, str)
        }
    out = {}
    cfg = Hparams()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                out[f"--{f.name}.{g.name}"] = (docs[type(value).__name__][g.name], getattr(value, g.name))
        else:
            out[f"--{f.name}"] = (docs["Hparams"][f.name], value)
    return out


def help_entries(text: str) -> dict[str, str]:
    """Flag → its help entry (the lines from the flag to the next flag or section)."""
    entries, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^  (--[\w.]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif line.startswith("    ") and current:
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def shown(value: object) -> str:
    return {True: "true", False: "false", "": "empty"}.get(value, str(value)) if isinstance(value, (bool, str)) else str(value)


def test_help_lists_every_field_with_its_docstring_and_default(capsys):
    with pytest.raises(SystemExit) as info:  # simple-parsing adds the dataclass flags while parsing
        build_parser().parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    entries = help_entries(text)
    squeeze = lambda t: re.sub(r"\s+", "", t)  # noqa: E731  (argparse re-wraps, also after hyphens)
    expected = field_docstrings()
    assert len(expected) > 100
    for flag, (doc, default) in expected.items():
        assert flag in entries, flag
        assert squeeze(doc) in squeeze(entries[flag]), flag
        assert squeeze(f"(default: {shown(default)})") in squeeze(entries[flag]), (flag, entries[flag])
    assert "--config" in entries


def test_help_is_grouped_without_internal_names(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith("usage: main.py") and lines[1] == ""  # a one-line usage, not every flag
    assert "Hparams" not in text and "['hp" not in text and "Config [" not in text
    sections = [line[:-1] for line in lines if re.fullmatch(r"[a-z]+:", line)]
    groups = [f.name for f in dataclasses.fields(Hparams) if dataclasses.is_dataclass(getattr(Hparams(), f.name))]
    assert sections == ["options", "general", *groups]
    # every flag sits in the section of its group
    section = None
    for line in lines:
        if re.fullmatch(r"[a-z]+:", line):
            section = line[:-1]
        match = re.match(r"^  --(\w+)\.", line)
        if match:
            assert match.group(1) == section, line
    assert "--data.nodownload" not in text and "(default: False)" not in text


def test_boolean_no_flag_still_parses():
    assert parse_config(["--data.pin_memory=true", "--data.nopin_memory"]).data.pin_memory is False


def test_help_defaults_follow_the_config_file(tmp_path):
    path = write_yaml(tmp_path, {"backbone": {"depth": 7}})
    out = subprocess.run([sys.executable, "main.py", "--config", path, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0
    assert "(default: 7)" in help_entries(out.stdout)["--backbone.depth"]


def test_main_help_exits_zero():
    out = subprocess.run([sys.executable, "main.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "--barlow.proj_dim" in out.stdout and "--trainer.resume" in out.stdout


def test_saved_config_round_trips(tmp_path):
    cfg = parse_config(["--backbone.depth=5", "--optim.lr=0.123", "--log.wandb_tags=a,b"])
    save_config(cfg, tmp_path / "config.yaml")
    again = parse_config(["--config", str(tmp_path / "config.yaml")])
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == to_dict(cfg)


# ---------------------------------------------------------------- validation errors
SYN = ["--data.dataset=synthetic", "--data.root=/tmp/vitssl-unused"]  # no data needed for these checks

INVALID = [
    (["--data.img_size=100"] + SYN, "--data.img_size=100 is not a multiple of the patch size 16"),
    (["--backbone.embed_dim=100", "--backbone.num_heads=6"] + SYN, "--backbone.embed_dim=100 is not divisible by --backbone.num_heads=6"),
    (["--backbone.name=vit_tiny_nonexistent"] + SYN, "--backbone.name: unknown backbone 'vit_tiny_nonexistent'; valid: pixels, resnet50, vit"),
    (["--task=classification"] + SYN, "--task: unknown task 'classification'; valid: barlow_twins"),
    (["--data.dataset=cityscapes"], "--data.dataset: unknown dataset 'cityscapes'; valid: folder, imagenet, synthetic, voc"),
    (["--optim.lr=0"] + SYN, "--optim.lr must be > 0, got 0.0"),
    (["--optim.lr=-1e-3"] + SYN, "--optim.lr must be > 0"),
    (["--trainer.max_epochs=0"] + SYN, "--trainer.max_epochs must be > 0, got 0"),
    (["--data.batch_size=0"] + SYN, "--data.batch_size must be > 0, got 0"),
    (["--barlow.proj_dim=0"] + SYN, "--barlow.proj_dim must be > 0, got 0"),
    (["--barlow.proj_layers=-2"] + SYN, "--barlow.proj_layers must be > 0, got -2"),
    (["--data.root=/definitely/not/here"], "--data.root: '/definitely/not/here' does not exist"),
    (["--backbone.weights=/no/such/file.pth"] + SYN, "--backbone.weights: file '/no/such/file.pth' does not exist"),
    (["--trainer.resume=/no/such/last.ckpt"] + SYN, "--trainer.resume: checkpoint '/no/such/last.ckpt' does not exist"),
    (["--backbone.name=resnet50", "--backbone.depth=6"] + SYN, "--backbone.depth applies to ViT backbones only"),
    (["--backbone.name=vit", "--backbone.pretrained=true"] + SYN, "--backbone.pretrained needs a named model"),
    (["--aug.hflip_prob=1.5"] + SYN, "--aug.hflip_prob must be a probability in [0, 1]"),
    (["--backbone.patch_size=8", "--data.img_size=60"] + SYN, "--data.img_size=60 is not a multiple of the patch size 8"),
]


@pytest.mark.parametrize("argv, message", INVALID, ids=[m.split()[0] for _, m in INVALID])
def test_invalid_values_name_the_field(argv, message):
    with pytest.raises(ConfigError) as info:
        validate(parse_config(argv))
    assert message in str(info.value)


def test_unknown_yaml_key_is_an_error(tmp_path):
    path = write_yaml(tmp_path, {"backbone": {"detph": 6}})
    with pytest.raises(ConfigError, match=r"unknown key 'backbone.detph'; valid keys here: backbone.name, backbone.depth"):
        parse_config(["--config", path])


def test_unknown_yaml_group_and_wrong_shape_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'optimizer'"):
        parse_config(["--config", write_yaml(tmp_path, {"optimizer": {"lr": 1}}, "a.yaml")])
    with pytest.raises(ConfigError, match="backbone must be a mapping"):
        parse_config(["--config", write_yaml(tmp_path, {"backbone": 5}, "b.yaml")])


def test_wrongly_typed_yaml_value_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="backbone.depth: expected an integer, got 'six'"):
        parse_config(["--config", write_yaml(tmp_path, {"backbone": {"depth": "six"}})])
    with pytest.raises(ConfigError, match="log.wandb_mode: 'sometimes' is not one of online, offline, disabled"):
        parse_config(["--config", write_yaml(tmp_path, {"log": {"wandb_mode": "sometimes"}}, "d.yaml")])


def test_missing_config_file_is_an_error():
    with pytest.raises(ConfigError, match="--config: file '/no/such.yaml' does not exist"):
        parse_config(["--config", "/no/such.yaml"])


def test_bad_flag_value_is_one_line_error():
    with pytest.raises(ConfigError, match="--backbone.depth"):
        parse_config(["--backbone.depth=six"])


@pytest.mark.parametrize("argv, message", [
    (["--backbone.embed_dim=100", "--backbone.num_heads=6"], "not divisible by --backbone.num_heads=6"),
    (["--data.root=/definitely/not/here"], "--data.root"),
    (["--optim.lr=abc"], "--optim.lr"),
    (["--backbone.name=vit_huge_typo"], "unknown backbone 'vit_huge_typo'"),
])
def test_cli_errors_exit_2_with_one_line_and_no_traceback(argv, message):
    out = subprocess.run([sys.executable, "main.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], out.stderr


# ---------------------------------------------------------------- fast config errors, devices
HEAVY = ("torch", "timm", "pytorch_lightning", "torchvision")


@pytest.mark.parametrize("argv, message", [
    (["--backbone.embed_dim", "100", "--backbone.num_heads", "6"], "--backbone.embed_dim=100 is not divisible by --backbone.num_heads=6"),
    (["--optim.lr", "-1"], "--optim.lr must be > 0, got -1.0"),
    (["--backbone.patch_size=8", "--data.img_size=60"], "--data.img_size=60 is not a multiple of the patch size 8"),
    (["--trainer.accelerator=tpu"], "--trainer.accelerator: 'tpu' is not one of"),
])
def test_value_errors_are_reported_before_torch_timm_or_lightning_is_imported(argv, message):
    # The same main() as the command line, in a fresh interpreter: exit status 2, the one-line message,
    # and none of the heavy packages imported (which is what made these errors take seconds).
    code = ("import sys, main; rc = main.main(sys.argv[1:]); "
            f"print(rc, [m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split("\n")[0] == "2 []", out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr


def test_first_pass_of_a_valid_config_imports_nothing_heavy():
    code = ("import sys; from config.loading import parse_config; from config.validation import validate_values; "
            "validate_values(parse_config(['--config', 'config/quickstart.yaml'])); "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_architecture_of_a_named_model_is_checked_in_the_second_pass():
    # num_heads alone: divisibility needs the named model's width (ViT-S: 384), known only to timm.
    cfg = parse_config(["--backbone.num_heads=5"] + SYN)
    from config.validation import validate_values

    validate_values(cfg)  # nothing to say without timm
    with pytest.raises(ConfigError, match=r"--backbone.embed_dim=384 is not divisible by --backbone.num_heads=5"):
        validate(cfg)


@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_gpu_accelerator_without_a_gpu_is_a_config_error(accelerator, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=rf"--trainer.accelerator={accelerator}: no CUDA GPU is visible here"):
        validate(parse_config([f"--trainer.accelerator={accelerator}"] + SYN))


@pytest.mark.parametrize("accelerator", ["gpu", "auto"])
def test_more_devices_than_visible_gpus_is_a_config_error(accelerator, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    validate(parse_config([f"--trainer.accelerator={accelerator}", "--trainer.devices=2"] + SYN))  # fits
    with pytest.raises(ConfigError, match=r"--trainer.devices=4: only 2 CUDA GPU\(s\) visible"):
        validate(parse_config([f"--trainer.accelerator={accelerator}", "--trainer.devices=4"] + SYN))


def test_cpu_processes_need_no_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    validate(parse_config(["--trainer.devices=4", "--trainer.strategy=ddp_spawn"] + SYN))  # 4 CPU processes
    validate(parse_config(["--trainer.accelerator=cpu", "--trainer.devices=4"] + SYN))


def test_gpu_accelerator_on_a_machine_without_gpu_exits_2_with_one_line():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU whatever the machine
    out = subprocess.run([sys.executable, "main.py", "--trainer.accelerator", "gpu", *SYN], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --trainer.accelerator=gpu: no CUDA GPU is visible here (torch.cuda.is_available() is "
                      "False); use auto (a GPU when there is one) or cpu"], out.stderr
