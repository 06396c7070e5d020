"""Distributed Barlow Twins: sharded sampling gives the same global batches, and a 2-process DDP step
(gloo on CPU) has the loss and gradients of one process on the concatenated batch."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing

from config.loading import parse_config
from datamodules import sampling
from datamodules.barlow_twins import BarlowTwinsDataModule
from lightningmodules.barlow_twins import BarlowTwinsModule
from tests.conftest import TINY_DATA


@pytest.mark.parametrize("world", [2, 3])
def test_shards_together_hold_the_single_process_batches(monkeypatch, world):
    n, batch = 23, 2
    single = list(sampling.SeededSampler(n, seed=5))
    shards = []
    for rank in range(world):
        monkeypatch.setattr(sampling, "distributed_rank_and_size", lambda r=rank: (r, world))
        shard = sampling.SeededSampler(n, seed=5)
        shard.set_epoch(0)
        shards.append(list(shard))
        assert len(shard) == n // world  # even shards: every process runs the same number of steps
    steps = min(len(s) for s in shards) // batch
    for step in range(steps):
        global_batch = [key for s in shards for key in s[step * batch:(step + 1) * batch]]
        expected = single[step * world * batch:(step + 1) * world * batch]  # same items, same item seeds
        assert sorted(global_batch) == sorted(expected)


def test_uneven_shards_keep_every_item(monkeypatch):
    keys = []
    for rank in range(3):
        monkeypatch.setattr(sampling, "distributed_rank_and_size", lambda r=rank: (r, 3))
        keys += list(sampling.SeededSampler(10, seed=0, shuffle=False, vary_with_epoch=False, even=False))
    assert sorted(index for index, _ in keys) == list(range(10))


class GradientDump(pl.Callback):
    """Saves rank 0's loss and gradients (after DDP's all-reduce) of the first step, then its parameters."""

    def __init__(self, path: str):
        self.path = path
        self.record: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            self.record["loss"] = outputs["loss"].detach().clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.record["grads"] = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                                    if p.grad is not None}

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            self.record["params"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            torch.save(self.record, self.path)


def run_one_step(voc_root, batch_size: int, devices: int, path, micro: int = 0):
    cfg = parse_config([
        "--data.dataset=synthetic", f"--data.root={voc_root.parent.parent}",
        *[f"--data.{k}={v}" for k, v in TINY_DATA.items()], "--data.img_size=32",
        f"--data.batch_size={batch_size}", "--data.num_workers=0",
        "--backbone.name=vit", "--backbone.depth=2", "--backbone.embed_dim=32", "--backbone.num_heads=2",
        "--backbone.patch_size=8", "--barlow.proj_dim=64", f"--barlow.micro_batch_size={micro}",
        "--optim.name=lars", "--optim.warmup_epochs=0",
    ])
    torch.manual_seed(0)
    module = BarlowTwinsModule.from_hparams(cfg)
    datamodule = BarlowTwinsDataModule(cfg.data, cfg.aug, cfg.seed)
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, use_distributed_sampler=False, callbacks=[GradientDump(str(path))],
    )
    trainer.fit(module, datamodule=datamodule)
    return torch.load(path, weights_only=True)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is unavailable")
@pytest.mark.parametrize("micro", [0, 2])
def test_two_process_ddp_step_equals_single_process_on_concatenated_batch(voc_root, tmp_path, micro):
    single = run_one_step(voc_root, batch_size=8, devices=1, path=tmp_path / "single.pt")
    ddp = run_one_step(voc_root, batch_size=4, devices=2, path=tmp_path / "ddp.pt", micro=micro)
    torch.testing.assert_close(ddp["loss"], single["loss"], rtol=1e-5, atol=1e-5)
    assert ddp["grads"].keys() == single["grads"].keys() and len(single["grads"]) > 10
    from tests.test_barlow_twins import assert_grads_close, well_posed

    for name, expected in single["grads"].items():
        assert_grads_close(name, well_posed(name, ddp["grads"][name]), well_posed(name, expected))
    # LARS: the step is proportional to the gradient, so parameters agree to float32 tolerance too
    for key, expected in single["params"].items():
        torch.testing.assert_close(ddp["params"][key], expected, rtol=1e-5, atol=1e-6, msg=key)


class DinoStepDump(GradientDump):
    """GradientDump for DINO: the loss averaged over the processes (each computes it on its own images), and
    the center and teacher entropies after the step (computed over the global batch)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            loss = outputs["loss"].detach().clone()
            if trainer.world_size > 1:
                torch.distributed.all_reduce(loss)
                loss /= trainer.world_size
            self.record.update(loss=loss, center=pl_module.center.clone(),
                               entropy=pl_module.last_teacher_entropy.clone(),
                               mean_entropy=pl_module.last_teacher_mean_entropy.clone())


def run_one_dino_step(voc_root, batch_size: int, devices: int, path, micro: int = 0):
    from lightningmodules.dino import DinoModule, dino_datamodule

    cfg = parse_config([
        "--task=dino", "--data.dataset=synthetic", f"--data.root={voc_root.parent.parent}",
        *[f"--data.{k}={v}" for k, v in TINY_DATA.items()], "--data.img_size=32",
        f"--data.batch_size={batch_size}", "--data.num_workers=0",
        "--backbone.name=vit", "--backbone.depth=2", "--backbone.embed_dim=32", "--backbone.num_heads=2",
        "--backbone.patch_size=8", "--backbone.drop_path_rate=0", "--dino.out_dim=64", "--dino.hidden_dim=48",
        "--dino.bottleneck_dim=16", "--dino.local_crops_number=2", f"--dino.micro_batch_size={micro}",
        "--optim.warmup_epochs=0",
    ])
    torch.manual_seed(0)
    module = DinoModule.from_hparams(cfg)
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, use_distributed_sampler=False, callbacks=[DinoStepDump(str(path))],
    )
    trainer.fit(module, datamodule=dino_datamodule(cfg))
    return torch.load(path, weights_only=True)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is unavailable")
def test_two_process_dino_step_equals_single_process_on_concatenated_batch(voc_root, tmp_path):
    """DINO's loss is a mean of per-image terms given the teacher and the center: each process's loss on its
    half of the batch, DDP-averaged, has the single-process gradients; the center (all-reduced teacher-logit
    sums) and the entropy diagnostics are those of the global batch."""
    single = run_one_dino_step(voc_root, batch_size=8, devices=1, path=tmp_path / "single.pt")
    ddp = run_one_dino_step(voc_root, batch_size=4, devices=2, path=tmp_path / "ddp.pt", micro=2)
    for key in ("loss", "entropy", "mean_entropy"):
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(ddp["center"], single["center"], rtol=1e-5, atol=1e-7)
    assert not torch.equal(single["center"], torch.zeros_like(single["center"]))
    assert ddp["grads"].keys() == single["grads"].keys() and len(single["grads"]) > 10
    from tests.test_barlow_twins import assert_grads_close, well_posed

    for name, expected in single["grads"].items():
        assert_grads_close(name, well_posed(name, ddp["grads"][name]), well_posed(name, expected))
