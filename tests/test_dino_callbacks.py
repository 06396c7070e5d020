"""The pictures and probes of a DINO run: which backbone each reads (attention maps: teacher and student;
emergence, ERF, online probe: the teacher), the teacher-entropy collapse monitor, the task dispatch, sweep
metrics, and a tiny end-to-end DINO run with every picture on."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from torch import nn

from callbacks import callback_metrics, visualisation_callbacks
from callbacks.visual import backbone_of, evaluated_role, named_backbones, vit_of, wait_for_pictures


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# -- a stand-in for lightningmodules.dino.DinoModule (COMMON.md interface) ----------------------------------
class Backbone(nn.Module):
    """What models.backbones builds for a ViT: the timm model as ``.vit``."""

    def __init__(self, seed: int, class_token: bool = True):
        super().__init__()
        torch.manual_seed(seed)
        self.vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32,
                                     patch_size=8, depth=2, embed_dim=32, num_heads=2, class_token=class_token,
                                     global_pool="token" if class_token else "avg")


class FakeDino(nn.Module):
    """``backbone`` (student), ``teacher_backbone``, ``named_backbones()``, ``center`` and the per-step
    entropies, as the DINO module exposes them."""

    def __init__(self, out_dim: int = 64, teacher: Backbone | None = None, student: Backbone | None = None):
        super().__init__()
        self.backbone = student or Backbone(seed=1)
        self.teacher_backbone = teacher or Backbone(seed=2)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.last_teacher_entropy = None
        self.last_teacher_mean_entropy = None

    def named_backbones(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher_backbone, "student": self.backbone}

    @property
    def device(self) -> torch.device:
        return self.center.device


class Single(nn.Module):
    """A Barlow Twins module as the callbacks see it: one ``backbone``."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


def fake_trainer(tmp_path: Path, step: int = 0, epoch: int = 0, max_epochs: int = 3, **extra):
    return SimpleNamespace(default_root_dir=str(tmp_path), global_step=step, current_epoch=epoch, max_epochs=max_epochs,
                           loggers=[], callbacks=[], is_global_zero=True, sanity_checking=False, **extra)


# -- which backbone ----------------------------------------------------------------------------------------
def test_probes_read_the_teacher_and_single_backbone_modules_are_unchanged():
    dino = FakeDino()
    assert named_backbones(dino) == {"teacher": dino.teacher_backbone, "student": dino.backbone}
    assert backbone_of(dino) is dino.teacher_backbone and backbone_of(dino) is not dino.backbone
    assert vit_of(dino) is dino.teacher_backbone.vit
    assert evaluated_role(dino) == "teacher"
    # Barlow Twins (pl_module.backbone) and segmentation (pl_module.model.backbone): one unnamed backbone
    b = Backbone(seed=3)
    assert named_backbones(Single(b)) == {"": b} and backbone_of(Single(b)) is b and evaluated_role(Single(b)) == ""
    seg = SimpleNamespace(model=SimpleNamespace(backbone=b))
    assert named_backbones(seg) == {"": b} and vit_of(seg) is b.vit
    assert named_backbones(SimpleNamespace()) == {} and backbone_of(SimpleNamespace()) is None
    # a module naming no teacher: its first backbone is the evaluated one
    two = SimpleNamespace(named_backbones=lambda: {"online": b, "target": dino.backbone})
    assert backbone_of(two) is b and evaluated_role(two) == "online"


def test_attention_maps_are_drawn_for_teacher_and_student(tmp_path, monkeypatch):
    import callbacks.attention_maps as attention_maps

    dino = FakeDino()
    seen = []
    real = attention_maps.cls_attentions
    monkeypatch.setattr(attention_maps, "cls_attentions",
                        lambda vit, images, blocks: seen.append((vit, list(blocks))) or real(vit, images, blocks))
    callback = attention_maps.AttentionMapCallback(every_n_epochs=1, num_images=2, blocks=[0])
    assert callback.check(None, dino) is None
    callback._images = torch.randn(2, 3, 32, 32)
    trainer = fake_trainer(tmp_path)
    callback.render(trainer, dino, "e000")
    wait_for_pictures()
    # one forward pass per backbone, each on its own ViT: the teacher's maps are the teacher's
    assert seen == [(dino.teacher_backbone.vit, [1, 0]), (dino.backbone.vit, [1, 0])]
    assert sorted(p.name for p in (tmp_path / "media").glob("*.png")) == [
        "attention_student_b00_e000.png", "attention_student_e000.png",
        "attention_teacher_b00_e000.png", "attention_teacher_e000.png"]
    # a single-backbone module keeps its names
    assert callback.stem(1, 2, "e000") == "attention_e000" and callback.stem(0, 2, "e000") == "attention_b00_e000"


