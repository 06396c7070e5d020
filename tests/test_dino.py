"""DINO (task=dino): the loss against the paper's pseudo-code, the head against the official DINOHead, the
schedules against the official cosine_scheduler, a whole training step against the official
train_one_epoch written out by hand, the teacher / center / entropy bookkeeping, micro-batching, ResNet-50,
the task's config checks, and loading a DINO checkpoint's teacher backbone."""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from config.loading import ConfigError, parse_config
from lightningmodules.dino import (DinoModule, check_config, clip_gradients_per_parameter, cosine_schedule,
                                   resolution_runs, teacher_temperature)
from models.dino_head import DINOHead
from models.losses import dino_loss

TINY = ["--task=dino", "--backbone.name=vit", "--backbone.depth=2", "--backbone.embed_dim=32", "--backbone.num_heads=2",
        "--backbone.patch_size=8", "--data.img_size=32", "--dino.out_dim=64", "--dino.hidden_dim=48",
        "--dino.bottleneck_dim=16", "--dino.local_crops_number=3", "--dino.local_crop_size=16"]


def module_from(*flags: str, seed: int = 0) -> DinoModule:
    torch.manual_seed(seed)
    return DinoModule.from_hparams(parse_config([*TINY, *flags]))


def crops(batch: int = 4, local: int = 3, size: int = 32, local_size: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(batch, 3, size, size, generator=g) for _ in range(2)]
            + [torch.randn(batch, 3, local_size, local_size, generator=g) for _ in range(local)])


# ------------------------------------------------------------------------------------------------ loss
def algorithm_1_H(t: torch.Tensor, s: torch.Tensor, center: torch.Tensor, tps: float, tpt: float) -> torch.Tensor:
    """H(t, s) of the paper's Algorithm 1, in float64: t = t.detach(); s = softmax(s / tps);
    t = softmax((t - C) / tpt); return -(t * log(s)).sum(dim=1).mean()."""
    t = t.detach().double()
    s = torch.softmax(s.double() / tps, dim=1)
    t = torch.softmax((t - center.double()) / tpt, dim=1)
    return -(t * torch.log(s)).sum(dim=1).mean()


def reference_loss(student, teacher, center, tps, tpt) -> torch.Tensor:
    """Algorithm 1 generalised to multi-crop as the paper's section 3.1 does: the mean of H(t_i, s_v) over
    the global views i the teacher sees and every student view v != i."""
    terms = [algorithm_1_H(t, s, center, tps, tpt)
             for i, t in enumerate(teacher) for v, s in enumerate(student) if v != i]
    return torch.stack(terms).mean()


def logits(n_views: int, batch: int = 6, k: int = 32, seed: int = 0, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(batch, k, generator=g) for _ in range(n_views)]


def test_two_views_is_algorithm_1():
    s1, s2 = logits(2, seed=1)
    t1, t2 = logits(2, seed=2)
    center = 0.3 * torch.randn(1, 32, generator=torch.Generator().manual_seed(3))
    expected = algorithm_1_H(t1, s2, center, 0.1, 0.04) / 2 + algorithm_1_H(t2, s1, center, 0.1, 0.04) / 2
    got = dino_loss([s1, s2], [t1, t2], center, 0.1, 0.04)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("local", [1, 4, 8])
@pytest.mark.parametrize("temps", [(0.1, 0.04), (0.1, 0.07), (0.2, 0.5)])
def test_multicrop_loss_matches_the_pseudo_code(local, temps):
    student = logits(2 + local, seed=10 + local, scale=3.0)
    teacher = logits(2, seed=20 + local, scale=3.0)
    center = torch.randn(1, 32, generator=torch.Generator().manual_seed(4))
    expected = reference_loss(student, teacher, center, *temps)
    torch.testing.assert_close(dino_loss(student, teacher, center, *temps).double(), expected, rtol=1e-5, atol=1e-6)
    # 2 teacher views × (2 + local) student views, the 2 same-view pairs left out
    assert len([(i, v) for i in range(2) for v in range(2 + local) if v != i]) == 2 * (2 + local) - 2


