"""The online linear probe: its pieces by hand, that it leaves the pretraining untouched, what it logs,
and that a resumed run continues it exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torch.utils.data import Dataset

import main
from callbacks.online_probe import (CyclicBatches, OnlineProbeCallback, build_linear_head, confusion_matrix,
                                    masked_cross_entropy)
from config.hparams import SegmentationConfig
from config.loading import ConfigError, parse_config
from config.validation import validate
from datamodules.sampling import seeded
from tests.conftest import tiny_args
from tests.test_emergence import finished_run_file
from tests.test_main import ckpt, column, metrics
from tests.wandb_records import logged

PROBE = {"callbacks.online_probe": "true", "callbacks.online_probe_batch_size": 4,
         "callbacks.online_probe_every_n_epochs": 1, "callbacks.online_probe_lr": 0.01,
         # stochastic depth on: any draw from the global RNG by the probe would change the backbone
         "backbone.drop_path_rate": 0.2,
         "callbacks.attention": "false", "callbacks.cross_correlation": "false", "callbacks.emergence": "false"}


# -- pieces ------------------------------------------------------------------------------------------------
def test_head_initialisation_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    first = build_linear_head(8, 3, 4, SegmentationConfig(), seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    again = build_linear_head(8, 3, 4, SegmentationConfig(), seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert first([torch.zeros(2, 8, 5, 5)]).shape == (2, 3, 5, 5)


def test_confusion_matrix_by_hand():
    target = torch.tensor([[0, 1, 1], [2, 255, 2]])
    pred = torch.tensor([[0, 1, 2], [2, 0, 0]])
    # (target, pred) pairs without the 255 pixel: (0,0) (1,1) (1,2) (2,2) (2,0)
    expected = [[1, 0, 0], [0, 1, 1], [1, 0, 1]]
    assert confusion_matrix(pred, target, 3).tolist() == expected


def test_masked_cross_entropy_ignores_255_and_is_zero_without_labels():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2 classes, 1, 2 pixels)
    target = torch.tensor([[[1, 255]]])  # (1, 1, 2)
    # only pixel 0 counts: -log softmax([2, 0])[1] = log(1 + e^2)
    assert masked_cross_entropy(logits, target).item() == pytest.approx(np.log(1 + np.e ** 2))
    assert masked_cross_entropy(logits, torch.full((1, 1, 2), 255)).item() == 0.0


class Numbered(Dataset):
    """Item i → (i, a number drawn under the item's seed), like an augmented image."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, key):
        index, item_seed = key
        with seeded(item_seed):
            return torch.tensor(index), torch.rand(())


def test_cyclic_batches_resume_where_they_stopped_without_touching_the_global_rng():
    before = torch.get_rng_state()
    batches = CyclicBatches(Numbered(), batch_size=2, seed=3)
    drawn = [batches.next() for _ in range(5)]  # 2 batches per pass (the odd item is dropped): 2.5 passes
    assert torch.equal(torch.get_rng_state(), before)
    assert batches.state_dict() == {"epoch": 2, "position": 1}
    passes = [torch.cat([drawn[0][0], drawn[1][0]]), torch.cat([drawn[2][0], drawn[3][0]])]
    assert all(len(set(p.tolist())) == 4 for p in passes) and not torch.equal(passes[0], passes[1])

    resumed = CyclicBatches(Numbered(), batch_size=2, seed=3)
    resumed.load_state_dict({"epoch": 1, "position": 1})  # after the first 3 batches
    for expected in drawn[3:]:
        got = resumed.next()
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_probe_batch_larger_than_the_labelled_set_is_an_error():
    from datamodules.images import DataError

    with pytest.raises(DataError, match="online_probe_batch_size=8"):
        CyclicBatches(Numbered(), batch_size=8, seed=0)


def test_validation_refuses_the_probe_on_a_cnn():
    with pytest.raises(ConfigError, match="--callbacks.online_probe needs a ViT"):
        validate(parse_config(["--callbacks.online_probe=true", "--backbone.name=resnet50",
                               "--data.dataset=synthetic"]))


# -- in a run ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def probe_runs(data_cache, tmp_path_factory):
    """Two-epoch tiny runs (4 steps each) with the probe on and off, same seed, stochastic depth on."""
    out = tmp_path_factory.mktemp("probe_runs")
    assert main.main(tiny_args(data_cache, out, "on", **PROBE)) == 0
    off = {**PROBE, "callbacks.online_probe": "false"}
    assert main.main(tiny_args(data_cache, out, "off", **off)) == 0
    return out


def test_probe_leaves_the_backbone_untouched(probe_runs, data_cache, tmp_path, monkeypatch):
    on = ckpt(probe_runs / "on" / "checkpoints" / "last.ckpt")["state_dict"]
    off = ckpt(probe_runs / "off" / "checkpoints" / "last.ckpt")["state_dict"]
    assert on.keys() == off.keys()  # the head is not part of the module
    assert all(torch.equal(on[k], off[k]) for k in on), [k for k in on if not torch.equal(on[k], off[k])]
    # ...and the comparison can tell: a probe that draws one number from the global RNG per step changes it
    step = OnlineProbeCallback.step

    def drawing_step(self, trainer, pl_module):
        torch.rand(1)
        return step(self, trainer, pl_module)

    monkeypatch.setattr(OnlineProbeCallback, "step", drawing_step)
    assert main.main(tiny_args(data_cache, tmp_path, "drawing", **PROBE)) == 0
    drawn = ckpt(tmp_path / "drawing" / "checkpoints" / "last.ckpt")["state_dict"]
    assert any(not torch.equal(drawn[k], off[k]) for k in off if k.startswith("backbone."))


def reference_miou(state: dict, voc, ids: list[str], img_size: int, num_classes: int = 21) -> float:
    """The probe's val mIoU recomputed from the checkpoint: backbone + saved head, numpy confusion matrix,
    IoU = TP / (TP + FP + FN) averaged over the classes present in target or prediction."""
    import torch.nn.functional as F

    from datamodules.transforms import segmentation_eval_transform
    from lightningmodules.barlow_twins import BarlowTwinsModule

    module = BarlowTwinsModule(state["hyper_parameters"]["config"])
    module.load_state_dict(state["state_dict"])
    vit = module.backbone.vit.eval()
    head = next(v for k, v in state["callbacks"].items() if "OnlineProbe" in k)["head"]
    weight, bias = head["classifier.weight"], head["classifier.bias"]
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for image_id in ids:
        rgb = decode_image(str(voc / "JPEGImages" / f"{image_id}.jpg"), mode=ImageReadMode.RGB)
        mask = Image.open(voc / "SegmentationClass" / f"{image_id}.png").resize((img_size, img_size), Image.NEAREST)
        target = np.array(mask).astype(np.int64)
        with torch.no_grad():
            tokens = vit.forward_features(segmentation_eval_transform(img_size)(rgb)[None])[0, vit.num_prefix_tokens:]
            grid = int(len(tokens) ** 0.5)
            logits = (tokens @ weight[:, :, 0, 0].T + bias).T.reshape(1, num_classes, grid, grid)
            pred = F.interpolate(logits, size=(img_size, img_size), mode="bilinear").argmax(1)[0].numpy()
        for t, p in zip(target.ravel(), pred.ravel()):
            if t != 255:
                confusion[t, p] += 1
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    return float(np.mean(tp[union > 0] / union[union > 0]))


def test_probe_logs_its_loss_and_val_miou(probe_runs, data_cache):
    run = probe_runs / "on"
    rows = metrics(run)
    assert [s for s, _ in column(rows, "train/probe_loss")] == list(range(8))  # one probe step per training step
    miou = column(rows, "val/probe_mIoU")
    assert [s for s, _ in miou] == [4, 8]  # after each epoch (every 1); the last one not repeated
    _, history = logged(finished_run_file(run))
    in_wandb = [(h["trainer/global_step"], h["val/probe_mIoU"]) for h in history if "val/probe_mIoU" in h]
    assert [s for s, _ in in_wandb] == [s for s, _ in miou]  # pytest 9's approx refuses lists of tuples
    assert [v for _, v in in_wandb] == pytest.approx([v for _, v in miou])
    assert len([h for h in history if "train/probe_loss" in h]) == 8
    voc = next(data_cache.glob("*/VOCdevkit/VOC2012"))
    ids = (voc / "ImageSets/Segmentation/val.txt").read_text().split()
    state = ckpt(run / "checkpoints" / "last.ckpt")
    assert miou[-1][1] == pytest.approx(reference_miou(state, voc, ids, img_size=32), abs=1e-6)


def test_resumed_run_continues_the_probe_exactly(probe_runs, data_cache, tmp_path):
    assert main.main(tiny_args(data_cache, tmp_path, "cut", **PROBE, **{"trainer.max_epochs": 1})) == 0
    cut = tmp_path / "cut"
    assert main.main(["--trainer.resume", str(cut / "checkpoints" / "last.ckpt"), "--trainer.max_epochs=2"]) == 0
    full = probe_runs / "on"
    for key in ("train/probe_loss", "val/probe_mIoU"):
        resumed, reference = column(metrics(cut), key), column(metrics(full), key)
        assert [s for s, _ in resumed] == [s for s, _ in reference], key
        assert [v for _, v in resumed] == pytest.approx([v for _, v in reference], rel=1e-5), key
    head = lambda path: next(v for k, v in ckpt(path)["callbacks"].items() if "OnlineProbe" in k)  # noqa: E731
    resumed_state, full_state = head(cut / "checkpoints" / "last.ckpt"), head(full / "checkpoints" / "last.ckpt")
    assert resumed_state["loader"] == full_state["loader"]
    for name, tensor in full_state["head"].items():
        assert torch.allclose(resumed_state["head"][name], tensor, rtol=1e-5, atol=1e-7), name


def test_tuner_trials_leave_no_trace(tiny, tmp_path):
    # The batch-size search runs short fits with these callbacks in place: they must stay idle there (no
    # extra step-0 measurement, no probe steps) so that the tuned run equals a run given the found values.
    flags = {k.replace(".", "__"): v for k, v in PROBE.items()}
    flags.update(callbacks__emergence="true", callbacks__emergence_images=4, trainer__max_epochs=1,
                 trainer__tune_batch_size="true", trainer__tune_batch_size_max=16)
    assert main.main(tiny("tuned", **flags)) == 0
    tuned = tmp_path / "runs" / "tuned"
    assert main.main(["--config", str(tuned / "config.yaml"), "--log.run_name=again"]) == 0
    again = tmp_path / "runs" / "again"
    for key in ("val/attn_jaccard", "train/probe_loss", "val/probe_mIoU"):
        assert column(metrics(tuned), key) == column(metrics(again), key), key
    assert [s for s, _ in column(metrics(tuned), "val/attn_jaccard")] == [0, 2]  # 32 images / 16 per batch
    assert len(column(metrics(tuned), "train/probe_loss")) == 2