def test_attention_check_names_the_backbone_that_cannot_be_drawn():
    from callbacks.attention_maps import AttentionMapCallback

    dino = FakeDino(teacher=Backbone(seed=2, class_token=False))
    message = AttentionMapCallback().check(None, dino)
    assert message.startswith("teacher backbone:") and "class token" in message
    message = AttentionMapCallback(blocks=[2]).check(None, FakeDino())
    assert "--callbacks.attention_blocks" in message and "0..1" in message


def test_emergence_jaccard_is_the_teachers(voc_root):
    """The DINO module's score is the score of a module whose only backbone is its teacher, not its student's."""
    from callbacks.emergence import EmergenceCallback

    dino = FakeDino().eval()
    trainer = SimpleNamespace(datamodule=SimpleNamespace(root=str(voc_root)))

    def score(module):
        callback = EmergenceCallback(num_images=6, keep=0.6, protocol="dino", img_size=32)
        return callback.compute(trainer, module)

    teacher, student, both = score(Single(dino.teacher_backbone)), score(Single(dino.backbone)), score(dino)
    assert both.images > 0
    assert both.jaccard == teacher.jaccard and torch.equal(both.per_head, teacher.per_head)
    assert not torch.equal(both.per_head, student.per_head)


def test_receptive_fields_are_the_teachers(tmp_path, monkeypatch):
    import callbacks.receptive_field as receptive_field

    dino = FakeDino()
    models = []
    real = receptive_field.effective_receptive_field
    monkeypatch.setattr(receptive_field, "effective_receptive_field",
                        lambda model, *a, **k: models.append(model) or real(model, *a, **k))
    callback = receptive_field.ReceptiveFieldCallback(layers="0,1", num_images=2)
    assert callback.check(None, dino) is None
    figure = callback.draw(fake_trainer(tmp_path), dino, torch.randn(2, 3, 32, 32))
    assert models == [dino.teacher_backbone.vit] * 2
    assert "the teacher's centre unit" in figure.texts[0].get_text()


def test_online_probe_trains_on_teacher_tokens(voc_root, monkeypatch):
    """The probe's step reads the teacher's patch tokens (it never sees the student)."""
    import callbacks.online_probe as online_probe
    from config.hparams import SegmentationConfig

    dino = FakeDino()
    read = []
    real = online_probe.patch_tokens
    monkeypatch.setattr(online_probe, "patch_tokens", lambda vit, *a, **k: read.append(vit) or real(vit, *a, **k))
    callback = online_probe.OnlineProbeCallback(SegmentationConfig(), img_size=32, batch_size=4)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(root=str(voc_root)), is_global_zero=True, callbacks=[],
                              precision_plugin=SimpleNamespace(forward_context=lambda: None))
    callback.setup(trainer, dino, "fit")
    callback.on_train_start(trainer, dino)
    loss = callback.step(trainer, dino)
    assert read == [dino.teacher_backbone.vit] and math.isfinite(float(loss))


# -- the teacher-entropy picture ------------------------------------------------------------------------------
def feed(callback, module, trainer, values):
    """Training steps as Lightning runs them: the module sets its entropies, the optimiser step moves
    global_step on; the batch's step is the one before."""
    for h, hm in values:
        callback.on_train_batch_start(trainer, module, None, trainer.global_step)
        module.last_teacher_entropy, module.last_teacher_mean_entropy = torch.tensor(h), torch.tensor(hm)
        trainer.global_step += 1
        callback.on_train_batch_end(trainer, module, None, None, trainer.global_step - 1)


