"""The contract between a training method and the rest of the framework (lightningmodules/base.py, the task
registry's facts, the interface callbacks read): a method registered from this test file alone, touching no
project file, trains with the attention-map and emergence callbacks on; every registered task honours the
contract; the facts that used to be name literals are read from the registry entries."""
from __future__ import annotations

import csv

import pytest
import torch
from torch import Tensor, nn

from datamodules.barlow_twins import BarlowTwinsDataModule
from lightningmodules import TASKS, Task, TaskModule
from models.backbones import backbone_kind, build_backbone, has_attention, is_vit

pytestmark = pytest.mark.usefixtures("one_thread")

DUMMY = "test_dummy_method"


class DummyMethod(TaskModule):
    """A minimal two-view method: the two views' embeddings pulled together, their batch variance kept at 1."""

    def __init__(self, config: dict):
        super().__init__(config)
        self.backbone = build_backbone(self.cfg.backbone, self.cfg.data.img_size)
        self.head = nn.Linear(self.backbone.num_features, 16)

    def embed(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.micro_batched(self.backbone, x1)), self.head(self.micro_batched(self.backbone, x2))

    def loss(self, batch) -> Tensor:
        z1, z2 = self.embed(batch[0], batch[1])
        return (z1 - z2).pow(2).mean() + (1 - z1.var(dim=0)).pow(2).mean()

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.train_metrics.add("train/loss", loss)
        self.train_metrics.commit(self, batch[0].shape[0], batch_idx)
        self.record_nonfinite(loss)
        return loss

    def validation_step(self, batch, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("val/loss", loss, batch_size=batch[0].shape[0])
        return loss


@pytest.fixture
def dummy_task():
    TASKS.register(DUMMY)(Task(module=DummyMethod, datamodule=lambda cfg: BarlowTwinsDataModule(cfg.data, cfg.aug, cfg.seed),
                               monitor="val/loss", mode="min", pretraining=True, views=2,
                               metrics=("train/loss_step", "train/loss_epoch", "val/loss")))
    try:
        yield DUMMY
    finally:
        TASKS.unregister(DUMMY)


def test_a_method_registered_in_a_test_file_trains_with_attention_and_emergence(dummy_task, tiny, tmp_path):
    import main

    flags = tiny("dummy", task=dummy_task, trainer__max_epochs=1, trainer__limit_train_batches=1,
                 callbacks__attention="true", callbacks__every_n_epochs=1,
                 callbacks__emergence="true", callbacks__emergence_every_n_epochs=1)
    assert main.main(flags) == 0
    run_dir = tmp_path / "runs" / "dummy"
    with (run_dir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    jaccards = [float(r["val/attn_jaccard"]) for r in rows if r.get("val/attn_jaccard")]
    assert jaccards and all(0.0 <= j <= 1.0 for j in jaccards)
    assert any(r.get("train/loss_step") for r in rows)
    pictures = [p.name for p in (run_dir / "media").rglob("*.png")]
    assert any(name.startswith("attention") for name in pictures), pictures


def test_the_callbacks_of_a_pretraining_task_come_from_its_registry_entry(dummy_task):
    from callbacks import callback_metrics, visualisation_callbacks
    from callbacks.emergence import EmergenceCallback
    from callbacks.online_probe import OnlineProbeCallback
    from callbacks.views import ViewPairsCallback
    from config.loading import parse_config

    cfg = parse_config([f"--task={dummy_task}", "--callbacks.online_probe=true", "--callbacks.views=true"])
    kinds = {type(c) for c in visualisation_callbacks(cfg)}
    assert {EmergenceCallback, OnlineProbeCallback, ViewPairsCallback} <= kinds
    assert "val/attn_jaccard" in callback_metrics(cfg) and "val/probe_mIoU" in callback_metrics(cfg)
    assert not any(name.startswith("cc/") for name in callback_metrics(cfg))  # no diagnostic picture declared


@pytest.mark.parametrize("name", ["barlow_twins", "dino", "segmentation", "vicreg"])
def test_every_registered_task_honours_the_contract(name):
    task = TASKS.get(name)
    assert issubclass(task.module, TaskModule)
    assert task.mode in ("min", "max") and task.monitor in task.metrics
    metric, which = task.report_metric()
    assert metric in task.metrics and which in ("final", "best")
    assert task.pretraining == (task.views == 2)
    from callbacks import TRAINING_DIAGNOSTICS

    assert task.diagnostic is None or task.diagnostic in TRAINING_DIAGNOSTICS


def test_registry_facts():
    # What used to be name comparisons spread over callbacks, validation and tools
    assert [n for n in TASKS.names() if TASKS.get(n).pretraining] == ["barlow_twins", "dino", "vicreg"]
    assert TASKS.get("barlow_twins").diagnostic == "cross_correlation"
    assert TASKS.get("dino").diagnostic == "teacher_entropy"
    assert TASKS.get("segmentation").report_metric() == ("val/mIoU", "best")
    assert TASKS.get("barlow_twins").min_reliable_batch == 64 and TASKS.get("dino").min_reliable_batch == 0
    assert (backbone_kind("vit"), has_attention("vit"), is_vit("vit")) == ("vit", True, True)
    assert (backbone_kind("pixels"), has_attention("pixels"), is_vit("pixels")) == ("vit", False, True)
    assert (backbone_kind("resnet50"), has_attention("resnet50"), is_vit("resnet50")) == ("cnn", False, False)
    assert has_attention("vit_small_patch16_224") and is_vit("vit_small_patch16_224")


def test_the_interface_defaults_and_dino_teacher():
    from callbacks.visual import backbone_of, evaluated_role, named_backbones
    from config.loading import parse_config, to_dict

    def tiny_cfg(task):
        return to_dict(parse_config([f"--task={task}", "--data.img_size=32", "--backbone.depth=1",
                                     "--backbone.embed_dim=16", "--backbone.num_heads=2", "--backbone.patch_size=8",
                                     "--dino.out_dim=32", "--dino.hidden_dim=16", "--dino.bottleneck_dim=8",
                                     "--vicreg.expander=32-32", "--barlow.proj_dim=32"]))

    vicreg = TASKS.get("vicreg").module(tiny_cfg("vicreg"))
    assert named_backbones(vicreg) == {"": vicreg.backbone} and backbone_of(vicreg) is vicreg.backbone
    assert vicreg.last_cross_correlation is None and vicreg.last_teacher_entropy is None  # declared defaults
    dino = TASKS.get("dino").module(tiny_cfg("dino"))
    assert evaluated_role(dino) == "teacher" and backbone_of(dino) is dino.teacher_backbone
    assert dino.output_dim == 32
    seg = TASKS.get("segmentation").module(tiny_cfg("segmentation"))
    assert backbone_of(seg) is seg.model.backbone


def test_micro_batched_forward_is_the_whole_batch_forward():
    """The base class's gradient-cached forward, on any method: the same outputs and gradients."""
    from config.loading import parse_config, to_dict

    class Chunked(DummyMethod):
        micro_batch_size = 3

    cfg = to_dict(parse_config(["--data.img_size=32", "--backbone.depth=1", "--backbone.embed_dim=16",
                                "--backbone.num_heads=2", "--backbone.patch_size=8"]))
    torch.manual_seed(0)
    whole, chunked = DummyMethod(cfg), Chunked(cfg)
    chunked.load_state_dict(whole.state_dict())
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    outputs = []
    for m in (whole, chunked):
        out = m.micro_batched(m.backbone, x)
        out.pow(2).sum().backward()
        outputs.append((out.detach(), m.backbone.vit.patch_embed.proj.weight.grad.clone()))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs[1][1], outputs[0][1], rtol=1e-4, atol=1e-6)
