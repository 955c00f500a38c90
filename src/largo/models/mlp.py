"""The MLP family: number, category and bag-of-tokens text encoders, an image MLP, and the combiner."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from largo.config import BagEncoderConfig
from largo.data.text import NGRAM_HASH_BASE, NGRAM_HASH_MODULUS
from largo.models.layers import PixelNorm, masked_pool, mlp_stack, token_embedding


class NumberEncoder(nn.Module):
    """Stacked number inputs [b, k], already scaled: passed through, or projected to `width` features.

    Beside a text encoder with hundreds of output features, a few raw numbers reach the
    combiner through a handful of weights that Adam moves by ~lr per step, so the big encoder's features
    win before the numbers count; a learned projection gives them as many weights as they need.
    """

    def __init__(self, num_features: int, width: int | None = None):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(num_features, width), nn.GELU()) if width else None
        self.out_dim = width or num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x if self.project is None else self.project(x)


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


def hash_ngrams(ids: torch.Tensor, n: int, buckets: int) -> torch.Tensor:
    """Hash every window of n consecutive ids [b, t] into [0, buckets) → int64 [b, t - n + 1].

    Deterministic (no Python `hash`), so the same text always lands in the same buckets across runs,
    processes and exported graphs. The hash is seeded with n, so a bigram and a trigram differ.
    `largo.data.text.hash_ngrams_array` computes the same numbers in numpy (see the constants there).
    """
    ids = ids.long()
    windows = ids.size(1) - n + 1
    h = torch.full_like(ids[:, :windows], n)
    for k in range(n):
        h = (h * NGRAM_HASH_BASE + ids[:, k : k + windows] + 1) % NGRAM_HASH_MODULUS
    return h % buckets


class BagTextEncoder(nn.Module):
    """fastText-style bag of tokens: embed the tokens (and hashed n-grams) and pool them over the text.

    Input: ids [b, t], right-padded with pad_id; output [b, out_dim] (dim, or 2 * dim for mean_max).
    N-grams of length 2..config.ngrams that lie wholly inside the text get a second embedding table of
    config.ngram_buckets rows, multiplied by config.ngram_scale, and are pooled together with the
    tokens. With config.ngram_min_count > 1 only the buckets in `ngram_kept` (those seen that often in
    the train split, from `TextProcessor.fit`) count: the table has a row per kept bucket, and the other
    n-grams are left out of the pooling as if absent. An empty text gives zeros.
    """

    def __init__(
        self,
        vocab_size: int,
        pad_id: int,
        config: BagEncoderConfig,
        dropout: float = 0.0,
        max_length: int = 512,  # unused: a bag has no positions; kept for the common signature
        ngram_kept: Sequence[int] | None = None,
    ):
        super().__init__()
        self.pad_id = pad_id
        self.ngrams = config.ngrams
        self.buckets = config.ngram_buckets
        self.ngram_scale = config.ngram_scale
        self.pooling = config.pooling
        self.embed = token_embedding(vocab_size, config.dim)
        self.ngram_embed = None
        row = None  # bucket → row of ngram_embed, 0 for a left-out one (a buffer, rebuilt from the state)
        if config.ngrams > 1 and config.ngram_min_count > 1:
            if ngram_kept is None:
                raise ValueError(
                    "bag encoder: ngram_min_count > 1 needs the n-gram buckets kept on the train split "
                    "(TextProcessor.fit records them)"
                )
            kept = torch.as_tensor(list(ngram_kept), dtype=torch.long)
            if kept.numel() and (kept.min() < 0 or kept.max() >= config.ngram_buckets):
                raise ValueError(f"bag encoder: ngram_kept holds buckets outside [0, {config.ngram_buckets})")
            row = torch.zeros(config.ngram_buckets, dtype=torch.int32)  # 4 bytes a bucket: millions are fine
            row[kept] = torch.arange(1, kept.numel() + 1, dtype=torch.int32)
            self.ngram_embed = token_embedding(kept.numel() + 1, config.dim)  # row 0 is never pooled
        elif config.ngrams > 1:
            self.ngram_embed = token_embedding(config.ngram_buckets, config.dim)
        self.ngram_row: torch.Tensor | None
        self.register_buffer("ngram_row", row, persistent=False)
        self.drop = nn.Dropout(dropout)
        self.out_dim = config.dim * (2 if config.pooling == "mean_max" else 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # trailing padding never changes the output, so always append enough for one window of every
        # n-gram length (and a step when t = 0) instead of branching on the shape
        ids = F.pad(ids, (0, self.ngrams), value=self.pad_id)
        mask = ids != self.pad_id  # [b, t]
        parts, masks = [self.embed(ids)], [mask]
        for n in range(2, self.ngrams + 1):  # ngram_embed exists whenever this loop runs
            h = hash_ngrams(ids, n, self.buckets)  # [b, t - n + 1]
            inside = mask[:, n - 1 :]  # right padding: a window is inside the text iff its last token is
            if self.ngram_row is not None:
                h = self.ngram_row[h].long()
                inside = inside & (h > 0)
            parts.append(self.ngram_embed(h) * self.ngram_scale)
            masks.append(inside)
        x = torch.cat(parts, dim=1)  # tokens and n-grams side by side along time
        return self.drop(masked_pool(x, torch.cat(masks, dim=1), self.pooling))
