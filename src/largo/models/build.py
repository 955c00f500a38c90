"""Config + fitted preprocessors → one `nn.Module`: an encoder per input, a combiner, a head per output."""

from __future__ import annotations

import torch
from torch import nn

from largo.config import Config, TextFeatureConfig
from largo.data.features import NUMBERS, CategoryProcessor, ImageProcessor, Processor, TextProcessor
from largo.models.heads import ClassificationHead, RegressionHead
from largo.models.layers import init_weights
from largo.models.mlp import CategoryEncoder, Combiner, NumberEncoder
from largo.models.zoo import IMAGE_ENCODERS, PRETRAINED_TEXT_ENCODERS, TEXT_ENCODERS


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


def text_encoder(
    f: TextFeatureConfig, proc: TextProcessor, dropout: float, load_pretrained: bool
) -> nn.Module:
    """The encoder of one text input (a pretrained one reads its folder only when `load_pretrained`;
    otherwise it is rebuilt from the architecture the text processor saved)."""
    enc = f.encoder
    if enc.kind in PRETRAINED_TEXT_ENCODERS:
        saved = None if load_pretrained else proc.model_config
        return PRETRAINED_TEXT_ENCODERS[enc.kind](enc, proc.pad_id, dropout, saved)
    if enc.kind == "bag":  # the n-gram buckets the processor kept on the train split, if it pruned
        return TEXT_ENCODERS["bag"](
            proc.vocab_size, proc.pad_id, enc, dropout, proc.max_length, ngram_kept=proc.ngram_kept
        )
    return TEXT_ENCODERS[enc.kind](proc.vocab_size, proc.pad_id, enc, dropout, proc.max_length)


def build_model(
    config: Config, processors: dict[str, Processor], load_pretrained: bool = True
) -> FeatureModel:
    """Build and initialize the model described by the config and the fitted processors.

    `load_pretrained=False` builds pretrained encoders from their saved architecture with random
    weights, for a bundle whose own weights are loaded next (the model folder is not needed then).
    """
    m = config.model
    encoders: dict[str, nn.Module] = {}
    num_numbers = sum(1 for f in config.inputs if f.type == "number")
    if num_numbers:
        wide = any(f.type == "text" for f in config.inputs)  # see NumberEncoder
        encoders[NUMBERS] = NumberEncoder(num_numbers, max(64, num_numbers) if wide else None)
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
        elif f.type == "text":
            assert isinstance(proc, TextProcessor)
            encoders[f.name] = text_encoder(f, proc, m.dropout, load_pretrained)
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
    # a scheme re-initializes what is trained from scratch, never pretrained weights nor a family's
    # own careful init (the Transformer's scaled residual projections)
    for part in [*encoders.values(), combiner, *heads.values()]:
        if not getattr(part, "own_init", False):
            init_weights(part, m.init, m.init_std, m.activation)
    return model
