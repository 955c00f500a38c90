"""The language-model config (`largo pretrain`): corpus, byte-level BPE tokenizer, GPT sizes, training.

A sibling of `config.py`'s run config, with the same rules: small pydantic models, unknown keys are
errors, and a bad value names its key path and what is allowed (`ConfigError`). The sizes of the GPT
presets are data here, so a config validates without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from largo.config import (
    LoraConfig,
    OptimizerConfig,
    ScheduleConfig,
    StrictModel,
    TuneConfig,
    check_head_size,
    read_yaml_mapping,
    swiglu_width,
    validate_model,
)

LM_TUNE_METRICS = ("valid.loss", "valid.perplexity", "valid.bpc")  # what a pretraining evaluation logs

# name → sizes of a decoder-only Transformer (litgpt's name_to_config). Parameter counts are for a
# vocabulary of 8,192 (gpt2-124m: GPT-2's 50,304, counted as GPT-2 counts them, tied embedding once)
GPT_PRESETS: dict[str, dict[str, int]] = {
    "gpt-1m": {"dim": 128, "layers": 4, "heads": 4, "context": 256},  # ~1.8M
    "gpt-5m": {"dim": 256, "layers": 4, "heads": 4, "context": 256},  # ~5.3M
    "gpt-14m": {"dim": 384, "layers": 6, "heads": 6, "context": 256},  # ~13.8M
    "gpt-30m": {"dim": 512, "layers": 8, "heads": 8, "context": 512},  # ~29M
    "gpt2-124m": {"dim": 768, "layers": 12, "heads": 12, "context": 1024},  # ~124M
    "gpt-350m": {"dim": 1024, "layers": 24, "heads": 16, "context": 1024},  # ~350M
}


class CorpusConfig(StrictModel):
    """Where the raw text comes from and how much of it is held out."""

    paths: list[str] = Field(
        ...,
        description="Files (.txt, .jsonl, .parquet) or folders of them, read in order (an imported "
        "model's bundle names none).",
    )
    text_field: str = Field("text", description="The text field of .jsonl records / .parquet columns.")
    prompt_field: str | None = Field(
        None,
        min_length=1,
        description="Fine-tuning pairs: the prompt field of .jsonl records / .parquet columns; its tokens "
        "are context, and only the completions (text_field) are trained on and scored.",
    )
    messages_field: str | None = Field(
        None,
        min_length=1,
        description="Chat fine-tuning: the field of .jsonl records holding a conversation ([{role, "
        "content}, …] ending with the assistant's turn), laid out by the base model's chat template; "
        "only the last assistant turn is trained on and scored.",
    )
    encoding: Literal["auto", "utf-8", "utf-8-sig", "gbk", "gb18030"] = Field(
        "auto", description="Encoding of .txt/.jsonl files; auto detects UTF-8 (with BOM) or GBK."
    )
    valid: float = Field(
        0.02,
        ge=0.0,
        lt=0.5,
        description="Share of the corpus (every 1/valid-th ~4k-character piece) held out for perplexity.",
    )
    cache_dir: str | None = Field(
        None,
        description="Where tokenizers and token files are cached for reuse by later runs "
        "(default: <runs_dir>/.cache).",
    )

    @model_validator(mode="after")
    def _one_kind_of_pairs(self) -> CorpusConfig:
        if self.prompt_field is not None and self.messages_field is not None:
            raise ValueError(
                "data.messages_field: a corpus of conversations has no prompt_field; give one of them"
            )
        return self


class LMTokenizerConfig(StrictModel):
    """A byte-level BPE trained on a sample of the corpus (or an existing tokenizer.json)."""

    eot: str = Field(
        "<|endoftext|>",
        min_length=1,
        description="The token that ends every document and stops generation (an imported model's own).",
    )
    bos: str | None = Field(
        None,
        min_length=1,
        description="A token put before every document and prompt (an imported model's, when its "
        "tokenizer adds one), or null.",
    )
    pad: str = Field(
        "<pad>",
        min_length=1,
        description="The padding token (a classifier reading the LM pads with it; an imported model's "
        "own pad, else its end-of-text token).",
    )
    stop: list[str] = Field(
        default_factory=list,
        description="More tokens that end a generation besides eot (an imported chat model's end of turn).",
    )

    def special_tokens(self) -> tuple[str, ...]:
        """The tokens the tokenizer must have: eot, pad, then bos and the stops when named."""
        return (self.eot, self.pad, *([self.bos] if self.bos else []), *self.stop)

    def named(self) -> tuple[str, ...]:
        """Cache-key parts for the special tokens that differ from a trained tokenizer's defaults (the
        defaults add none, so caches written before these settings existed stay valid)."""
        default = LMTokenizerConfig()
        return tuple(
            f"{key}={getattr(self, key)}"
            for key in ("eot", "bos", "pad", "stop")
            if getattr(self, key) != getattr(default, key)
        )

    vocab_size: int = Field(8192, ge=260, le=1 << 20, description="Vocabulary size, special tokens included.")
    sample_mb: float = Field(
        64.0,
        gt=0.0,
        description="Train the tokenizer on at most this many MB of text, spread over the files.",
    )
    min_frequency: int = Field(2, ge=1, description="Merges seen fewer times are not learned.")
    path: str | None = Field(
        None, description="Use this tokenizer.json (e.g. an earlier run's) instead of training one."
    )


class RopeScalingConfig(StrictModel):
    """How RoPE's frequencies are stretched for a context longer than the one trained on: `linear`
    divides every position by `factor`; `llama3` (Llama 3.1+) divides the low frequencies by `factor`,
    keeps the high ones, and blends those between (wavelengths between original_context/low_freq_factor
    and original_context/high_freq_factor)."""

    kind: Literal["linear", "llama3"] = Field(..., description="linear or llama3.")
    factor: float = Field(..., gt=0.0, description="How much longer the context is stretched.")
    low_freq_factor: float = Field(1.0, gt=0.0, description="llama3: wavelengths beyond context/this scale.")
    high_freq_factor: float = Field(4.0, gt=0.0, description="llama3: wavelengths below context/this stay.")
    original_context: int = Field(8192, ge=1, description="llama3: the context the model was trained on.")


class GPTConfig(StrictModel):
    """Sizes of the decoder-only Transformer; a preset fills the sizes not given."""

    preset: str | None = Field(None, description=f"One of: {', '.join(GPT_PRESETS)}.")
    dim: int = Field(256, ge=8, description="Model width (d_model).")
    layers: int = Field(4, ge=1, description="Transformer blocks.")
    heads: int = Field(4, ge=1, description="Attention heads; dim / heads must be even (RoPE).")
    ff_dim: int | None = Field(
        None, ge=1, description="SwiGLU hidden width; default ~8/3·dim, rounded to 64."
    )
    context: int = Field(256, ge=8, description="Longest sequence the model attends over, in tokens.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on attention output and MLP.")
    rope_theta: float = Field(10_000.0, gt=0.0, description="RoPE base frequency.")
    rope_scaling: RopeScalingConfig | None = Field(
        None, description="Stretch RoPE's frequencies (an imported Llama 3's llama3 rule), or null."
    )
    kv_heads: int | None = Field(
        None, ge=1, description="Key/value heads (grouped-query attention); default: heads (one per head)."
    )
    qkv_bias: bool = Field(False, description="Biases on the query/key/value projection (Qwen2).")
    proj_bias: bool = Field(False, description="A bias on the attention output projection.")
    tie_embeddings: bool = Field(True, description="The output layer shares the token embedding's weights.")
    norm_eps: float = Field(1e-5, gt=0.0, description="RMSNorm's epsilon.")
    vocab_size: int | None = Field(None, description="Filled in from the tokenizer; leave unset.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            if data["preset"] not in GPT_PRESETS:
                raise ValueError(f"preset: unknown {data['preset']!r}; allowed: {', '.join(GPT_PRESETS)}")
            data = {**GPT_PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _heads_divide(self) -> GPTConfig:
        check_head_size(self.dim, self.heads)
        if self.heads % self.key_value_heads:
            raise ValueError(f"kv_heads ({self.kv_heads}) must divide heads ({self.heads})")
        return self

    @property
    def key_value_heads(self) -> int:
        """Heads of keys and values (grouped-query attention when fewer than `heads`)."""
        return self.kv_heads or self.heads

    @property
    def hidden(self) -> int:
        """The SwiGLU hidden width."""
        return swiglu_width(self.dim, self.ff_dim)


class LMTrainConfig(StrictModel):
    """The pretraining loop: steps of a fixed number of tokens, AdamW, cosine schedule."""

    steps: int = Field(1000, ge=1, description="Optimizer steps.")
    micro_batch: int = Field(16, ge=1, description="Sequences per forward/backward pass.")
    tokens_per_step: int | None = Field(
        None,
        ge=1,
        description="Tokens per optimizer step; micro-batches are accumulated to reach it "
        "(default: one micro-batch, micro_batch × context).",
    )
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    )
    schedule: ScheduleConfig = Field(
        default_factory=lambda: ScheduleConfig(name="cosine", warmup=0.02, min_lr_ratio=0.1)
    )
    clip_grad_norm: float | None = Field(1.0, gt=0.0, description="Clip the global gradient norm.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast precision; auto: bf16 on GPUs and CPUs with fast bf16 (AMX), else fp32."
    )
    compile: bool = Field(False, description="torch.compile the model (first steps are slow to compile).")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun: ddp keeps a whole model on every process; fsdp shards parameters, "
        "gradients and optimizer state over them (FSDP2, one shard group per block), for models too "
        "big for one device.",
    )
    eval_every: int = Field(200, ge=1, description="Validate (perplexity) every this many steps.")
    eval_batches: int = Field(20, ge=1, description="Micro-batches of held-out windows per validation.")
    checkpoint_every: int = Field(200, ge=1, description="Write checkpoints/last.pt every this many steps.")
    keep_checkpoint: bool = Field(False, description="Keep checkpoints/ in the bundle after a finished run.")
    init_from: str | None = Field(
        None, description="Start from this LM bundle's weights and tokenizer (continued pretraining)."
    )
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters only (needs init_from), or null.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Where to train.")
    seed: int = Field(42, description="Seeds the init, the windows drawn and dropout.")
    progress: bool = Field(True, description="Show a progress bar.")


class LMConfig(StrictModel):
    """A whole pretraining run: corpus → tokenizer → GPT → bundle."""

    task: Literal["lm"] = Field("lm", description="Marks a language-model config and bundle.")
    name: str = Field("lm", min_length=1, description="Run name; the bundle goes to runs/<name>/<version>.")
    runs_dir: str = Field("runs", description="Folder that holds all runs.")
    data: CorpusConfig
    tokenizer: LMTokenizerConfig = Field(default_factory=LMTokenizerConfig)
    model: GPTConfig = Field(default_factory=GPTConfig)
    train: LMTrainConfig = Field(default_factory=LMTrainConfig)
    tune: TuneConfig | None = Field(
        None, description="The search `largo tune` runs (`largo pretrain` ignores it)."
    )

    @field_validator("tune")
    @classmethod
    def _tune_metric(cls, v: TuneConfig | None) -> TuneConfig | None:
        allowed = ("auto", *LM_TUNE_METRICS)
        if v is not None and v.metric not in allowed:
            raise ValueError(f"tune.metric: {v.metric!r} is not logged; allowed: {', '.join(allowed)}")
        return v

    @field_validator("train")
    @classmethod
    def _lora_needs_base(cls, v: LMTrainConfig) -> LMTrainConfig:
        if v.lora is not None and v.init_from is None:
            raise ValueError("train.lora: needs train.init_from (an LM bundle to adapt)")
        if v.lora is not None and v.parallel == "fsdp":
            raise ValueError("train.parallel: fsdp shards whole models; LoRA trains small adapters: use ddp")
        return v

    @property
    def cache_dir(self) -> Path:
        """The folder of cached tokenizers and token files."""
        return Path(self.data.cache_dir or Path(self.runs_dir) / ".cache")


def validate_lm_config(data: dict[str, Any], source: str = "config") -> LMConfig:
    """Validate a dict into an `LMConfig`, raising `ConfigError` with readable messages."""
    return validate_model(LMConfig, data, source)


def read_lm_yaml(path: str | Path) -> dict[str, Any]:
    """An LM config file as a dict; relative corpus and bundle paths are made relative to its folder."""
    path = Path(path)
    data = read_yaml_mapping(path)

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and not Path(value).is_absolute() and (path.parent / value).exists():
            return str(path.parent / value)
        return value

    corpus = data.get("data")
    if isinstance(corpus, dict) and isinstance(corpus.get("paths"), list):
        corpus["paths"] = [resolve(p) for p in corpus["paths"]]
    for section, key in (("tokenizer", "path"), ("train", "init_from")):
        if isinstance(data.get(section), dict) and key in data[section]:
            data[section][key] = resolve(data[section][key])
    return data


def dump_lm_config(config: LMConfig) -> str:
    """The resolved config as YAML, every default written out."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
