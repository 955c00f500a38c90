"""An export-friendly RNN text encoder: masking instead of `pack_padded_sequence`.

Packed sequences do not survive ONNX export (the dynamo exporter fails on them, the TorchScript one
silently runs the padding through the recurrence). `MaskedRnnEncoder` computes what the packed
`RnnTextEncoder` computes from plain padded tensors: each layer and direction runs as its own
one-layer RNN (sharing the trained weights); the backward direction reads every text reversed
within its own length, so trailing padding only ever comes after a text's last step, where nothing
reads it. The final states are gathered at each text's last step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from largo.models.layers import masked_pool
from largo.models.rnn import RnnTextEncoder


def _single_layer(rnn: nn.RNNBase, layer: int, reverse: bool) -> nn.RNNBase:
    """A one-layer, one-direction copy of one layer/direction of a stacked (bi)RNN."""
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    in_size = rnn.input_size if layer == 0 else rnn.hidden_size * (2 if rnn.bidirectional else 1)
    single = type(rnn)(in_size, rnn.hidden_size, batch_first=True)
    with torch.no_grad():
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(single, f"{kind}_l0").copy_(getattr(rnn, kind + suffix))
    return single


class MaskedRnnEncoder(nn.Module):
    """The same function as a trained `RnnTextEncoder` (eval mode), without packed sequences."""

    def __init__(self, encoder: RnnTextEncoder):
        super().__init__()
        rnn = encoder.rnn
        self.pad_id = encoder.pad_id
        self.pooling = encoder.pooling
        self.directions = encoder.directions
        self.embed = encoder.embed
        self.cells = nn.ModuleList(
            _single_layer(rnn, layer, reverse=d == 1)
            for layer in range(rnn.num_layers)
            for d in range(self.directions)
        )
        self.out_dim = encoder.out_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = F.pad(ids, (0, 1), value=self.pad_id)  # as the packed encoder: t ≥ 1
        mask = ids != self.pad_id  # [b, t]
        lengths = mask.sum(1).clamp(min=1)  # an empty text reads one pad token, as when packed
        b, t = ids.shape
        pos = torch.arange(t, device=ids.device).unsqueeze(0)  # [1, t]
        last = (lengths - 1).unsqueeze(1)  # [b, 1]
        # reversal within each text's length (an involution: applying it twice is the identity)
        flip = torch.where(pos <= last, last - pos, pos)  # [b, t]
        x = self.embed(ids)
        for layer in range(len(self.cells) // self.directions):
            outs = []
            for d in range(self.directions):
                cell = self.cells[layer * self.directions + d]
                inp = x if d == 0 else _gather(x, flip)
                out, _ = cell(inp)
                outs.append(out if d == 0 else _gather(out, flip))
            x = torch.cat(outs, dim=-1)  # [b, t, hidden * directions]
        if self.pooling == "last":
            hidden = x.size(-1) // self.directions
            forward = _gather(x[..., :hidden], last)[:, 0]  # the forward pass ends on the last token
            states = [forward] if self.directions == 1 else [forward, x[:, 0, hidden:]]  # backward: first
            return torch.cat(states, dim=-1)
        return masked_pool(x, mask, self.pooling)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [b, t, c] at time positions index [b, k] → [b, k, c]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.size(-1)))


def export_friendly(model: nn.Module) -> nn.Module:
    """The model with every packed RNN text encoder replaced by its masked form (a shallow copy)."""
    import copy

    encoders = getattr(model, "encoders", None)
    if encoders is None or not any(isinstance(e, RnnTextEncoder) for e in encoders.values()):
        return model
    out = copy.copy(model)
    out._modules = dict(model._modules)  # the copy's own module table: the original stays untouched
    out.encoders = nn.ModuleDict(
        {k: MaskedRnnEncoder(e) if isinstance(e, RnnTextEncoder) else e for k, e in encoders.items()}
    )
    return out
