"""A user's situation (a damaged weight file, no network) ends in one line naming the flag and the file or
URL, exit status 1, and no traceback; the offline alternatives the messages name really work.

The CLI cases run ``python main.py`` in subprocesses, all started at once (they spend their time importing).
No test reaches the network on any machine: the subprocesses get ``https_proxy=http://127.0.0.1:9`` (a
closed local port, which every download library honours) and empty Hugging Face / torch.hub caches.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import main
from config.hparams import BackboneConfig
from config.loading import parse_config
from datamodules.images import DataError
from models.backbones import build_backbone
from models.segmenters import build_segmenter
from models.weights import WeightLoadingError, timm_published_weights, torch_hub_file
from tests.conftest import tiny_args
from utils.downloads import connection_problem, one_line, proxy_for

ROOT = Path(__file__).resolve().parents[1]
CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens there: a connection is refused at once
LOG_RECORD = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
NO_ARCH = {"backbone__depth": 0, "backbone__embed_dim": 0, "backbone__num_heads": 0, "backbone__patch_size": 0}
SEG = {"task": "segmentation", "segmentation__hidden_dim": 16, "data__batch_size": 4}
TINY_VIT = {"name": "vit", "depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8}


def offline_env(home: Path) -> dict[str, str]:
    """The environment of a machine without network and with empty download caches."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy", "hf_hub_offline", "transformers_offline")}
    env.update({"https_proxy": CLOSED_PORT, "http_proxy": CLOSED_PORT, "HTTPS_PROXY": CLOSED_PORT,
                "HTTP_PROXY": CLOSED_PORT, "HF_HOME": str(home / "hf"), "TORCH_HOME": str(home / "torch")})
    return env


@contextlib.contextmanager
def no_network(monkeypatch, tmp_path: Path):
    """The same, in this process: downloads go to the closed port, torch.hub's cache is empty."""
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.setenv(name, CLOSED_PORT)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    yield


# ------------------------------------------------------------------------------- files the cases use
def tiny_vit_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(**TINY_VIT), 32).vit.state_dict()


def random_state(make) -> dict[str, torch.Tensor]:
    """Random tensors shaped like the state dict of the model ``make()`` builds (on the meta device: no init)."""
    with torch.device("meta"):
        shapes = make().state_dict()
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in shapes.items()}


def first_half(path: Path, out: Path) -> Path:
    data = path.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    return out


