"""The RNN family: an LSTM or GRU text encoder over token embeddings.

Variable lengths are packed (`pack_padded_sequence`), so padding never enters the recurrent state and
a text's vector does not depend on how long the other texts in its batch are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from largo.config import RnnEncoderConfig
from largo.models.layers import masked_pool


class RnnTextEncoder(nn.Module):
    """Embedding → (bi)LSTM or GRU → the final states, or the mean or max of the outputs over time.

    Input: ids [b, t], right-padded with pad_id; output [b, hidden * directions]. With pooling 'last'
    the vector is the top layer's final hidden state, both directions concatenated (the backward
    direction ends on the first token). An empty text reads a single pad token ('last') or gives
    zeros ('mean', 'max').
    """

    def __init__(
        self,
        vocab_size: int,
        pad_id: int,
        config: RnnEncoderConfig,
        dropout: float = 0.0,
        max_length: int = 512,  # unused: recurrence needs no positions; kept for the common signature
    ):
        super().__init__()
        self.pad_id = pad_id
        self.pooling = config.pooling
        self.directions = 2 if config.bidirectional else 1
        self.embed = nn.Embedding(vocab_size, config.dim)
        cell = nn.LSTM if config.cell == "lstm" else nn.GRU
        self.rnn = cell(
            config.dim,
            config.hidden,
            num_layers=config.layers,
            bidirectional=config.bidirectional,
            batch_first=True,
            dropout=dropout if config.layers > 1 else 0.0,  # PyTorch applies it between layers only
        )
        self.drop = nn.Dropout(dropout)
        self.out_dim = config.hidden * self.directions

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = F.pad(ids, (0, 1), value=self.pad_id)  # a batch of empty texts (t = 0) still has one step
        mask = ids != self.pad_id  # [b, t]
        # packing wants lengths on the CPU and at least 1: an empty text reads one pad token
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(self.embed(ids), lengths, batch_first=True, enforce_sorted=False)
        out, state = self.rnn(packed)
        if self.pooling == "last":
            h = state[0] if isinstance(state, tuple) else state  # LSTM: (h, c); h [layers * dirs, b, hidden]
            pooled = torch.cat(list(h[-self.directions :]), dim=-1)  # top layer, forward then backward
        else:
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.size(1))  # [b, t, H]
            pooled = masked_pool(out, mask, self.pooling)
        return self.drop(pooled)