def test_the_center_is_subtracted_from_the_teacher_only():
    student, teacher = logits(4, seed=5), logits(2, seed=6)
    center = torch.randn(1, 32, generator=torch.Generator().manual_seed(7))
    # centering = shifting the teacher logits by -center
    shifted = dino_loss(student, [t - center for t in teacher], torch.zeros(1, 32), 0.1, 0.04)
    torch.testing.assert_close(dino_loss(student, teacher, center, 0.1, 0.04), shifted, rtol=1e-5, atol=1e-6)
    # a center that matches one dominant dimension takes its dominance away: without it every target is that
    # dimension (one-hot loss = -log p_v[0]); with it the targets follow the other dimensions
    dominant = [t.clone() for t in teacher]
    for t in dominant:
        t[:, 0] += 50.0
    one_hot = torch.stack([-F.log_softmax(s / 0.1, dim=-1)[:, 0].mean()
                           for i in range(2) for v, s in enumerate(student) if v != i]).mean()
    torch.testing.assert_close(dino_loss(student, dominant, torch.zeros(1, 32), 0.1, 0.04), one_hot)
    bias = torch.zeros(1, 32)
    bias[0, 0] = 50.0
    torch.testing.assert_close(dino_loss(student, dominant, bias, 0.1, 0.04),
                               dino_loss(student, teacher, torch.zeros(1, 32), 0.1, 0.04))
    # a center equal to every teacher output: uniform targets, the loss is the mean cross-entropy to uniform
    same = logits(1, seed=8)[0]
    uniform = torch.stack([-F.log_softmax(s / 0.1, dim=-1).mean(dim=-1).mean()
                           for i in range(2) for v, s in enumerate(student) if v != i]).mean()
    torch.testing.assert_close(dino_loss(student, [same, same], same, 0.1, 0.04), uniform)


def test_only_the_student_gets_gradients():
    student = [s.requires_grad_() for s in logits(3, seed=9)]
    teacher = [t.requires_grad_() for t in logits(2, seed=10)]
    dino_loss(student, teacher, torch.zeros(32), 0.1, 0.04).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert all(t.grad is None for t in teacher)


def test_loss_is_float32_under_autocast():
    student, teacher = logits(3, seed=11), logits(2, seed=12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dino_loss([s.bfloat16() for s in student], [t.bfloat16() for t in teacher], torch.zeros(1, 32), 0.1, 0.04)
    assert got.dtype == torch.float32


def test_loss_rejects_bad_views():
    with pytest.raises(ValueError, match="student_logits\\[1\\]"):
        dino_loss([torch.randn(4, 8), torch.randn(4, 9)], [torch.randn(4, 8)] * 2, torch.zeros(8), 0.1, 0.04)
    with pytest.raises(ValueError, match="pair"):
        dino_loss([torch.randn(4, 8)], [torch.randn(4, 8)], torch.zeros(8), 0.1, 0.04)


# ------------------------------------------------------------------------------------------------ head
class OfficialDINOHead(nn.Module):
    """facebookresearch/dino vision_transformer.DINOHead, verbatim but for trunc_normal_ (torch's has the same
    defaults) and the deprecated weight norm it uses."""

    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)  # the official trunc_normal_: same algorithm, same ±2 cut
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.mlp(x)
        x = nn.functional.normalize(x, dim=-1, p=2)
        return self.last_layer(x)