def test_entropy_history_is_kept_in_order_on_the_device_and_grows(tmp_path, monkeypatch):
    import callbacks.dino_entropy as dino_entropy

    monkeypatch.setattr(dino_entropy, "INITIAL_CAPACITY", 4)
    callback, dino, trainer = dino_entropy.TeacherEntropyCallback(), FakeDino(), fake_trainer(tmp_path)
    values = [(0.1 * i, 4.0 - 0.01 * i) for i in range(11)]  # 11 > 4 → the buffer doubles twice
    feed(callback, dino, trainer, values)
    steps, history = callback.history()
    assert steps == list(range(11))  # the batches' steps, as metrics.csv has them
    assert torch.allclose(history, torch.tensor(values))
    assert callback._values.device == dino.center.device and callback._values.shape[0] == 16
    # nothing recorded: no entropies on the module, another rank, a sanity check, the batch-size tuner's steps
    from pytorch_lightning.callbacks import BatchSizeFinder

    for module, changes in [(Single(Backbone(seed=3)), {}), (dino, {"is_global_zero": False}),
                            (dino, {"sanity_checking": True}), (dino, {"callbacks": [BatchSizeFinder()]})]:
        other = SimpleNamespace(**{**vars(trainer), **changes})
        callback.on_train_batch_end(other, module, None, None, 0)
    assert callback.history()[0] == steps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a host synchronisation can only be caught on CUDA")
