"""The sequence-to-sequence config (`largo train` on `task: seq2seq`): text pairs → encoder-decoder.

Translation, summarization, question → SQL, normalization of messy text: a table of (source, target)
pairs trains a Transformer encoder-decoder that writes the target. A sibling of `config.py`'s run config
with the same rules (unknown keys are errors, a bad value names its key path and what is allowed); the
training loop is the classifier's, so `train:` takes the same keys plus the two a text output needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from largo.config import (
    CleanConfig,
    DataConfig,
    OptimizerConfig,
    ScheduleConfig,
    StrictModel,
    TrainConfig,
    TuneConfig,
    check_head_size,
    read_yaml_mapping,
    resolve_data_paths,
    swiglu_width,
    validate_model,
)

# what a seq2seq epoch logs; the generated-text scores only with train.eval_generate > 0
SEQ2SEQ_METRICS = ("train.loss", "valid.loss", "valid.perplexity", "valid.token_accuracy")
GENERATED_METRICS = ("valid.bleu", "valid.chrf", "valid.exact_match")


class PairDataConfig(DataConfig):
    """A table of text pairs (csv, tsv, jsonl, parquet) and how it is split; no stratification."""

    source: str = Field("source", min_length=1, description="The column of the text to read.")
    target: str = Field("target", min_length=1, description="The column of the text to write.")
    valid: float | str | None = Field(
        0.05, description="A fraction of train held out for validation, or a path to a file, or null."
    )
    test: float | str | None = Field(
        0.05, description="A fraction of train held out for the final test, or a path to a file, or null."
    )
    stratify: bool = Field(False, description="Not used: text targets have no classes to stratify on.")
    clean: CleanConfig = Field(
        default_factory=lambda: CleanConfig(drop_missing_inputs=True),
        description="Rows missing either text are dropped.",
    )

    @field_validator("stratify")
    @classmethod
    def _no_stratify(cls, v: bool) -> bool:
        if v:
            raise ValueError("text pairs have no classes to stratify on; leave stratify false")
        return v

    @field_validator("format")
    @classmethod
    def _tables_only(cls, v: str) -> str:
        if v == "images":
            raise ValueError("a seq2seq task reads text pairs; allowed: auto, csv, tsv, jsonl, parquet")
        return v


class Seq2SeqTokenizerConfig(StrictModel):
    """One byte-level BPE shared by both sides (any text round-trips), trained on the train split."""

    vocab_size: int = Field(8000, ge=260, le=1 << 20, description="Vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="Merges seen fewer times are not learned.")
    nfkc: bool = Field(
        True,
        description="Unicode NFKC on the sources (full-width letters, digits and punctuation → half-width); "
        "targets are learned as written.",
    )
    max_source_length: int = Field(
        128, ge=2, description="Longest source in tokens; longer ones keep their start."
    )
    max_target_length: int = Field(
        128, ge=2, description="Longest target in tokens (training) and the default generation length."
    )
    path: str | None = Field(None, description="Use this tokenizer.json (e.g. an earlier run's) instead.")


class Seq2SeqModelConfig(StrictModel):
    """Sizes of the encoder-decoder Transformer (pre-norm, RoPE, SwiGLU, tied embeddings)."""

    dim: int = Field(256, ge=8, description="Model width (d_model).")
    encoder_layers: int = Field(3, ge=1, description="Encoder blocks.")
    decoder_layers: int = Field(3, ge=1, description="Decoder blocks.")
    heads: int = Field(4, ge=1, description="Attention heads; dim / heads must be even (RoPE).")
    ff_dim: int | None = Field(
        None, ge=1, description="SwiGLU hidden width; default ~8/3·dim, rounded to 64."
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on embeddings, attention and MLP.")
    rope_theta: float = Field(10_000.0, gt=0.0, description="RoPE base frequency.")
    vocab_size: int | None = Field(None, description="Filled in from the tokenizer; leave unset.")
    context: int | None = Field(None, description="Filled in from the tokenizer's lengths; leave unset.")

    @model_validator(mode="after")
    def _heads_divide(self) -> Seq2SeqModelConfig:
        check_head_size(self.dim, self.heads)
        return self

    @property
    def hidden(self) -> int:
        """The SwiGLU hidden width."""
        return swiglu_width(self.dim, self.ff_dim)


class Seq2SeqTrainConfig(TrainConfig):
    """The classifier's training loop (epochs, batches, schedules, early stopping, resume) with defaults
    for Transformers (AdamW with decay, cosine with warmup, clipping), and the two keys a text output
    adds."""

    epochs: int = Field(20, ge=1, description="Number of passes over the train split.")
    batch_size: int = Field(32, ge=1, description="Pairs per optimizer micro-batch.")
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(name="adamw", lr=5e-4, weight_decay=0.01)
    )
    schedule: ScheduleConfig = Field(default_factory=lambda: ScheduleConfig(name="cosine", warmup=0.05))
    clip_grad_norm: float | None = Field(1.0, gt=0.0, description="Clip the global gradient norm.")

    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0, description="Label smoothing of the token loss.")
    eval_generate: int = Field(
        200,
        ge=0,
        description="After every epoch, decode this many validation sources (greedy) and log valid.bleu, "
        "valid.chrf and valid.exact_match (0: only the token loss, faster).",
    )


class DecodeConfig(StrictModel):
    """How the bundle writes a target: beam search, used for the test scores and as `predict` defaults."""

    beams: int = Field(4, ge=1, le=64, description="Beam width; 1 is greedy decoding.")
    length_penalty: float = Field(
        1.0,
        ge=0.0,
        description="Beams are ranked by log-probability / length^penalty: 0 favours short outputs, "
        "1 ranks by the mean per token.",
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="Longest output in tokens (default: tokenizer.max_target_length)."
    )


class Seq2SeqConfig(StrictModel):
    """A whole sequence-to-sequence run: pairs → tokenizer → encoder-decoder → bundle."""

    task: Literal["seq2seq"] = Field("seq2seq", description="Marks a sequence-to-sequence config and bundle.")
    name: str = Field(
        "seq2seq", min_length=1, description="Run name; the bundle goes to runs/<name>/<version>."
    )
    runs_dir: str = Field("runs", description="Folder that holds all runs.")
    data: PairDataConfig
    tokenizer: Seq2SeqTokenizerConfig = Field(default_factory=Seq2SeqTokenizerConfig)
    model: Seq2SeqModelConfig = Field(default_factory=Seq2SeqModelConfig)
    train: Seq2SeqTrainConfig = Field(default_factory=Seq2SeqTrainConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    tune: TuneConfig | None = Field(
        None, description="The search `largo tune` runs (`largo train` ignores it)."
    )

    @model_validator(mode="after")
    def _check(self) -> Seq2SeqConfig:
        if self.data.source == self.data.target:
            raise ValueError(f"data.source and data.target name the same column ({self.data.source!r})")
        es = self.train.early_stopping
        allowed = self.metric_names()
        if es is not None and es.metric not in allowed:
            raise ValueError(
                f"train.early_stopping.metric: {es.metric!r} is not logged; allowed: {', '.join(allowed)}"
            )
        if self.train.lora is not None:
            raise ValueError("train.lora: a seq2seq model is trained whole (LoRA adapts pretrained encoders)")
        judged = [m for m in allowed if m.startswith("valid.")]
        if self.tune is not None and self.tune.metric not in ("auto", *judged):
            raise ValueError(f"tune.metric: {self.tune.metric!r} is not logged; allowed: {', '.join(judged)}")
        return self

    def metric_names(self) -> list[str]:
        """Every metric an epoch logs for this config (usable for early stopping)."""
        return [*SEQ2SEQ_METRICS, *(GENERATED_METRICS if self.train.eval_generate else ())]

    @property
    def max_new_tokens(self) -> int:
        """The default longest output."""
        return self.decode.max_new_tokens or self.tokenizer.max_target_length


def validate_seq2seq_config(data: dict[str, Any], source: str = "config") -> Seq2SeqConfig:
    """Validate a dict into a `Seq2SeqConfig`, raising `ConfigError` with readable messages."""
    return validate_model(Seq2SeqConfig, data, source)


def load_seq2seq_config(path: str | Path) -> Seq2SeqConfig:
    """Read a seq2seq YAML file; relative data and tokenizer paths are resolved against its folder."""
    path = Path(path)
    data = read_yaml_mapping(path)
    resolve_data_paths(data, path.parent)
    tokenizer = data.get("tokenizer")
    given = tokenizer.get("path") if isinstance(tokenizer, dict) else None
    if isinstance(given, str) and not Path(given).is_absolute() and (path.parent / given).exists():
        tokenizer["path"] = str(path.parent / given)
    return validate_seq2seq_config(data, str(path))


def dump_seq2seq_config(config: Seq2SeqConfig) -> str:
    """The resolved config as YAML, every default written out."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
