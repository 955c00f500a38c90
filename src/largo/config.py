"""The run configuration: small pydantic models per stage, `load_config()` and readable errors.

A config is data. YAML is just its serialized form; the same dict works from Python. Every field has a
description, unknown keys are errors, and a validation error names the key path, the value given and
what is allowed (`ConfigError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- data


class CleanConfig(StrictModel):
    """Row-level cleaning rules applied before the split; each dropped row is counted in the report."""

    strip_whitespace: bool = Field(True, description="Trim leading/trailing whitespace in string cells.")
    empty_as_missing: bool = Field(True, description="Treat empty strings (after stripping) as missing.")
    drop_missing_target: bool = Field(True, description="Drop rows whose target value is missing.")
    drop_missing_inputs: bool = Field(
        False, description="Drop rows with any missing input instead of filling the value."
    )
    drop_duplicates: bool = Field(False, description="Drop exact duplicate rows (inputs and targets).")


class DataConfig(StrictModel):
    """Where the data comes from and how it is split."""

    train: str = Field(
        ..., description="Path to the training data: csv, tsv, jsonl, parquet or image folder."
    )
    valid: float | str | None = Field(
        0.1, description="A fraction of train held out for validation, or a path to a file, or null."
    )
    test: float | str | None = Field(
        0.1, description="A fraction of train held out for the final test, or a path to a file, or null."
    )
    split_seed: int = Field(42, description="Seed of the train/valid/test split.")
    stratify: bool = Field(True, description="Stratify the split on the first category output.")
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet", "images"] = Field(
        "auto", description="File format; auto picks it from the file suffix."
    )
    encoding: Literal["auto", "utf-8", "utf-8-sig", "gbk", "gb18030"] = Field(
        "auto", description="Text encoding of csv/tsv/jsonl files; auto detects UTF-8 (with BOM) or GBK."
    )
    clean: CleanConfig = Field(default_factory=CleanConfig)

    @field_validator("valid", "test")
    @classmethod
    def _fraction_or_path(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, float) and not 0.0 <= v < 1.0:
            raise ValueError("a split fraction must be in [0, 1)")
        return v


# ----------------------------------------------------------------------------------------- features


class AugmentConfig(StrictModel):
    """Random image augmentation, applied to the train split only."""

    flip: bool = Field(False, description="Random horizontal flip (off for digits and text in images).")
    crop: int = Field(0, ge=0, description="Pad by this many pixels, then crop back at a random offset.")
    rotate: float = Field(0.0, ge=0.0, le=180.0, description="Random rotation within ±degrees.")


class _FeatureBase(StrictModel):
    name: str = Field(..., min_length=1, description="Feature name, also the column name by default.")
    column: str | None = Field(None, description="Column in the data; defaults to the feature name.")

    @property
    def source(self) -> str:
        """The column this feature reads."""
        return self.column or self.name


class NumberFeatureConfig(_FeatureBase):
    """A numeric column: standardized or min-max scaled, missing values filled."""

    type: Literal["number"] = "number"
    normalization: Literal["standard", "minmax", "none"] = Field("standard", description="Scaling.")
    fill: Literal["mean", "median", "zero", "constant"] = Field("mean", description="Missing-value fill.")
    fill_value: float = Field(0.0, description="Value used when fill is 'constant'.")
    loss: Literal["mse", "mae", "huber"] = Field("mse", description="Loss when this is an output.")


class CategoryFeatureConfig(_FeatureBase):
    """A categorical column: a vocabulary fit on train; unseen inputs go to an unknown bucket."""

    type: Literal["category"] = "category"
    min_count: int = Field(1, ge=1, description="Values seen fewer times go to the unknown bucket.")
    max_size: int | None = Field(None, ge=1, description="Keep at most this many most frequent values.")
    embedding_dim: int | None = Field(None, ge=1, description="Embedding width; default grows with size.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Label smoothing when an output.")
    class_weights: Literal["none", "balanced"] = Field("none", description="Loss weights when an output.")


IMAGE_ENCODER_NAMES = ("cnn", "cnn-classic", "mlp")  # the keys of models.zoo.IMAGE_ENCODERS (tested)


class ImageFeatureConfig(_FeatureBase):
    """An image column (paths, or an image folder): decoded, resized, normalized, augmented on train."""

    type: Literal["image"] = "image"
    size: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = Field(
        None, description="[height, width]; default: the first image's."
    )
    channels: Literal[1, 3] | None = Field(None, description="1 (grayscale) or 3 (RGB); default: detected.")
    encoder: str = Field("cnn", description="Image encoder from the model zoo.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, v: str) -> str:
        # names, not the zoo itself: the zoo imports torch, and an ONNX server reads configs without it
        if v not in IMAGE_ENCODER_NAMES:
            raise ValueError(f"unknown image encoder; allowed: {', '.join(IMAGE_ENCODER_NAMES)}")
        return v


class NormalizeConfig(StrictModel):
    """Text normalization, applied the same way at train and predict time (before tokenizing)."""

    nfkc: bool = Field(
        True, description="Unicode NFKC: full-width letters, digits and punctuation → half-width."
    )
    lowercase: bool = Field(True, description="Lowercase the text.")
    collapse_whitespace: bool = Field(True, description="Trim and collapse runs of whitespace to one space.")
    remove_punctuation: bool = Field(False, description="Replace punctuation and symbols with spaces.")
    stopwords: Literal["none", "english", "chinese", "both"] | list[str] = Field(
        "none", description="Remove stop words: a built-in list (english, chinese, both) or your own words."
    )


class TokenizerConfig(StrictModel):
    """How text becomes token ids; fit on the train split only and saved in the bundle."""

    kind: Literal["bpe", "wordpiece", "char", "jieba", "pretrained"] = Field(
        "bpe",
        description="bpe / wordpiece (HF tokenizers), char (good for Chinese), jieba (Chinese words), "
        "pretrained (the tokenizer of a Hugging Face model folder).",
    )
    vocab_size: int = Field(8000, ge=16, description="Largest vocabulary (bpe, wordpiece, char, jieba).")
    min_frequency: int = Field(2, ge=1, description="Tokens seen fewer times in train become <unk>.")
    max_length: int = Field(256, ge=2, description="Longest sequence in tokens; longer texts are truncated.")
    truncation: Literal["right", "left"] = Field("right", description="Which end of a long text is cut.")
    path: str | None = Field(None, description="Model folder for kind 'pretrained' (default: the encoder's).")


class BagEncoderConfig(StrictModel):
    """Embedding + pooling over tokens, fastText-style with optional hashed n-grams: fast on small data."""

    kind: Literal["bag"] = "bag"
    dim: int = Field(128, ge=1, description="Embedding width.")
    pooling: Literal["mean", "max", "mean_max"] = Field("mean", description="Pooling over tokens.")
    ngrams: int = Field(1, ge=1, le=3, description="Also embed hashed n-grams up to this length.")
    ngram_buckets: int = Field(200_000, ge=1, description="Hash buckets for the n-gram embeddings.")
    ngram_min_count: int = Field(
        1,
        ge=1,
        description="Leave out n-grams whose hash bucket occurs fewer times than this in the train split "
        "(TF-IDF's min_df): n-grams seen once only memorize their text. 1 keeps every bucket.",
    )
    ngram_scale: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Multiplier on the n-gram embeddings before pooling. Adam moves a rare n-gram's "
        "vector by many times the learning rate on each of its few appearances, so a full-size table "
        "memorizes the train set; at 0.2 the n-grams learn at a fifth of the rate, as a regularizer.",
    )


class CnnTextEncoderConfig(StrictModel):
    """TextCNN (Kim 2014): convolutions of several widths over embeddings, max over time."""

    kind: Literal["cnn"] = "cnn"
    dim: int = Field(128, ge=1, description="Embedding width.")
    filters: int = Field(128, ge=1, description="Filters per kernel width.")
    kernel_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [2, 3, 4, 5], min_length=1, description="Kernel widths in tokens."
    )


class RnnEncoderConfig(StrictModel):
    """LSTM or GRU over embeddings; variable lengths are packed so padding never enters the state."""

    kind: Literal["rnn"] = "rnn"
    cell: Literal["lstm", "gru"] = Field("lstm", description="Recurrent cell.")
    dim: int = Field(128, ge=1, description="Embedding width.")
    hidden: int = Field(128, ge=1, description="Hidden size per direction.")
    layers: int = Field(1, ge=1, description="Stacked recurrent layers.")
    bidirectional: bool = Field(True, description="Read the text both ways.")
    pooling: Literal["last", "mean", "max"] = Field("max", description="Final states, or pool over time.")


class TransformerEncoderConfig(StrictModel):
    """A pre-norm Transformer encoder (scaled_dot_product_attention, padding mask, learned positions)."""

    kind: Literal["transformer"] = "transformer"
    dim: int = Field(256, ge=8, description="Model width (d_model).")
    layers: int = Field(4, ge=1, description="Encoder blocks.")
    heads: int = Field(4, ge=1, description="Attention heads; dim must be divisible by heads.")
    ff_mult: int = Field(4, ge=1, description="Feed-forward width as a multiple of dim.")
    pooling: Literal["cls", "mean"] = Field(
        "mean", description="A [CLS] token's state or the mean of tokens."
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> TransformerEncoderConfig:
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        return self


class PretrainedEncoderConfig(StrictModel):
    """A local Hugging Face model folder (loaded with transformers, offline), fine-tuned end to end."""

    kind: Literal["pretrained"] = "pretrained"
    path: str = Field(..., min_length=1, description="Folder with config.json, weights and tokenizer files.")
    pooling: Literal["cls", "mean", "last"] = Field(
        "mean",
        description="[CLS] state, the masked mean of tokens, or the last real token's state (for causal "
        "models such as GPT-2, whose first state has seen only the first token).",
    )
    freeze: bool = Field(False, description="Keep the pretrained weights fixed; train only the rest.")
    lr_scale: float = Field(
        0.05,
        gt=0.0,
        le=1.0,
        description="The pretrained weights learn at this fraction of train.optimizer.lr (the layers on "
        "top use the full rate): 0.05 × 1e-3 = 5e-5, the usual fine-tuning rate.",
    )


class LmEncoderConfig(StrictModel):
    """A largo language-model bundle (`largo pretrain`) as the text encoder: its GPT body, pooled.

    Written `encoder: {from: runs/lm/v1}` (kind lm is implied by `from`); the text is tokenized with the
    bundle's own tokenizer, and the classifier's bundle keeps the GPT's sizes, so it loads without the
    LM folder.
    """

    kind: Literal["lm"] = "lm"
    path: str = Field(
        ...,
        min_length=1,
        validation_alias=AliasChoices("from", "path"),
        description="The LM bundle folder (runs/<name>/<version>); written `from` in a config.",
    )
    pooling: Literal["mean", "last"] = Field(
        "mean",
        description="The mean of the hidden states over real tokens, or the last real token's state "
        "(the only one that has read the whole text: the model is causal).",
    )
    freeze: bool = Field(False, description="Keep the LM's weights fixed; train only the layers on top.")
    lr_scale: float = Field(
        0.1,
        gt=0.0,
        le=1.0,
        description="The LM's weights learn at this fraction of train.optimizer.lr (the layers on top use "
        "the full rate), so a few labelled examples adjust the body without erasing what it learned.",
    )


TextEncoderConfig = Annotated[
    BagEncoderConfig
    | CnnTextEncoderConfig
    | RnnEncoderConfig
    | TransformerEncoderConfig
    | PretrainedEncoderConfig
    | LmEncoderConfig,
    Field(discriminator="kind"),
]


class TextFeatureConfig(_FeatureBase):
    """A free-text column (Chinese or English): normalized, tokenized, encoded by a sequence model."""

    type: Literal["text"] = "text"
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    encoder: TextEncoderConfig = Field(
        default_factory=CnnTextEncoderConfig,
        description="bag, cnn, rnn, transformer, pretrained (a Hugging Face folder) or lm (a largo LM "
        "bundle: {from: runs/lm/v1}); a name alone takes that encoder's defaults.",
    )
    pretrained: str | None = Field(
        None, description="Shorthand for encoder {kind: pretrained, path: …} with that folder's tokenizer."
    )
    token_dropout: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="In training, replace this share of tokens with [UNK] (word dropout): regularizes and "
        "teaches the model what an unseen word is.",
    )

    @field_validator("encoder", mode="before")
    @classmethod
    def _encoder_by_name(cls, v: Any) -> Any:
        if isinstance(v, dict) and "from" in v and "kind" not in v:
            return {**v, "kind": "lm"}  # {from: runs/lm/v1}: a largo language model
        return {"kind": v} if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _pretrained_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("pretrained"):
            data = dict(data)
            encoder = data.get("encoder")
            encoder = {"kind": encoder} if isinstance(encoder, str) else dict(encoder or {})
            if encoder.get("kind", "pretrained") != "pretrained":
                raise ValueError("pretrained: PATH needs encoder kind 'pretrained' (or no encoder key)")
            data["encoder"] = {**encoder, "kind": "pretrained", "path": data["pretrained"]}
        return data

    @model_validator(mode="after")
    def _pretrained_tokenizer(self) -> TextFeatureConfig:
        tok = self.tokenizer
        if isinstance(self.encoder, PretrainedEncoderConfig | LmEncoderConfig):
            # a pretrained model reads its own tokens: the tokenizer.json of its folder or LM bundle
            if tok.kind != "pretrained":
                object.__setattr__(tok, "kind", "pretrained")
            if tok.path is None:
                object.__setattr__(tok, "path", self.encoder.path)
        if tok.kind == "pretrained" and tok.path is None:
            raise ValueError("tokenizer.path: required for tokenizer kind 'pretrained'")
        return self


InputFeature = Annotated[
    NumberFeatureConfig | CategoryFeatureConfig | ImageFeatureConfig | TextFeatureConfig,
    Field(discriminator="type"),
]
OutputFeature = Annotated[NumberFeatureConfig | CategoryFeatureConfig, Field(discriminator="type")]


# -------------------------------------------------------------------------------------------- model


class ModelConfig(StrictModel):
    """The combiner MLP on top of the input encoders, and weight init."""

    hidden: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [128], description="Hidden layer widths of the combiner MLP."
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout in the combiner and encoders.")
    activation: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="Hidden activation.")
    norm: Literal["none", "batch", "layer"] = Field("none", description="Normalization in the combiner.")
    init: Literal["default", "normal", "xavier", "he"] = Field("default", description="Weight init.")
    init_std: float = Field(0.02, gt=0.0, description="Standard deviation for init 'normal'.")


# -------------------------------------------------------------------------------------------- train


class OptimizerConfig(StrictModel):
    """Optimizer and its hyper-parameters."""

    name: Literal["sgd", "adam", "adamw"] = Field("adamw", description="Optimizer.")
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled (adamw) or coupled weight decay.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    nesterov: bool = Field(False, description="SGD Nesterov momentum.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    eps: float = Field(1e-8, gt=0.0, description="Adam epsilon.")


class ScheduleConfig(StrictModel):
    """Learning-rate schedule, stepped every optimizer step, with optional linear warmup."""

    name: Literal["constant", "step", "exponential", "cosine"] = Field("constant", description="Shape.")
    warmup: float = Field(
        0.0, ge=0.0, description="Linear warmup: a fraction of all steps if < 1, else a number of steps."
    )
    step_epochs: float = Field(10.0, gt=0.0, description="'step': multiply by gamma every this many epochs.")
    gamma: float = Field(
        0.1, gt=0.0, le=1.0, description="'step': factor per decay; 'exponential': per epoch."
    )
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="'cosine': final lr as a fraction of lr.")


def check_head_size(dim: int, heads: int) -> None:
    """A RoPE Transformer's width must split into `heads` whole, even-sized heads (ValueError)."""
    if dim % heads or (dim // heads) % 2:
        raise ValueError(f"dim ({dim}) / heads ({heads}) must be a whole, even head size")


def swiglu_width(dim: int, ff_dim: int | None) -> int:
    """The SwiGLU hidden width: `ff_dim`, else ~8/3·dim rounded up to a multiple of 64 (LLaMA's rule)."""
    return ff_dim or 64 * ((8 * dim // 3 + 63) // 64)


LOWER_IS_BETTER = frozenset({"loss", "mse", "rmse", "mae", "log_loss", "perplexity", "bpc"})


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value is better for a metric (`valid.rmse`, `label.mae`, `loss` …): losses,
    errors, perplexity and bits per character."""
    return metric.rsplit(".", 1)[-1] in LOWER_IS_BETTER


class EarlyStoppingConfig(StrictModel):
    """Stop when a logged metric stops improving; the best weights are restored."""

    metric: str = Field("valid.loss", description="Any logged metric, e.g. valid.loss or valid.f1_macro.")
    mode: Literal["auto", "min", "max"] = Field("auto", description="auto: min for losses/errors.")
    patience: int = Field(5, ge=1, description="Epochs without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest change that counts as an improvement.")

    @property
    def minimize(self) -> bool:
        """Whether a smaller value of the metric is better."""
        if self.mode != "auto":
            return self.mode == "min"
        return lower_is_better(self.metric)


class CheckpointConfig(StrictModel):
    """Checkpoints for resume: every epoch, and every N steps when set."""

    every_steps: int | None = Field(None, ge=1, description="Also checkpoint every this many steps.")
    keep: bool = Field(False, description="Keep checkpoints/ in the bundle after a finished run.")


class LoraConfig(StrictModel):
    """LoRA: train low-rank adapters beside frozen Linear weights (peft), instead of the weights."""

    rank: int = Field(8, ge=1, description="Rank of the adapter matrices.")
    alpha: float = Field(16.0, gt=0.0, description="Scale: the update is alpha / rank · B·A.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    targets: list[str] = Field(
        default_factory=lambda: ["qkv", "proj"],
        min_length=1,
        description="Names (last part) of the Linear modules that get adapters, e.g. qkv, proj, w1, w2, w3 "
        "in a largo GPT; query, key, value in a BERT-like Hugging Face encoder.",
    )
    save: Literal["merged", "adapter"] = Field(
        "merged",
        description="merged: the bundle holds full weights with the adapters folded in; adapter: only the "
        "adapter weights, with the base bundle named (and hash-checked) in the bundle.",
    )


class TrainConfig(StrictModel):
    """The training loop."""

    epochs: int = Field(10, ge=1, description="Number of passes over the train split.")
    batch_size: int = Field(64, ge=1, description="Examples per optimizer micro-batch.")
    accumulate: int = Field(1, ge=1, description="Micro-batches per optimizer step (gradient accumulation).")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    clip_grad_norm: float | None = Field(None, gt=0.0, description="Clip the global gradient norm.")
    l1: float = Field(0.0, ge=0.0, description="L1 penalty on weights (not biases or norms).")
    l2: float = Field(0.0, ge=0.0, description="L2 penalty on weights, added to the loss.")
    ema: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="Keep an exponential moving average of the weights with this decay per optimizer "
        "step (e.g. 0.99 for short runs, 0.999 for long ones); validation, early stopping and the bundle "
        "use the averaged weights. null: off.",
    )
    early_stopping: EarlyStoppingConfig | None = Field(None, description="Early stopping, or null.")
    lora: LoraConfig | None = Field(
        None, description="Fine-tune pretrained text encoders through LoRA adapters only, or null."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Autocast precision.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Where to train.")
    seed: int = Field(42, description="Seeds Python, NumPy and torch.")
    deterministic: bool = Field(
        False,
        description="Deterministic kernels on GPUs, so reruns and resumes are bitwise equal (slower). "
        "CPU training is deterministic without it.",
    )
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval_batch_size: int = Field(512, ge=1, description="Batch size for evaluation and prediction.")
    length_buckets: bool = Field(
        True, description="Batch texts of similar length together (less padding); no effect without text."
    )
    progress: bool = Field(True, description="Show a progress bar.")


# --------------------------------------------------------------------------------------------- root


class SearchDimension(StrictModel):
    """One tuned config key: a float or int range (log scale optional), or a list of choices."""

    type: Literal["float", "int", "choice"] = Field(..., description="float / int: a range; choice: a list.")
    low: float | None = Field(None, description="Smallest value of a float / int range.")
    high: float | None = Field(None, description="Largest value of a float / int range (included).")
    log: bool = Field(False, description="Sample a range on a log scale (e.g. learning rates).")
    step: float | None = Field(None, gt=0.0, description="Grid step of a range (not with log).")
    choices: list[Any] | None = Field(None, min_length=1, description="The values a choice takes (any YAML).")

    @model_validator(mode="after")
    def _check(self) -> SearchDimension:
        if self.type == "choice":
            if self.choices is None or self.low is not None or self.high is not None:
                raise ValueError("a choice takes `choices: [...]` and no low/high")
            return self
        if self.choices is not None or self.low is None or self.high is None:
            raise ValueError(f"a {self.type} range takes `low` and `high` and no choices")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log: true needs low > 0 and no step")
        whole = [v for v in (self.low, self.high, self.step) if v is not None]
        if self.type == "int" and not all(float(v).is_integer() for v in whole):
            raise ValueError("an int range needs whole low, high and step")
        return self


class TuneConfig(StrictModel):
    """`largo tune`: a hyperparameter search over config keys (optuna), pruned on the validation curve."""

    space: dict[str, SearchDimension] = Field(
        ...,
        min_length=1,
        description="Config key paths as --set writes them (train.optimizer.lr, inputs.0.encoder.layers) "
        "→ their range or choices.",
    )
    metric: str = Field(
        "auto", description="The logged metric to optimize; auto: train.early_stopping's, else valid.loss."
    )
    direction: Literal["auto", "maximize", "minimize"] = Field(
        "auto", description="auto: minimize losses and errors, maximize the rest."
    )
    trials: int = Field(
        20, ge=1, description="Trials in the study, in total (a resumed study counts its own)."
    )
    timeout_s: float | None = Field(None, gt=0.0, description="Stop starting trials after this many seconds.")
    sampler: Literal["tpe", "random"] = Field("tpe", description="How values are proposed.")
    pruner: Literal["median", "none"] = Field(
        "median", description="median: stop a trial whose curve is below the median of earlier ones."
    )
    startup_trials: int = Field(
        5,
        ge=0,
        description="Trials sampled at random, and never pruned against, before TPE and pruning start.",
    )
    warmup_epochs: int = Field(
        2,
        ge=0,
        description="Epochs (a language model: evaluations) every trial runs before it can be pruned.",
    )
    seed: int = Field(0, description="Seeds the sampler (trials train with train.seed).")


class Config(StrictModel):
    """A whole run: data, features, model and training."""

    name: str = Field("run", min_length=1, description="Run name; the bundle goes to runs/<name>/<version>.")
    runs_dir: str = Field("runs", description="Folder that holds all runs.")
    data: DataConfig
    inputs: list[InputFeature] = Field(..., min_length=1, description="Input features.")
    outputs: list[OutputFeature] = Field(..., min_length=1, description="Output features (targets).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig | None = Field(
        None, description="The search `largo tune` runs (`largo train` ignores it)."
    )

    @model_validator(mode="after")
    def _check_features(self) -> Config:
        names = [f.name for f in self.inputs] + [f.name for f in self.outputs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"feature names must be unique; repeated: {', '.join(dup)}")
        es = self.train.early_stopping
        if es is not None:
            allowed = self.metric_names()
            if es.metric not in allowed:
                raise ValueError(
                    f"train.early_stopping.metric: {es.metric!r} is not logged; allowed: {', '.join(allowed)}"
                )
        if self.tune is not None and self.tune.metric != "auto":
            allowed = [m for m in self.metric_names() if m.startswith("valid.")]
            if self.tune.metric not in allowed:
                raise ValueError(
                    f"tune.metric: {self.tune.metric!r} is not logged; allowed: {', '.join(allowed)}"
                )
        return self

    def metric_names(self) -> list[str]:
        """Every metric name the training loop logs for this config (usable for early stopping)."""
        names = ["train.loss", "valid.loss"]
        single = len(self.outputs) == 1
        for out in self.outputs:
            prefix = "valid." if single else f"valid.{out.name}."
            if out.type == "category":
                keys = ["accuracy", "f1_macro", "f1_micro", "precision_macro", "recall_macro"]
            else:
                keys = ["mse", "rmse", "mae", "r2"]
            names += [prefix + k for k in keys]
        return names


# ------------------------------------------------------------------------------------------- errors


class ConfigError(ValueError):
    """A config that does not validate; the message lists every problem with its key path."""


def _allowed(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        return f"; allowed: {ctx['expected']}"
    if "expected_tags" in ctx:
        return f"; allowed: {ctx['expected_tags']}"
    return ""


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    """Turn a pydantic error into lines of `key.path: message (got value); allowed: ...`."""
    lines = [f"invalid {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for i, p in enumerate(err["loc"]) if not _is_union_tag(err["loc"], i))
        got = err.get("input")
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown key"
        elif kind == "missing":
            msg = "required key is missing"
        elif kind == "union_tag_invalid":
            ctx = err.get("ctx") or {}
            err = {**err, "ctx": {"expected": ctx.get("expected_tags")}}
            msg, got = f"unknown {ctx.get('discriminator', 'kind').strip(chr(39))}", ctx.get("tag")
        else:
            msg = err["msg"].removeprefix("Value error, ")
        got_s = "" if kind == "missing" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {loc or '<root>'}: {msg}{got_s}{_allowed(err)}")
    return "\n".join(lines)


_FEATURE_TAGS = {"number", "category", "image", "text"}
_ENCODER_TAGS = {"bag", "cnn", "rnn", "transformer", "pretrained", "lm"}


def _is_union_tag(loc: tuple, i: int) -> bool:
    """pydantic puts the chosen member of a tagged union into the path (inputs.0.text.encoder.cnn…)."""
    if i == 0 or not isinstance(loc[i], str):
        return False
    before = loc[i - 1]
    return (isinstance(before, int) and loc[i] in _FEATURE_TAGS) or (
        before == "encoder" and loc[i] in _ENCODER_TAGS
    )


def validate_model(model: type[StrictModel], data: Any, source: str = "config") -> Any:
    """Validate a dict into a root config model, raising `ConfigError` with readable messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid {source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def validate_config(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a dict into a `Config`, raising `ConfigError` with readable messages."""
    return validate_model(Config, data, source)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a dict (any task), raising `ConfigError` for bad YAML or a non-mapping."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"invalid {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def resolve_data_paths(data: dict[str, Any], folder: Path) -> None:
    """Relative `data.train` / `valid` / `test` paths of a YAML file are relative to its folder (unless
    only the path as written exists), in place."""
    section = data.get("data")
    if not isinstance(section, dict):
        return
    for key in ("train", "valid", "test"):
        value = section.get(key)
        if isinstance(value, str) and not Path(value).is_absolute():
            candidate = folder / value
            if candidate.exists() or not Path(value).exists():
                section[key] = str(candidate)


def load_config(path: str | Path) -> Config:
    """Read a YAML config file; relative data paths are resolved against the file's folder."""
    path = Path(path)
    data = read_yaml_mapping(path)
    resolve_data_paths(data, path.parent)
    for feature in data.get("inputs") or []:
        _resolve_model_paths(feature, path.parent)
    return validate_config(data, source=str(path))


def _resolve_model_paths(feature: Any, folder: Path) -> None:
    """Relative pretrained-model and LM-bundle folders in a YAML file are relative to the file, like data
    paths."""
    if not isinstance(feature, dict):
        return
    holders = [(feature, "pretrained")]
    holders += [(feature[k], "path") for k in ("encoder", "tokenizer") if isinstance(feature.get(k), dict)]
    if isinstance(feature.get("encoder"), dict):
        holders.append((feature["encoder"], "from"))
    for holder, key in holders:
        value = holder.get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and (folder / value).exists():
            holder[key] = str(folder / value)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.path=value` overrides (value parsed as YAML); list items by index: inputs.0.size=[28,28]."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {part!r} is not an index of a list of {len(node)}")
                index: int | str = int(part)
            elif isinstance(node, dict):
                index = part
                if not last:
                    node.setdefault(part, {})
            else:
                raise ConfigError(f"--set {key}: {'.'.join(parts[:depth])!r} is not a section")
            if last:
                node[index] = yaml.safe_load(raw)
            else:
                node = node[index]
    return data


def dump_config(config: Config) -> str:
    """The resolved config as YAML, every default written out."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
