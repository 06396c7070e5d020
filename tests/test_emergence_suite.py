"""python -m tools.emergence beyond the Jaccard: CorLoc (LOST, TokenCut), Hummingbird retrieval, the random-init
baseline, ResNet backbones and the one-line errors for inputs that cannot work (before any compute)."""
from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY_DATA

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_VIT = ["--backbone.name=vit", "--backbone.depth=2", "--backbone.embed_dim=32", "--backbone.num_heads=2",
            "--backbone.patch_size=8", "--data.img_size=32"]


def synthetic(data_cache: Path) -> list[str]:
    return ["--data.dataset=synthetic", f"--data.root={data_cache}", "--data.num_workers=0",
            *(f"--data.{k}={v}" for k, v in TINY_DATA.items())]


def rows_of(path: Path) -> dict[str, dict]:
    with path.open() as f:
        return {r["metric"]: r for r in csv.DictReader(f)}


def tiny_vit_file(tmp_path: Path):
    import timm

    torch.manual_seed(5)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            depth=2, embed_dim=32, num_heads=2)
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    return vit.eval(), path


def main_lost_corloc(vit, root: Path, split: str, every: int = 1) -> tuple[float, float, int]:
    """CorLoc of LOST and TokenCut boxes computed from keys read as main_lost.py reads them (transform, zero
    padding, qkv hook, DINO's position embedding) and ground truth parsed by torchvision's VOC reader
    (extract_gt_VOC's input), over every ``every``-th image of a VOC 2012 detection split."""
    import torchvision.transforms as T
    from torchvision.datasets import VOCDetection

    from analysis.discovery import bbox_iou, dino_vit_position_embedding, lost_box, tokencut_box

    dataset = VOCDetection(str(root), year="2012", image_set=split,
                           transform=T.Compose([T.ToTensor(),
                                                T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]))
    patch = vit.patch_embed.patch_size[0]
    dim = vit.blocks[-1].attn.qkv.out_features // 3
    hits, n = {"lost": 0, "tokencut": 0}, 0
    for index in range(0, len(dataset), every):
        img, target = dataset[index]
        objects = target["annotation"]["object"]
        gt = np.asarray([[int(o["bndbox"]["xmin"]) - 1, int(o["bndbox"]["ymin"]) - 1, int(o["bndbox"]["xmax"]),
                          int(o["bndbox"]["ymax"])] for o in objects])
        size_im = (3, int(np.ceil(img.shape[1] / patch) * patch), int(np.ceil(img.shape[2] / patch) * patch))
        padded = torch.zeros(size_im)
        padded[:, :img.shape[1], :img.shape[2]] = img
        feat_out = {}
        handle = vit.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: feat_out.__setitem__("qkv", o))
        grid = (size_im[1] // patch, size_im[2] // patch)
        with torch.no_grad(), dino_vit_position_embedding(vit, grid):
            vit.forward_features(padded[None])
        handle.remove()
        keys = feat_out["qkv"][0, 1:, dim:2 * dim]
        for name, method in (("lost", lost_box), ("tokencut", tokencut_box)):
            box = method(keys, grid, patch, tuple(img.shape[1:]))
            hits[name] += bool((bbox_iou(box, gt) >= 0.5).any())
        n += 1
    return hits["lost"] / n, hits["tokencut"] / n, n


def test_corloc_of_the_tool_is_lost_and_tokencut_on_main_lost_inputs(tmp_path, data_cache, capsys):
    from tools.emergence import main as emergence_main

    vit, weights = tiny_vit_file(tmp_path)
    runs = tmp_path / "runs"
    args = [*TINY_VIT, f"--backbone.weights={weights}", *synthetic(data_cache), "--metrics=corloc",
            "--baseline=false", "--corloc-split=val", f"--log.output_dir={runs}", "--log.run_name=c"]
    assert emergence_main(args) == 0
    got = rows_of(runs / "c" / "suite.csv")
    assert set(got) == {"corloc_lost", "corloc_tokencut"}
    want_lost, want_cut, n = main_lost_corloc(vit, next(data_cache.glob("synthetic_voc_*")), "val")
    assert float(got["corloc_lost"]["value"]) == pytest.approx(want_lost, abs=1e-6)
    assert float(got["corloc_tokencut"]["value"]) == pytest.approx(want_cut, abs=1e-6)
    assert f"{n} images" in got["corloc_lost"]["protocol"] and got["corloc_lost"]["published"] == ""
    assert f"corloc_lost: {want_lost:.4f}" in capsys.readouterr().out


def test_the_whole_suite_with_its_random_init_baseline(tmp_path, data_cache, capsys):
    from tools.emergence import main as emergence_main

    _, weights = tiny_vit_file(tmp_path)
    runs = tmp_path / "runs"
    args = [*TINY_VIT, f"--backbone.weights={weights}", *synthetic(data_cache), "--data.batch_size=8",
            "--callbacks.emergence_img_size=32", "--hummingbird-img-size=32", "--memory-size=512",
            "--augmentation-epochs=1", "--num-images=6", f"--log.output_dir={runs}", "--log.run_name=s"]
    assert emergence_main(args) == 0
    run = runs / "s"
    rows = rows_of(run / "suite.csv")
    assert list(rows) == ["attn_jaccard", "corloc_lost", "corloc_tokencut", "hummingbird_miou",
                          "hummingbird_miou_hungarian"]
    for row in rows.values():
        assert 0.0 <= float(row["value"]) <= 1.0 and 0.0 <= float(row["random_init"]) <= 1.0
    # 512 patches over 32 trainaug images x 1 pass: all 16 patches of each
    assert "memory 512 patches of trainaug x 1 passes" in rows["hummingbird_miou"]["protocol"]
    with (run / "emergence.csv").open() as f:
        assert next(csv.DictReader(f))["images"] == "6"
    md = (run / "suite.md").read_text()
    assert "| metric | value | random init | published | protocol |" in md and "corloc_tokencut" in md
    assert (run / "emergence_grid.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "random init" in out and f"run directory: {run}" in out


def test_memory_of_the_tool_is_the_sampled_memory(tmp_path, data_cache):
    """--memory-size splits evenly over images x passes, as the reference's num_sampled_features."""
    from tools.emergence import main as emergence_main

    _, weights = tiny_vit_file(tmp_path)
    runs = tmp_path / "runs"
    args = [*TINY_VIT, f"--backbone.weights={weights}", *synthetic(data_cache), "--metrics=hummingbird",
            "--hummingbird-img-size=32", "--memory-size=100", "--augmentation-epochs=2", "--baseline=false",
            "--num-images=4", f"--log.output_dir={runs}", "--log.run_name=m"]
    assert emergence_main(args) == 0
    # 100 // (32 images x 2 passes) = 1 patch per image and pass
    assert "memory 64 patches" in rows_of(runs / "m" / "suite.csv")["hummingbird_miou"]["protocol"]


def test_resnet_runs_retrieval_and_refuses_key_metrics(tmp_path, data_cache, capsys):
    from tools.emergence import main as emergence_main

    runs = tmp_path / "runs"
    base = ["--backbone.name=resnet50", "--data.img_size=64", *synthetic(data_cache), f"--log.output_dir={runs}"]
    assert emergence_main(base + ["--metrics=corloc,hummingbird"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CorLoc (LOST, TokenCut) reads a ViT's last-block keys; --backbone.name=resnet50" in err[0]
    assert "--metrics=hummingbird runs on any backbone" in err[0]
    assert emergence_main(base + ["--metrics=hummingbird", "--hummingbird-img-size=64", "--memory-size=16",
                                  "--augmentation-epochs=1", "--num-images=2", "--memory-images=4", "--neighbours=5",
                                  "--baseline=false", "--data.batch_size=4", "--log.run_name=r"]) == 0
    assert "memory 16 patches" in rows_of(runs / "r" / "suite.csv")["hummingbird_miou"]["protocol"]  # 4 x 2x2


def fake_voc(root: Path, annotations: bool = True, trainaug: bool = True, image_size: int = 32) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for name in ("a", "b"):
        Image.fromarray(np.full((image_size, image_size, 3), 100, np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
        Image.fromarray(np.zeros((image_size, image_size), np.uint8), "L").save(
            voc / "SegmentationClass" / f"{name}.png")
    for split in ("train", "val", "trainval"):
        (voc / "ImageSets/Segmentation" / f"{split}.txt").write_text("a\nb\n")
        (voc / "ImageSets/Main" / f"{split}.txt").write_text("a\nb\n")
    if annotations:
        (voc / "Annotations").mkdir()
        for name in ("a", "b"):
            (voc / "Annotations" / f"{name}.xml").write_text(
                f"<annotation><size><width>{image_size}</width><height>{image_size}</height></size><object><name>cat"
                "</name><truncated>0</truncated><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
                f"<xmax>{image_size}</xmax><ymax>{image_size}</ymax></bndbox></object></annotation>")
    if trainaug:
        (voc / "SegmentationClassAug").mkdir()
        (voc / "ImageSets/Segmentation/trainaug.txt").write_text("a\nb\n")
        for name in ("a", "b"):
            Image.fromarray(np.zeros((image_size, image_size), np.uint8), "L").save(
                voc / "SegmentationClassAug" / f"{name}.png")
    return root


@pytest.mark.parametrize("layout, flags, status, message", [
    (dict(annotations=False), ["--metrics=corloc"], 1, "CorLoc needs box annotations: {voc}/Annotations is missing"),
    (dict(trainaug=False), ["--metrics=hummingbird"], 1,
     "--memory-split=trainaug: {voc}/ImageSets/Segmentation/trainaug.txt is missing; trainaug is VOC 2012's "
     "SBD-augmented segmentation set"),
    ({}, ["--metrics=hummingbird", "--memory-size=999999"], 2,
     "--memory-size=999999 is larger than the 16384 patches available (2 trainaug images x 2 passes x 4096 "
     "patches); use at most 16384"),  # 512 px in 8-px patches: 64 x 64 per image
    ({}, ["--metrics=hummingbird", "--hummingbird-img-size=4"], 2,
     "--hummingbird-img-size=4 is smaller than one 8-px patch of --backbone.name=vit"),
    (dict(image_size=6), ["--metrics=corloc"], 1,
     "{voc}/Annotations/a.xml: the image is 6x6 px, smaller than one 8-px patch each way"),
    ({}, ["--metrics=corloc", "--corloc-year=2007"], 1, "--corloc-year=2007: {root}/VOCdevkit/VOC2007 does not exist"),
    ({}, ["--metrics=corloc", "--corloc-split=test"], 2, "--corloc-split: 'test' is not one of train, val, trainval"),
    ({}, ["--metrics=attention"], 2, "--metrics: attention is not a list of jaccard, corloc, hummingbird"),
    ({}, ["--metrics=hummingbird", "--temperature=0"], 2, "--temperature must be > 0, got 0.0"),
])
def test_bad_input_is_one_line_before_any_compute(tmp_path, capsys, monkeypatch, layout, flags, status, message):
    import analysis.discovery
    import analysis.retrieval
    from tools.emergence import main as emergence_main

    def no_compute(*args, **kwargs):
        raise AssertionError("computed before the input was checked")

    monkeypatch.setattr(analysis.discovery, "discover", no_compute)
    monkeypatch.setattr(analysis.retrieval, "hummingbird", no_compute)
    root = fake_voc(tmp_path / "voc", **layout)
    runs = tmp_path / "runs"
    assert emergence_main([*TINY_VIT, f"--data.root={root}", "--data.num_workers=0", f"--log.output_dir={runs}",
                           *flags]) == status
    err = capsys.readouterr().err.strip().splitlines()
    voc = root / "VOCdevkit" / "VOC2012"
    assert len(err) == 1 and err[0].startswith("error: ") and message.format(voc=voc, root=root) in err[0], err
    assert not runs.exists() or not any(runs.iterdir())


def test_published_values_only_for_dino_vit_s16():
    from types import SimpleNamespace

    from tools.emergence import published_values

    def cfg(name, pretrained=False, weights=None):
        return SimpleNamespace(backbone=SimpleNamespace(name=name, pretrained=pretrained, weights=weights))

    assert published_values(cfg("vit_small_patch16_224.dino", True))["corloc_lost"]["2007"] == 0.619
    official = cfg("vit_small_patch16_224", weights="/w/dino_deitsmall16_pretrain.pth")
    assert published_values(official)["jaccard"] == 0.459
    assert published_values(cfg("vit_small_patch16_224.dino")) == {}  # random weights: not DINO's model
    assert published_values(cfg("vit_small_patch8_224.dino", True)) == {}


def test_annotation_reader_matches_the_files_the_tests_write(tmp_path):
    root = fake_voc(tmp_path)
    xml = root / "VOCdevkit/VOC2012/Annotations/a.xml"
    assert ET.parse(xml).getroot().find("object/name").text == "cat"


def test_no_hard_leaves_out_images_with_only_hard_boxes(tmp_path, data_cache):
    from tools.emergence import main as emergence_main

    _, weights = tiny_vit_file(tmp_path)
    runs = tmp_path / "runs"
    args = [*TINY_VIT, f"--backbone.weights={weights}", *synthetic(data_cache), "--metrics=corloc", "--no-hard",
            "--baseline=false", "--corloc-split=train", f"--log.output_dir={runs}", "--log.run_name=h"]
    assert emergence_main(args) == 0
    voc = next(data_cache.glob("synthetic_voc_*")) / "VOCdevkit" / "VOC2012"
    kept = 0
    for xml in sorted((voc / "Annotations").glob("train_*.xml")):
        objects = ET.parse(xml).getroot().findall("object")
        kept += any(o.findtext("truncated") == "0" and o.findtext("difficult") == "0" for o in objects)
    row = rows_of(runs / "h" / "suite.csv")["corloc_lost"]
    assert f", {kept} images," in row["protocol"] and "no hards" in row["protocol"]
    assert 0 < kept < TINY_DATA["synthetic_train"]  # some images are dropped, some kept
