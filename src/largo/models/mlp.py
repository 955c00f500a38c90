"""The MLP family: the encoder of stacked number inputs and the combiner of all encoders."""

from __future__ import annotations

import torch
from torch import nn

from largo.models.layers import PixelNorm, mlp_stack


class NumberEncoder(nn.Module):
    """Stacked number inputs [b, k] pass through unchanged (they are already scaled)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.out_dim = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


class CategoryEncoder(nn.Module):
    """An embedding per category input; id 0 is the unknown bucket."""

    def __init__(self, vocab_size: int, dim: int, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.drop = nn.Dropout(dropout)
        self.out_dim = dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.embed(ids))


class ImageMLP(nn.Module):
    """Flattened, normalized pixels → an MLP (a baseline image encoder)."""

    def __init__(
        self,
        shape: tuple[int, int, int],
        mean: list[float] | None = None,
        std: list[float] | None = None,
        hidden: tuple[int, ...] = (256,),
        dropout: float = 0.0,
    ):
        super().__init__()
        c, h, w = shape
        self.norm = PixelNorm(c, mean, std)
        self.net = mlp_stack(c * h * w, list(hidden), "relu", dropout)
        self.out_dim = hidden[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x).flatten(1))


class Combiner(nn.Module):
    """Concatenate the encoders' outputs and mix them with an MLP."""

    def __init__(self, in_dim: int, hidden: list[int], activation: str, dropout: float, norm: str):
        super().__init__()
        self.net = mlp_stack(in_dim, hidden, activation, dropout, norm)
        self.out_dim = hidden[-1] if hidden else in_dim

    def forward(self, parts: list[torch.Tensor]) -> torch.Tensor:
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return self.net(x)