@pytest.mark.parametrize("nlayers,use_bn", [(1, False), (2, True), (3, False), (4, True)])
@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_equals_the_official_head(nlayers, use_bn, norm_last_layer):
    torch.manual_seed(0)
    ours = DINOHead(24, 40, hidden_dim=32, bottleneck_dim=8, nlayers=nlayers, use_bn=use_bn,
                    norm_last_layer=norm_last_layer)
    theirs = OfficialDINOHead(24, 40, use_bn=use_bn, norm_last_layer=norm_last_layer, nlayers=nlayers, hidden_dim=32,
                              bottleneck_dim=8)
    torch.manual_seed(0)
    fresh = OfficialDINOHead(24, 40, use_bn=use_bn, norm_last_layer=norm_last_layer, nlayers=nlayers, hidden_dim=32,
                             bottleneck_dim=8)
    # the same initialisation from the same seed (same draws in the same order), under the official names
    assert fresh.state_dict().keys() == ours.state_dict().keys()
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0, msg=key)
    theirs.load_state_dict(ours.state_dict())
    assert [type(m) for m in ours.mlp.modules()] == [type(m) for m in theirs.mlp.modules()]
    x = torch.randn(5, 24)
    ours.train(), theirs.train()
    torch.testing.assert_close(ours(x), theirs(x))
    trainable = {k for k, p in ours.named_parameters() if p.requires_grad}
    official = {k for k, p in theirs.named_parameters() if p.requires_grad}
    assert trainable == official


def test_head_output_is_a_cosine_to_unit_prototypes():
    torch.manual_seed(1)
    head = DINOHead(16, 20, hidden_dim=12, bottleneck_dim=6)
    x = torch.randn(7, 16)
    z = head.mlp(x)
    v = head.last_layer.weight_v
    expected = F.normalize(z, dim=-1) @ (v / v.norm(dim=1, keepdim=True)).T  # g = 1
    torch.testing.assert_close(head(x), expected)
    assert head(x).abs().max() <= 1 + 1e-6  # unit vectors: logits are cosines


def test_head_init():
    torch.manual_seed(2)
    head = DINOHead(384, 64, hidden_dim=2048, bottleneck_dim=256)
    for layer in [m for m in head.mlp if isinstance(m, nn.Linear)]:
        assert abs(layer.weight.std().item() - 0.02) < 0.001  # truncated normal, std 0.02 (cut at ±2 = 100 σ)
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    assert torch.equal(head.last_layer.weight_g, torch.ones(64, 1))
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(64))


def test_norm_last_layer_fixes_the_norm_at_1_through_training():
    torch.manual_seed(3)
    fixed, free = DINOHead(8, 10, 16, 4, norm_last_layer=True), DINOHead(8, 10, 16, 4, norm_last_layer=False)
    for head in (fixed, free):
        opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
        for _ in range(3):
            opt.zero_grad()
            (head(torch.randn(6, 8)) ** 2).sum().backward()
            opt.step()
    assert not fixed.last_layer.weight_g.requires_grad and fixed.last_layer.weight_g.grad is None
    torch.testing.assert_close(fixed.last_layer.weight.norm(dim=1), torch.ones(10))
    assert free.last_layer.weight_g.requires_grad
    assert not torch.allclose(free.last_layer.weight.norm(dim=1), torch.ones(10), atol=1e-3)


def test_head_pickles():
    """ddp_spawn pickles the module to start its processes (torch's parametrised weight norm refuses that)."""
    import pickle

    head = DINOHead(8, 10, 16, 4)
    copy_ = pickle.loads(pickle.dumps(head))
    x = torch.randn(3, 8)
    torch.testing.assert_close(copy_(x), head(x))


def test_head_rejects_bad_sizes():
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(8, 10, nlayers=0)


