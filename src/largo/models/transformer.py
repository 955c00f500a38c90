"""The Transformer text encoder: pre-norm blocks over token + learned position embeddings.

nanoGPT's model without the causal mask: a learned CLS vector is prepended to every text (so no
tokenizer CLS token is needed), padded keys are masked out of attention, and the text's vector is the
CLS state or the masked mean of the token states. Attention is PyTorch's
`scaled_dot_product_attention`, which picks a fused kernel where one fits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from largo.config import TransformerEncoderConfig
from largo.models.layers import masked_mean


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused q, k, v projection and a key padding mask."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.heads = heads
        self.dropout = dropout

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape  # batch, time, channels
        q, k, v = self.qkv(x).split(c, dim=2)
        # [b, t, c] → [b, heads, t, c / heads]
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        # keep [b, 1, 1, t]: True where a key may be attended to; broadcast over heads and queries
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(ln(x)), then x + ff(ln(x))."""

    def __init__(self, dim: int, heads: int, ff_mult: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), keep))
        return x + self.drop(self.ff(self.ln2(x)))


class TransformerTextEncoder(nn.Module):
    """CLS + token embeddings + learned positions → pre-norm blocks → final LayerNorm → pooled [b, dim].

    Input: ids [b, t], right-padded with pad_id, t ≤ max_length (the tokenizer truncates); output
    [b, dim]. Position 0 belongs to the CLS slot, tokens take 1..t. The CLS slot is always a valid key,
    so an empty text never makes attention see a fully masked row ('mean' gives it zeros).
    """

    def __init__(
        self,
        vocab_size: int,
        pad_id: int,
        config: TransformerEncoderConfig,
        dropout: float = 0.0,
        max_length: int = 512,
    ):
        super().__init__()
        self.pad_id = pad_id
        self.pooling = config.pooling
        self.embed = nn.Embedding(vocab_size, config.dim)
        self.pos = nn.Embedding(max_length + 1, config.dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(config.dim, config.heads, config.ff_mult, dropout) for _ in range(config.layers)
        )
        self.ln_f = nn.LayerNorm(config.dim)
        self.out_dim = config.dim
        self.own_init = True  # build_model leaves model.init schemes to the other parts
        self._init(config.layers)

    def _init(self, layers: int) -> None:
        # Linear weights N(0, 1/fan_in): about GPT-2's fixed 0.02 at its widths, but it keeps attention
        # logits away from zero at small widths too (0.02 left a dim-16 model stuck at chance for
        # hundreds of steps). As in GPT-2, the projections that write into the residual stream are
        # further scaled by 1/sqrt(2 * layers) so its variance does not grow with depth. Embeddings
        # keep N(0, 1): every block reads them through a LayerNorm.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, m.in_features**-0.5)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 1.0)
        nn.init.normal_(self.cls, 0.0, 1.0)
        for block in self.blocks:
            for proj in (block.attn.proj, block.ff[2]):
                nn.init.normal_(proj.weight, 0.0, proj.in_features**-0.5 / math.sqrt(2 * layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        mask = ids != self.pad_id  # [b, t]
        x = torch.cat([self.cls.expand(b, -1, -1), self.embed(ids)], dim=1)  # [b, 1 + t, dim]
        x = self.drop(x + self.pos(torch.arange(t + 1, device=ids.device)))
        keep = torch.cat([mask.new_ones(b, 1), mask], dim=1)[:, None, None, :]  # [b, 1, 1, 1 + t]
        for block in self.blocks:
            x = block(x, keep)
        x = self.ln_f(x)
        if self.pooling == "cls":
            return x[:, 0]
        return masked_mean(x[:, 1:], mask)
