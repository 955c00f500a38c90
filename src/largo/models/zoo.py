"""The one registry: encoder name → constructor, as literal dicts.

Image encoders take (shape, mean, std, dropout). Text encoders take (vocab_size, pad_id, config,
dropout, max_length), where config is the encoder's section of the text feature's config; each has
`out_dim` and maps right-padded ids [b, t] to [b, out_dim]. Adding a family means adding a line here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from largo.models.cnn import ImageCNN, TextCNN
from largo.models.mlp import BagTextEncoder, ImageMLP
from largo.models.rnn import RnnTextEncoder
from largo.models.transformer import TransformerTextEncoder

IMAGE_ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "cnn": partial(ImageCNN, preset="standard"),
    "cnn-classic": partial(ImageCNN, preset="classic"),
    "mlp": ImageMLP,
}

# keyed by the config's encoder kind; "pretrained" (a Hugging Face folder) joins when pretrained.py lands
TEXT_ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "bag": BagTextEncoder,
    "cnn": TextCNN,
    "rnn": RnnTextEncoder,
    "transformer": TransformerTextEncoder,
}