# ------------------------------------------------------------------------------------------------ schedules
def official_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """facebookresearch/dino utils.cosine_scheduler, verbatim."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


@pytest.mark.parametrize("base,final,epochs,niter,warmup", [
    (0.996, 1.0, 5, 7, 0), (0.04, 0.4, 3, 11, 0), (1e-3, 2e-6, 6, 5, 2), (1.0, 0.002, 4, 3, 1), (5e-4, 1e-6, 2, 1, 1)])
def test_cosine_schedule_equals_the_official_array(base, final, epochs, niter, warmup):
    expected = official_cosine_scheduler(base, final, epochs, niter, warmup)
    got = [cosine_schedule(it, base, final, epochs * niter, warmup * niter) for it in range(epochs * niter)]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    assert cosine_schedule(epochs * niter + 5, base, final, epochs * niter, warmup * niter) == final  # past the end


@pytest.mark.parametrize("warmup_temp,temp,warmup_epochs,epochs",
                         [(0.04, 0.07, 30, 100), (0.04, 0.04, 0, 10), (0.02, 0.06, 1, 5)])
def test_teacher_temperature_equals_the_official_schedule(warmup_temp, temp, warmup_epochs, epochs):
    expected = np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs), np.ones(epochs - warmup_epochs) * temp))
    got = [teacher_temperature(e, warmup_temp, temp, warmup_epochs) for e in range(epochs)]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)


def official_clip_gradients(model, clip):
    """facebookresearch/dino utils.clip_gradients, verbatim."""
    norms = []
    for name, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def test_per_parameter_clipping_equals_the_official_clip_gradients():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 5))
    model(torch.randn(3, 10)).pow(2).sum().backward()
    model[0].weight.grad.mul_(100.0)  # above the bound
    model[1].bias.grad.mul_(1e-3)  # below it
    ours = copy.deepcopy(model)
    for p, q in zip(model.parameters(), ours.parameters()):
        q.grad = p.grad.clone()  # deepcopy leaves .grad behind
    official_clip_gradients(model, 3.0)
    clip_gradients_per_parameter(list(ours.parameters()), 3.0)
    for p, q in zip(model.parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=0)
    assert abs(ours[0].weight.grad.norm().item() - 3.0) < 1e-4


# ------------------------------------------------------------------------------------------------ module
def test_teacher_is_a_frozen_copy_without_stochastic_depth():
    from timm.layers import DropPath

    m = module_from("--backbone.drop_path_rate=0.3")
    assert any(isinstance(x, DropPath) for x in m.backbone.modules())
    assert not any(isinstance(x, DropPath) for x in m.teacher_backbone.modules())
    assert all(not p.requires_grad for p in m.teacher_parameters())
    student = {**{f"backbone.{k}": v for k, v in m.backbone.state_dict().items()},
               **{f"head.{k}": v for k, v in m.head.state_dict().items()}}
    teacher = {**{f"backbone.{k}": v for k, v in m.teacher_backbone.state_dict().items()},
               **{f"head.{k}": v for k, v in m.teacher_head.state_dict().items()}}
    assert student.keys() == teacher.keys()
    assert all(torch.equal(student[k], teacher[k]) for k in student)
    assert m.named_backbones() == {"teacher": m.teacher_backbone, "student": m.backbone}
    assert m.center.shape == (1, 64) and "center" in m.state_dict()


def test_student_runs_one_backbone_pass_per_resolution():
    m = module_from().eval()  # stochastic depth off: the two ways of running the crops must agree
    calls = []
    m.backbone.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    views = crops(batch=4, local=3)
    out = m.student_logits(views)
    assert calls == [8, 12] and out.shape == (20, 64)  # globals together, locals together
    separate = torch.cat([m.head(m.backbone(v)) for v in views])  # no BatchNorm: the same outputs
    torch.testing.assert_close(out, separate, rtol=1e-5, atol=1e-6)
    assert resolution_runs(crops(local=0)) == [(0, 2)]
    big, small = torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 4, 4)
    assert resolution_runs([big, small, big]) == [(0, 1), (1, 2), (2, 3)]  # runs of consecutive crops only


def official_prepare_tokens(vit, x: torch.Tensor) -> torch.Tensor:
    """facebookresearch/dino VisionTransformer.prepare_tokens + interpolate_pos_encoding, verbatim but for the
    names of timm's modules (patch_embed, cls_token, pos_embed, pos_drop)."""
    B, nc, w, h = x.shape
    x = vit.patch_embed(x).flatten(1, 2)  # timm with dynamic_img_size keeps the grid: (B, H, W, C) → (B, N, C)
    cls_tokens = vit.cls_token.expand(B, -1, -1)
    x = torch.cat((cls_tokens, x), dim=1)
    npatch = x.shape[1] - 1
    N = vit.pos_embed.shape[1] - 1
    if npatch == N and w == h:
        pos = vit.pos_embed
    else:
        class_pos_embed = vit.pos_embed[:, 0]
        patch_pos_embed = vit.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // vit.patch_embed.patch_size[0]
        h0 = h // vit.patch_embed.patch_size[0]
        w0, h0 = w0 + 0.1, h0 + 0.1
        patch_pos_embed = nn.functional.interpolate(
            patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
            mode='bicubic',
        )
        assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        pos = torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)
    return vit.pos_drop(x + pos)


