"""Output heads: classification logits and regression values."""

from __future__ import annotations

import torch
from torch import nn


class ClassificationHead(nn.Module):
    """Linear layer to one logit per class."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # [b, classes]


class RegressionHead(nn.Module):
    """Linear layer to one value (in the target's scaled space)."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).squeeze(-1)  # [b]