def damaged_files(folder: Path, state: dict[str, torch.Tensor]) -> dict[str, tuple[Path, str]]:
    """name → (file, what the message must say about it): garbage, empty, truncated in every format, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "real.pth")
    torch.save({"state_dict": state, "epoch": 0, "global_step": 1}, folder / "real.ckpt")  # Lightning's layout
    save_file(state, str(folder / "real.safetensors"))
    torch.save(state, folder / "legacy.pth", _use_new_zipfile_serialization=False)
    (folder / "garbage.pth").write_bytes(hashlib.sha512(b"noise").digest() * 40)
    (folder / "empty.ckpt").write_bytes(b"")
    (folder / "page.safetensors").write_text("<!DOCTYPE html>\n<html><body>404</body></html>\n")
    (folder / "lfs.pth").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    torch.save({"args": argparse.Namespace(lr=0.1), "model": state}, folder / "with_args.pth")
    torch.save({"epoch": 3, "note": "no tensors"}, folder / "no_tensors.pt")
    return {
        "garbage": (folder / "garbage.pth", "is not a weight file"),
        "empty": (folder / "empty.ckpt", "is empty (0 bytes)"),
        "half_ckpt": (first_half(folder / "real.ckpt", folder / "half.ckpt"), "the file is truncated"),
        "half_pth": (first_half(folder / "real.pth", folder / "half.pth"), "the file is truncated"),
        "half_safetensors": (first_half(folder / "real.safetensors", folder / "half.safetensors"),
                             "the file is truncated"),
        "half_legacy": (first_half(folder / "legacy.pth", folder / "half_legacy.pth"), "the file is truncated"),
        "html_page": (folder / "page.safetensors", "text file starting with '<!DOCTYPE html>"),
        "git_lfs_pointer": (folder / "lfs.pth", "Git LFS pointer"),
        "python_objects": (folder / "with_args.pth", "refuses it (Unsupported global: GLOBAL argparse.Namespace)"),
        "no_tensors": (folder / "no_tensors.pt", "its entry 'epoch' is of type int"),
    }


# ---------------------------------------------------------------------------- the CLI, in subprocesses
def cli_cases(data: Path, work: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    files = damaged_files(work / "files", tiny_vit_state())
    args = lambda name, **o: tiny_args(data, work / "runs", name, log__wandb_mode="disabled", **o)  # noqa: E731
    home = work / "home"
    return {
        "garbage_backbone_weights": (args("g", backbone__weights=files["garbage"][0]), offline_env(home)),
        "truncated_head_weights_eval_only": (
            args("h", **SEG, trainer__eval_only="true", segmentation__head_weights=files["half_ckpt"][0]),
            offline_env(home)),
        "dino_from_the_hub": (
            args("d", backbone__name="vit_small_patch16_224.dino", backbone__pretrained="true", **NO_ARCH),
            offline_env(home)),
        "deeplabv3_pretrained_head": (
            args("p", **SEG, backbone__name="resnet50", segmentation__head="deeplabv3",
                 segmentation__pretrained_head="true", **NO_ARCH), offline_env(home)),
        "voc_download": (
            args("v", data__dataset="voc", data__root=work / "voc", data__download="true"), offline_env(home)),
    }


@pytest.fixture(scope="module")
def cli(data_cache, tmp_path_factory):
    """name → CompletedProcess of every CLI case, all started together."""
    cases = cli_cases(data_cache, tmp_path_factory.mktemp("user_errors"))
    procs = {name: subprocess.Popen([sys.executable, "main.py", *argv], cwd=ROOT, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (argv, env) in cases.items()}
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def error_line(result: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a failed run; everything else on stderr must be log records."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Retrying" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    assert all(LOG_RECORD.match(line) for line in lines[:-1]), result.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("case, expected", [
    ("garbage_backbone_weights", ["--backbone.weights:", "garbage.pth is not a weight file"]),
    ("truncated_head_weights_eval_only", ["--segmentation.head_weights:", "half.ckpt", "the file is truncated"]),
    ("dino_from_the_hub", ["--backbone.pretrained:", "vit_small_patch16_224.dino",
                           "https://huggingface.co/timm/vit_small_patch16_224.dino/resolve/main/model.safetensors",
                           "cannot connect to 127.0.0.1:9 (the proxy set for huggingface.co)",
                           "offline: download that file elsewhere and pass --backbone.weights PATH"]),
    ("deeplabv3_pretrained_head", ["--segmentation.pretrained_head:", "deeplabv3_resnet50_coco-cd0a2569.pth",
                                   "127.0.0.1:9", "--segmentation.head_weights PATH and --backbone.weights PATH"]),
    ("voc_download", ["--data.download:", "https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                      "127.0.0.1:9", "VOCdevkit/VOC2012", "VOCtrainval_11-May-2012.tar into"]),
])
def test_cli_prints_one_line_naming_the_flag_and_the_file(cli, case, expected):
    line = error_line(cli[case])
    missing = [text for text in expected if text not in line]
    assert not missing, f"{missing} not in {line!r}"


# --------------------------------------------------------------------------------- damaged weight files
@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    return damaged_files(tmp_path_factory.mktemp("damaged"), tiny_vit_state())


def head_cfg(data_cache, tmp_path, **overrides):
    return parse_config(tiny_args(data_cache, tmp_path / "runs", "h", **{**SEG, **overrides}))


@pytest.mark.parametrize("name", ["garbage", "empty", "half_ckpt", "half_pth", "half_safetensors", "half_legacy",
                                  "html_page", "git_lfs_pointer", "python_objects", "no_tensors"])
@pytest.mark.parametrize("flag", ["--backbone.weights", "--segmentation.head_weights"])
def test_damaged_weight_file_is_one_line_naming_flag_file_and_damage(damaged, data_cache, tmp_path, flag, name):
    path, says = damaged[name]
    with pytest.raises(WeightLoadingError) as info:
        if flag == "--backbone.weights":
            build_backbone(BackboneConfig(**TINY_VIT, weights=str(path)), 32)
        else:
            build_segmenter(head_cfg(data_cache, tmp_path, segmentation__head_weights=path))
    message = str(info.value)
    assert "\n" not in message and main._one_line(info.value) == message  # the CLI prints it whole
    assert message.startswith(f"{flag}: ") and str(path) in message and says in message, message


def test_real_files_of_every_format_load(damaged):
    # The same files, whole: the damage above is what the messages say, not the format.
    folder = damaged["garbage"][0].parent
    reference = tiny_vit_state()
    for name in ("real.pth", "real.ckpt", "real.safetensors", "legacy.pth"):
        torch.manual_seed(1)  # another init: only loading can make them equal
        vit = build_backbone(BackboneConfig(**TINY_VIT, weights=str(folder / name), strict_weights=True), 32).vit
        assert all(torch.equal(vit.state_dict()[k], reference[k]) for k in reference), name


def test_head_weights_log_names_their_own_flag(data_cache, tmp_path, caplog):
    """--segmentation.head_weights used to log 'backbone.weights: loaded 8 tensors'."""
    torch.manual_seed(0)
    head = build_segmenter(head_cfg(data_cache, tmp_path)).head.state_dict()
    path = tmp_path / "best.ckpt"
    torch.save({"state_dict": {f"model.head.{k}": v for k, v in head.items()}}, path)
    with caplog.at_level(logging.INFO, logger="models.weights"):
        torch.manual_seed(1)
        loaded = build_segmenter(head_cfg(data_cache, tmp_path, segmentation__head_weights=path)).head.state_dict()
    assert all(torch.equal(loaded[k], head[k]) for k in head)
    lines = [r.getMessage() for r in caplog.records if r.name == "models.weights"]
    assert f"--segmentation.head_weights: loaded {len(head)} tensors from {path}" in lines
    assert not [line for line in lines if "backbone" in line], lines


def test_head_weights_of_another_architecture_name_the_head_options(data_cache, tmp_path):
    head = build_segmenter(head_cfg(data_cache, tmp_path)).head.state_dict()
    path = tmp_path / "head.pt"
    torch.save({f"head.{k}": v for k, v in head.items()}, path)
    with pytest.raises(WeightLoadingError) as info:
        build_segmenter(head_cfg(data_cache, tmp_path, segmentation__head_weights=path, segmentation__hidden_dim=8))
    message = str(info.value)
    assert message.startswith("--segmentation.head_weights: ") and "but the segmentation head expects" in message
    assert "--segmentation.head / hidden_dim" in message and "\n" not in message


# ------------------------------------------------------------------------------------ published weights
def test_torchvision_weights_without_network(monkeypatch, tmp_path):
    with no_network(monkeypatch, tmp_path), pytest.raises(WeightLoadingError) as info:
        build_backbone(BackboneConfig(name="resnet50", pretrained=True), 32)
    message = str(info.value)
    assert message.startswith("--backbone.pretrained: cannot download torchvision's ImageNet ResNet-50 weights from "
                              "https://download.pytorch.org/models/resnet50-0676ba61.pth: cannot connect to 127.0.0.1:9")
    assert "pass --backbone.weights PATH" in message and "\n" not in message
    assert f"copy it to {tmp_path / 'torch' / 'hub' / 'checkpoints' / 'resnet50-0676ba61.pth'}" in message


def test_damaged_cached_download_is_named_with_the_way_out(monkeypatch, tmp_path):
    from torchvision.models import ResNet50_Weights

    with no_network(monkeypatch, tmp_path):
        cached = torch_hub_file(ResNet50_Weights.IMAGENET1K_V1.url)
        assert str(cached).startswith(str(tmp_path / "torch"))
        cached.parent.mkdir(parents=True)
        torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "whole.pth")
        first_half(tmp_path / "whole.pth", cached)
        with pytest.raises(WeightLoadingError) as info:
            build_backbone(BackboneConfig(name="resnet50", pretrained=True), 32)
    message = str(info.value)
    assert message.startswith("--backbone.pretrained: ") and str(cached) in message
    assert "the file is truncated" in message and "delete it to download again" in message


def test_hub_weights_in_the_cache_load_without_network(monkeypatch, tmp_path):
    """A ViT whose published weights are in the Hugging Face cache loads them with no network (timm's URL
    file for this model is a .npz with a custom loader: the hub's safetensors file must not go to it)."""
    import timm
    from huggingface_hub import constants

    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    source = random_state(lambda: timm.create_model(name, pretrained=False, num_classes=0))
    snapshot = tmp_path / "hub" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file(source, str(snapshot / "model.safetensors"))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with no_network(monkeypatch, tmp_path):
        torch.manual_seed(4)
        vit = build_backbone(BackboneConfig(name=name, pretrained=True), 224).vit
    assert all(torch.equal(vit.state_dict()[k], source[k]) for k in source)
    # Without the file: one line, at once, under HF_HUB_OFFLINE as without it.
    (snapshot / "model.safetensors").unlink()
    for hf_hub_offline, says in ((True, "HF_HUB_OFFLINE is set"), (False, "cannot connect to 127.0.0.1:9")):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", hf_hub_offline)
        with no_network(monkeypatch, tmp_path), pytest.raises(WeightLoadingError, match=re.escape(says)):
            with timm_published_weights(name):
                pass


def test_a_vit_without_published_weights_is_named():
    with pytest.raises(WeightLoadingError, match=r"^--backbone.pretrained: timm publishes no weights for "
                                                 r"vit_base_patch16_18x2_224; .*list_models"):
        with timm_published_weights("vit_base_patch16_18x2_224"):
            pass


def test_deeplabv3_pretrained_head_equals_its_offline_alternative(monkeypatch, tmp_path, data_cache):
    """--segmentation.pretrained_head reads torchvision's file from torch.hub's cache with no network, and the
    same file given as --segmentation.head_weights and --backbone.weights builds the same model."""
    from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights, deeplabv3_resnet50

    with no_network(monkeypatch, tmp_path):
        cached = torch_hub_file(DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1.url)
        cached.parent.mkdir(parents=True)
        coco = random_state(lambda: deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21,
                                                       aux_loss=True))
        torch.save(coco, cached)
        deeplab = {**NO_ARCH, "backbone__name": "resnet50", "segmentation__head": "deeplabv3",
                   "backbone__strict_weights": "true", "segmentation__aux_loss": "true"}
        hub = build_segmenter(head_cfg(data_cache, tmp_path, **deeplab, segmentation__pretrained_head="true"))
        assert set(hub.state_dict()) == set(coco)
        assert all(torch.equal(v, coco[k]) for k, v in hub.state_dict().items() if "num_batches_tracked" not in k)
        local = build_segmenter(head_cfg(data_cache, tmp_path, **deeplab, segmentation__head_weights=cached,
                                         backbone__weights=cached))
        assert all(torch.equal(v, coco[k]) for k, v in local.state_dict().items() if "num_batches_tracked" not in k)
        # Without the auxiliary head (strict): the file's aux_classifier.* is left out, as pretrained_head does.
        no_aux = build_segmenter(head_cfg(data_cache, tmp_path, **{**deeplab, "segmentation__aux_loss": "false"},
                                          segmentation__head_weights=cached, backbone__weights=cached))
        assert no_aux.aux_classifier is None
        assert torch.equal(no_aux.classifier[4].weight, coco["classifier.4.weight"])


