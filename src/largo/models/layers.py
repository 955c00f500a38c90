"""The only pieces model families share: activations, an MLP stack, weight init, masked pooling."""

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


TOKEN_EMBEDDING_STD = 0.02


def token_embedding(vocab_size: int, dim: int) -> nn.Embedding:
    """A token table initialized small, N(0, 0.02), as Keras (U(±0.05)) and fastText (U(±1/dim)) do.

    PyTorch's N(0, 1) makes pooled features of a fresh model mostly noise that Adam's ~lr-sized steps
    take epochs to overcome: a bag of words at N(0, 1) sat at chance for 3 epochs on a 10k-review task
    and peaked late and lower; small tables learn from the first epoch. Used by the bag encoder. The
    TextCNN and the RNN keep N(0, 1): with inputs this small, a conv filter whose (PyTorch-initialized)
    bias is negative never fires, so ReLU leaves it dead from the start.
    """
    embed = nn.Embedding(vocab_size, dim)
    nn.init.normal_(embed.weight, 0.0, TOKEN_EMBEDDING_STD)
    return embed


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


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [b, t, c] over the time steps where mask [b, t] is True → [b, c].

    A row with no True step gives zeros (not NaN), so an empty text still has a finite vector.
    """
    m = mask.unsqueeze(-1)  # [b, t, 1]
    count = m.sum(1).clamp(min=1).to(x.dtype)  # [b, 1]
    return x.masked_fill(~m, 0.0).sum(1) / count


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Maximum of x [b, t, c] over the time steps where mask [b, t] is True → [b, c].

    A row with no True step gives zeros. The dtype's lowest finite value stands in for -inf, so no
    inf ever appears (fp16 and exported graphs stay finite).
    """
    m = mask.unsqueeze(-1)  # [b, t, 1]
    lowest = torch.finfo(x.dtype).min
    out = x.masked_fill(~m, lowest).amax(1)  # [b, c]
    return torch.where(m.any(1), out, torch.zeros_like(out))


def masked_pool(x: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool x [b, t, c] over valid steps: 'mean' or 'max' → [b, c]; 'mean_max' → both side by side [b, 2c]."""
    if pooling == "mean":
        return masked_mean(x, mask)
    if pooling == "max":
        return masked_max(x, mask)
    if pooling == "mean_max":
        return torch.cat([masked_mean(x, mask), masked_max(x, mask)], dim=-1)
    raise ValueError(f"unknown pooling {pooling!r}; allowed: mean, max, mean_max")
