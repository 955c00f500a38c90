"""The one registry: encoder name → constructor, as a literal dict.

Image encoders take (shape, mean, std, dropout). Adding a family means adding a line here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from largo.models.cnn import ImageCNN
from largo.models.mlp import ImageMLP

IMAGE_ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "cnn": partial(ImageCNN, preset="standard"),
    "cnn-classic": partial(ImageCNN, preset="classic"),
    "mlp": ImageMLP,
}
