"""Segmentation: metrics against brute force, losses by hand, masks, freezing, checkpoints, end to end."""
from __future__ import annotations

import csv
import itertools
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassJaccardIndex

import main
from config.loading import ConfigError, parse_config, to_dict
from config.validation import validate
from datamodules.images import DataError
from datamodules.segmentation import load_mask
from lightningmodules.segmentation import SegmentationModule
from models.losses import DiceLoss, FocalLoss, median_frequency_weights, segmentation_loss
from tests.test_main import ckpt, column, metrics
from utils.segmentation_metrics import scores_from_confusion

SEG = {"task": "segmentation", "segmentation__hidden_dim": 16, "data__batch_size": 4}


# ------------------------------------------------------------------------------------------ metrics
def brute_force_scores(pred: np.ndarray, target: np.ndarray, n: int) -> dict:
    cm = np.zeros((n, n), dtype=np.int64)
    for p, t in zip(pred.ravel(), target.ravel()):
        if t != 255:
            cm[t, p] += 1
    iou, f1 = {}, {}
    for c in range(n):
        tp = cm[c, c]
        fp = sum(cm[r, c] for r in range(n) if r != c)
        fn = sum(cm[c, k] for k in range(n) if k != c)
        if tp + fp + fn:
            iou[c] = tp / (tp + fp + fn)
            f1[c] = 2 * tp / (2 * tp + fp + fn)
    return {"mIoU": np.mean(list(iou.values())), "iou": iou, "f1": np.mean(list(f1.values())),
            "pixel_acc": np.trace(cm) / cm.sum(), "mIoU_fg": np.mean([v for c, v in iou.items() if c])}


def test_scores_equal_brute_force_with_ignored_pixels_and_absent_classes():
    g = torch.Generator().manual_seed(0)
    n = 6
    target = torch.randint(0, 4, (3, 9, 11), generator=g)  # classes 4 and 5 never in the target...
    target[:, :2] = 255  # ...and ignored pixels
    pred = torch.randint(0, 5, (3, 9, 11), generator=g)  # 5 never predicted either: absent from both
    pred[0, 0, 0] = 4
    cm = MulticlassConfusionMatrix(n, ignore_index=255)
    for i in range(3):  # accumulated over "batches"
        cm.update(pred[i:i + 1], target[i:i + 1])
    scores = scores_from_confusion(cm.compute())
    ref = brute_force_scores(pred.numpy(), target.numpy(), n)
    assert scores["mIoU"].item() == pytest.approx(ref["mIoU"])
    assert scores["mIoU_fg"].item() == pytest.approx(ref["mIoU_fg"])
    assert scores["f1"].item() == pytest.approx(ref["f1"])
    assert scores["pixel_acc"].item() == pytest.approx(ref["pixel_acc"])
    for c in range(n):
        if c in ref["iou"]:
            assert scores["per_class_iou"][c].item() == pytest.approx(ref["iou"][c])
        else:
            assert torch.isnan(scores["per_class_iou"][c])
    assert torch.isnan(scores["per_class_iou"][5]) and not torch.isnan(scores["per_class_iou"][4])
    # and torchmetrics' own metrics agree
    jac = MulticlassJaccardIndex(n, ignore_index=255, average="macro")(pred, target)
    assert scores["mIoU"].item() == pytest.approx(jac.item(), abs=1e-6)
    acc = MulticlassAccuracy(n, ignore_index=255, average="micro")(pred, target)
    assert scores["pixel_acc"].item() == pytest.approx(acc.item(), abs=1e-6)