@pytest.mark.parametrize("size", [32, 16, 8, 48])
def test_position_embedding_of_other_crop_sizes_is_the_official_interpolation(size):
    from timm.models.vision_transformer import VisionTransformer

    m = module_from().eval()
    for vit in (m.backbone.vit, m.teacher_backbone.vit):
        x = torch.randn(2, 3, size, size)
        ours = vit._pos_embed(vit.patch_embed(x))
        torch.testing.assert_close(ours, official_prepare_tokens(vit, x))
        timm = VisionTransformer._pos_embed(vit, vit.patch_embed(x))
        assert torch.equal(ours, timm) == (size == 32)  # the model's own size: nothing resampled either way


def test_center_and_entropies_of_a_step():
    m = module_from()
    m.center.copy_(torch.randn(1, 64, generator=torch.Generator().manual_seed(5)))
    before = m.center.clone()
    views = crops()
    with torch.no_grad():
        t = m.teacher_head(m.teacher_backbone(torch.cat(views[:2])))
    m.training_step(views, 0)
    torch.testing.assert_close(m.center, 0.9 * before + 0.1 * t.mean(dim=0, keepdim=True))
    p = torch.softmax((t.double() - before.double()) / 0.04, dim=-1)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(dim=-1).mean()
    mean_p = p.mean(dim=0)
    mean_entropy = -(mean_p * torch.log(mean_p)).sum()
    torch.testing.assert_close(m.last_teacher_entropy.double(), entropy, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m.last_teacher_mean_entropy.double(), mean_entropy, rtol=1e-4, atol=1e-6)
    assert m.last_teacher_entropy <= m.last_teacher_mean_entropy <= math.log(64) + 1e-5  # concavity


def one_lightning_run(module: DinoModule, batches: list, epochs: int = 1) -> DinoModule:
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return module


def official_param_groups(student: nn.Module) -> list[dict]:
    """facebookresearch/dino utils.get_params_groups, verbatim."""
    regularized, not_regularized = [], []
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.}]


def ill_posed(name: str) -> bool:
    """The qkv key bias adds q·b to every logit of a softmax row: its exact gradient is 0, the computed one
    float32 noise that AdamW's first steps (≈ lr · sign(g)) turn into ±lr."""
    return name.endswith("attn.qkv.bias")


