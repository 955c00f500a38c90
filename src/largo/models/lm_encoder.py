"""A largo language model (`largo pretrain`) as a classifier's text encoder: the GPT body, pooled.

`encoder: {from: runs/lm/v1}` reads the LM bundle's GPT sizes and safetensors weights; the text is
tokenized with the bundle's own tokenizer (data/text.py). The body is the GPT's embedding, blocks and
final norm; the LM head, which is the embedding again (tied), is dropped. The model is causal, so right
padding never reaches a real token's state and no attention mask is needed: pooling is the mean of the
hidden states over real tokens, or the state of the last real token (the only one that has read the
whole text). The GPT's sizes are kept (`gpt_config`, stored in the text processor's state), so a
classifier bundle rebuilds the body without the LM folder before loading its own weights.

The GPT class comes from the registry (models/zoo.py passes `body=GPT`), because model files do not
import each other: this file needs only a module with `hidden(ids) → [b, t, dim]`, built from a
GPTConfig (whose `dim` and `context` it reads), whose LM head attribute is `head`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model
from torch import nn

from largo.config import LmEncoderConfig
from largo.config_lm import GPTConfig
from largo.data.text import read_lm_model_config
from largo.models.layers import masked_mean

WEIGHTS = "model.safetensors"  # the LM bundle's weights file (deploy/generator.py writes it)


def load_lm_weights(body: nn.Module, folder: str | Path) -> None:
    """Load an LM bundle's safetensors weights into a freshly built GPT of the same sizes; every tensor
    must match (a ValueError naming `encoder.from` otherwise)."""
    try:
        missing, unexpected = load_model(body, str(Path(folder) / WEIGHTS), strict=False)
    except RuntimeError as e:  # tensors of other shapes
        problem = str(e).splitlines()[-1].strip()
    else:
        if not missing and not unexpected:
            return
        # e.g. a LoRA adapter bundle, which holds only the adapters
        problem = f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
    raise ValueError(f"encoder.from: the weights in {str(folder)!r} do not match its config.yaml ({problem})")


class LmTextEncoder(nn.Module):
    """Token ids → the pooled hidden states of a largo GPT.

    Input: ids [b, t] (int32 or int64) right-padded with `pad_id` (the LM tokenizer's `<pad>`); rows
    longer than the LM's context are cut to it. Output: [b, out_dim] with out_dim the GPT's width.
    """

    def __init__(
        self,
        config: LmEncoderConfig,
        pad_id: int,
        dropout: float = 0.0,
        gpt_config: dict[str, Any] | None = None,
        *,
        body: Callable[[GPTConfig], nn.Module],
    ):
        """Load the GPT from the bundle at `config.path`, or, given `gpt_config`, build it untrained.

        Args:
            config: the encoder's config (LM bundle folder, pooling, freeze, lr_scale).
            pad_id: the id that pads `ids`; those positions are left out of the pooling.
            dropout: dropout on the pooled vector.
            gpt_config: the `gpt_config` of an earlier encoder; the body is rebuilt from it with random
                weights and no file access, ready for `load_state_dict`.
            body: the GPT class (from the registry); called with a GPTConfig.
        """
        super().__init__()
        arch = gpt_config if gpt_config is not None else read_lm_model_config(config.path)
        cfg = GPTConfig.model_validate(arch)
        self.body = body(cfg)
        if gpt_config is None:
            load_lm_weights(self.body, config.path)
        # the tied LM head is the embedding matrix again: unused here, and it would store the same
        # tensor under a second name in the classifier's weights
        self.body.head = None
        self.gpt_config: dict[str, Any] = cfg.model_dump(mode="json")
        self.own_init = True  # pretrained weights: build_model never re-initializes them
        self.lr_scale = config.lr_scale  # read by train/optim.py: the body learns at a fraction of lr
        self.out_dim = cfg.dim
        self.context = cfg.context
        self.pad_id = pad_id
        self.pooling = config.pooling
        self.drop = nn.Dropout(dropout)
        if config.freeze:
            self.body.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids[:, : self.context].long()  # the tokenizer already cuts at the context; a guard
        mask = ids != self.pad_id  # [b, t]
        h = self.body.hidden(ids)  # [b, t, dim]
        if self.pooling == "mean":
            return self.drop(masked_mean(h, mask))
        b, t = ids.shape
        positions = torch.arange(1, t + 1, device=ids.device)
        lengths = torch.where(mask, positions, 0).amax(dim=1)  # [b]: last real position + 1, 0 if empty
        last = h[torch.arange(b, device=ids.device), (lengths - 1).clamp(min=0)]  # [b, dim]
        return self.drop(last * (lengths > 0).unsqueeze(-1).to(last.dtype))  # an empty text: zeros
