"""Components describe and check themselves: a head (or backbone) registered in a test, with nothing added to
config/validation.py, is validated, built and trained, and its own check's message reaches the user."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import main
from config.hparams import Hparams
from config.loading import ConfigError, parse_config
from config.validation import validate

OWN_RULE = "--segmentation.head=dummy needs --segmentation.hidden_dim=8 (its one hidden layer), got {}"


class DummyHead(nn.Module):
    """1×1 conv → ReLU → 1×1 classifier on the last block's patch tokens."""

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int):
        super().__init__()
        self.hidden = nn.Sequential(nn.Conv2d(in_dim, hidden_dim, 1), nn.ReLU())
        self.classify = nn.Conv2d(hidden_dim, num_classes, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        (tokens,) = features
        return self.classify(self.hidden(tokens))


def dummy_check(cfg: Hparams):
    hidden = cfg.segmentation.hidden_dim
    return None if hidden == 8 else OWN_RULE.format(hidden)


@pytest.fixture(params=[{}, {"aux_heads": True}], ids=["plain", "says-aux"])
def dummy_head(request):
    """The head 'dummy': one factory and one registry line, as a new head file would have; unregistered after."""
    from models.heads import HEADS

    def build(in_dim: int, num_classes: int, patch_size: int, cfg, num_levels: int = 1) -> nn.Module:
        return DummyHead(in_dim, num_classes, cfg.hidden_dim)

    HEADS.register("dummy", check_config=dummy_check, **request.param)(build)
    try:
        yield request.param
    finally:
        HEADS.unregister("dummy")
    assert "dummy" not in HEADS


def seg_flags(*flags: str) -> list[str]:
    return ["--task=segmentation", "--data.dataset=synthetic", "--backbone.name=vit", "--backbone.depth=2",
            "--backbone.embed_dim=32", "--backbone.num_heads=2", "--backbone.patch_size=8", "--data.img_size=32",
            *flags]


def test_a_registered_head_validates_builds_and_trains(dummy_head, tiny, tmp_path):
    validate(parse_config(seg_flags("--segmentation.head=dummy", "--segmentation.hidden_dim=8")))
    args = tiny("seg", task="segmentation", segmentation__head="dummy", segmentation__hidden_dim=8,
                data__batch_size=4, trainer__max_steps=1, trainer__limit_val_batches=1,
                callbacks__predictions="false", callbacks__attention="false", log__wandb_mode="disabled")
    assert main.main(args) == 0
    ckpt = torch.load(tmp_path / "runs" / "seg" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1
    weights = ckpt["state_dict"]
    assert weights["model.head.hidden.0.weight"].shape == (8, 32, 1, 1)  # the dummy head, built as registered
    assert weights["model.head.classify.weight"].shape == (21, 8, 1, 1)


def test_a_registered_heads_own_check_reaches_the_user(dummy_head, tiny, capsys):
    with pytest.raises(ConfigError) as err:
        validate(parse_config(seg_flags("--segmentation.head=dummy", "--segmentation.hidden_dim=16")))
    assert str(err.value) == OWN_RULE.format(16)
    args = tiny("seg", task="segmentation", segmentation__head="dummy", segmentation__hidden_dim=16)
    assert main.main(args) == 2
    assert capsys.readouterr().err.strip() == f"error: {OWN_RULE.format(16)}"


def test_what_a_head_says_about_itself_decides_its_options(dummy_head):
    """--segmentation.aux_loss applies to the heads whose registry line says aux_heads=True, and the message
    lists them; nothing about the dummy head is written anywhere else."""
    flags = seg_flags("--segmentation.head=dummy", "--segmentation.hidden_dim=8", "--segmentation.aux_loss=true")
    if dummy_head.get("aux_heads"):
        validate(parse_config(flags))
    else:
        with pytest.raises(ConfigError, match=r"aux_loss applies to --segmentation.head=deeplabv3, setr_pup, "
                                              r"setr_mla only \(their auxiliary heads\), not dummy"):
            validate(parse_config(flags))
    with pytest.raises(ConfigError, match="classifier_dropout applies to --segmentation.head=setr_pup, setr_mla "
                                          "only, not dummy"):
        validate(parse_config([*flags[:-1], "--segmentation.classifier_dropout=0.1"]))


def test_an_unregistered_head_is_unknown_again():
    from models.heads import HEADS

    assert "dummy" not in HEADS
    with pytest.raises(ConfigError, match="unknown head 'dummy'"):
        validate(parse_config(seg_flags("--segmentation.head=dummy")))


@pytest.fixture
def dummy_backbone():
    """A backbone whose registry line carries its own check (its factory is never called: validation only)."""
    from models.backbones import BACKBONES

    def check(cfg: Hparams):
        size = cfg.data.img_size
        return None if size == 32 else f"--backbone.name=dummy_net reads 32 px inputs, got --data.img_size={size}"

    BACKBONES.register("dummy_net", check_config=check)(lambda cfg, img_size: None)
    try:
        yield
    finally:
        BACKBONES.unregister("dummy_net")


def test_a_registered_backbones_own_check_reaches_the_user(dummy_backbone):
    with pytest.raises(ConfigError, match="^--backbone.name=dummy_net reads 32 px inputs, got --data.img_size=64$"):
        validate(parse_config(["--data.dataset=synthetic", "--backbone.name=dummy_net", "--data.img_size=64",
                               "--callbacks.attention=false", "--callbacks.emergence=false"]))
