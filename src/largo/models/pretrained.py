"""A local Hugging Face model folder (BERT, MiniLM, GPT-2, …) as a text encoder, fine-tuned end to end.

transformers is an optional extra (`pip install "largo[pretrained]"`), so it is imported only when an
encoder is built. Nothing here reaches the network: weights come from a folder with `local_files_only`,
and a saved bundle rebuilds the architecture from the stored `hf_config` dict before loading its own
safetensors weights, without the original folder.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from largo.config import PretrainedEncoderConfig
from largo.models.layers import masked_mean

INSTALL_HINT = 'pip install "largo[pretrained]"'


def read_hf_config(path: str) -> dict:
    """Return the `config.json` of a Hugging Face model folder as a dict (no transformers needed).

    Raises FileNotFoundError naming the folder when it or its config.json is missing.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"pretrained model folder {str(path)!r} does not exist or is not a folder")
    file = folder / "config.json"
    if not file.is_file():
        lm = (folder / "config.yaml").is_file() and "task: lm" in (folder / "config.yaml").read_text("utf-8")
        hint = "; it is a largo language-model bundle: use encoder: {from: PATH}" if lm else ""
        raise FileNotFoundError(
            f"pretrained model folder {str(path)!r} has no config.json; "
            f"expected a Hugging Face model folder (config.json, weights and tokenizer files){hint}"
        )
    return json.loads(file.read_text(encoding="utf-8"))


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            f"the 'pretrained' text encoder needs the transformers package: {INSTALL_HINT}"
        ) from e
    return transformers


@contextlib.contextmanager
def _no_progress_bar(transformers: Any) -> Iterator[None]:
    # transformers 5 draws a "Loading weights" tqdm bar; model code does not print
    logging = transformers.utils.logging
    was_enabled = logging.is_progress_bar_enabled()
    if was_enabled:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _load_hf_model(transformers: Any, path: str | None, hf_config: dict | None) -> nn.Module:
    """Weights from the folder at `path`, or random weights in the architecture `hf_config` describes."""
    auto = transformers.AutoModel

    def build(attn: str) -> nn.Module:
        if hf_config is not None:
            cfg = dict(hf_config)
            config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
            return auto.from_config(config, attn_implementation=attn)
        with _no_progress_bar(transformers):
            return auto.from_pretrained(path, local_files_only=True, attn_implementation=attn)

    try:
        model = build("sdpa")
    except (ValueError, ImportError):  # an architecture without an SDPA attention path
        model = build("eager")
    return model.float()  # transformers 5 keeps a checkpoint's own dtype (e.g. fp16) by default


class PretrainedTextEncoder(nn.Module):
    """Token ids → the pooled last hidden state of a Hugging Face encoder or causal (decoder) model.

    Input: ids [b, t] (int32 or int64) padded with `pad_id`, which must be the pad id of the folder's
    tokenizer. Output: [b, out_dim] where out_dim is the model's hidden size. Pooling is the state at
    position 0 ("cls"), the mean over non-pad tokens ("mean", as sentence-transformers pools MiniLM), or
    the last non-pad token's state ("last": in a causal model such as GPT-2 the only one that has read
    the whole text; its position-0 state has seen one token, so "cls" suits it poorly).
    """

    def __init__(
        self,
        config: PretrainedEncoderConfig,
        pad_id: int,
        dropout: float = 0.0,
        hf_config: dict | None = None,
    ):
        """Load the weights from `config.path`, or, given `hf_config`, build the same model untrained.

        Args:
            config: the encoder's config (folder, pooling, freeze).
            pad_id: the id that pads `ids` to a common length; those positions are masked out.
            dropout: dropout on the pooled vector.
            hf_config: the `hf_config` of an earlier encoder; the architecture is rebuilt from it with
                random weights and no file access, ready for `load_state_dict`.
        """
        super().__init__()
        transformers = _import_transformers()
        if hf_config is None:
            read_hf_config(config.path)  # a clear error naming the folder before transformers' own
        self.model = _load_hf_model(transformers, config.path if hf_config is None else None, hf_config)
        if getattr(self.model, "pooler", None) is not None:
            # BERT-style pooler (dense + tanh on [CLS]) is unused here: dropping it saves compute and keeps
            # parameters without gradients out of the optimizer and DDP
            self.model.pooler = None
        self.hf_config: dict = self.model.config.to_dict()
        self.own_init = True  # pretrained weights: build_model never re-initializes them
        self.lr_scale = config.lr_scale  # read by train/optim.py: fine-tune the body at a fraction of lr
        self.out_dim: int = int(self.model.config.hidden_size)
        self.max_len: int | None = getattr(self.model.config, "max_position_embeddings", None)
        self.pad_id = pad_id
        self.pooling = config.pooling
        self.drop = nn.Dropout(dropout)
        if config.freeze:
            self.model.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.max_len is not None:
            ids = ids[:, : self.max_len]  # longer inputs would index past the position embeddings
        ids = ids.long()
        mask = ids != self.pad_id  # [b, t]
        h = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # [b, t, c]
        if self.pooling == "cls":
            pooled = h[:, 0]
        elif self.pooling == "mean":
            pooled = masked_mean(h, mask)
        else:  # the last non-pad position (right padding); an empty text keeps position 0
            positions = torch.arange(1, ids.shape[1] + 1, device=ids.device)
            last = (torch.where(mask, positions, 0).amax(dim=1) - 1).clamp(min=0)  # [b]
            pooled = h[torch.arange(len(ids), device=ids.device), last]
        return self.drop(pooled)