# ------------------------------------------------------------------------------------------- VOC download
def test_damaged_voc_archive_is_named(monkeypatch, tmp_path):
    from datamodules.voc import VOCSource

    root = tmp_path / "voc"
    root.mkdir()
    (root / "VOCtrainval_11-May-2012.tar").write_bytes(b"half a download")
    cfg = parse_config(["--data.dataset=voc", f"--data.root={root}", "--data.download=true"]).data
    with no_network(monkeypatch, tmp_path), pytest.raises(DataError) as info:
        VOCSource.prepare(cfg)
    message = str(info.value)
    assert message.startswith("--data.download: ") and "\n" not in message
    assert f"{root / 'VOCtrainval_11-May-2012.tar'} is incomplete or damaged" in message
    assert "cannot connect to 127.0.0.1:9" in message


def test_voc_archive_in_the_root_is_extracted_without_network(monkeypatch, tmp_path, voc_root):
    """The offline alternative of --data.download: the archive put into --data.root (here a tiny one in
    VOC's layout, its MD5 standing in for the real archive's) is checked and extracted by torchvision."""
    from torchvision.datasets.voc import DATASET_YEAR_DICT

    from datamodules.voc import VOCSource, is_voc_root, read_split

    root = tmp_path / "voc"
    root.mkdir()
    archive = root / DATASET_YEAR_DICT["2012"]["filename"]
    with tarfile.open(archive, "w") as tar:
        tar.add(voc_root / "VOCdevkit", arcname="VOCdevkit")
    monkeypatch.setitem(DATASET_YEAR_DICT["2012"], "md5", hashlib.md5(archive.read_bytes()).hexdigest())
    cfg = parse_config(["--data.dataset=voc", f"--data.root={root}", "--data.download=true"]).data
    with no_network(monkeypatch, tmp_path):
        assert VOCSource.prepare(cfg) == root
    assert is_voc_root(root) and read_split(root, "train") == read_split(voc_root, "train")


# ------------------------------------------------------------------------------------------- the probe
def test_probe_honours_the_proxy_settings(monkeypatch):
    for name in ("all_proxy", "ALL_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("no_proxy", "internal.example")
    monkeypatch.setenv("NO_PROXY", "internal.example")
    assert proxy_for("https://huggingface.co/x") == "http://proxy.example:3128"
    assert proxy_for("https://internal.example/x") is None
    assert connection_problem("http://127.0.0.1:9/x") == "cannot connect to 127.0.0.1:9: Connection refused"


def test_one_line():
    assert one_line(RuntimeError("first\n\n  second\tthird ")) == "first second third"
    assert one_line(EOFError()) == "EOFError"
    assert one_line("x" * 500, limit=10) == "x" * 9 + "…"