# ------------------------------------------------------------------------------------------- losses
def test_losses_by_hand():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 5, 5, generator=g)
    target = torch.randint(0, 4, (2, 5, 5), generator=g)
    target[0, 0] = 255
    valid = target != 255
    logp = logits.log_softmax(1)
    nll = -logp.gather(1, target.clamp(max=3)[:, None])[:, 0]
    assert segmentation_loss("ce", 4)(logits, target).item() == pytest.approx(nll[valid].mean().item(), rel=1e-6)
    assert FocalLoss(gamma=0.0)(logits, target).item() == pytest.approx(nll[valid].mean().item(), rel=1e-6)
    pt = torch.exp(-nll)
    assert FocalLoss(gamma=2.0)(logits, target).item() == pytest.approx(((1 - pt) ** 2 * nll)[valid].mean().item(), rel=1e-5)
    # weighted CE: Σ w_t·nll / Σ w_t over valid pixels
    w = torch.tensor([0.5, 1.0, 2.0, 3.0])
    wt = w[target.clamp(max=3)]
    expected = (wt * nll)[valid].sum() / wt[valid].sum()
    assert segmentation_loss("ce", 4, weight=w)(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert segmentation_loss("focal", 4, focal_gamma=0.0, weight=w)(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    # Dice by loops
    probs = logits.softmax(1)
    terms = []
    for c in range(4):
        inter = sum(probs[b, c, i, j] for b, i, j in itertools.product(range(2), range(5), range(5))
                    if valid[b, i, j] and target[b, i, j] == c)
        p_sum = sum(probs[b, c, i, j] for b, i, j in itertools.product(range(2), range(5), range(5)) if valid[b, i, j])
        g_sum = sum(1 for b, i, j in itertools.product(range(2), range(5), range(5)) if valid[b, i, j] and target[b, i, j] == c)
        terms.append((2 * inter + 1) / (p_sum + g_sum + 1))
    assert DiceLoss(4)(logits, target).item() == pytest.approx(1 - torch.stack([torch.as_tensor(t) for t in terms]).mean().item(), rel=1e-5)


def test_median_frequency_weights_by_hand():
    w = median_frequency_weights(torch.tensor([600, 300, 100, 0]))
    # frequencies 0.6, 0.3, 0.1 → median 0.3
    assert w.tolist() == pytest.approx([0.5, 1.0, 3.0, 0.0])


# -------------------------------------------------------------------------------------------- masks
def test_masks_outside_the_label_range_name_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.array([[0, 20], [255, 3]], dtype=np.uint8), mode="L").save(good)
    assert load_mask(good, 21).tolist() == [[0, 20], [255, 3]]
    bad = tmp_path / "bad.png"
    Image.fromarray(np.array([[0, 21], [40, 3]], dtype=np.uint8), mode="L").save(bad)
    with pytest.raises(DataError, match=r"mask .*bad.png has values \[21, 40\] outside 0–20 and 255"):
        load_mask(bad, 21)
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (4, 4), (128, 0, 0)).save(rgb)
    with pytest.raises(DataError, match="rgb.png is a RGB image"):
        load_mask(rgb, 21)


# ------------------------------------------------------------------------------------ model and config
@pytest.mark.parametrize("flags, message", [
    (["--backbone.name=resnet50", "--segmentation.head=setr_mla"], "setr_mla needs a ViT backbone"),
    (["--backbone.name=vit", "--segmentation.head=deeplabv3"], "deeplabv3 needs --backbone.name=resnet50"),
    (["--segmentation.head=attn_fusion", "--backbone.name=pixels", "--backbone.depth=0", "--backbone.embed_dim=0",
      "--backbone.num_heads=0"], "attn_fusion fuses the backbone's attention"),
    (["--segmentation.head=setr_fancy"], "unknown head 'setr_fancy'; valid: attn_fusion, linear, setr_mla, setr_naive, setr_pup, setr_pytorch_naive, setr_pytorch_pup, deeplabv3"),
    (["--backbone.name=vit", "--backbone.depth=4", "--segmentation.head=setr_mla", "--segmentation.mla_blocks=1,9"], "mla_blocks"),
    (["--segmentation.head=setr_naive", "--segmentation.aux_loss=true"], "applies to --segmentation.head=deeplabv3, setr_pup, setr_mla only"),
    (["--segmentation.head_weights=/no/head.ckpt"], "--segmentation.head_weights: file '/no/head.ckpt' does not exist"),
])
def test_segmentation_config_errors(flags, message):
    with pytest.raises(ConfigError, match=message):
        validate(parse_config(["--task=segmentation", "--data.dataset=synthetic", *flags]))


def tiny_module(tiny, **overrides) -> SegmentationModule:
    return SegmentationModule(to_dict(parse_config(tiny("m", **{**SEG, **overrides}))))


@pytest.mark.parametrize("overrides", [
    {"segmentation__head": "setr_naive"},
    {"backbone__name": "resnet50", "backbone__depth": 0, "backbone__embed_dim": 0, "backbone__num_heads": 0,
     "backbone__patch_size": 0, "segmentation__head": "deeplabv3", "segmentation__aux_loss": "true"},
], ids=["vit", "deeplabv3"])
def test_frozen_backbone_parameters_and_batchnorm_buffers_do_not_move(tiny, overrides):
    import pytorch_lightning as pl

    module = tiny_module(tiny, **overrides)
    before = {k: v.clone() for k, v in module.model.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in module.model.state_dict().items() if not k.startswith("backbone.")}
    assert any("running_mean" in k for k in before) == ("deeplabv3" in str(overrides))
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 21, (8, 32, 32))
    y[:, 0] = 255
    batches = [(x[i:i + 4], y[i:i + 4]) for i in (0, 4)] * 2

    class Batches:
        def __iter__(self):
            return iter(batches)

        def __len__(self):
            return len(batches)

    pl.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0, accelerator="cpu").fit(module, train_dataloaders=Batches())
    after = module.model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for p in module.model.backbone.parameters())
    assert not module.model.backbone.training
    head_after = {k: v for k, v in module.model.state_dict().items() if not k.startswith("backbone.")}
    assert any(not torch.equal(head_before[k], head_after[k]) for k in head_before)  # the head did train


