"""Training an encoder-decoder on text pairs through the loop every model uses (`loop.fit`).

`fit_pairs` encodes the splits, builds the objective and the per-epoch scores, and calls `fit()`, so a
seq2seq run gets the same epochs, schedules, accumulation, early stopping, EMA, checkpoints, exact
resume and DDP as a classifier. Shared by `largo train` (api_seq2seq.py) and `largo update`
(lifecycle/update_seq2seq.py).

The objective: the model returns each example's summed token loss; `loss_fn` divides by the train
split's mean target length (a constant), and fit() divides by the examples of a whole optimizer step.
Accumulated micro-batches of any lengths so reproduce one big batch exactly, and the loss is a per-token
mean on average: every token weighs the same in every step, so a step of long targets moves the weights
more than one of short targets.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from tokenizers import Tokenizer

from largo.config_seq2seq import Seq2SeqConfig
from largo.data.loader import EncodedSplit
from largo.data.pairs import encode_pairs, texts
from largo.evaluate.metrics import generation_metrics, perplexity
from largo.models.seq2seq import Seq2SeqTransformer, greedy
from largo.train.distributed import log
from largo.train.loop import FitResult, fit


def token_scores(outputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-token loss (nats), perplexity and next-token accuracy from the model's per-example sums."""
    tokens = max(1, int(outputs["tokens"].sum()))
    loss = float(outputs["nll"].double().sum()) / tokens
    accuracy = float(outputs["correct"].sum()) / tokens
    return {"loss": loss, "perplexity": perplexity(loss), "token_accuracy": accuracy}


def _probe(valid: EncodedSplit, references: list[str], count: int) -> tuple[torch.Tensor, list[str]]:
    """The first `count` validation sources (ids, trimmed to their longest) and their references."""
    sources = valid.inputs["source"][:count]
    longest = int(valid.lengths["source"][:count].max()) if len(sources) else 1
    return sources[:, :longest], references[:count]


def fit_pairs(
    model: Seq2SeqTransformer,
    tokenizer: Tokenizer,
    cfg: Seq2SeqConfig,
    tables: dict[str, pa.Table],
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
) -> FitResult:
    """Train `model` in place on tables["train"], validating on tables["valid"] (may be empty) after
    every epoch: token loss, perplexity and accuracy, and with `train.eval_generate` the BLEU, chrF and
    exact match of greedy outputs for the first validation sources."""
    train = encode_pairs(tables["train"], cfg, tokenizer, "train", log)
    valid = encode_pairs(tables["valid"], cfg, tokenizer, "valid", log) if tables["valid"].num_rows else None
    mean_tokens = max(1.0, float(train.targets["tokens"].double().mean()))

    def loss_fn(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs["nll"].sum() / mean_tokens

    def score_fn(outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        return token_scores(outputs)  # its "loss" replaces fit's per-example valid.loss

    probe = None
    if valid is not None and cfg.train.eval_generate:
        probe = _probe(valid, texts(tables["valid"], cfg.data.target), cfg.train.eval_generate)

    def model_score_fn(judged: torch.nn.Module) -> dict[str, float]:
        sources, references = probe
        device = next(judged.parameters()).device
        hyps = [tokenizer.decode(r) for r in greedy(judged, sources.to(device), cfg.max_new_tokens)]
        scores = generation_metrics(hyps, references)
        return {k: scores[k] for k in ("bleu", "chrf", "exact_match")}

    return fit(
        model,
        train,
        valid,
        cfg.train,
        loss_fn,
        score_fn=score_fn,
        model_score_fn=model_score_fn if probe is not None else None,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        on_epoch_end=on_epoch_end,
    )


def new_model(cfg: Seq2SeqConfig, weights: dict[str, Any] | None = None) -> Seq2SeqTransformer:
    """The config's encoder-decoder, seeded with train.seed, or holding `weights` (a state dict)."""
    from largo.train.checkpoint import seed_everything

    seed_everything(cfg.train.seed)
    model = Seq2SeqTransformer(cfg.model, cfg.train.label_smoothing)
    if weights is not None:
        model.load_state_dict(weights)
    return model
