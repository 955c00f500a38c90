"""Config + fitted preprocessors → one `nn.Module`: an encoder per input, a combiner, a head per output."""

from __future__ import annotations

import torch
from torch import nn

from largo.config import Config
from largo.data.features import NUMBERS, CategoryProcessor, ImageProcessor, Processor
from largo.models.heads import ClassificationHead, RegressionHead
from largo.models.layers import init_weights
from largo.models.mlp import CategoryEncoder, Combiner, NumberEncoder
from largo.models.zoo import IMAGE_ENCODERS


def embedding_dim(vocab_size: int) -> int:
    """A default embedding width that grows slowly with the vocabulary (fast.ai's rule, capped)."""
    return int(min(64, round(1.6 * vocab_size**0.56)))


class FeatureModel(nn.Module):
    """Encoders → combiner → heads. forward(batch) returns {output name: logits or values}."""

    def __init__(self, encoders: dict[str, nn.Module], combiner: Combiner, heads: dict[str, nn.Module]):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.combiner = combiner
        self.heads = nn.ModuleDict(heads)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        parts = [encoder(batch[name]) for name, encoder in self.encoders.items()]
        h = self.combiner(parts)
        return {name: head(h) for name, head in self.heads.items()}


def build_model(config: Config, processors: dict[str, Processor]) -> FeatureModel:
    """Build and initialize the model described by the config and the fitted processors."""
    m = config.model
    encoders: dict[str, nn.Module] = {}
    num_numbers = sum(1 for f in config.inputs if f.type == "number")
    if num_numbers:
        encoders[NUMBERS] = NumberEncoder(num_numbers)
    for f in config.inputs:
        proc = processors[f.name]
        if f.type == "category":
            assert isinstance(proc, CategoryProcessor)
            dim = f.embedding_dim or embedding_dim(proc.size)
            encoders[f.name] = CategoryEncoder(proc.size, dim, m.dropout)
        elif f.type == "image":
            assert isinstance(proc, ImageProcessor)
            st = proc.stats
            encoders[f.name] = IMAGE_ENCODERS[f.encoder](
                proc.shape, mean=st["mean"], std=st["std"], dropout=m.dropout
            )
    in_dim = sum(e.out_dim for e in encoders.values())
    combiner = Combiner(in_dim, list(m.hidden), m.activation, m.dropout, m.norm)
    heads: dict[str, nn.Module] = {}
    for f in config.outputs:
        proc = processors[f.name]
        if f.type == "category":
            heads[f.name] = ClassificationHead(combiner.out_dim, proc.size)
        else:
            heads[f.name] = RegressionHead(combiner.out_dim)
    model = FeatureModel(encoders, combiner, heads)
    init_weights(model, m.init, m.init_std, m.activation)
    return model
