"""LARS, parameter groups, AdamW construction and the warmup-cosine schedule, against hand computations."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from config.hparams import OptimConfig
from utils.optim import LARS, build_optimizer, effective_lr, global_batch_size, lr_scale, parameter_groups
from utils.schedule import log_effective_lr, warmup_cosine, warmup_cosine_factor


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.fc2 = nn.Linear(4, 2)
        self.offset = nn.Parameter(torch.zeros(3, 2))  # zero norm: trust ratio must fall back to 1
        self.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x)))) + x @ self.offset + x[:, :2] @ self.frozen


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    with torch.no_grad():  # non-trivial 1-D parameters
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    return model


def compute_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()


def lars_reference_step(params, grads, mus, lr, wd, momentum, eta, excluded):
    """The official Barlow Twins LARS update, element by element on float64 copies."""
    new_params, new_mus = [], []
    for p, g, mu, exc in zip(params, grads, mus, excluded):
        if exc:
            step = g
        else:
            step = g + wd * p
            p_norm = math.sqrt(sum(v * v for v in p.flatten().tolist()))
            s_norm = math.sqrt(sum(v * v for v in step.flatten().tolist()))
            trust = eta * p_norm / s_norm if p_norm > 0 and s_norm > 0 else 1.0
            step = trust * step
        mu = momentum * mu + step
        new_mus.append(mu)
        new_params.append(p - lr[exc] * mu if isinstance(lr, dict) else p - lr * mu)
    return new_params, new_mus


@pytest.mark.parametrize("exclude_1d", [True, False])
def test_lars_two_steps_match_hand_computation(exclude_1d):
    cfg = OptimConfig(name="lars", lr=0.3, weight_decay=0.05, momentum=0.8, lars_eta=0.02,
                      bias_lr_scale=0.25, exclude_1d_from_decay=exclude_1d)
    model = tiny_model()
    opt = build_optimizer(model, cfg, lr=cfg.lr)
    assert isinstance(opt, LARS)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    excluded = [exclude_1d and params[n].ndim == 1 for n in names]
    assert sum(excluded) == (4 if exclude_1d else 0)  # fc1.bias, norm.weight, norm.bias, fc2.bias
    lr = {True: cfg.lr * cfg.bias_lr_scale, False: cfg.lr}

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)
    ref = [params[n].detach().double().clone() for n in names]
    mus = [torch.zeros_like(p) for p in ref]
    frozen_before = model.frozen.detach().clone()
    trusts_not_one = 0
    for step in range(2):
        compute_grads(model, x, y)
        grads = [params[n].grad.detach().double().clone() for n in names]
        assert all(gr.abs().sum() > 0 for gr in grads)
        # The model's float32 params must still agree with the float64 reference before each step.
        for n, r in zip(names, ref):
            torch.testing.assert_close(params[n].detach().double(), r, rtol=1e-5, atol=1e-6)
        for r, gr, exc in zip(ref, grads, excluded):
            if not exc and r.norm() > 0:
                trusts_not_one += abs(cfg.lars_eta * r.norm() / (gr + cfg.weight_decay * r).norm() - 1) > 0.5
        ref, mus = lars_reference_step(ref, grads, mus, lr, cfg.weight_decay, cfg.momentum, cfg.lars_eta, excluded)
        opt.step()
        for n, r in zip(names, ref):
            torch.testing.assert_close(params[n].detach().double(), r, rtol=1e-5, atol=1e-7, msg=n)
        for n, mu in zip(names, mus):
            torch.testing.assert_close(opt.state[params[n]]["mu"].double(), mu, rtol=1e-5, atol=1e-7, msg=n)
    assert trusts_not_one > 0  # the trust ratio really scaled some updates
    assert torch.equal(model.frozen, frozen_before)


def test_lars_first_step_of_zero_parameter_is_plain_sgd():
    # 'offset' starts at zero: trust 1 and wd·0 = 0, so after one step offset = -lr·g exactly.
    cfg = OptimConfig(name="lars", lr=0.3, weight_decay=0.05, momentum=0.8, lars_eta=0.02)
    model = tiny_model()
    opt = build_optimizer(model, cfg, lr=cfg.lr)
    compute_grads(model, torch.randn(5, 3), torch.randn(5, 2))
    g = model.offset.grad.detach().clone()
    assert g.abs().sum() > 0
    opt.step()
    torch.testing.assert_close(model.offset.detach(), -0.3 * g)


def test_lars_zero_norm_param_uses_trust_one_and_no_grad_is_skipped():
    p = nn.Parameter(torch.zeros(2, 3))
    q = nn.Parameter(torch.ones(4))
    p.grad = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    opt = LARS([p, q], lr=0.1, weight_decay=0.5, momentum=0.9, eta=0.001)
    opt.step()
    # trust 1 (‖p‖ = 0), wd·p = 0: p = -lr·g exactly.
    torch.testing.assert_close(p.detach(), -0.1 * torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]))
    assert torch.equal(q.detach(), torch.ones(4))  # no grad: untouched
    # Zero gradient on a non-zero parameter: the update is wd·p, its trust ratio eta·‖p‖/‖wd·p‖ = eta/wd.
    r = nn.Parameter(torch.full((2, 2), 2.0))
    r.grad = torch.zeros(2, 2)
    LARS([r], lr=1.0, weight_decay=0.5, momentum=0.9, eta=0.01).step()
    torch.testing.assert_close(r.detach(), torch.full((2, 2), 2.0 - (0.01 / 0.5) * 0.5 * 2.0))


def test_parameter_groups():
    model = tiny_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    vectors = {id(p) for p in trainable if p.dim() == 1}
    matrices = {id(p) for p in trainable if p.dim() >= 2}
    assert len(vectors) == 4 and len(matrices) == 3

    cfg = OptimConfig(weight_decay=0.07, bias_lr_scale=0.024, exclude_1d_from_decay=True)
    groups = parameter_groups(model, cfg, lr=2.0)
    assert len(groups) == 2
    decayed = next(gr for gr in groups if gr["weight_decay"] == 0.07)
    plain = next(gr for gr in groups if gr["weight_decay"] == 0.0)
    assert {id(p) for p in decayed["params"]} == matrices and decayed["lr"] == pytest.approx(2.0)
    assert {id(p) for p in plain["params"]} == vectors and plain["lr"] == pytest.approx(0.048)
    assert id(model.frozen) not in {id(p) for gr in groups for p in gr["params"]}

    cfg = OptimConfig(weight_decay=0.07, bias_lr_scale=0.024, exclude_1d_from_decay=False)
    groups = parameter_groups(model, cfg, lr=2.0)
    assert len(groups) == 1
    assert {id(p) for p in groups[0]["params"]} == vectors | matrices
    assert groups[0]["weight_decay"] == 0.07 and groups[0]["lr"] == 2.0


def test_adamw_built_with_groups_betas_and_decoupled_decay():
    cfg = OptimConfig(name="adamw", lr=0.01, weight_decay=0.2, beta1=0.8, beta2=0.95,
                      bias_lr_scale=0.5, exclude_1d_from_decay=True)
    model = tiny_model()
    opt = build_optimizer(model, cfg, lr=cfg.lr)
    assert type(opt) is torch.optim.AdamW
    assert all(gr["betas"] == (0.8, 0.95) for gr in opt.param_groups)
    assert all("exclude" not in gr for gr in opt.param_groups)
    assert sorted((gr["weight_decay"], gr["lr"]) for gr in opt.param_groups) == [(0.0, 0.005), (0.2, 0.01)]

    # First AdamW step by hand: m̂ = g, v̂ = g², so p ← p·(1 − lr·wd) − lr·g / (|g| + eps).
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    compute_grads(model, x, y)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    for n, p in model.named_parameters():
        if n not in grads:
            continue
        lr, wd = (0.005, 0.0) if p.dim() == 1 else (0.01, 0.2)
        g = grads[n]
        expected = before[n] * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6, msg=n)


def test_unknown_optimizer_raises():
    with pytest.raises(ValueError, match="sgd"):
        build_optimizer(tiny_model(), OptimConfig(name="sgd"), lr=0.1)


# ---------------------------------------------------------------------------------------------- schedule

def reference_factor(step, warmup, total, min_ratio):
    if step < warmup:
        return step / warmup  # the official Barlow Twins warmup: rate 0 at the first step
    t = min(step, total)
    angle = math.pi * (t - warmup) / (total - warmup)
    return min_ratio + (1 - min_ratio) * (1 + math.cos(angle)) / 2


def test_warmup_cosine_factor_values():
    warmup, total, min_ratio = 5, 25, 0.1
    assert warmup_cosine_factor(0, warmup, total, min_ratio) == 0.0
    assert warmup_cosine_factor(1, warmup, total, min_ratio) == pytest.approx(0.2)
    assert warmup_cosine_factor(4, warmup, total, min_ratio) == pytest.approx(0.8)
    assert warmup_cosine_factor(5, warmup, total, min_ratio) == pytest.approx(1.0)
    # Halfway through the decay the cosine is at 0: min + (1 − min)/2.
    assert warmup_cosine_factor(15, warmup, total, min_ratio) == pytest.approx(0.55)
    assert warmup_cosine_factor(25, warmup, total, min_ratio) == pytest.approx(0.1)
    assert warmup_cosine_factor(40, warmup, total, min_ratio) == pytest.approx(0.1)
    for step in (0, 1, 2, 3, 4, 5, 6, 10, 13, 20, 24, 25, 30):
        assert warmup_cosine_factor(step, warmup, total, min_ratio) == pytest.approx(
            reference_factor(step, warmup, total, min_ratio), rel=1e-12), step
    values = [warmup_cosine_factor(s, warmup, total, min_ratio) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_cosine_factor_without_warmup():
    assert warmup_cosine_factor(0, 0, 10, 0.0) == pytest.approx(1.0)
    assert warmup_cosine_factor(5, 0, 10, 0.0) == pytest.approx(0.5)
    assert warmup_cosine_factor(10, 0, 10, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine_factor(3, 0, 10, 0.2) == pytest.approx(reference_factor(3, 0, 10, 0.2))


def test_lambda_lr_reproduces_the_sequence():
    w = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(1))
    peaks = [0.4, 0.4 * 0.024]
    opt = torch.optim.SGD([{"params": [w], "lr": peaks[0]}, {"params": [b], "lr": peaks[1]}], lr=peaks[0])
    sched = warmup_cosine(opt, warmup_steps=3, total_steps=12, min_ratio=0.01)
    seen = []
    for _ in range(15):
        seen.append([gr["lr"] for gr in opt.param_groups])
        opt.step()
        sched.step()
    for step, lrs in enumerate(seen):
        factor = reference_factor(step, 3, 12, 0.01)
        assert lrs == pytest.approx([peak * factor for peak in peaks], rel=1e-12), step
    assert seen[0][0] == 0.0 and seen[1][0] == pytest.approx(0.4 / 3)
    assert seen[3][0] == pytest.approx(0.4) and seen[12][0] == pytest.approx(0.004)


# ---------------------------------------------------------------------- the official Barlow Twins recipe
def official_adjust_learning_rate(step: int, loader_len: int, epochs: int, batch_size: int,
                                  lr_weights: float = 0.2, lr_biases: float = 0.0048) -> tuple[float, float]:
    """facebookresearch/barlowtwins main.py ``adjust_learning_rate``, transcribed: (weights' lr, biases' lr)."""
    max_steps = epochs * loader_len
    warmup_steps = 10 * loader_len
    base_lr = batch_size / 256
    if step < warmup_steps:
        lr = base_lr * step / warmup_steps
    else:
        step -= warmup_steps
        max_steps -= warmup_steps
        q = 0.5 * (1 + math.cos(math.pi * step / max_steps))
        end_lr = base_lr * 0.001
        lr = base_lr * q + end_lr * (1 - q)
    return lr * lr_weights, lr * lr_biases


def test_readme_lars_recipe_reproduces_the_official_rates_step_by_step():
    from config.loading import parse_config

    cfg = parse_config(["--optim.name=lars", "--optim.lr=0.2", "--optim.lr_scaling=linear", "--optim.bias_lr_scale=0.024",
                        "--optim.weight_decay=1.5e-6", "--data.batch_size=64"])
    assert (cfg.optim.warmup_epochs, cfg.optim.min_lr_ratio) == (10, 0.001)  # the official defaults
    assert effective_lr(cfg) == pytest.approx(0.05)  # 0.2 × 64 / 256, not 0.2
    loader_len, epochs = 7, 30
    opt = build_optimizer(tiny_model(), cfg.optim, effective_lr(cfg))
    sched = warmup_cosine(opt, round(cfg.optim.warmup_epochs * loader_len), epochs * loader_len, cfg.optim.min_lr_ratio)
    for step in range(epochs * loader_len):
        weights_lr, biases_lr = official_adjust_learning_rate(step, loader_len, epochs, 64)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([weights_lr, biases_lr], rel=1e-9, abs=1e-15), step
        opt.step()
        sched.step()


def test_linear_scaling_uses_the_global_batch():
    from config.loading import parse_config

    plain = parse_config(["--optim.lr=0.2", "--data.batch_size=64"])
    assert lr_scale(plain) == 1.0 and effective_lr(plain) == 0.2  # lr_scaling defaults to none
    cfg = parse_config(["--optim.lr=0.2", "--optim.lr_scaling=linear", "--data.batch_size=64", "--trainer.devices=2",
                        "--trainer.num_nodes=2"])
    assert global_batch_size(cfg) == 256 and effective_lr(cfg) == pytest.approx(0.2)
    cfg.data.batch_size = 2048 // 4
    assert effective_lr(cfg) == pytest.approx(0.2 * 2048 / 256)  # the official ImageNet run: 1.6
    cfg.optim.lr_scaling = "sqrt"
    with pytest.raises(ValueError, match="valid: none, linear"):
        effective_lr(cfg)


def test_linear_scaling_refuses_the_tuners():
    from config.loading import ConfigError, parse_config
    from config.validation import validate

    for tune in ("--trainer.tune_lr=true", "--trainer.tune_batch_size=true"):
        with pytest.raises(ConfigError, match="--optim.lr_scaling=linear scales optim.lr by the batch fixed at start"):
            validate(parse_config(["--optim.lr_scaling=linear", tune, "--data.dataset=synthetic"]))
    with pytest.raises(ConfigError, match="lr_scaling"):
        parse_config(["--optim.lr_scaling=sqrt"])


def test_log_effective_lr_logs_the_first_groups_peak_on_rank_zero():
    from types import SimpleNamespace

    class Recorder:
        def __init__(self):
            self.rows = []

        def log_metrics(self, metrics, step):
            self.rows.append((step, metrics))

    opt = build_optimizer(tiny_model(), OptimConfig(lr=0.05, bias_lr_scale=0.024), lr=0.05)
    a, b = Recorder(), Recorder()
    log_effective_lr(SimpleNamespace(is_global_zero=True, loggers=[a, b], global_step=7), opt)
    assert a.rows == b.rows == [(7, {"optim/effective_lr": 0.05})]
    log_effective_lr(SimpleNamespace(is_global_zero=False, loggers=[a], global_step=8), opt)
    assert len(a.rows) == 1


def test_segmentation_run_trains_at_the_scaled_rate_and_logs_it(tiny, tmp_path):
    import csv

    import main

    args = tiny("scaled", task="segmentation", segmentation__hidden_dim=8, data__batch_size=4,
                optim__lr_scaling="linear", optim__lr=0.64, optim__warmup_epochs=0, trainer__max_steps=2,
                trainer__limit_val_batches=1, callbacks__predictions="false", log__wandb_mode="disabled")
    assert main.main(args) == 0
    with (tmp_path / "runs" / "scaled" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["optim/effective_lr"]) for r in rows if r.get("optim/effective_lr")]
    assert logged == [pytest.approx(0.64 * 4 / 256)]
    first_lr = next(float(r["lr-AdamW/pg1"]) for r in rows if r.get("lr-AdamW/pg1"))
    assert first_lr == pytest.approx(0.01)  # no warmup: the first step runs at the peak, 0.64 × 4 / 256


def test_lr_scaling_note_names_the_rate_and_its_origin():
    from config.loading import parse_config

    from utils.optim import lr_scaling_note

    cfg = parse_config(["--optim.lr=0.2", "--optim.lr_scaling=linear", "--data.batch_size=64"])
    assert lr_scaling_note(cfg) == "effective optim.lr: 0.05 (0.2 × global batch 64 / 256, --optim.lr_scaling linear)"
    assert lr_scaling_note(parse_config(["--optim.lr=0.2"])) == "effective optim.lr: 0.2 (--optim.lr_scaling none)"


# ---------------------------------------------------------------- the foreach implementations
class OfficialLARS(torch.optim.Optimizer):
    """facebookresearch/barlowtwins main.py, class LARS, transcribed verbatim: the per-parameter loop."""

    def __init__(self, params, lr, weight_decay=0, momentum=0.9, eta=0.001,
                 weight_decay_filter=False, lars_adaptation_filter=False):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        eta=eta, weight_decay_filter=weight_decay_filter,
                        lars_adaptation_filter=lars_adaptation_filter)
        super().__init__(params, defaults)

    def exclude_bias_and_norm(self, p):
        return p.ndim == 1

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g['params']:
                dp = p.grad
                if dp is None:
                    continue
                if not g['weight_decay_filter'] or not self.exclude_bias_and_norm(p):
                    dp = dp.add(p, alpha=g['weight_decay'])
                if not g['lars_adaptation_filter'] or not self.exclude_bias_and_norm(p):
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.,
                                    torch.where(update_norm > 0,
                                                (g['eta'] * param_norm / update_norm), one), one)
                    dp = dp.mul(q)
                param_state = self.state[p]
                if 'mu' not in param_state:
                    param_state['mu'] = torch.zeros_like(p)
                mu = param_state['mu']
                mu.mul_(g['momentum']).add_(dp)
                p.add_(mu, alpha=-g['lr'])


@pytest.mark.parametrize("exclude_1d", [True, False])
def test_foreach_lars_matches_the_official_per_parameter_loop(exclude_1d):
    """Ours (foreach, groups from parameter_groups) against the official class as the official main.py builds
    it ([weights, biases] groups, both filters on) — or with the filters off when nothing is excluded —
    over 6 steps with a changing learning rate, a zero-norm parameter and a frozen one. On CPU the norms are
    summed in the same order: bitwise equal (on CUDA the foreach norm may differ by float32 round-off)."""
    cfg = OptimConfig(name="lars", lr=0.3, weight_decay=0.05, momentum=0.9, lars_eta=0.02,
                      bias_lr_scale=0.024, exclude_1d_from_decay=exclude_1d)
    ours_model, ref_model = tiny_model(), tiny_model()
    ours = build_optimizer(ours_model, cfg, lr=cfg.lr)
    trainable = [(n, p) for n, p in ref_model.named_parameters() if p.requires_grad]
    if exclude_1d:
        groups = [{"params": [p for _, p in trainable if p.ndim != 1], "lr": cfg.lr},
                  {"params": [p for _, p in trainable if p.ndim == 1], "lr": cfg.lr * cfg.bias_lr_scale}]
    else:
        groups = [{"params": [p for _, p in trainable], "lr": cfg.lr}]
    ref = OfficialLARS(groups, lr=0, weight_decay=cfg.weight_decay, momentum=cfg.momentum, eta=cfg.lars_eta,
                       weight_decay_filter=exclude_1d, lars_adaptation_filter=exclude_1d)
    g = torch.Generator().manual_seed(3)
    for step in range(6):
        x, y = torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)
        compute_grads(ours_model, x, y)
        compute_grads(ref_model, x, y)
        scale = 1.0 - step / 10  # a schedule changing the groups' rates, as the official adjust_learning_rate
        for opt_groups, peaks in ((ours.param_groups, [cfg.lr, cfg.lr * cfg.bias_lr_scale]),
                                  (ref.param_groups, [cfg.lr, cfg.lr * cfg.bias_lr_scale])):
            for group, peak in zip(opt_groups, peaks):
                group["lr"] = peak * scale
        ours.step()
        ref.step()
        for (n, p), (_, q) in zip(ours_model.named_parameters(), ref_model.named_parameters()):
            assert torch.equal(p, q), f"{n} at step {step}"
    for (n, p), (_, q) in zip(ours_model.named_parameters(), ref_model.named_parameters()):
        if p.requires_grad:
            assert torch.equal(ours.state[p]["mu"], ref.state[q]["mu"]), n
    assert torch.equal(ours_model.frozen, torch.ones(2, 2))
    assert not torch.equal(ours_model.offset, torch.zeros(3, 2))  # the zero-norm start did move (trust 1)


def test_foreach_lars_groups_tensors_of_several_dtypes():
    """A group may mix dtypes (foreach ops need one dtype per call): each tensor still gets its own update."""
    a = nn.Parameter(torch.full((2, 2), 2.0, dtype=torch.float64))
    b = nn.Parameter(torch.full((3,), 1.0))
    a.grad, b.grad = torch.full((2, 2), 0.5, dtype=torch.float64), torch.full((3,), 0.25)
    LARS([a, b], lr=1.0, weight_decay=0.0, momentum=0.9, eta=0.1).step()
    # trust = 0.1 · ‖p‖ / ‖g‖, update = trust · g: a: 0.1 · 4 / 1 · 0.5 = 0.2; b: 0.1 · √3 / (0.25 √3) · 0.25 = 0.1
    torch.testing.assert_close(a.detach(), torch.full((2, 2), 1.8, dtype=torch.float64))
    torch.testing.assert_close(b.detach(), torch.full((3,), 0.9))


def test_adamw_uses_foreach_on_cpu_with_the_default_loops_results():
    """AdamW is built with foreach=True off CUDA (fused=True on CUDA, checked by benchmarks/gpu_train_step.sh):
    on CPU its steps give bitwise the parameters of PyTorch's per-tensor loop (foreach=False)."""
    from utils.optim import adamw_implementation

    cfg = OptimConfig(name="adamw", lr=0.01, weight_decay=0.2, bias_lr_scale=0.5, exclude_1d_from_decay=True)
    ours_model, ref_model = tiny_model(), tiny_model()
    ours = build_optimizer(ours_model, cfg, lr=cfg.lr)
    assert all(gr["foreach"] is True and not gr["fused"] for gr in ours.param_groups)
    assert adamw_implementation([{"params": list(ours_model.parameters())}]) == {"foreach": True}
    ref = torch.optim.AdamW([{k: v for k, v in gr.items() if k in ("params", "lr", "weight_decay")}
                             for gr in parameter_groups(ref_model, cfg, cfg.lr)],
                            lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2), foreach=False)
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        x, y = torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)
        compute_grads(ours_model, x, y)
        compute_grads(ref_model, x, y)
        ours.step()
        ref.step()
    for (n, p), (_, q) in zip(ours_model.named_parameters(), ref_model.named_parameters()):
        assert torch.equal(p, q), n
