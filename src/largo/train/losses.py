"""The training objective: a summed per-example loss over all outputs.

Losses are summed, not averaged, so the loop can divide by the number of examples in a whole
optimizer step: accumulating micro-batches of any sizes then gives the gradient of one big batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]


def make_loss_fn(outputs: list, class_weights: dict[str, torch.Tensor | None] | None = None) -> LossFn:
    """Build loss(outputs, targets) → scalar sum over examples and outputs.

    Args:
        outputs: the output feature configs (category → cross entropy, number → mse/mae/huber).
        class_weights: optional per-class weights for category outputs.
    """
    class_weights = class_weights or {}
    parts: list[tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = []
    for f in outputs:
        if f.type == "category":
            w, ls = class_weights.get(f.name), f.label_smoothing

            def ce(logits: torch.Tensor, y: torch.Tensor, w=w, ls=ls) -> torch.Tensor:
                weight = None if w is None else w.to(logits.device)
                return F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=ls, reduction="sum")

            parts.append((f.name, ce))
        else:
            fn = {"mse": F.mse_loss, "mae": F.l1_loss, "huber": F.huber_loss}[f.loss]
            parts.append((f.name, lambda p, y, fn=fn: fn(p.float(), y.float(), reduction="sum")))

    if len(parts) == 1:
        name, fn = parts[0]
        return lambda out, tgt: fn(out[name], tgt[name])
    return lambda out, tgt: sum(fn(out[name], tgt[name]) for name, fn in parts)
