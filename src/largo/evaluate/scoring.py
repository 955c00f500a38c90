"""Model outputs + encoded targets → metrics per output, in the units the user knows."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from largo.data.features import CategoryProcessor, NumberProcessor, Processor
from largo.evaluate.metrics import classification_metrics, regression_metrics

HEADLINE = {
    "category": ("accuracy", "f1_macro", "f1_micro", "precision_macro", "recall_macro"),
    "number": ("mse", "rmse", "mae", "r2"),
}


def score_outputs(
    outputs: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    configs: list,
    processors: dict[str, Processor],
) -> dict[str, dict[str, Any]]:
    """Full metrics for each output: classification from logits, regression in the raw target units."""
    result: dict[str, dict[str, Any]] = {}
    for f in configs:
        proc = processors[f.name]
        out, y = outputs[f.name], targets[f.name].cpu()
        if isinstance(proc, CategoryProcessor):
            probs = torch.softmax(out.float(), dim=-1).numpy()
            m = classification_metrics(y.numpy(), probs.argmax(-1), proc.vocab, probs)
            result[f.name] = {"type": "category", **m}
        else:
            assert isinstance(proc, NumberProcessor)
            y_true = proc.unscale(y.double().numpy())
            y_pred = proc.unscale(out.double().numpy())
            result[f.name] = {"type": "number", **regression_metrics(y_true, y_pred)}
    return result


def headline(scores: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The scalar metrics logged per epoch: 'accuracy' for one output, 'label.accuracy' for several."""
    flat: dict[str, float] = {}
    single = len(scores) == 1
    for name, m in scores.items():
        for key in HEADLINE[m["type"]]:
            value = m.get(key)
            if value is not None and np.isfinite(value):
                flat[key if single else f"{name}.{key}"] = float(value)
    return flat
