"""VICReg (--task vicreg): the loss against facebookresearch/vicreg's main_vicreg.py transcribed by hand, the
official expander and recipe as the task's defaults, gradient-cached micro-batching, DDP on 2 processes equal
to 1 process on the concatenated batch, and a run with every pretraining callback, a kill and resume, and its
checkpoint initialising segmentation."""
from __future__ import annotations

import csv
import math
import signal

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from config.loading import parse_config
from lightningmodules.vicreg import VICRegModule, build_expander
from models.losses import vicreg_loss, vicreg_terms
from tests.conftest import TINY_DATA

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the official code, transcribed by hand (main_vicreg.py, VICReg.forward, one process) -----------------------
def off_diagonal(x):
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def official_vicreg(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    batch_size, num_features = x.shape  # args.batch_size: the (global) batch; num_features: the last width
    repr_loss = F.mse_loss(x, y)
    # FullGatherLayer over one process: the batch itself
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (batch_size - 1)
    cov_y = (y.T @ y) / (batch_size - 1)
    cov_loss = off_diagonal(cov_x).pow_(2).sum().div(num_features) + off_diagonal(cov_y).pow_(2).sum().div(num_features)
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


def official_lr(step, base_lr, batch_size, steps_per_epoch, epochs):
    """main_vicreg.py adjust_learning_rate."""
    max_steps = epochs * steps_per_epoch
    warmup_steps = 10 * steps_per_epoch
    base_lr = base_lr * batch_size / 256
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    step -= warmup_steps
    max_steps -= warmup_steps
    q = 0.5 * (1 + math.cos(math.pi * step / max_steps))
    end_lr = base_lr * 0.001
    return base_lr * q + end_lr * (1 - q)


def embeddings(n=16, d=24, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    # small spread: some dimensions below the variance target 1, so the hinge is active for some and not others
    x = torch.randn(n, d, generator=g) * scale * torch.linspace(0.2, 3.0, d)
    y = x + 0.5 * torch.randn(n, d, generator=g)
    return x.double(), y.double()


@pytest.mark.parametrize("coeffs", [(25.0, 25.0, 1.0), (1.0, 5.0, 0.1)])
def test_loss_and_gradients_equal_the_official_code(coeffs):
    x, y = embeddings()
    a, b = x.clone().float().requires_grad_(), y.clone().float().requires_grad_()
    got = vicreg_loss(a, b, *coeffs)
    got.backward()
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    expected = official_vicreg(xr, yr, *coeffs)  # float64: the reference is exact to float32 round-off
    expected.backward()
    assert torch.isclose(got.double(), expected, rtol=1e-5)
    torch.testing.assert_close(a.grad.double(), xr.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(b.grad.double(), yr.grad, rtol=1e-4, atol=1e-7)
    # some dimensions are below the variance target and some above: both branches of the hinge are exercised
    std = torch.sqrt((x - x.mean(0)).var(0) + 1e-4)
    assert (std < 1).any() and (std > 1).any()


def test_terms_by_hand_on_a_small_batch():
    # Two samples in two dimensions: every quantity by hand.
    z1 = torch.tensor([[1.0, 0.0], [-1.0, 2.0]])
    z2 = torch.tensor([[1.0, 1.0], [-1.0, 1.0]])
    loss, inv, var, cov = vicreg_terms(z1, z2)
    assert inv.item() == pytest.approx(((0 - 1) ** 2 + (2 - 1) ** 2) / 4)
    # z1 centred: [[1, -1], [-1, 1]]: variances 2, 2 (unbiased, N − 1 = 1); z2 centred: [[1, 0], [-1, 0]]: 2, 0
    s2, s0 = math.sqrt(2 + 1e-4), math.sqrt(0 + 1e-4)
    assert var.item() == pytest.approx((2 * max(0, 1 - s2)) / 2 / 2 + (max(0, 1 - s2) + max(0, 1 - s0)) / 2 / 2)
    # covariances: z1's off-diagonal (1·−1 + −1·1) / 1 = −2, twice, / D = 2 → 4; z2's is 0
    assert cov.item() == pytest.approx(2 * 4 / 2)
    assert loss.item() == pytest.approx(25 * inv.item() + 25 * var.item() + cov.item())


def test_loss_refuses_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        vicreg_loss(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="at least 2 samples"):
        vicreg_loss(torch.randn(1, 3), torch.randn(1, 3))


def test_loss_is_float32_under_autocast():
    x, y = (t.float() for t in embeddings())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vicreg_loss(x.bfloat16(), y.bfloat16())
    assert got.dtype == torch.float32
    assert torch.isclose(got.double(), official_vicreg(x.bfloat16().double(), y.bfloat16().double()), rtol=1e-5)


# -- the official model and recipe --------------------------------------------------------------------------------
def test_expander_is_the_official_projector():
    expander = build_expander(16, "32-32-8")
    kinds = [type(m) for m in expander]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    linears = [m for m in expander if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 8)]
    assert [m.bias is not None for m in linears] == [True, True, False]


def test_defaults_are_the_official_recipe():
    cfg = parse_config(["--task=vicreg", "--data.batch_size=512"])
    v, o = cfg.vicreg, cfg.optim
    assert (v.expander, v.sim_coeff, v.std_coeff, v.cov_coeff) == ("8192-8192-8192", 25.0, 25.0, 1.0)
    assert (o.name, o.lr, o.lr_scaling, o.weight_decay, o.momentum, o.lars_eta) == ("lars", 0.2, "linear", 1e-6, 0.9, 0.001)
    assert o.exclude_1d_from_decay and o.bias_lr_scale == 1.0
    assert cfg.trainer.max_epochs == 100
    from utils.optim import effective_lr
    from utils.schedule import warmup_cosine_factor

    peak = effective_lr(cfg)
    assert peak == pytest.approx(0.2 * 512 / 256)
    steps_per_epoch, epochs = 7, 100
    for step in (0, 3, 69, 70, 71, 300, 699):
        factor = warmup_cosine_factor(step, round(o.warmup_epochs * steps_per_epoch), epochs * steps_per_epoch,
                                      o.min_lr_ratio)
        assert peak * factor == pytest.approx(official_lr(step, 0.2, 512, steps_per_epoch, epochs), rel=1e-9, abs=1e-15)


def test_lars_excludes_biases_and_norms_from_decay_and_adaptation():
    m = tiny_module()
    from utils.optim import LARS, optimizer_from_groups

    optimizer = optimizer_from_groups(m.param_groups(), m.cfg.optim, m.lr)
    assert isinstance(optimizer, LARS)
    for group in optimizer.param_groups:
        assert all(p.ndim == 1 for p in group["params"]) == group["exclude"]
        assert group["lr"] == m.lr  # one rate for all (bias_lr_scale 1)


def well_posed(name: str, value: torch.Tensor) -> torch.Tensor:
    """tests.test_barlow_twins.well_posed, and: the bias of an expander Linear that a BatchNorm follows shifts
    every sample equally, which the BatchNorm subtracts again: its exact gradient is 0, the computed one float32
    cancellation noise."""
    from tests.test_barlow_twins import well_posed as backbone_well_posed

    if name.startswith("expander.") and name.endswith(".bias"):
        return value[:0]
    return backbone_well_posed(name, value)


# -- micro-batching -----------------------------------------------------------------------------------------------
def tiny_module(*flags: str) -> VICRegModule:
    cfg = parse_config(["--task=vicreg", "--data.img_size=32", "--backbone.name=vit", "--backbone.depth=2",
                        "--backbone.embed_dim=32", "--backbone.num_heads=2", "--backbone.patch_size=8",
                        "--vicreg.expander=64-64", *flags])
    torch.manual_seed(0)
    return VICRegModule.from_hparams(cfg)


def test_micro_batched_loss_and_gradients_equal_the_full_batch():
    full, micro = tiny_module(), tiny_module("--vicreg.micro_batch_size=3")
    micro.load_state_dict(full.state_dict())
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)
    grads = {}
    for name, m in (("full", full), ("micro", micro)):
        m.train()
        loss, batch, _ = m.loss_terms((x1, x2))
        loss.backward()
        grads[name] = (loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    torch.testing.assert_close(grads["micro"][0], grads["full"][0], rtol=1e-5, atol=1e-6)
    from tests.test_barlow_twins import assert_grads_close

    assert grads["micro"][1].keys() == grads["full"][1].keys()
    for name, expected in grads["full"][1].items():
        assert_grads_close(name, well_posed(name, grads["micro"][1][name]), well_posed(name, expected))


# -- DDP on 2 processes == 1 process on the concatenated batch ----------------------------------------------------
def run_one_step(voc_root, batch_size: int, devices: int, path, micro: int = 0):
    from datamodules.barlow_twins import BarlowTwinsDataModule
    from tests.test_distributed import GradientDump

    cfg = parse_config([
        "--task=vicreg", "--data.dataset=synthetic", f"--data.root={voc_root.parent.parent}",
        *[f"--data.{k}={v}" for k, v in TINY_DATA.items()], "--data.img_size=32",
        f"--data.batch_size={batch_size}", "--data.num_workers=0",
        "--backbone.name=vit", "--backbone.depth=2", "--backbone.embed_dim=32", "--backbone.num_heads=2",
        "--backbone.patch_size=8", "--vicreg.expander=64-64", f"--vicreg.micro_batch_size={micro}",
        "--optim.warmup_epochs=0", f"--trainer.devices={devices}",  # lr × global batch / 256: the same rate
    ])
    torch.manual_seed(0)
    module = VICRegModule.from_hparams(cfg)
    datamodule = BarlowTwinsDataModule(cfg.data, cfg.aug, cfg.seed)
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, use_distributed_sampler=False, callbacks=[GradientDump(str(path))],
    )
    trainer.fit(module, datamodule=datamodule)
    return torch.load(path, weights_only=True)


@pytest.mark.e2e
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is unavailable")
@pytest.mark.parametrize("micro", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_two_process_ddp_step_equals_single_process_on_concatenated_batch(voc_root, tmp_path, micro):
    single = run_one_step(voc_root, batch_size=8, devices=1, path=tmp_path / "single.pt")
    ddp = run_one_step(voc_root, batch_size=4, devices=2, path=tmp_path / "ddp.pt", micro=micro)
    torch.testing.assert_close(ddp["loss"], single["loss"], rtol=1e-5, atol=1e-5)
    assert ddp["grads"].keys() == single["grads"].keys() and len(single["grads"]) > 10
    from tests.test_barlow_twins import assert_grads_close

    for name, expected in single["grads"].items():
        assert_grads_close(name, well_posed(name, ddp["grads"][name]), well_posed(name, expected))
    for key, expected in single["params"].items():
        torch.testing.assert_close(ddp["params"][key], expected, rtol=1e-5, atol=1e-6, msg=key)


# -- end to end: every pretraining callback, then its checkpoint in segmentation ----------------------------------
def metrics(run_dir):
    with (run_dir / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_run_with_every_pretraining_callback_then_segmentation_from_its_checkpoint(tiny, tmp_path):
    import main

    flags = tiny("vicreg", task="vicreg", vicreg__expander="64-64", trainer__max_epochs=1,
                 callbacks__attention="true", callbacks__emergence="true", callbacks__emergence_every_n_epochs=1,
                 callbacks__online_probe="true", callbacks__online_probe_every_n_epochs=1,
                 callbacks__views="true", callbacks__every_n_epochs=1)
    assert main.main(flags) == 0
    run_dir = tmp_path / "runs" / "vicreg"
    rows = metrics(run_dir)
    columns = set().union(*(r.keys() for r in rows))
    for name in ("train/loss_step", "train/invariance_epoch", "train/variance_epoch", "train/covariance_epoch",
                 "val/loss", "val/attn_jaccard", "val/probe_mIoU"):
        assert name in columns, name
        assert any(r.get(name) for r in rows), name
    media = {p.name for p in (run_dir / "media").rglob("*.png")}
    assert any(n.startswith("attention") for n in media), media
    assert any(n.startswith("views") for n in media), media
    # its checkpoint initialises a segmentation backbone (strict: every backbone key found)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    seg = tiny("seg", task="segmentation", trainer__max_epochs=1, backbone__weights=str(ckpt),
               backbone__strict_weights="true", segmentation__hidden_dim=16)
    assert main.main(seg) == 0
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    from models.weights import read_state_dict  # noqa: F401  (the loader the flag uses)

    seg_state = torch.load(tmp_path / "runs" / "seg" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    key = "backbone.vit.patch_embed.proj.weight"
    assert torch.equal(seg_state["model." + key], state[key])  # frozen backbone: still the VICReg weights


@pytest.mark.slow
def test_kill_then_resume_equals_uninterrupted(data_cache, tmp_path):
    from tests.test_crash_safety import EVERY, flags, run_main, series, step_of

    extra = {"task": "vicreg", "vicreg__expander": "64-64"}
    ref = run_main(flags(data_cache, tmp_path, "reference", **extra))
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = run_main(flags(data_cache, tmp_path, "killed", **extra), fault=("KILL", 2 * EVERY + 1, "batch_end"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_main(["--trainer.resume", str(tmp_path / "killed")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for key in ("train/loss_step", "train/covariance_step", "val/loss"):
        got, want = series(tmp_path / "killed", key), series(tmp_path / "reference", key)
        assert got == want and got, key
    assert step_of(tmp_path / "killed" / "checkpoints" / "last.ckpt") == step_of(tmp_path / "reference" / "checkpoints" / "last.ckpt")


# -- the tools see it through its config file alone ---------------------------------------------------------------
def test_method_study_runs_it_from_its_proxy_config(tmp_path, monkeypatch):
    from config.validation import validate_values
    from tools import method_study

    calls = []
    monkeypatch.setattr(method_study, "run", lambda name, config, flags, *a, **k: calls.append((name, config, flags)) or True)
    assert method_study.main(["--output-dir", str(tmp_path), "--stage", "pretrain", "--budgets", "8",
                              "--methods", "bt-global,vicreg", "--figure", ""]) == 0
    assert [(name, config) for name, config, _ in calls] == [
        ("pretrain-bt-global-e8", "config/proxy/pretrain.yaml"), ("pretrain-vicreg-e8", "config/proxy/pretrain_vicreg.yaml")]
    assert method_study.METHODS["vicreg"][0] == "VICReg"
    cfg = parse_config(["--config", "config/proxy/pretrain_vicreg.yaml"])
    validate_values(cfg)
    assert cfg.task == "vicreg" and cfg.optim.name == "lars" and cfg.vicreg.expander == "1024-1024-1024"


def test_reproduce_reports_its_registry_metric():
    from lightningmodules import TASKS

    assert TASKS.get("vicreg").report_metric() == ("val/loss", "final")
    assert TASKS.get("vicreg").check_config(parse_config(["--task=vicreg", "--vicreg.expander=8192-x"])) == (
        "--vicreg.expander='8192-x': expected dash-separated positive widths, e.g. 8192-8192-8192")
