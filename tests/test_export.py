"""tools/export.py: a run's backbone as safetensors + JSON, loaded back in plain timm / torchvision (no code of
this project on the loading side) and compared with the features the backbone gives inside our modules."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision

import main
from config.loading import from_dict, parse_config, to_dict
from lightningmodules import TASKS
from tests.conftest import tiny_args
from tools import export

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
QUIET = {"callbacks__attention": "false", "callbacks__cross_correlation": "false", "callbacks__emergence": "false",
         "callbacks__teacher_entropy": "false", "trainer__max_epochs": 1, "trainer__limit_train_batches": 2,
         "trainer__limit_val_batches": 1}


@pytest.fixture(scope="module")
def runs(data_cache, tmp_path_factory) -> Path:
    """A Barlow Twins run and a DINO run of one short epoch each (real main.py, real checkpoints)."""
    out = tmp_path_factory.mktemp("export_runs")
    assert main.main(tiny_args(data_cache, out, "bt", **QUIET, backbone__global_pool="avg")) == 0
    assert main.main(tiny_args(data_cache, out, "dino", task="dino", dino__out_dim=64, dino__local_crops_number=2,
                               **QUIET)) == 0
    return out


def plain_timm(spec_file: Path) -> torch.nn.Module:
    """What a user outside this project writes: only timm, the JSON and the safetensors file."""
    spec = json.loads(spec_file.read_text())
    assert spec["library"] == "timm"
    weights = spec_file.with_name(spec["weights"])
    return timm.create_model(spec["model_name"], pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                             **spec["kwargs"]).eval()


def our_module(ckpt_path: Path):
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    module = TASKS.get(ckpt["hyper_parameters"]["config"]["task"]).module(ckpt["hyper_parameters"]["config"])
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


def images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def test_barlow_twins_backbone_loads_in_plain_timm_with_identical_features(runs):
    weights, spec_file = export.export(runs / "bt")
    assert weights == runs / "bt" / "export" / "last_backbone.safetensors" and weights.is_file()
    spec = json.loads(spec_file.read_text())
    assert spec["source"]["role"] == "backbone" and spec["source"]["global_step"] == 2
    vit = plain_timm(spec_file)
    module = our_module(runs / "bt" / "checkpoints" / "last.ckpt")
    x = images()
    with torch.no_grad():
        # bitwise: the same tensors through the same timm code
        assert torch.equal(vit.forward_features(x), module.backbone.vit.forward_features(x))
        # the pooled embedding: --backbone.global_pool avg is the mean patch token in both
        assert torch.equal(vit(x), module.backbone(x))
    assert sum(p.numel() for p in vit.parameters()) == sum(p.numel() for p in module.backbone.parameters())


def test_dino_exports_the_teacher_not_the_student(runs):
    weights, spec_file = export.export(runs / "dino" / "checkpoints" / "last.ckpt", out=runs / "dino_teacher")
    assert weights == runs / "dino_teacher.safetensors"
    assert json.loads(spec_file.read_text())["source"]["role"] == "teacher"
    vit = plain_timm(spec_file)
    module = our_module(runs / "dino" / "checkpoints" / "last.ckpt")
    x = images()
    with torch.no_grad():
        teacher = module.teacher_backbone.vit.forward_features(x)
        student = module.backbone.vit.forward_features(x)
        assert torch.equal(vit.forward_features(x), teacher)
        assert not torch.allclose(teacher, student)  # after 2 steps the EMA teacher differs from the student


def test_resnet50_exports_as_a_torchvision_state_dict(tmp_path):
    cfg = parse_config(["--backbone.name=resnet50", "--data.img_size=64", "--barlow.proj_dim=16",
                        "--barlow.proj_layers=1"])
    config = to_dict(cfg)
    module = TASKS.get("barlow_twins").module(config).eval()
    path = tmp_path / "resnet.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": config}, "global_step": 0,
                "epoch": 0}, path)
    weights, spec_file = export.export(path)
    spec = json.loads(spec_file.read_text())
    assert (spec["library"], spec["model_name"]) == ("torchvision", "resnet50")
    from safetensors.torch import load_file

    resnet = torchvision.models.resnet50()
    resnet.fc = torch.nn.Identity()
    resnet.load_state_dict(load_file(str(weights)))  # strict: every tensor, nothing extra
    resnet.eval()
    x = images(2, 64)
    with torch.no_grad():
        assert torch.equal(resnet(x), module.backbone(x))

    group = to_dict(parse_config(["--backbone.name=resnet50", "--backbone.resnet_norm=group"]))
    torch.save({"state_dict": {"backbone.model.conv1.weight": torch.zeros(1)}, "hyper_parameters": {"config": group}},
               tmp_path / "group.ckpt")
    with pytest.raises(export.ExportError, match="GroupNorm ResNet-50 .*--backbone.resnet_norm=group"):
        export.export(tmp_path / "group.ckpt")


def run_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.export", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "missing", "no such file or directory"),
    (lambda d: d, "holds no checkpoints/last.ckpt; it saved no checkpoint yet"),
    (lambda d: (d / "notes.yaml").write_text("a: 1\n") and d / "notes.yaml", "is not a readable checkpoint (not a PyTorch checkpoint archive)"),
    (lambda d: torch.save({"weights": torch.zeros(2)}, d / "plain.pt") or d / "plain.pt", "is not a checkpoint of this project"),
])
def test_bad_input_is_one_line(tmp_path, make, expected):
    result = run_export(str(make(tmp_path)))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


def test_raw_pixel_baseline_is_refused(tmp_path):
    config = to_dict(from_dict({"task": "segmentation", "backbone": {"name": "pixels", "patch_size": 8}}))
    torch.save({"state_dict": {}, "hyper_parameters": {"config": config}, "global_step": 0}, tmp_path / "p.ckpt")
    with pytest.raises(export.ExportError, match="raw-pixel baseline; it has no weights"):
        export.export(tmp_path / "p.ckpt")
