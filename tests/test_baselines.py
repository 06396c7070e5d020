"""--segmentation.baselines: references trained inside a segmentation run under the run's own protocol.

The reference for "random_init" is checked against an independent run: a separate segmentation run without
--backbone.weights (same seed, same config otherwise) must report, epoch by epoch, the val/mIoU the
reference reported inside the run with weights. And the references must not change the run itself."""
from __future__ import annotations

import contextlib
import csv
import io
import re
from pathlib import Path

import pytest
import timm
import torch

import main
from callbacks.baselines import parse_baselines, why_skipped
from config.loading import parse_config
from tests.conftest import tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")
SEG = {"task": "segmentation", "log__wandb_mode": "disabled", "trainer__max_epochs": 2, "callbacks__attention": "false",
       "callbacks__predictions": "false", "segmentation__head": "setr_naive", "segmentation__hidden_dim": 16,
       "trainer__limit_train_batches": 2}


def columns(run: Path) -> dict[str, list[tuple[int, str]]]:
    with (run / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [(int(r["step"]), r[k]) for r in rows if r.get(k)] for k in rows[0]}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A 'pretrained' ViT of the tiny architecture: timm weights from another seed, as a plain state dict."""
    torch.manual_seed(1234)
    vit = timm.create_model("vit_small_patch16_224", num_classes=0, img_size=32, depth=2, embed_dim=32, num_heads=2,
                            patch_size=8)
    path = tmp_path_factory.mktemp("weights") / "vit.pth"
    torch.save(vit.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def seg_runs(data_cache, weights_file, tmp_path_factory) -> dict[str, Path]:
    """Three real segmentation runs: with the references, the same without them, and a random-init run. The
    printed output of each is kept in runs["<name>.out"]."""
    out = tmp_path_factory.mktemp("baseline_runs")
    runs = {}
    for name, extra in {
        "with": {"backbone__weights": str(weights_file), "segmentation__baselines": "random_init,pixels"},
        "without": {"backbone__weights": str(weights_file)},
        "random": {},
    }.items():
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main.main(tiny_args(data_cache, out, name, **SEG, **extra)) == 0
        runs[name] = out / name
        runs[f"{name}.out"] = printed.getvalue()
    return runs


def test_random_init_reference_reports_what_a_separate_random_init_run_reports(seg_runs):
    inside = columns(seg_runs["with"])["val/mIoU_random_init"]
    separate = columns(seg_runs["random"])["val/mIoU"]
    assert [s for s, _ in inside] == [s for s, _ in separate] and len(inside) == 2
    for (_, a), (_, b) in zip(inside, separate):
        assert float(a) == pytest.approx(float(b), abs=1e-6)
    assert "val/mIoU_pixels" in columns(seg_runs["with"])


def test_references_do_not_change_the_run(seg_runs):
    with_refs, without = columns(seg_runs["with"]), columns(seg_runs["without"])
    for name in ("train/loss_step", "val/loss", "val/mIoU", "train/mIoU"):
        assert with_refs[name] == without[name], name


def test_final_line_prints_the_best_reference_beside_the_result(seg_runs):
    line = next(line for line in seg_runs["with.out"].splitlines() if line.startswith("best val/mIoU"))
    match = re.fullmatch(r"best val/mIoU (\d\.\d{4}) at epoch (\d+) \(random-init backbone, same probe: (\d\.\d{4}); "
                         r"raw pixels: (\d\.\d{4})\), checkpoint .*best-e\d{3}-s\d+\.ckpt", line)
    assert match, line
    table = columns(seg_runs["with"])
    for group, name in ((3, "val/mIoU_random_init"), (4, "val/mIoU_pixels")):
        assert float(match.group(group)) == pytest.approx(max(float(v) for _, v in table[name]), abs=5e-5)
    assert "time/baselines_s" in table
    # without references the line is the plain one
    plain = next(line for line in seg_runs["without.out"].splitlines() if line.startswith("best val/mIoU"))
    assert re.fullmatch(r"best val/mIoU \d\.\d{4} at epoch \d+, checkpoint .*", plain), plain


def test_parse_and_skip_rules():
    assert parse_baselines(" random_init, pixels,random_init ") == ["random_init", "pixels"]
    with pytest.raises(ValueError, match=r"--segmentation.baselines: unknown baseline 'imagenet' \(valid: random_init, pixels"):
        parse_baselines("imagenet")
    random_run = parse_config(["--task=segmentation", "--backbone.name=vit"])
    assert "its own random-init reference" in why_skipped(random_run, "random_init")
    assert why_skipped(random_run, "pixels") is None
    resnet = parse_config(["--task=segmentation", "--backbone.name=resnet50", "--segmentation.head=deeplabv3"])
    assert "not a ViT" in why_skipped(resnet, "pixels")


def test_unknown_baseline_is_one_line_before_any_work(tmp_path, capsys):
    code = main.main(["--task=segmentation", "--segmentation.baselines=imagenet", f"--log.output_dir={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --segmentation.baselines: unknown baseline 'imagenet'"), err
    assert not any(tmp_path.iterdir())
