"""The CNN family: image CNNs and TextCNN.

ImageCNN is the classic conv32-pool-conv64-pool stack or a deeper BatchNorm variant; TextCNN runs
convolutions of several widths over token embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from largo.config import CnnTextEncoderConfig
from largo.models.layers import PixelNorm, masked_max


def _block(c_in: int, c_out: int, convs: int, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers.append(nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.MaxPool2d(2))
    return layers


# preset → (channels per stage, convs per stage, batch norm)
PRESETS: dict[str, tuple[tuple[int, ...], int, bool]] = {
    "classic": ((32, 64), 1, False),  # Keras' MNIST example: conv32-pool-conv64-pool-dense
    "standard": ((32, 64), 2, True),  # two conv-bn-relu per stage; more stages for big images
}


class ImageCNN(nn.Module):
    """Normalize raw pixels, run conv stages, flatten (or average-pool big maps) to a vector.

    Input: uint8 or float pixels [b, c, h, w] in 0..255. The per-channel mean/std learned from the
    train split live in buffers, so an exported model takes raw pixels.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        mean: list[float] | None = None,
        std: list[float] | None = None,
        preset: str = "standard",
        dropout: float = 0.0,
    ):
        super().__init__()
        c, h, w = shape
        widths, convs, bn = PRESETS[preset]
        widths = list(widths)
        if min(h, w) < 2 ** len(widths):
            raise ValueError(
                f"image encoder {preset!r} pools {len(widths)} times and needs images of at least "
                f"{2 ** len(widths)}x{2 ** len(widths)} pixels, got {h}x{w}; set the feature's size: [h, w]"
            )
        if preset != "classic":  # add stages until the map is at most 7x7 (28x28 → 7x7)
            while min(h, w) // 2 ** len(widths) > 7 and len(widths) < 5:
                widths.append(min(widths[-1] * 2, 256))
        layers: list[nn.Module] = []
        c_in = c
        for width in widths:
            layers += _block(c_in, width, convs, bn)
            c_in = width
        self.features = nn.Sequential(*layers)
        mh, mw = h // 2 ** len(widths), w // 2 ** len(widths)
        if mh * mw > 64:  # large inputs: average to 4x4 so the vector stays small
            self.pool: nn.Module = nn.AdaptiveAvgPool2d(4)
            mh = mw = 4
        else:
            self.pool = nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.out_dim = c_in * max(mh, 1) * max(mw, 1)
        self.norm = PixelNorm(c, mean, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)  # [b, c, h, w] standardized
        return self.drop(self.pool(self.features(x)).flatten(1))


class TextCNN(nn.Module):
    """TextCNN (Kim 2014): convolutions of several widths over token embeddings, max over time.

    Input: ids [b, t], right-padded with pad_id; output [b, filters * len(kernel_sizes)]. A window
    counts in the max only when it starts on a real token; an empty text gives zeros.
    """

    def __init__(
        self,
        vocab_size: int,
        pad_id: int,
        config: CnnTextEncoderConfig,
        dropout: float = 0.0,
        max_length: int = 512,  # unused: convolutions need no positions; kept for the common signature
    ):
        super().__init__()
        self.pad_id = pad_id
        self.max_kernel = max(config.kernel_sizes)
        self.embed = nn.Embedding(vocab_size, config.dim)
        self.convs = nn.ModuleList(nn.Conv1d(config.dim, config.filters, k) for k in config.kernel_sizes)
        self.drop = nn.Dropout(dropout)
        self.out_dim = config.filters * len(config.kernel_sizes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # trailing padding never changes the output, so always append max_kernel pad steps: a text
        # shorter than the widest kernel (even t = 0) then has a window, with no branch on the shape
        ids = F.pad(ids, (0, self.max_kernel), value=self.pad_id)
        mask = ids != self.pad_id  # [b, t]
        # zero the padding so a window reaching past the text sees the same zeros however long the batch is
        x = self.embed(ids).masked_fill(~mask.unsqueeze(-1), 0.0).transpose(1, 2)  # [b, dim, t]
        pooled = []
        for conv in self.convs:
            h = torch.relu(conv(x)).transpose(1, 2)  # [b, t - k + 1, filters]; window j covers j..j+k-1
            pooled.append(masked_max(h, mask[:, : h.size(1)]))  # right padding: starts on a token → valid
        return self.drop(torch.cat(pooled, dim=-1))
