"""Optimisers: AdamW and LARS, with 1-D parameters (biases, norms) optionally excluded from weight decay."""
from __future__ import annotations

import torch
from torch import nn

from config.hparams import OptimConfig


class LARS(torch.optim.Optimizer):
    """LARS as in the official Barlow Twins code (momentum SGD with layer-wise trust ratios), as a foreach
    implementation: one fused call per operation over all of a group's tensors instead of a Python loop
    over parameters (about 10 small operations per parameter per step otherwise).

    Per parameter p with gradient g (facebookresearch/barlowtwins ``main.py``, class ``LARS``):
    d = g + weight_decay · p; q = eta · ‖p‖ / ‖d‖ if ‖p‖ > 0 and ‖d‖ > 0, else 1; d = q · d;
    mu = momentum · mu + d; p = p − lr · mu. Groups with ``exclude=True`` skip the weight decay and the
    trust ratio (the official recipe's filters for biases and norm parameters, there decided per tensor
    by ``p.ndim == 1``; here :func:`parameter_groups` puts exactly those tensors in the excluded group).
    The same arithmetic as the official per-parameter loop; only the norms' summation order may differ
    (float round-off). No host sync.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "mu" not in self.state[p]:
                    self.state[p]["mu"] = torch.zeros_like(p)
            mus = [self.state[p]["mu"] for p in params]
            for device_params, device_grads, device_mus in _by_device_and_dtype(params, grads, mus):
                self._update(group, device_params, device_grads, device_mus)
        return loss

    @staticmethod
    def _update(group: dict, params: list, grads: list, mus: list) -> None:
        if group["exclude"]:
            updates = grads
        else:
            updates = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            param_norm = torch.stack(torch._foreach_norm(params))
            update_norm = torch.stack(torch._foreach_norm(updates))
            one = torch.ones_like(param_norm)
            trust = torch.where(param_norm > 0.0,
                                torch.where(update_norm > 0, group["eta"] * param_norm / update_norm, one), one)
            torch._foreach_mul_(updates, trust.unbind())
        torch._foreach_mul_(mus, group["momentum"])
        torch._foreach_add_(mus, updates)
        torch._foreach_add_(params, mus, alpha=-group["lr"])


def _by_device_and_dtype(params: list, grads: list, mus: list):
    """(params, grads, mus) lists split by (device, dtype): foreach operations take one of each."""
    groups: dict = {}
    for p, g, m in zip(params, grads, mus):
        lists = groups.setdefault((p.device, p.dtype), ([], [], []))
        lists[0].append(p)
        lists[1].append(g)
        lists[2].append(m)
    return groups.values()


LINEAR_SCALING_BATCH = 256  # the official Barlow Twins code: lr = base × batch / 256


def global_batch_size(cfg) -> int:
    """Images per optimiser step over all processes: data.batch_size (per device) × devices × nodes."""
    return cfg.data.batch_size * max(1, cfg.trainer.devices) * max(1, cfg.trainer.num_nodes)


def lr_scale(cfg) -> float:
    """The factor ``optim.lr_scaling`` applies to ``optim.lr`` (``cfg`` is the full Hparams): 1 for
    'none', global batch / 256 for 'linear'."""
    if cfg.optim.lr_scaling == "none":
        return 1.0
    if cfg.optim.lr_scaling == "linear":
        return global_batch_size(cfg) / LINEAR_SCALING_BATCH
    raise ValueError(f"unknown --optim.lr_scaling {cfg.optim.lr_scaling!r}; valid: none, linear")


def effective_lr(cfg) -> float:
    """The peak learning rate a run uses: ``optim.lr × lr_scale(cfg)`` (official Barlow Twins LARS at batch 64:
    0.2 × 64 / 256 = 0.05). The 1-D parameters get it times ``optim.bias_lr_scale``."""
    return cfg.optim.lr * lr_scale(cfg)


def lr_scaling_note(cfg) -> str:
    """One line saying which peak rate the run uses and why, e.g. for a comment atop config.yaml:
    ``effective optim.lr: 0.05 (0.2 × global batch 64 / 256, --optim.lr_scaling linear)``."""
    lr = effective_lr(cfg)
    if cfg.optim.lr_scaling == "none":
        return f"effective optim.lr: {lr:g} (--optim.lr_scaling none)"
    return (f"effective optim.lr: {lr:g} ({cfg.optim.lr:g} × global batch {global_batch_size(cfg)} / "
            f"{LINEAR_SCALING_BATCH}, --optim.lr_scaling {cfg.optim.lr_scaling})")


def parameter_groups(model: nn.Module, cfg: OptimConfig, lr: float) -> list[dict]:
    """Trainable parameters in one group, or two (matrices / 1-D tensors) with exclude_1d_from_decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return []
    if not cfg.exclude_1d_from_decay:
        return [{"params": params, "lr": lr, "weight_decay": cfg.weight_decay}]
    matrices = [p for p in params if p.ndim > 1]
    vectors = [p for p in params if p.ndim <= 1]
    groups = [{"params": matrices, "lr": lr, "weight_decay": cfg.weight_decay}]
    if vectors:
        groups.append({"params": vectors, "lr": lr * cfg.bias_lr_scale, "weight_decay": 0.0, "exclude": True})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    return optimizer_from_groups(parameter_groups(model, cfg, lr), cfg, lr)


def optimizer_from_groups(groups: list[dict], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.name == "lars":
        return LARS(groups, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, eta=cfg.lars_eta)
    if cfg.name == "adamw":
        for group in groups:
            group.pop("exclude", None)
        return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                                 **adamw_implementation(groups))
    raise ValueError(f"unknown optimiser {cfg.name!r}; valid: adamw, lars")


def adamw_implementation(groups: list[dict]) -> dict:
    """AdamW's fastest implementation for where the parameters are (they are on their device when
    Lightning calls ``configure_optimizers``): ``fused=True`` with every parameter a floating-point CUDA
    tensor (one kernel per step for all tensors), else ``foreach=True`` (on CPU bitwise the same results
    as PyTorch's default per-tensor loop there, at a fraction of its Python cost per step)."""
    params = [p for g in groups for p in g["params"]]
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": True}


def rescale_checkpoint_lrs(checkpoint: dict, new_lrs: list[float]) -> None:
    """Resuming with a changed learning rate: Lightning restores the optimizer's and scheduler's stored
    rates unchanged. Rescale them to ``new_lrs`` (one per parameter group, in order) so the run uses the
    config it says it uses."""
    for opt_state in checkpoint.get("optimizer_states", []):
        for group, lr in zip(opt_state["param_groups"], new_lrs):
            ratio = lr / group.get("initial_lr", group["lr"])
            group["initial_lr"], group["lr"] = lr, group["lr"] * ratio
    for sched_state in checkpoint.get("lr_schedulers", []):
        if "base_lrs" in sched_state and len(sched_state["base_lrs"]) == len(new_lrs):
            ratios = [lr / old for lr, old in zip(new_lrs, sched_state["base_lrs"])]
            sched_state["base_lrs"] = list(new_lrs)
            sched_state["_last_lr"] = [lr * r for lr, r in zip(sched_state.get("_last_lr", new_lrs), ratios)]