def test_recording_never_synchronises_with_the_host(tmp_path):
    from callbacks.dino_entropy import INITIAL_CAPACITY, TeacherEntropyCallback

    callback, dino, trainer = TeacherEntropyCallback(), FakeDino().cuda(), fake_trainer(tmp_path)
    for step in range(INITIAL_CAPACITY + 3):  # through a growth of the buffer
        h, hm = torch.rand((), device="cuda"), torch.rand((), device="cuda")
        dino.last_teacher_entropy, dino.last_teacher_mean_entropy = h, hm
        trainer.global_step = step
        torch.cuda.set_sync_debug_mode("error")
        try:
            callback.on_train_batch_end(trainer, dino, None, None, step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert callback._values.is_cuda and len(callback.history()[0]) == INITIAL_CAPACITY + 3


def test_entropy_history_survives_a_checkpoint(tmp_path):
    from callbacks.dino_entropy import TeacherEntropyCallback

    first, dino, trainer = TeacherEntropyCallback(), FakeDino(), fake_trainer(tmp_path)
    feed(first, dino, trainer, [(1.0, 3.0), (0.5, 3.5)])
    path = tmp_path / "state.pt"
    torch.save(first.state_dict(), path)
    resumed = TeacherEntropyCallback()
    resumed.load_state_dict(torch.load(path, weights_only=True))
    feed(resumed, dino, trainer, [(0.25, 3.75)])
    steps, values = resumed.history()
    assert steps == [0, 1, 2] and values.tolist() == [[1.0, 3.0], [0.5, 3.5], [0.25, 3.75]]
    assert TeacherEntropyCallback().state_dict() == {}  # nothing recorded: nothing saved
    empty = TeacherEntropyCallback()
    empty.load_state_dict({})
    assert empty.history()[0] == []


def test_entropy_figure_shows_both_curves_their_gap_and_the_two_collapse_levels():
    import matplotlib

    matplotlib.use("Agg")
    from callbacks.dino_entropy import plot_teacher_entropy

    steps = [10, 20, 30]
    values = torch.tensor([[4.0, 4.1], [2.0, 3.9], [0.5, 3.7]])  # teacher entropy, entropy of the mean
    figure = plot_teacher_entropy(steps, values, out_dim=64, title="t")
    top, bottom = figure.axes
    lines = {line.get_label(): line for line in top.get_lines()}
    teacher = next(l for name, l in lines.items() if name.startswith("teacher entropy"))
    mean = next(l for name, l in lines.items() if name.startswith("entropy of the batch-mean"))
    assert list(teacher.get_xdata()) == steps and list(teacher.get_ydata()) == pytest.approx([4.0, 2.0, 0.5])
    assert list(mean.get_ydata()) == pytest.approx([4.1, 3.9, 3.7])
    levels = sorted(float(l.get_ydata()[0]) for l in top.get_lines() if len(set(l.get_ydata())) == 1
                    and l not in (teacher, mean))
    assert levels == pytest.approx([0.0, math.log(64)])
    assert top.get_ylim()[1] > math.log(64) and top.get_ylim()[0] < 0
    gap = bottom.get_lines()[0]
    assert list(gap.get_ydata()) == pytest.approx([0.1, 1.9, 3.2])


def test_long_histories_are_drawn_as_block_means():
    from callbacks.dino_entropy import block_means

    values = torch.arange(10.0).repeat(2, 1).T  # (10, 2)
    xs, ys, f = block_means(list(range(10)), values, max_points=4)  # f = ceil(10 / 4) = 3: blocks 3, 3, 3, 1
    assert f == 3 and xs == [1.0, 4.0, 7.0, 9.0] and ys[:, 0].tolist() == [1.0, 4.0, 7.0, 9.0]
    xs, ys, f = block_means([5, 6], values[:2], max_points=4)
    assert f == 1 and xs == [5.0, 6.0] and torch.equal(ys, values[:2])


def test_entropy_picture_is_drawn_every_n_epochs_and_after_the_last(tmp_path):
    from callbacks.dino_entropy import TeacherEntropyCallback

    callback, dino = TeacherEntropyCallback(every_n_epochs=2), FakeDino(out_dim=128)
    trainer = fake_trainer(tmp_path, max_epochs=4)
    for epoch in range(4):
        trainer.current_epoch = epoch
        feed(callback, dino, trainer, [(1.0, 4.0), (0.8, 4.2)])
        callback.on_train_epoch_end(trainer, dino)
    wait_for_pictures()
    assert sorted(p.name for p in (tmp_path / "media").glob("*.png")) == [
        "teacher_entropy_e000.png", "teacher_entropy_e002.png", "teacher_entropy_e003.png"]


# -- dispatch and sweeps -------------------------------------------------------------------------------------
def names(callbacks) -> list[str]:
    return [type(c).__name__ for c in callbacks]


def parsed(*flags: str):
    from config.loading import parse_config

    return parse_config(list(flags))


def test_dino_gets_the_entropy_picture_instead_of_the_cross_correlation():
    dino = names(visualisation_callbacks(parsed("--task=dino", "--callbacks.views=true", "--callbacks.online_probe=true")))
    assert "TeacherEntropyCallback" in dino and "CrossCorrelationCallback" not in dino
    for name in ("AttentionMapCallback", "EmergenceCallback", "OnlineProbeCallback"):
        assert name in dino
    assert any("View" in n for n in dino)
    assert "TeacherEntropyCallback" not in names(visualisation_callbacks(parsed("--task=dino", "--callbacks.teacher_entropy=false")))
    bt = names(visualisation_callbacks(parsed("--task=barlow_twins")))
    assert "CrossCorrelationCallback" in bt and "TeacherEntropyCallback" not in bt
    seg = names(visualisation_callbacks(parsed("--task=segmentation")))
    assert "EmergenceCallback" not in seg and "TeacherEntropyCallback" not in seg


def test_sweep_metrics_include_what_the_callbacks_log():
    from tools.sweep import SweepError, check_metric

    on = parsed("--task=barlow_twins", "--callbacks.online_probe=true")
    assert {"val/attn_jaccard", "val/probe_mIoU", "cc/diag_mean"} <= set(callback_metrics(on))
    off = parsed("--task=barlow_twins", "--callbacks.emergence=false")
    assert "val/attn_jaccard" not in callback_metrics(off)
    sweep = SimpleNamespace(metric={"name": "val/attn_jaccard", "goal": "maximize"}, path=Path("s.yaml"))
    check_metric(sweep, [on])
    with pytest.raises(SweepError, match="'val/attn_jaccard' is never logged by task 'barlow_twins'"):
        check_metric(sweep, [on, off])


def test_the_dino_sweep_needs_the_emergence_callback_for_its_metric():
    from tools import sweep

    path = Path(__file__).resolve().parent.parent / "sweeps" / "dino_teacher_temp.yaml"
    plan = sweep.plan(path, overrides=["data.dataset=synthetic"], strict_data=True)
    assert [r.config.dino.teacher_temp for r in plan.runs] == [0.04, 0.055, 0.07]
    assert all(r.config.task == "dino" and r.config.optim.lr_scaling == "linear" for r in plan.runs)  # DINO's recipe
    with pytest.raises(sweep.SweepError, match="'val/attn_jaccard' is never logged by task 'dino'"):
        sweep.plan(path, overrides=["data.dataset=synthetic", "callbacks.emergence=false"], strict_data=True)


# -- end to end ----------------------------------------------------------------------------------------------
def test_tiny_dino_run_draws_and_logs_every_picture(tiny, tmp_path):
    """A tiny --task=dino run with every picture and probe on: the files, the metrics and wandb's records."""
    import csv

    import main
    from tests.wandb_records import logged, run_file

    args = [a for a in tiny("dino", task="dino", dino__out_dim=64, dino__local_crops_number=2, dino__hidden_dim=32,
                            dino__bottleneck_dim=16, trainer__max_epochs=1, callbacks__every_n_epochs=1,
                            callbacks__attention_blocks="0", callbacks__views="true", callbacks__erf="true",
                            callbacks__erf_images=2, callbacks__emergence_images=4, callbacks__online_probe="true",
                            callbacks__online_probe_batch_size=4)
            if not a.startswith("--barlow.")]
    assert main.main(args) == 0
    run = tmp_path / "runs" / "dino"
    assert sorted(p.name for p in (run / "media").glob("*.png")) == [
        "attention_student_b00_e000.png", "attention_student_e000.png", "attention_teacher_b00_e000.png",
        "attention_teacher_e000.png", "erf_e000.png", "teacher_entropy_e000.png", "views_e000.png"]
    with (run / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))

    def column(key):
        return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]

    assert [step for step, _ in column("val/attn_jaccard")] == [0, 4]  # before training, after the epoch
    assert all(0 <= v <= 1 for _, v in column("val/attn_jaccard"))
    assert [step for step, _ in column("val/probe_mIoU")] == [4]
    entropies = column("train/teacher_entropy")
    assert [step for step, _ in entropies] == [0, 1, 2, 3]
    # the picture's history is what the module logged, step for step, and it travels in the checkpoint
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    history = next(v for k, v in state.items() if k.startswith("TeacherEntropyCallback"))
    assert history["steps"].tolist() == [0, 1, 2, 3]
    assert history["values"][:, 0].tolist() == pytest.approx([v for _, v in entropies], rel=1e-6)
    assert history["values"][:, 1].tolist() == pytest.approx([v for _, v in column("train/teacher_mean_entropy")],
                                                              rel=1e-6)
    assert (0 <= history["values"]).all() and (history["values"] <= math.log(64) + 1e-5).all()
    _, wandb_history = logged(run_file(run))
    keys = {k.split("/")[0] + "/" + k.split("/")[1] for h in wandb_history for k in h if k.startswith("media/")}
    assert keys >= {"media/attention_teacher", "media/attention_student", "media/attention_teacher_b00",
                    "media/erf", "media/teacher_entropy", "media/views"}
    scalars = {k for h in wandb_history for k in h}
    assert {"val/attn_jaccard", "val/probe_mIoU", "train/teacher_entropy", "train/teacher_mean_entropy"} <= scalars


def test_batch_size_tuner_runs_on_crop_lists_and_its_steps_are_not_in_the_entropy_history(tiny, tmp_path):
    import yaml

    import main

    args = [a for a in tiny("tuned", task="dino", dino__out_dim=64, dino__local_crops_number=2, dino__hidden_dim=32,
                            dino__bottleneck_dim=16, trainer__max_epochs=1, optim__lr_scaling="none",
                            trainer__tune_batch_size="true", trainer__tune_batch_size_max=16,
                            callbacks__attention="false", callbacks__emergence="false")
            if not a.startswith("--barlow.")]
    assert main.main(args) == 0
    run = tmp_path / "runs" / "tuned"
    assert yaml.safe_load((run / "tuning.yaml").read_text())["batch_size"] == 16  # 8 → 16, the bound
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    history = next(v for k, v in state.items() if k.startswith("TeacherEntropyCallback"))
    assert history["steps"].tolist() == [0, 1]  # 32 images / 16: the two training steps, none of the trials'
    assert (run / "media" / "teacher_entropy_e000.png").is_file()