def test_barlow_twins_checkpoint_loads_as_segmentation_backbone(tiny, tmp_path, caplog):
    assert main.main(tiny("bt", trainer__max_epochs=1)) == 0
    path = tmp_path / "runs" / "bt" / "checkpoints" / "last.ckpt"
    caplog.set_level(logging.INFO)
    module = tiny_module(tiny, backbone__weights=str(path), backbone__strict_weights="true")
    state = ckpt(path)["state_dict"]
    vit = module.model.backbone.vit.state_dict()
    bt = {k[len("backbone.vit."):]: v for k, v in state.items() if k.startswith("backbone.vit.")}
    assert set(bt) == set(vit)  # every key matched, none missing, none left over
    assert all(torch.equal(bt[k], vit[k]) for k in vit)
    assert f"loaded {len(vit)} tensors" in caplog.text and "missing" not in caplog.text


def test_head_weights_of_another_shape_are_refused(tiny, tmp_path):
    from models.weights import WeightLoadingError

    module = tiny_module(tiny, segmentation__hidden_dim=16)
    path = tmp_path / "head.pt"
    torch.save({f"model.head.{k}": v for k, v in module.model.head.state_dict().items()}, path)
    tiny_module(tiny, segmentation__hidden_dim=16, segmentation__head_weights=str(path))  # same shape: fine
    with pytest.raises(WeightLoadingError, match="has shape"):
        tiny_module(tiny, segmentation__hidden_dim=8, segmentation__head_weights=str(path))


# -------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def data64(tmp_path_factory) -> Path:
    from datamodules.synthetic_voc import ensure_synthetic_voc

    cache = tmp_path_factory.mktemp("data64")
    ensure_synthetic_voc(cache, 256, 32, 64, 0)
    return cache


def seg64(tiny, data64, name, **overrides):
    # Random-init frozen ViT: weak features, so enough images/steps and class-balanced CE (plain CE
    # collapses to all-background on such features).
    values = {**SEG, "data__root": str(data64), "data__synthetic_train": 256, "data__synthetic_val": 32,
              "data__synthetic_size": 64, "data__img_size": 64, "data__batch_size": 32, "backbone__embed_dim": 64,
              "segmentation__hidden_dim": 32, "segmentation__class_weighting": "median_frequency",
              "optim__lr": 0.01, "optim__warmup_epochs": 0, "trainer__max_epochs": 5, **overrides}
    return tiny(name, **values)


