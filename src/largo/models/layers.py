"""The only pieces model families share: activations, an MLP stack, and weight init."""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def mlp_stack(
    in_dim: int, hidden: list[int], activation: str = "relu", dropout: float = 0.0, norm: str = "none"
) -> nn.Sequential:
    """Linear → [norm] → activation → dropout, once per hidden width. Output width = hidden[-1]."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers.append(nn.Linear(in_dim, width))
        if norm == "batch":
            layers.append(nn.BatchNorm1d(width))
        elif norm == "layer":
            layers.append(nn.LayerNorm(width))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = width
    return nn.Sequential(*layers)


def init_weights(module: nn.Module, scheme: str, std: float = 0.02, activation: str = "relu") -> None:
    """Re-initialize Linear, Conv and Embedding weights in place ('default' keeps PyTorch's init).

    normal: N(0, std); xavier: Glorot uniform; he: Kaiming normal (fan_in) for the activation.
    Biases are zeroed; norm layers keep weight 1, bias 0.
    """
    if scheme == "default":
        return
    gain_name = "relu" if activation in ("relu", "gelu", "silu") else "tanh"
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d):
            if scheme == "normal":
                nn.init.normal_(m.weight, 0.0, std)
            elif scheme == "xavier":
                nn.init.xavier_uniform_(m.weight, gain=nn.init.calculate_gain(gain_name))
            elif scheme == "he":
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity=gain_name)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std if scheme == "normal" else 1.0 / math.sqrt(m.embedding_dim))


class PixelNorm(nn.Module):
    """Raw pixels (uint8 or float, 0..255) → standardized floats with train-split mean/std buffers."""

    def __init__(self, channels: int, mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean or [0.5] * channels).view(1, channels, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std or [0.25] * channels).view(1, channels, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std