@pytest.mark.parametrize("freeze", [0, 1])
def test_training_steps_equal_the_official_train_one_epoch(freeze):
    """Three optimizer steps through Lightning against the official loop written out on copies of the same
    networks: schedules (lr, weight decay, momentum), loss, clipping, last-layer freezing, AdamW, teacher EMA,
    center."""
    # batch 256: lr × 256/256 = 5e-4; teacher momentum from 0.5 so that the EMA moves the teacher measurably
    flags = ["--backbone.drop_path_rate=0", "--optim.warmup_epochs=0", f"--dino.freeze_last_layer_epochs={freeze}",
             "--dino.clip_grad=0.05", "--data.batch_size=256", "--dino.momentum_teacher=0.5"]
    batches = [crops(seed=s) for s in (1, 2, 3)]
    module = module_from(*flags)
    ours = {"student": nn.ModuleDict({"backbone": module.backbone, "head": module.head}),
            "teacher": nn.ModuleDict({"backbone": module.teacher_backbone, "head": module.teacher_head})}
    student, teacher = copy.deepcopy(ours["student"]), copy.deepcopy(ours["teacher"])
    center = torch.zeros(1, 64)
    one_lightning_run(module, batches)

    n_steps, lr, min_lr = len(batches), 5e-4, 5e-4 * 0.002
    lr_schedule = official_cosine_scheduler(lr, min_lr, 1, n_steps, 0)
    wd_schedule = official_cosine_scheduler(0.04, 0.4, 1, n_steps)
    momentum_schedule = official_cosine_scheduler(0.5, 1, 1, n_steps)
    optimizer = torch.optim.AdamW(official_param_groups(student))
    clipped = []
    for it, images in enumerate(batches):
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = lr_schedule[it]
            if i == 0:
                group["weight_decay"] = wd_schedule[it]
        with torch.no_grad():
            t = teacher["head"](teacher["backbone"](torch.cat(images[:2])))
        features = [student["backbone"](torch.cat(images[:2])), student["backbone"](torch.cat(images[2:]))]
        s = student["head"](torch.cat(features))
        loss = reference_loss(list(s.chunk(5)), list(t.chunk(2)), center, 0.1, 0.04)
        center = center * 0.9 + t.sum(dim=0, keepdim=True) / len(t) * 0.1
        optimizer.zero_grad()
        loss.float().backward()
        clipped.append(sum(n > 0.05 for n in official_clip_gradients(student, 0.05)))
        if freeze > 0:  # official cancel_gradients_last_layer: epoch 0 < freeze_last_layer
            for name, p in student.named_parameters():
                if "last_layer" in name:
                    p.grad = None
        optimizer.step()
        with torch.no_grad():
            m = momentum_schedule[it]
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
    assert clipped[0] > 10  # the bound really clips

    torch.testing.assert_close(module.center, center, rtol=1e-5, atol=1e-6)
    groups = module.trainer.optimizers[0].param_groups  # decay: the last step's scheduled value, group 0 only
    assert groups[0]["weight_decay"] == pytest.approx(wd_schedule[-1], rel=1e-12) and groups[1]["weight_decay"] == 0
    assert [5e-4 * module.lr_factor_at(it, 0) for it in range(n_steps)] == pytest.approx(lr_schedule, rel=1e-12)
    ours = {f"{side}.{n}": p for side, net in ours.items() for n, p in net.named_parameters()}
    theirs = {f"{side}.{n}": p for side, net in (("student", student), ("teacher", teacher))
              for n, p in net.named_parameters()}
    assert ours.keys() == theirs.keys()
    start = module_from(*flags)
    last_layer = module.head.last_layer.weight_v
    moved = not torch.equal(last_layer, start.head.last_layer.weight_v)
    assert moved == (freeze == 0)  # frozen during epoch 0 when freeze_last_layer_epochs=1
    # AdamW's update m / (√v + ε) is about ±lr wherever the gradient is small, so float32 noise in a near-zero
    # gradient element moves that element by up to a few percent of lr (5e-4): all within 2e-5 (4 percent of a
    # step), all but a few per thousand within 2e-6
    for key in ours:
        if not ill_posed(key):
            diff = (ours[key] - theirs[key]).abs()
            assert diff.max() <= 2e-5 and (diff > 2e-6).float().mean() <= 0.005, (key, diff.max().item())


def test_frozen_last_layer_gets_no_weight_decay_and_no_optimizer_state():
    module = module_from("--dino.freeze_last_layer_epochs=1", "--optim.warmup_epochs=0")
    start = module.head.last_layer.weight_v.detach().clone()
    one_lightning_run(module, [crops(seed=1)])
    v = module.head.last_layer.weight_v
    assert torch.equal(v, start)  # no gradient step and no decoupled weight decay
    optimizer = module.trainer.optimizers[0]
    assert any(p is v for g in optimizer.param_groups for p in g["params"]) and v not in optimizer.state