def test_tiny_segmentation_run_improves_val_miou(tiny, tmp_path, data64):
    assert main.main(seg64(tiny, data64, "seg")) == 0
    run = tmp_path / "runs" / "seg"
    miou = [v for _, v in column(metrics(run), "val/mIoU")]
    assert len(miou) == 5 and miou[-1] > miou[0] + 0.01, miou
    # per-class IoU: one row per validation epoch, background first; best checkpoint by val mIoU
    with (run / "per_class_iou.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and list(rows[0])[:3] == ["epoch", "step", "background"]
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    assert int(best.name.split("-e")[1][:3]) == int(np.argmax(miou))


def test_eval_only_reproduces_the_best_checkpoints_score(tiny, tmp_path, data64):
    assert main.main(seg64(tiny, data64, "train", trainer__max_epochs=2)) == 0
    run = tmp_path / "runs" / "train"
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    epoch = int(best.name.split("-e")[1][:3])
    logged = dict((int(r["epoch"]), float(r["val/mIoU"])) for r in metrics(run) if r.get("val/mIoU"))
    args = seg64(tiny, data64, "eval", trainer__eval_only="true", backbone__weights=str(best),
                 segmentation__head_weights=str(best))
    assert main.main(args) == 0
    result = yaml.safe_load((tmp_path / "runs" / "eval" / "eval_metrics.yaml").read_text())
    assert result["val/mIoU"] == pytest.approx(logged[epoch], abs=1e-6)


def test_eval_only_reports_the_validation_loss_training_logged(tiny, tmp_path):
    # Class-weighted loss: the weights come from the training masks and must be the same in eval-only mode
    # (they were once built for fit only, and eval-only reported the unweighted loss: 3.31 against 3.06).
    weighted = {**SEG, "segmentation__class_weighting": "median_frequency", "trainer__max_epochs": 1}
    assert main.main(tiny("train", **weighted)) == 0
    last = tmp_path / "runs" / "train" / "checkpoints" / "last.ckpt"
    logged = {int(r["epoch"]): r for r in metrics(tmp_path / "runs" / "train") if r.get("val/loss")}
    assert list(logged) == [0]
    args = tiny("eval", **weighted, trainer__eval_only="true", backbone__weights=str(last),
                segmentation__head_weights=str(last))
    assert main.main(args) == 0
    result = yaml.safe_load((tmp_path / "runs" / "eval" / "eval_metrics.yaml").read_text())
    for name in ("val/loss", "val/mIoU", "val/f1", "val/pixel_acc"):
        assert result[name] == pytest.approx(float(logged[0][name]), abs=1e-5), name


def test_full_resolution_evaluation_handles_mixed_image_sizes(tiny, tmp_path, data64):
    root = tmp_path / "voc"
    shutil.copytree(next(p for p in data64.glob("synthetic_voc_*") if p.is_dir()), root)
    voc = root / "VOCdevkit" / "VOC2012"
    val_ids = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    valid_pixels = 0
    for k, image_id in enumerate(val_ids):
        size = (64 + 8 * (k % 3), 64 - 4 * (k % 2))  # (w, h) differ within every batch
        img = Image.open(voc / "JPEGImages" / f"{image_id}.jpg").resize(size, Image.BILINEAR)
        img.save(voc / "JPEGImages" / f"{image_id}.jpg")
        mask = Image.open(voc / "SegmentationClass" / f"{image_id}.png")
        mask = mask.resize(size, Image.NEAREST)
        mask.save(voc / "SegmentationClass" / f"{image_id}.png")
        valid_pixels += int((np.array(mask) != 255).sum())
    module = tiny_module(tiny, data__dataset="voc", data__root=str(root), data__img_size=64, data__batch_size=5,
                         segmentation__eval_mode="full")
    module.eval()
    from datamodules.segmentation import SegmentationDataModule

    dm = SegmentationDataModule(module.cfg.data, module.cfg.segmentation, seed=0)
    dm.setup()
    images, masks = next(iter(dm.val_dataloader()))
    assert images.shape == (5, 3, 64, 64) and len({tuple(m.shape) for m in masks}) > 1
    total = 0
    for images, masks in dm.val_dataloader():
        out = module.model(images)["out"]
        for logits, mask in zip(out, masks):
            up = F.interpolate(logits[None], size=mask.shape, mode="bilinear", align_corners=False)
            module.val_confusion.update(up.argmax(1), mask[None])
            total += 1
    assert total == len(val_ids)
    assert int(module.val_confusion.compute().sum()) == valid_pixels  # every original labelled pixel scored


def test_deeplabv3_trains_end_to_end(tiny, tmp_path):
    args = tiny("deeplab", **{**SEG, "backbone__name": "resnet50", "backbone__depth": 0, "backbone__embed_dim": 0,
                             "backbone__num_heads": 0, "backbone__patch_size": 0, "segmentation__head": "deeplabv3",
                             "segmentation__aux_loss": "true", "trainer__max_steps": 2, "trainer__limit_val_batches": 1})
    assert main.main(args) == 0
    state = ckpt(tmp_path / "runs" / "deeplab" / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 2 and any(k.startswith("model.aux_classifier.") for k in state["state_dict"])


def test_fine_tuning_trains_the_backbone_with_its_own_learning_rate(tiny):
    import pytorch_lightning as pl

    module = tiny_module(tiny, segmentation__freeze_backbone="false", segmentation__backbone_lr=1e-3, optim__lr=1e-2)
    groups = module.param_groups()
    backbone_ids = {id(p) for p in module.model.backbone.parameters()}
    backbone_lrs = {g["lr"] for g in groups if any(id(p) in backbone_ids for p in g["params"])}
    head_lrs = {g["lr"] for g in groups if not any(id(p) in backbone_ids for p in g["params"])}
    assert backbone_lrs == {1e-3} and head_lrs == {1e-2}
    before = {k: v.clone() for k, v in module.model.backbone.state_dict().items()}
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 21, (4, 32, 32))

    class Batches:
        def __iter__(self):
            return iter([(x, y)] * 2)

        def __len__(self):
            return 2

    pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0, accelerator="cpu").fit(module, train_dataloaders=Batches())
    after = module.model.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
