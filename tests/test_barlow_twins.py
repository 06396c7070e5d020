"""Barlow Twins module: micro-batching (gradient caching) is exact, replays random state, and counts
BatchNorm statistics once; batch-independent ResNet norms."""
from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from config.loading import parse_config
from lightningmodules.barlow_twins import BarlowTwinsModule
from models.losses import barlow_twins_loss

TINY_VIT = ["--backbone.name=vit", "--backbone.depth=2", "--backbone.embed_dim=32", "--backbone.num_heads=2",
            "--backbone.patch_size=8", "--data.img_size=32", "--barlow.proj_dim=64", "--optim.warmup_epochs=0"]


def module_from(*flags: str, seed: int = 0) -> BarlowTwinsModule:
    torch.manual_seed(seed)
    return BarlowTwinsModule.from_hparams(parse_config([*TINY_VIT, *flags]))


def views(n: int, size: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)


def well_posed(name: str, value: torch.Tensor) -> torch.Tensor:
    """The part of a parameter (or its gradient) whose exact gradient is not identically 0.

    Two parameters cannot change the loss: the key third of a qkv bias adds q·b to every logit of a softmax
    row, which the softmax ignores; the ViT's final norm bias shifts every embedding equally, which the
    projector's first Linear + BatchNorm subtracts again. Their computed gradients are float32 cancellation
    noise that depends on the summation order, and Adam's first step (≈ lr · sign(g)) turns any noise into ±lr.
    """
    if name.endswith("vit.norm.bias"):
        return value[:0]
    if name.endswith("attn.qkv.bias"):
        q, _, v = value.chunk(3)
        return torch.cat([q, v])
    return value