def test_logged_schedules_and_entropies(tmp_path):
    import csv

    module = module_from("--optim.warmup_epochs=0", "--dino.warmup_teacher_temp=0.02", "--dino.teacher_temp=0.06",
                         "--dino.warmup_teacher_temp_epochs=2")
    logger = pl.loggers.CSVLogger(tmp_path)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader([crops(batch=2, seed=1)], batch_size=None))
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    per_step = {int(r["step"]): r for r in rows if r.get("dino/teacher_momentum")}
    assert sorted(per_step) == list(range(3))  # 3 epochs of 1 step
    for step, row in per_step.items():
        assert float(row["dino/teacher_momentum"]) == pytest.approx(official_cosine_scheduler(0.996, 1, 3, 1)[step])
        assert float(row["optim/weight_decay"]) == pytest.approx(official_cosine_scheduler(0.04, 0.4, 3, 1)[step])
        assert float(row["dino/teacher_temp"]) == pytest.approx([0.02, 0.06, 0.06][step])
        entropy, mean_entropy = float(row["train/teacher_entropy"]), float(row["train/teacher_mean_entropy"])
        assert 0 <= entropy <= mean_entropy <= math.log(64) + 1e-5


def test_micro_batched_gradients_equal_full_batch_gradients():
    views = crops(batch=6)
    grads = []
    for micro in (0, 4):
        # no stochastic depth: chunks draw other masks than the whole batch (the replay of a chunk's masks in
        # its recomputation is the shared gradient-caching code's, tested in tests/test_barlow_twins.py)
        m = module_from(f"--dino.micro_batch_size={micro}", "--backbone.drop_path_rate=0")
        loss, _, _ = m.losses(views, 0)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    full, chunked = grads
    assert full.keys() == chunked.keys() and len(full) > 20
    for name in full:
        if not ill_posed(name):
            scale = full[name].abs().max().item()
            torch.testing.assert_close(chunked[name], full[name], rtol=0, atol=1e-4 * scale + 1e-12, msg=name)


def test_resnet50_trains():
    torch.manual_seed(0)
    module = DinoModule.from_hparams(parse_config([
        "--task=dino", "--backbone.name=resnet50", "--data.img_size=32", "--dino.out_dim=64", "--dino.hidden_dim=32",
        "--dino.bottleneck_dim=16", "--dino.local_crops_number=2", "--dino.local_crop_size=32",
        "--optim.warmup_epochs=0", "--dino.freeze_last_layer_epochs=0"]))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    one_lightning_run(module, [crops(batch=3, local=2, local_size=32)])
    after = module.state_dict()
    for prefix in ("backbone.", "head.", "teacher_backbone.", "center"):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix
    assert torch.isfinite(module.last_teacher_entropy)


def test_lr_range_test_runs_and_restores_teacher_and_center(tmp_path):
    """The LR finder (--trainer.tune_lr) drives the rate through the module's optimiser and puts everything
    back afterwards, the teacher and the center included."""
    from pytorch_lightning.tuner import Tuner

    module = module_from("--optim.lr_scaling=none")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(max_epochs=20, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=str(tmp_path))
    finder = Tuner(trainer).lr_find(module, train_dataloaders=DataLoader([crops(batch=2, seed=s) for s in range(4)],
                                                                         batch_size=None),
                                    min_lr=1e-6, max_lr=1.0, num_training=20, attr_name="lr", update_attr=False)
    lrs, losses = finder.results["lr"], finder.results["loss"]
    assert len(lrs) == 20 and all(b > a for a, b in zip(lrs, lrs[1:])) and all(map(math.isfinite, losses))
    after = module.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


# ------------------------------------------------------------------------------------------------ config
def config_problem(*flags: str) -> str:
    from config.validation import validate

    with pytest.raises(ConfigError) as err:
        validate(parse_config([*TINY, "--data.dataset=synthetic", *flags]))
    return str(err.value)


def test_task_checks():
    assert "--dino.micro_batch_size" in config_problem("--barlow.micro_batch_size=4")
    assert "--barlow.dense_weight" in config_problem("--barlow.dense_weight=0.5")
    assert "--dino.local_crop_size=12" in config_problem("--dino.local_crop_size=12")
    assert check_config(parse_config(TINY)) is None
    resnet = ["--backbone.name=resnet50", "--backbone.depth=0", "--backbone.embed_dim=0", "--backbone.num_heads=0",
              "--backbone.patch_size=0", "--dino.local_crop_size=32"]
    assert check_config(parse_config([*TINY, *resnet])) is None


