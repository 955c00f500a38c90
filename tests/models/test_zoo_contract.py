"""One contract for every zoo model: shapes, parameters, a training step, a save/load round trip.

Like Keras's `run_layer_test`: each image encoder in `IMAGE_ENCODERS` (on 8x8 grayscale and 28x28 RGB
images) and a tabular model with a regression head go through the same checks. The init schemes of
`models/layers.py` are checked against their textbook statistics.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from largo.config import Config, OptimizerConfig, validate_config
from largo.data.features import NUMBERS, encode_inputs, make_processor
from largo.models.build import FeatureModel, build_model
from largo.models.heads import ClassificationHead, RegressionHead
from largo.models.layers import init_weights
from largo.models.zoo import IMAGE_ENCODERS
from largo.train.loop import train_step
from largo.train.losses import make_loss_fn
from largo.train.optim import build_optimizer

N = 12  # examples in the fixed batch
CLASSES = ["a", "b", "c"]


pytestmark = pytest.mark.usefixtures("one_thread")


def image_case(encoder: str, shape: tuple[int, int, int]) -> dict[str, Any]:
    c, h, w = shape
    rng = np.random.default_rng(0)
    size = (h, w, 3) if c == 3 else (h, w)
    return {
        "inputs": [{"name": "img", "type": "image", "encoder": encoder}],
        "outputs": [{"name": "label", "type": "category"}],
        "columns": {
            "img": [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(N)],
            "label": [CLASSES[i % 3] for i in range(N)],
        },
        "shapes": {"label": (N, 3)},
    }


def tabular_case() -> dict[str, Any]:
    rng = np.random.default_rng(1)
    return {
        "inputs": [
            {"name": "x1", "type": "number"},
            {"name": "color", "type": "category"},
            {"name": "x2", "type": "number", "normalization": "minmax"},
        ],
        "outputs": [{"name": "label", "type": "category"}, {"name": "price", "type": "number"}],
        "columns": {
            "x1": rng.normal(size=N).tolist(),
            "color": [["red", "green", "blue", None][i % 4] for i in range(N)],
            "x2": rng.uniform(0, 10, size=N).tolist(),
            "label": [CLASSES[i % 3] for i in range(N)],
            "price": rng.normal(100, 20, size=N).tolist(),
        },
        "shapes": {"label": (N, 3), "price": (N,)},
    }


CASES = {
    **{
        f"{name}-{'x'.join(map(str, shape))}": (name, shape)
        for name in IMAGE_ENCODERS
        for shape in ((1, 8, 8), (3, 28, 28))
    },
    "tabular+regression": None,
}


def build(case: dict[str, Any], seed: int = 0) -> tuple[Config, FeatureModel, dict, dict, dict]:
    cfg = validate_config(
        {
            "data": {"train": "unused.csv"},
            "inputs": case["inputs"],
            "outputs": case["outputs"],
            "model": {"hidden": [16], "dropout": 0.0},
        }
    )
    columns = case["columns"]
    processors = {}
    for is_output, features in ((False, cfg.inputs), (True, cfg.outputs)):
        for f in features:
            processors[f.name] = make_processor(f, is_output)
            processors[f.name].fit(columns[f.name])
    torch.manual_seed(seed)
    model = build_model(cfg, processors)
    inputs = encode_inputs(columns, cfg.inputs, processors)
    targets = {f.name: processors[f.name].encode(columns[f.name]) for f in cfg.outputs}
    return cfg, model, processors, inputs, targets


@pytest.mark.parametrize("case_name", list(CASES))
def test_model_contract(case_name, tmp_path):
    spec = CASES[case_name]
    case = tabular_case() if spec is None else image_case(*spec)
    cfg, model, processors, inputs, targets = build(case)

    # 1. shapes: one tensor per output, classification logits [n, classes], regression values [n]
    if spec is not None:
        assert inputs["img"].shape == (N, *spec[1]) and inputs["img"].dtype == torch.uint8
    else:
        assert inputs[NUMBERS].shape == (N, 2)
    model.eval()
    with torch.no_grad():
        out = model(inputs)
    assert set(out) == set(case["shapes"])
    for name, shape in case["shapes"].items():
        assert out[name].shape == shape, name
        assert out[name].dtype == torch.float32 and torch.isfinite(out[name]).all()

    # 2. parameters: positive, all trainable, all inside encoders + combiner + heads, none shared
    params = list(model.parameters())
    count = sum(p.numel() for p in params)
    assert count > 0
    parts = [*model.encoders.values(), model.combiner, *model.heads.values()]
    assert count == sum(p.numel() for part in parts for p in part.parameters())
    assert len({id(p) for p in params}) == len(params)
    assert all(p.requires_grad for p in params)
    for f in cfg.outputs:  # a head is exactly Linear(combiner.out_dim → classes or 1)
        head = model.heads[f.name]
        width = processors[f.name].size if f.type == "category" else 1
        assert isinstance(head, ClassificationHead if f.type == "category" else RegressionHead)
        assert sum(p.numel() for p in head.parameters()) == (model.combiner.out_dim + 1) * width
    assert model.combiner.out_dim == 16

    # 3. training: every parameter gets a gradient, and a few steps on the fixed batch cut the loss
    model.train()
    loss_fn = make_loss_fn(cfg.outputs)
    optimizer = build_optimizer(model, OptimizerConfig(name="adam", lr=3e-3), torch.device("cpu"))
    losses = []
    for _ in range(10):
        loss = train_step(model, inputs, targets, loss_fn, 1.0 / N, contextlib.nullcontext())
        if not losses:
            missing = [n for n, p in model.named_parameters() if p.grad is None]
            assert not missing, f"parameters without a gradient: {missing}"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss) / N)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.97 * losses[0], losses

    # 4. save/load through safetensors into a freshly built (differently initialized) model
    model.eval()
    with torch.no_grad():
        before = model(inputs)
    path = tmp_path / "model.safetensors"
    save_model(model, str(path))
    _, other, _, _, _ = build(case, seed=1)
    other.eval()
    with torch.no_grad():
        assert any(not torch.equal(other(inputs)[k], before[k]) for k in before)
    load_model(other, str(path))
    with torch.no_grad():
        after = other(inputs)
    for k in before:
        assert torch.equal(after[k], before[k]), k


# --------------------------------------------------------------------------------------------- init


def _stack() -> nn.Module:
    return nn.Sequential(
        nn.Linear(400, 300),
        nn.ReLU(),
        nn.Linear(300, 200),
        nn.Embedding(50, 32),
        nn.Conv2d(8, 16, 3),
        nn.LayerNorm(200),
    )


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def test_init_normal_has_the_configured_std():
    torch.manual_seed(0)
    net = _stack()
    init_weights(net, "normal", std=0.05)
    for lin in _linears(net):
        assert lin.weight.std().item() == pytest.approx(0.05, rel=0.03)
        assert abs(lin.weight.mean().item()) < 0.005
        assert torch.count_nonzero(lin.bias) == 0
    assert net[3].weight.std().item() == pytest.approx(0.05, rel=0.05)  # embeddings too
    assert net[4].weight.std().item() == pytest.approx(0.05, rel=0.1)
    assert torch.count_nonzero(net[4].bias) == 0
    assert torch.equal(net[5].weight, torch.ones(200)) and torch.count_nonzero(net[5].bias) == 0


@pytest.mark.parametrize(("activation", "gain"), [("relu", math.sqrt(2.0)), ("tanh", 5.0 / 3.0)])
def test_init_xavier_within_glorot_bound(activation, gain):
    torch.manual_seed(0)
    net = _stack()
    init_weights(net, "xavier", activation=activation)
    for lin in _linears(net):
        fan_out, fan_in = lin.weight.shape
        bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
        w = lin.weight.abs()
        assert w.max().item() <= bound
        assert w.max().item() > 0.99 * bound  # uniform: it fills the whole range
        assert lin.weight.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.03)
        assert torch.count_nonzero(lin.bias) == 0


def test_init_he_std_is_sqrt_2_over_fan_in():
    torch.manual_seed(0)
    net = _stack()
    init_weights(net, "he", activation="relu")
    for lin in _linears(net):
        fan_in = lin.weight.shape[1]
        assert lin.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.03)
        assert torch.count_nonzero(lin.bias) == 0
    conv = net[4]
    fan_in = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.1)


def test_init_default_keeps_pytorch_init():
    torch.manual_seed(0)
    net = _stack()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    init_weights(net, "default")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_build_model_applies_the_configured_init():
    rows = 40
    columns = {
        "x1": list(range(rows)),
        "x2": list(range(rows)),
        "label": [CLASSES[i % 3] for i in range(rows)],
    }
    for init, want in (("normal", 0.3), ("he", math.sqrt(2.0 / 2000))):
        cfg = validate_config(
            {
                "data": {"train": "unused.csv"},
                "inputs": [{"name": "x1", "type": "number"}, {"name": "x2", "type": "number"}],
                "outputs": [{"name": "label", "type": "category"}],
                "model": {"hidden": [2000], "init": init, "init_std": 0.3},
            }
        )
        processors = {}
        for is_output, features in ((False, cfg.inputs), (True, cfg.outputs)):
            for f in features:
                processors[f.name] = make_processor(f, is_output)
                processors[f.name].fit(columns[f.name])
        torch.manual_seed(0)
        head = build_model(cfg, processors).heads["label"].proj  # Linear(2000 → 3)
        assert head.weight.std().item() == pytest.approx(want, rel=0.1)
        assert torch.count_nonzero(head.bias) == 0
