"""Tests for largo.train.loop (fit without checkpoints): learning, accumulation, clipping, penalties,
early stopping, bf16 and the on_epoch_end hook."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from sklearn.datasets import load_iris
from torch import nn

from largo.config import NumberFeatureConfig, TrainConfig, validate_config
from largo.data.features import NUMBERS, encode_inputs, make_processor
from largo.data.loader import EncodedSplit
from largo.evaluate.scoring import headline, score_outputs
from largo.models.build import build_model
from largo.train.loop import fit, forward_in_batches, train_step
from largo.train.losses import make_loss_fn

pytestmark = pytest.mark.usefixtures("one_thread")


def train_config(**kwargs) -> TrainConfig:
    base = {
        "epochs": 1,
        "batch_size": 16,
        "device": "cpu",
        "progress": False,
        "seed": 0,
        "optimizer": {"name": "adamw", "lr": 1e-2},
    }
    base.update(kwargs)
    return TrainConfig(**base)


# --------------------------------------------------------------------------------------------- iris


def iris(shuffle_valid_labels: bool = False, **train):
    """Iris through the real pipeline: processors fit on 120 train rows, 30 valid rows, a [16] MLP."""
    d = load_iris()
    names = [f"f{i}" for i in range(4)]
    order = np.random.default_rng(0).permutation(len(d.target))
    tr, va = order[:120], order[120:]
    cfg = validate_config(
        {
            "data": {"train": "iris.csv"},
            "inputs": [{"name": n, "type": "number"} for n in names],
            "outputs": [{"name": "species", "type": "category"}],
            "model": {"hidden": [16], "dropout": 0.0},
            "train": {
                "device": "cpu",
                "progress": False,
                "seed": 0,
                "optimizer": {"name": "adamw", "lr": 1e-2},
                **train,
            },
        }
    )
    labels = np.array([str(t) for t in d.target])
    valid_labels = np.random.default_rng(1).permutation(labels[va]) if shuffle_valid_labels else labels[va]

    def columns(rows, y):
        return {**{n: d.data[rows, i].tolist() for i, n in enumerate(names)}, "species": list(y)}

    train_cols, valid_cols = columns(tr, labels[tr]), columns(va, valid_labels)
    processors = {}
    for is_output, features in ((False, cfg.inputs), (True, cfg.outputs)):
        for f in features:
            processors[f.name] = make_processor(f, is_output)
            processors[f.name].fit(train_cols[f.name])

    def encode(cols):
        return EncodedSplit(
            encode_inputs(cols, cfg.inputs, processors),
            {"species": processors["species"].encode(cols["species"])},
        )

    train_split, valid_split = encode(train_cols), encode(valid_cols)
    torch.manual_seed(0)
    model = build_model(cfg, processors)

    def score_fn(outputs):
        return headline(score_outputs(outputs, valid_split.targets, cfg.outputs, processors))

    return cfg, model, train_split, valid_split, make_loss_fn(cfg.outputs), score_fn


def accuracy(model: nn.Module, split: EncodedSplit) -> float:
    logits = forward_in_batches(model, split.inputs, 256)["species"]
    return float((logits.argmax(-1) == split.targets["species"]).float().mean())


def test_fit_learns_iris_and_calls_on_epoch_end_once_per_epoch():
    cfg, model, train, valid, loss_fn, score_fn = iris(epochs=25, batch_size=16)
    records = []
    result = fit(model, train, valid, cfg.train, loss_fn, score_fn=score_fn, on_epoch_end=records.append)
    assert len(result.history) == 25
    assert records == result.history  # once per epoch, with the epoch's record
    assert [r["epoch"] for r in records] == list(range(1, 26))
    assert result.steps == 25 * 8 and records[-1]["step"] == result.steps  # 120 / 16 → 8 batches
    for key in ("train.loss", "valid.loss", "valid.accuracy", "valid.f1_macro", "lr", "time_s"):
        assert key in records[-1], key
    assert records[-1]["train.loss"] < 0.5 * records[0]["train.loss"]
    assert records[-1]["valid.accuracy"] > 0.9
    assert accuracy(model, valid) == pytest.approx(records[-1]["valid.accuracy"])
    assert not result.stopped_early and result.best_epoch is None


def test_fit_is_deterministic_per_seed():
    weights = []
    for seed in (0, 0, 1):
        cfg, model, train, valid, loss_fn, _ = iris(epochs=2, batch_size=16, seed=seed)
        fit(model, train, valid, cfg.train, loss_fn)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])  # the seed changes the epoch order


def test_bf16_runs_and_learns():
    cfg, model, train, valid, loss_fn, score_fn = iris(epochs=25, batch_size=16, precision="bf16")
    dtypes = set()
    handle = model.heads["species"].register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    result = fit(model, train, valid, cfg.train, loss_fn, score_fn=score_fn)
    handle.remove()
    assert torch.bfloat16 in dtypes  # autocast was really on
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert result.history[-1]["valid.accuracy"] > 0.85
    assert result.history[-1]["train.loss"] < 0.5 * result.history[0]["train.loss"]


def test_ema_returns_the_moving_average_of_the_steps_weights():
    # one step per epoch and a constant rate: a run of k epochs stops at the weights W_k of a longer run
    steps = []
    for epochs in (1, 2, 3):
        cfg, model, train, valid, loss_fn, _ = iris(epochs=epochs, batch_size=120)
        fit(model, train, valid, cfg.train, loss_fn)
        steps.append(flat(model))
    cfg, model, train, valid, loss_fn, score_fn = iris(epochs=3, batch_size=120, ema=0.8)
    result = fit(model, train, valid, cfg.train, loss_fn, score_fn=score_fn)
    expected = steps[0]  # the average starts at the first step's weights
    for w in steps[1:]:
        expected = 0.8 * expected + 0.2 * w
    assert torch.allclose(flat(model), expected, atol=1e-6)
    assert not torch.allclose(flat(model), steps[-1], atol=1e-3)  # not the raw last weights
    # validation judged the averaged weights, the ones the model ends with
    assert accuracy(model, valid) == pytest.approx(result.history[-1]["valid.accuracy"])


def test_early_stopping_restores_the_best_weights():
    # valid labels are shuffled: the better the model fits train, the worse its valid loss gets
    es = {"metric": "valid.loss", "patience": 3}
    cfg, model, train, valid, loss_fn, score_fn = iris(
        shuffle_valid_labels=True, epochs=60, batch_size=16, early_stopping=es
    )
    result = fit(model, train, valid, cfg.train, loss_fn, score_fn=score_fn)
    history = [r["valid.loss"] for r in result.history]
    assert result.stopped_early
    assert len(history) < 60
    best = int(np.argmin(history))
    assert result.best_epoch == best + 1
    assert len(history) == result.best_epoch + 3  # exactly `patience` epochs without a gain
    outputs = forward_in_batches(model, valid.inputs, 256)
    restored = float(loss_fn(outputs, valid.targets)) / len(valid)
    assert restored == pytest.approx(history[best], rel=1e-5)
    assert restored != pytest.approx(history[-1], rel=1e-3)  # the last epoch's weights were replaced


def test_early_stopping_on_a_max_metric_without_a_stop():
    es = {"metric": "valid.f1_macro", "patience": 50}
    cfg, model, train, valid, loss_fn, score_fn = iris(
        shuffle_valid_labels=True, epochs=8, batch_size=16, early_stopping=es
    )
    result = fit(model, train, valid, cfg.train, loss_fn, score_fn=score_fn)
    f1 = [r["valid.f1_macro"] for r in result.history]
    assert not result.stopped_early and len(f1) == 8
    assert result.best_epoch == int(np.argmax(f1)) + 1  # the first epoch reaching the max
    assert result.best_epoch < 8  # (the data make the best epoch an early one)
    restored = score_fn(forward_in_batches(model, valid.inputs, 256))["f1_macro"]
    assert restored == pytest.approx(max(f1))
    assert restored != pytest.approx(f1[-1])


def test_early_stopping_ties_go_to_the_lower_valid_loss():
    # 30 valid rows: accuracy moves in steps of 1/30 and repeats; among the epochs at the best
    # accuracy, the one with the lowest valid loss is kept (not the first to get there)
    es = {"metric": "valid.accuracy", "patience": 50}
    cfg, model, train, valid, loss_fn, score_fn = iris(epochs=25, batch_size=16, early_stopping=es)
    result = fit(model, train, valid, cfg.train, loss_fn, score_fn=score_fn)
    acc = [r["valid.accuracy"] for r in result.history]
    loss = [r["valid.loss"] for r in result.history]
    tied = [i for i, a in enumerate(acc) if a == max(acc)]
    assert len(tied) > 1  # the case under test happens
    best = min(tied, key=lambda i: loss[i])
    assert best != tied[0] and result.best_epoch == best + 1
    outputs = forward_in_batches(model, valid.inputs, 256)
    assert float(loss_fn(outputs, valid.targets)) / len(valid) == pytest.approx(loss[best], rel=1e-5)


# ------------------------------------------------------------------------------ exact small models


class Linear(nn.Module):
    """A linear regression on NUMBERS with output 'y' (a stand-in for a FeatureModel)."""

    def __init__(self, k: int = 5, out: int = 1):
        super().__init__()
        self.lin = nn.Linear(k, out)

    def forward(self, batch):
        return {"y": self.lin(batch[NUMBERS]).squeeze(-1)}


class MLP(Linear):
    def __init__(self):
        super().__init__()
        self.lin = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))


def regression(n: int, scale: float = 1.0, seed: int = 0) -> EncodedSplit:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.1 * torch.randn(n, generator=g)) * scale
    return EncodedSplit({NUMBERS: x}, {"y": y})


MSE = make_loss_fn([NumberFeatureConfig(name="y")])
SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9}


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_train_step_accumulation_equals_one_big_batch():
    data = regression(64)
    torch.manual_seed(0)
    big, acc = MLP(), MLP()
    acc.load_state_dict(big.state_dict())
    amp = contextlib.nullcontext()
    inputs, targets = data.take(torch.arange(64))
    loss = train_step(big, inputs, targets, MSE, 1 / 64, amp)
    total = 0.0
    for lo, hi in ((0, 40), (40, 64)):  # uneven micro-batches, each scaled by 1 / 64
        inputs, targets = data.take(torch.arange(lo, hi))
        total += float(train_step(acc, inputs, targets, MSE, 1 / 64, amp))
    assert total == pytest.approx(float(loss), rel=1e-5)  # summed, not averaged
    for p, q in zip(big.parameters(), acc.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)
    mean_loss = nn.functional.mse_loss(big(data.inputs)["y"], data.targets["y"])
    mean_loss.backward()  # reference: the gradient of the mean loss (accumulates: so now 2×)
    for p, q in zip(big.parameters(), acc.parameters(), strict=True):
        assert torch.allclose(p.grad, 2 * q.grad, atol=1e-5)


@pytest.mark.parametrize("n", [128, 100])  # 100: the last optimizer step holds 36 examples, not 64
def test_fit_accumulate_2_equals_double_batch(n):
    data = regression(n)
    weights = {}
    for batch_size, accumulate in ((64, 1), (32, 2), (32, 1)):
        torch.manual_seed(0)
        model = MLP()
        cfg = train_config(
            batch_size=batch_size,
            accumulate=accumulate,
            optimizer=SGD,
            epochs=2,
            schedule={"name": "cosine", "warmup": 1},
        )
        result = fit(model, data, None, cfg, MSE)
        assert result.steps == 2 * (2 if accumulate == 2 or batch_size == 64 else 4)
        weights[(batch_size, accumulate)] = flat(model)
    assert torch.allclose(weights[(64, 1)], weights[(32, 2)], atol=1e-6)
    assert not torch.allclose(weights[(64, 1)], weights[(32, 1)], atol=1e-3)  # the comparison can fail


def test_clip_grad_norm_bounds_the_update():
    data = regression(32, scale=1e4)  # a huge loss, a huge gradient
    sgd = {"name": "sgd", "lr": 1.0, "momentum": 0.0}
    deltas = {}
    for clip in (None, 0.5):
        torch.manual_seed(0)
        model = Linear()
        before = flat(model)
        fit(model, data, None, train_config(batch_size=32, optimizer=sgd, clip_grad_norm=clip), MSE)
        deltas[clip] = float((flat(model) - before).norm())  # one SGD step: lr × (clipped) gradient
    assert deltas[None] > 1e3
    assert deltas[0.5] == pytest.approx(0.5, rel=1e-4)


def test_clip_after_train_step_bounds_the_gradient_norm():
    data = regression(32, scale=1e4)
    torch.manual_seed(0)
    model = MLP()
    inputs, targets = data.take(torch.arange(32))
    train_step(model, inputs, targets, MSE, 1 / 32, contextlib.nullcontext())
    norm_before = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert norm_before > 100
    after = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert after == pytest.approx(1.0, rel=1e-4)


def test_l2_penalty_is_exact_and_counted_once_per_step():
    # with a loss of zero only the penalty moves weights: w ← w − lr · 2 · l2 · w, biases untouched
    data = regression(64)
    zero_loss = lambda out, tgt: (out["y"] * 0).sum()  # noqa: E731
    sgd = {"name": "sgd", "lr": 0.1, "momentum": 0.0}
    for batch_size, accumulate in ((64, 1), (16, 4)):
        torch.manual_seed(0)
        model = MLP()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        cfg = train_config(batch_size=batch_size, accumulate=accumulate, optimizer=sgd, l2=0.5)
        fit(model, data, None, cfg, zero_loss)
        after = model.state_dict()
        for key in before:
            if key.endswith("weight"):
                assert torch.allclose(after[key], before[key] * (1 - 0.1 * 2 * 0.5), atol=1e-6), key
            else:
                assert torch.equal(after[key], before[key]), key


def test_l1_penalty_moves_weights_by_lr_times_l1():
    data = regression(64)
    zero_loss = lambda out, tgt: (out["y"] * 0).sum()  # noqa: E731
    torch.manual_seed(0)
    model = Linear()
    before = model.lin.weight.detach().clone()
    fit(
        model,
        data,
        None,
        train_config(batch_size=64, optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.0}, l1=0.1),
        zero_loss,
    )
    assert torch.allclose(model.lin.weight, before - 0.01 * 0.1 * before.sign(), atol=1e-7)


def test_l2_shrinks_the_weight_norm_when_learning():
    norms = {}
    for l2 in (0.0, 0.05):
        cfg, model, train, valid, loss_fn, _ = iris(epochs=10, batch_size=16, l2=l2)
        fit(model, train, valid, cfg.train, loss_fn)
        norms[l2] = sum(
            float(m.weight.detach().norm() ** 2) for m in model.modules() if isinstance(m, nn.Linear)
        )
    assert norms[0.05] < 0.8 * norms[0.0]


def test_fit_without_valid_logs_train_loss_only():
    data = regression(50)
    torch.manual_seed(0)
    model = Linear()
    records = []
    result = fit(model, data, None, train_config(epochs=3, batch_size=10), MSE, on_epoch_end=records.append)
    assert len(records) == 3 and all("valid.loss" not in r for r in records)
    assert records[-1]["train.loss"] < records[0]["train.loss"]
    assert result.steps == 15


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_fit_on_cuda_learns(precision):
    cfg, model, train, valid, loss_fn, score_fn = iris(
        epochs=25, batch_size=16, precision=precision, device="cuda"
    )
    result = fit(model, train, valid, cfg.train, loss_fn, score_fn=score_fn)
    assert next(model.parameters()).device.type == "cuda"
    assert result.history[-1]["valid.accuracy"] > 0.85
