"""The data side of a training run, shared by `largo.api.train` and `largo.lifecycle.update`:
read and clean the files, split them, fit the processors on the train split, encode the splits,
and the per-batch augmentation and class weights the loop uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa
import torch

from largo.config import Config
from largo.data.augment import augment_images, drop_tokens, is_active
from largo.data.clean import clean_table
from largo.data.features import Processor, encode_inputs, make_processor, sequence_pads
from largo.data.loader import Batch, EncodedSplit
from largo.data.readers import read_table, source_dir
from largo.data.split import split_tables
from largo.data.text import check_text_column
from largo.train.distributed import log


def read_clean(path: str, cfg: Config) -> tuple[pa.Table, dict[str, int]]:
    """Read a data file and clean it as the config says; text columns are checked first."""
    table = read_table(path, format=cfg.data.format, encoding=cfg.data.encoding)
    for f in cfg.inputs:
        if f.type == "text" and f.source in table.column_names:
            check_text_column(table.column(f.source), f.name, path)
    return clean_table(
        table,
        inputs=[f.source for f in cfg.inputs],
        targets=[f.source for f in cfg.outputs],
        config=cfg.data.clean,
    )


def by_feature(table: pa.Table, features: list) -> dict[str, pa.ChunkedArray]:
    """Feature name → its column."""
    return {f.name: table.column(f.source) for f in features}


def load_splits(cfg: Config) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """Read, clean and split the data: {'train', 'valid', 'test'} tables and the cleaning counts."""
    strat = next((f for f in cfg.outputs if f.type == "category"), None)
    stratify = strat.source if cfg.data.stratify and strat is not None else None
    return split_tables(cfg.data, lambda path: read_clean(path, cfg), stratify)


def encode_split(
    table: pa.Table, cfg: Config, processors: dict[str, Processor], label: str = "data"
) -> EncodedSplit:
    """A cleaned table → tensors (inputs through their processors, targets encoded).

    Empty texts and texts cut at max_length are counted and reported, never dropped silently.
    """
    inputs = encode_inputs(by_feature(table, cfg.inputs), cfg.inputs, processors, source_dir(table))
    targets = {f.name: processors[f.name].encode(table.column(f.source)) for f in cfg.outputs}
    split = EncodedSplit(inputs, targets, sequence_pads(cfg.inputs, processors))
    for name, lengths in split.lengths.items():
        limit = processors[name].max_length
        empty, cut = int((lengths == 0).sum()), int((lengths >= limit).sum())
        if empty or cut:
            log(
                f"{label}: text {name!r}: {empty} of {len(lengths)} texts are empty or missing (kept as "
                f"empty), {cut} reach max_length {limit} and are truncated"
            )
    return split


def fit_processors(table: pa.Table, cfg: Config) -> dict[str, Processor]:
    """Fit every feature's preprocessing on the train split only."""
    base_dir = source_dir(table)
    processors: dict[str, Processor] = {}
    for role, features in (("input", cfg.inputs), ("output", cfg.outputs)):
        for f in features:
            proc = make_processor(f, role == "output", base_dir)
            proc.fit(table.column(f.source))
            processors[f.name] = proc
    return processors


def augmenter(
    cfg: Config, processors: dict[str, Processor]
) -> Callable[[Batch, torch.Generator], Batch] | None:
    """The per-batch augmentation of the inputs that have one (images, word dropout), or None."""
    images = {f.name: f.augment for f in cfg.inputs if f.type == "image" and is_active(f.augment)}
    texts = {
        f.name: (processors[f.name].unk_id, processors[f.name].special_ids, f.token_dropout)
        for f in cfg.inputs
        if f.type == "text" and f.token_dropout > 0 and processors[f.name].unk_id is not None
    }
    if not images and not texts:
        return None

    def transform(inputs: Batch, generator: torch.Generator) -> Batch:
        out = dict(inputs)
        for k, aug in images.items():
            out[k] = augment_images(out[k], aug, generator)
        for k, (unk, special, rate) in texts.items():
            out[k] = drop_tokens(out[k], unk, special, rate, generator)
        return out

    return transform


def class_weights(
    cfg: Config, split: EncodedSplit, processors: dict[str, Processor]
) -> dict[str, torch.Tensor]:
    """Balanced class weights of the outputs that ask for them (inverse class frequency)."""
    weights = {}
    for f in cfg.outputs:
        if f.type == "category" and f.class_weights == "balanced":
            k = processors[f.name].size
            counts = torch.bincount(split.targets[f.name], minlength=k).double().clamp(min=1)
            weights[f.name] = (counts.sum() / (k * counts)).float()
    return weights