def test_task_registration():
    from lightningmodules import TASKS

    task = TASKS.get("dino")
    assert task.module is DinoModule and task.monitor == "val/loss" and task.mode == "min"
    assert {"train/loss_step", "val/loss", "train/teacher_entropy", "train/teacher_mean_entropy"} <= set(task.metrics)


# ------------------------------------------------------------------------------------------------ weights
def test_backbone_weights_from_a_dino_checkpoint_take_the_teacher(tmp_path, caplog):
    from config.hparams import BackboneConfig
    from models.backbones import build_backbone

    module = module_from()
    with torch.no_grad():  # teacher and student differ, as after training
        for p in module.teacher_parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "global_step": 3}, path)
    cfg = BackboneConfig(name="vit", depth=2, embed_dim=32, num_heads=2, patch_size=8, weights=str(path))
    with caplog.at_level("INFO"):
        loaded = build_backbone(cfg, 32)
    assert "teacher backbone" in caplog.text
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, module.teacher_backbone.state_dict()[key]), key
    assert not torch.equal(loaded.vit.patch_embed.proj.weight, module.backbone.vit.patch_embed.proj.weight)


# ------------------------------------------------------------------------------------------------ resume
DINO_RUN = {"task": "dino", "dino__out_dim": 64, "dino__hidden_dim": 48, "dino__bottleneck_dim": 16,
            "dino__local_crops_number": 2, "trainer__max_epochs": 2, "callbacks__emergence": "false",
            "callbacks__teacher_entropy": "false", "optim__warmup_epochs": 1}


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(data_cache, tmp_path):
    """kill -9 one step after a mid-epoch step checkpoint, resume: the per-step losses, teacher entropies and
    validation losses in metrics.csv are the uninterrupted run's, bitwise, and so are the final teacher,
    center, student and optimizer state."""
    import signal

    from tests.test_crash_safety import EVERY, flags, run_main, series

    reference = run_main(flags(data_cache, tmp_path, "reference", **DINO_RUN))
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = run_main(flags(data_cache, tmp_path, "killed", **DINO_RUN), fault=("KILL", 2 * EVERY + 1, "batch_end"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2 * EVERY
    resumed = run_main(["--trainer.resume", str(tmp_path / "killed")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for key in ("train/loss_step", "train/teacher_entropy", "train/teacher_mean_entropy", "dino/teacher_momentum",
                "val/loss"):
        got, want = series(tmp_path / "killed", key), series(tmp_path / "reference", key)
        assert got == want and len(want) >= 2, key
    final = [torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
             for name in ("killed", "reference")]
    assert final[0]["global_step"] == final[1]["global_step"] == 8
    for key, value in final[1]["state_dict"].items():
        assert torch.equal(final[0]["state_dict"][key], value), key
    assert any(k.startswith("teacher_backbone.") for k in final[1]["state_dict"]) and "center" in final[1]["state_dict"]


def test_teacher_prefix_comes_first_for_every_known_layout():
    from models.weights import choose_prefix

    student, teacher = torch.zeros(2), torch.ones(2)
    # a ResNet-50 DINO checkpoint (backbone.model.*), as the deeplabv3 segmenter and the resnet50 backbone read it
    state = {"backbone.model.conv1.weight": student, "teacher_backbone.model.conv1.weight": teacher,
             "head.mlp.0.weight": student, "teacher_head.mlp.0.weight": teacher, "center": student}
    for prefixes in (("model.backbone.", "backbone.model."), ("model.backbone.", "backbone.model.", "backbone.")):
        chosen, prefix = choose_prefix(state, {"conv1.weight"}, prefixes)
        assert prefix == "teacher_backbone.model." and chosen == {"conv1.weight": teacher}
    # a Barlow Twins checkpoint has no teacher: its backbone, as before
    chosen, prefix = choose_prefix({"backbone.vit.cls_token": student, "projector.0.weight": teacher}, {"cls_token"},
                                   ("model.backbone.vit.", "backbone.vit."))
    assert prefix == "backbone.vit." and chosen == {"cls_token": student}