def assert_grads_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """Equal up to float32 summation-order noise, measured against the tensor's largest gradient."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * scale + 1e-12, msg=lambda m: f"{name}: {m}")


def one_lightning_step(module: pl.LightningModule, batch) -> dict[str, torch.Tensor]:
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    # batch_size=None: the loader yields the ready batch as it is
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def reference_loss(module: BarlowTwinsModule, x1, x2) -> torch.Tensor:
    """The un-chunked loss written out by hand: backbone on all images, projector per view, loss."""
    f = module.backbone(torch.cat([x1, x2]))
    f1, f2 = f.chunk(2)
    return barlow_twins_loss(module.projector(f1), module.projector(f2), module.cfg.barlow.lambd)[0]


@pytest.mark.parametrize("optimizer", ["adamw", "lars"])
def test_micro_batched_step_equals_full_batch_step(optimizer):
    x1, x2 = views(16)
    full = one_lightning_step(module_from(f"--optim.name={optimizer}"), (x1, x2))
    chunked = one_lightning_step(module_from(f"--optim.name={optimizer}", "--barlow.micro_batch_size=4"), (x1, x2))
    start = module_from().state_dict()
    moved = [k for k in full if not torch.equal(full[k], start[k])]
    assert len(moved) > 10  # the step really changed the parameters
    for key in full:
        torch.testing.assert_close(well_posed(key, chunked[key]), well_posed(key, full[key]), rtol=1e-5, atol=1e-6)


def test_micro_batched_gradients_equal_hand_written_full_batch_gradients():
    x1, x2 = views(12)
    reference = module_from()
    reference_loss(reference, x1, x2).backward()
    chunked = module_from("--barlow.micro_batch_size=5")  # 24 images → chunks 5, 5, 5, 5, 4
    f1, f2 = chunked.features(x1, x2)
    loss = barlow_twins_loss(chunked.projector(f1), chunked.projector(f2), chunked.cfg.barlow.lambd)[0]
    loss.backward()
    for (name, p), (_, q) in zip(reference.named_parameters(), chunked.named_parameters()):
        assert_grads_close(name, well_posed(name, q.grad), well_posed(name, p.grad))


def test_recomputation_replays_stochastic_depth():
    """Checkpointed chunks must draw the same drop-path masks in the backward recomputation as in the
    forward pass: gradients equal those of the same chunks run with a full graph (no recomputation)."""
    x1, x2 = views(8)
    flags = ("--backbone.drop_path_rate=0.5", "--barlow.micro_batch_size=4")
    plain, cached = module_from(*flags), module_from(*flags)

    torch.manual_seed(123)
    f = torch.cat([plain.backbone(part) for part in torch.cat([x1, x2]).split(4)])
    barlow_twins_loss(*(plain.projector(v) for v in f.chunk(2)), 0.0051)[0].backward()

    torch.manual_seed(123)
    torch.randn(1000)  # the recomputation happens later, after other draws: it must not use them
    torch.manual_seed(123)
    g1, g2 = cached.features(x1, x2)
    loss = barlow_twins_loss(cached.projector(g1), cached.projector(g2), 0.0051)[0]
    torch.randn(1000)  # RNG advanced between forward and backward
    loss.backward()
    grads = [(n, p.grad, q.grad) for (n, p), (_, q) in zip(plain.named_parameters(), cached.named_parameters())]
    assert any(not torch.equal(p.grad, torch.zeros_like(p.grad)) for p in plain.backbone.parameters())
    for name, expected, actual in grads:
        assert_grads_close(name, well_posed(name, actual), well_posed(name, expected))


def resnet_module(norm: str, micro: int = 0) -> BarlowTwinsModule:
    torch.manual_seed(0)
    return BarlowTwinsModule.from_hparams(parse_config([
        "--backbone.name=resnet50", f"--backbone.resnet_norm={norm}", "--data.img_size=32",
        "--barlow.proj_dim=32", f"--barlow.micro_batch_size={micro}"]))


def batchnorm_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def test_resnet_batchnorm_statistics_are_counted_once_per_chunk():
    """Recomputing a chunk in the backward pass must not update the running statistics a second time:
    they must equal those of running each chunk once."""
    x1, x2 = views(8)
    chunked = resnet_module("batch", micro=4)
    f1, f2 = chunked.features(x1, x2)
    barlow_twins_loss(chunked.projector(f1), chunked.projector(f2), 0.0051)[0].backward()

    reference = resnet_module("batch")
    with torch.no_grad():
        for view in (x1, x2):  # each view separately (BatchNorm), each in chunks of 4
            for part in view.split(4):
                reference.backbone(part)
    expected, actual = batchnorm_buffers(reference.backbone), batchnorm_buffers(chunked.backbone)
    assert int(actual["model.bn1.num_batches_tracked"]) == 4  # 2 views × 2 chunks, not 8
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], msg=key)


@pytest.mark.parametrize("norm", ["frozen", "group"])
def test_batch_independent_resnet_norms_make_chunking_exact(norm):
    x1, x2 = views(4)
    full, chunked = resnet_module(norm), resnet_module(norm, micro=2)
    assert not full.backbone.batch_coupled
    for m in (full, chunked):
        f1, f2 = m.features(x1, x2)
        barlow_twins_loss(m.projector(f1), m.projector(f2), 0.0051)[0].backward()
    for (name, p), (_, q) in zip(full.backbone.named_parameters(), chunked.backbone.named_parameters()):
        assert_grads_close(name, q.grad, p.grad)


def test_frozen_norm_keeps_statistics_and_trains_affine():
    m = resnet_module("frozen")
    before = batchnorm_buffers(m.backbone)
    x1, x2 = views(4)
    f1, f2 = m.features(x1, x2)
    barlow_twins_loss(m.projector(f1), m.projector(f2), 0.0051)[0].backward()
    after = batchnorm_buffers(m.backbone)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert m.backbone.model.bn1.weight.grad is not None
    # one image's features do not depend on the rest of the batch
    torch.testing.assert_close(m.backbone(x1[:1]), m.backbone(x1)[:1], rtol=1e-4, atol=1e-5)


def test_validation_chunks_without_graph():
    m = module_from("--barlow.micro_batch_size=3")
    x1, x2 = views(8)
    with torch.no_grad():
        f1, f2 = m.features(x1, x2)
    ref1, ref2 = copy.deepcopy(m).backbone(torch.cat([x1, x2])).chunk(2)
    torch.testing.assert_close(f1, ref1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f2, ref2, rtol=1e-5, atol=1e-6)


def test_compiled_backbone_trains_with_unchanged_checkpoint_keys(tiny):
    """--trainer.compile compiles the backbone in place: the run trains, and its checkpoint has the same
    parameter names as an uncompiled run's (so it loads into segmentation and uncompiled runs)."""
    import trainer
    from config.loading import parse_config as parse

    runs = {}
    for name, extra in (("plain", {}), ("compiled", {"trainer__compile": "true", "barlow__micro_batch_size": 4})):
        cfg = parse(tiny(name, trainer__max_epochs=1, trainer__limit_train_batches=2, trainer__limit_val_batches=0,
                         log__wandb_mode="disabled", **extra))
        runs[name] = trainer.run(cfg)
    assert runs["compiled"].module.backbone._compiled_call_impl is not None
    assert runs["plain"].module.backbone._compiled_call_impl is None
    keys = {name: set(torch.load(run.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
            for name, run in runs.items()}
    assert keys["plain"] == keys["compiled"]
    assert torch.isfinite(runs["compiled"].trainer.callback_metrics["train/loss_epoch"])
