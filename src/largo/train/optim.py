"""Optimizers (SGD, Adam, AdamW) and learning-rate schedules with linear warmup."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from largo.config import OptimizerConfig, ScheduleConfig


def _decay_split(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    # weights of Linear/Conv decay; biases, norm scales and embeddings do not. Embeddings are found by
    # module type, not by name: parameter names contain user feature names ("embedded_photo").
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay: list[torch.Tensor] = []
    no_decay: list[torch.Tensor] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    return decay, no_decay


def penalized_params(model: nn.Module) -> list[torch.Tensor]:
    """The weights that weight decay and L1/L2 penalties apply to."""
    return _decay_split(model)[0]


def _lr_scales(model: nn.Module) -> dict[int, float]:
    """Parameter id → learning-rate multiplier, from modules that set `lr_scale` (a pretrained body
    fine-tunes at a small fraction of the rate of the freshly initialized layers on top of it)."""
    scales: dict[int, float] = {}
    for m in model.modules():
        if getattr(m, "lr_scale", 1.0) != 1.0:
            scales.update({id(p): float(m.lr_scale) for p in m.parameters()})
    return scales


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    """The configured optimizer, with weight decay only on weights, fused kernels where available."""
    decay, no_decay = _decay_split(model)
    if cfg.weight_decay == 0:  # one group: a fused optimizer then runs one kernel per step, not two
        decay, no_decay = decay + no_decay, []
    scales = _lr_scales(model)
    groups = []
    for params, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)):
        for scale in sorted({scales.get(id(p), 1.0) for p in params}, reverse=True):
            chosen = [p for p in params if scales.get(id(p), 1.0) == scale]
            groups.append({"params": chosen, "weight_decay": wd, "lr": cfg.lr * scale})
    if cfg.name == "sgd":
        cls, kwargs = torch.optim.SGD, {"momentum": cfg.momentum, "nesterov": cfg.nesterov}
        if cfg.nesterov and cfg.momentum == 0:
            raise ValueError("train.optimizer.nesterov: needs momentum > 0")
    else:
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        kwargs = {"betas": tuple(cfg.betas), "eps": cfg.eps}
    try:  # fused kernels: the fastest path on CPU and CUDA
        return cls(groups, lr=cfg.lr, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return cls(groups, lr=cfg.lr, foreach=device.type != "cpu" or None, **kwargs)


def lr_factor(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """step → multiplier of the peak lr: linear warmup, then the schedule's shape."""
    warmup = int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)
    decay_steps = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        s = step - warmup
        if cfg.name == "step":
            return cfg.gamma ** math.floor(s / max(1.0, cfg.step_epochs * steps_per_epoch))
        if cfg.name == "exponential":
            return cfg.gamma ** (s / max(1, steps_per_epoch))
        if cfg.name == "cosine":
            progress = min(1.0, s / decay_steps)
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step; its state (the step count) resumes exactly."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total_steps, steps_per_epoch))
