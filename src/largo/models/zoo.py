"""The one registry: encoder name → constructor, as literal dicts.

Image encoders take (shape, mean, std, dropout). Text encoders take (vocab_size, pad_id, config,
dropout, max_length), where config is the encoder's section of the text feature's config; each has
`out_dim` and maps right-padded ids [b, t] to [b, out_dim]. Pretrained text encoders take (config,
pad_id, dropout, saved architecture): the architecture (a Hugging Face config.json, a GPT's sizes) is
None when the weights are read from the config's folder, and the dict the text processor saved when a
bundle is rebuilt without that folder. Adding a family means adding a line here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from largo.models.cnn import ImageCNN, TextCNN
from largo.models.gpt import GPT
from largo.models.lm_encoder import LmTextEncoder
from largo.models.mlp import BagTextEncoder, ImageMLP
from largo.models.pretrained import PretrainedTextEncoder  # transformers is imported only when built
from largo.models.rnn import RnnTextEncoder
from largo.models.transformer import TransformerTextEncoder

IMAGE_ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "cnn": partial(ImageCNN, preset="standard"),
    "cnn-classic": partial(ImageCNN, preset="classic"),
    "mlp": ImageMLP,
}

# keyed by the config's encoder kind; trained from scratch
TEXT_ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "bag": BagTextEncoder,
    "cnn": TextCNN,
    "rnn": RnnTextEncoder,
    "transformer": TransformerTextEncoder,
}

# keyed by the config's encoder kind; start from trained weights. The LM encoder gets the GPT class
# here, so the family files gpt.py and lm_encoder.py do not import each other
PRETRAINED_TEXT_ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "pretrained": PretrainedTextEncoder,  # a local Hugging Face folder
    "lm": partial(LmTextEncoder, body=GPT),  # a largo LM bundle (`largo pretrain`)
}
