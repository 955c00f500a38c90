"""Tests for largo.train.optim: schedules at hand-computed steps, optimizer kinds and weight-decay groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from largo.config import OptimizerConfig, ScheduleConfig
from largo.train.optim import build_optimizer, build_schedule, lr_factor, penalized_params

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------- schedules


def test_constant_without_and_with_warmup():
    f = lr_factor(ScheduleConfig(name="constant"), total_steps=50, steps_per_epoch=10)
    assert [f(s) for s in (0, 1, 49, 500)] == [1.0, 1.0, 1.0, 1.0]
    # warmup = 4 steps: (step + 1) / (warmup + 1) until step 4
    f = lr_factor(ScheduleConfig(name="constant", warmup=4), total_steps=50, steps_per_epoch=10)
    assert [f(s) for s in range(6)] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5, 1.0, 1.0])
    # warmup = 0.1 of 50 steps = 5 steps
    f = lr_factor(ScheduleConfig(name="constant", warmup=0.1), total_steps=50, steps_per_epoch=10)
    assert [f(s) for s in (0, 4, 5)] == pytest.approx([1 / 6, 5 / 6, 1.0])


def test_step_schedule():
    # gamma 0.5 every 2 epochs of 10 steps = every 20 steps
    f = lr_factor(ScheduleConfig(name="step", gamma=0.5, step_epochs=2), total_steps=100, steps_per_epoch=10)
    assert [f(s) for s in (0, 19, 20, 39, 40, 99)] == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.0625])
    # with 5 warmup steps the decay clock starts after the warmup
    cfg = ScheduleConfig(name="step", gamma=0.1, step_epochs=0.5, warmup=5)
    f = lr_factor(cfg, total_steps=100, steps_per_epoch=10)  # decay every 5 steps after warmup
    assert [f(s) for s in (0, 4, 5, 9, 10, 15)] == pytest.approx([1 / 6, 5 / 6, 1.0, 1.0, 0.1, 0.01])


def test_exponential_schedule_decays_by_gamma_per_epoch():
    f = lr_factor(ScheduleConfig(name="exponential", gamma=0.5), total_steps=100, steps_per_epoch=10)
    assert [f(s) for s in (0, 5, 10, 20, 35)] == pytest.approx([1.0, math.sqrt(0.5), 0.5, 0.25, 0.5**3.5])


def test_cosine_with_warmup():
    # 100 steps, 10 of warmup: cosine over the remaining 90
    cfg = ScheduleConfig(name="cosine", warmup=0.1)
    f = lr_factor(cfg, total_steps=100, steps_per_epoch=10)
    assert f(0) == pytest.approx(1 / 11)
    assert f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(40) == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))  # 30 of 90 steps: 0.75
    assert f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    assert f(1000) == pytest.approx(0.0, abs=1e-12)  # clamped past the end
    floor = lr_factor(ScheduleConfig(name="cosine", warmup=10, min_lr_ratio=0.2), 100, 10)
    assert floor(55) == pytest.approx(0.2 + 0.8 * 0.5)
    assert floor(100) == pytest.approx(0.2)
    values = [f(s) for s in range(10, 101)]
    assert all(b <= a for a, b in zip(values, values[1:], strict=False))  # monotone after warmup


def test_build_schedule_drives_the_optimizer_lr():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    cfg = ScheduleConfig(name="cosine", warmup=3)
    sched = build_schedule(opt, cfg, total_steps=20, steps_per_epoch=5)
    f = lr_factor(cfg, 20, 5)
    for step in range(20):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * f(step))
        opt.step()
        sched.step()
    # the step count resumes from the state dict
    again = build_schedule(torch.optim.SGD(model.parameters(), lr=0.2), cfg, 20, 5)
    again.load_state_dict(sched.state_dict())
    assert again.last_epoch == 20


# --------------------------------------------------------------------------------------- optimizers


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(10, 4)  # an embedding not called "embed"
        self.embedding_proj = nn.Linear(4, 6)  # a Linear whose name contains "embed"
        self.conv = nn.Conv1d(1, 2, 3)
        self.norm = nn.LayerNorm(6)
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)

    def forward(self, ids):
        return self.norm(self.embedding_proj(self.table(ids)))


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_penalized_params_are_weights_only():
    net = Net()
    got = _ids(penalized_params(net))
    assert got == _ids([net.embedding_proj.weight, net.conv.weight])
    assert id(net.table.weight) not in got and id(net.embedding_proj.bias) not in got
    assert id(net.norm.weight) not in got and id(net.frozen.weight) not in got


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_build_optimizer_kind_and_decay_groups(name):
    net = Net()
    cfg = OptimizerConfig(
        name=name,
        lr=0.01,
        weight_decay=0.1,
        momentum=0.8,
        nesterov=name == "sgd",
        betas=(0.85, 0.99),
        eps=1e-6,
    )
    opt = build_optimizer(net, cfg, CPU)
    want = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    assert type(opt) is want
    decayed = [g for g in opt.param_groups if g["weight_decay"] > 0]
    plain = [g for g in opt.param_groups if g["weight_decay"] == 0]
    assert len(decayed) == 1 and decayed[0]["weight_decay"] == 0.1
    assert _ids(decayed[0]["params"]) == _ids([net.embedding_proj.weight, net.conv.weight])
    assert all(p.ndim >= 2 for p in decayed[0]["params"])
    assert _ids(plain[0]["params"]) == _ids(
        [net.table.weight, net.embedding_proj.bias, net.conv.bias, net.norm.weight, net.norm.bias]
    )
    for g in opt.param_groups:
        assert g["lr"] == 0.01
        if name == "sgd":
            assert g["momentum"] == 0.8 and g["nesterov"] is True
        else:
            assert tuple(g["betas"]) == (0.85, 0.99) and g["eps"] == 1e-6


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_shrinks_weights_not_biases(name):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    nn.init.uniform_(net[0].bias, 0.5, 1.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = build_optimizer(net, OptimizerConfig(name=name, lr=0.1, weight_decay=0.5, momentum=0.9), CPU)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    # with a zero gradient only decay moves a weight: w ← w (1 − lr · wd) on the first step (both kinds)
    assert torch.allclose(net[0].weight, before["0.weight"] * 0.95, atol=1e-7)
    for key in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(net.state_dict()[key], before[key]), key


def test_sgd_nesterov_needs_momentum():
    with pytest.raises(ValueError, match="nesterov"):
        build_optimizer(nn.Linear(2, 2), OptimizerConfig(name="sgd", momentum=0.0, nesterov=True), CPU)


def test_optimizer_without_decay_params():
    opt = build_optimizer(nn.LayerNorm(3), OptimizerConfig(name="adam", weight_decay=0.1), CPU)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.0


def test_modules_with_lr_scale_get_their_own_rate_through_the_schedule():
    body = nn.Linear(4, 4)
    body.lr_scale = 0.05  # what a pretrained encoder sets: fine-tune its weights at a fraction of lr
    model = nn.Sequential(body, nn.Linear(4, 2))
    opt = build_optimizer(
        model, OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.01), torch.device("cpu")
    )
    rates = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert rates[id(body.weight)] == pytest.approx(5e-5) and rates[id(body.bias)] == pytest.approx(5e-5)
    assert rates[id(model[1].weight)] == pytest.approx(1e-3)
    sched = build_schedule(opt, ScheduleConfig(name="cosine"), total_steps=10, steps_per_epoch=5)
    for _ in range(5):
        opt.step()
        sched.step()
    ratio = {round(g["lr"] / g["initial_lr"], 9) for g in opt.param_groups}
    assert len(ratio) == 1  # every group follows the same schedule shape
