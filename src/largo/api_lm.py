"""The language-model half of the Python API: pretrain(), generate() and import_lm() (re-exported by
`largo.api`).

pretrain() reads top to bottom through the stages of a language model (corpus → tokenizer and token
files → GPT → train → bundle); generate() continues a prompt with a bundle; import_lm() turns a local
Hugging Face causal LM folder (Llama, Mistral, Qwen2) into an LM bundle.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from largo.config import ConfigError
from largo.config_lm import LMConfig, read_lm_yaml, validate_lm_config
from largo.deploy.bundle import environment, run_folder
from largo.deploy.generator import TextGenerator
from largo.deploy.metadata import is_seq2seq_bundle
from largo.train.checkpoint import seed_everything
from largo.train.distributed import is_main_process, log, main_first, process_group

if TYPE_CHECKING:
    from largo.api import TrainResult  # imported where it is built: largo.api imports this module


def _as_lm_config(config: LMConfig | dict | str | Path) -> LMConfig:
    if isinstance(config, LMConfig):
        return config
    if isinstance(config, dict):
        return validate_lm_config(config)
    return validate_lm_config(read_lm_yaml(config), str(config))


def pretrain(config: LMConfig | dict | str | Path, *, resume: bool | str | Path = False) -> TrainResult:
    """Pretrain a GPT-style language model on a raw-text corpus and write its bundle.

    Args:
        config: an LMConfig, the same as a dict, or a YAML file path.
        resume: True to continue the newest unfinished run of this config's name, or a run folder.

    Returns:
        TrainResult with the bundle path, metrics (history, held-out perplexity, bits per character,
        tokens/s) and the report path.

    Under torchrun (`torchrun --nproc_per_node N -m largo.cli pretrain …`) every process calls this:
    they join one process group and train data-parallel (see `train/lm.py`); rank 0 picks the run
    folder, prepares the corpus first (the others then read its cache) and writes every file.
    """
    cfg = _as_lm_config(config)
    _check_base(cfg)  # before a run folder is made
    with process_group(cfg.train.device):
        return _pretrain(cfg, resume)


def prepare_lm(cfg: LMConfig, tokenizer: Any = None) -> tuple[LMConfig, Any, Any, Any, Any]:
    """A run's corpus and starting model: (config with the vocabulary size, tokenizer, token data, GPT,
    base bundle or None). The tokenizer is the given one, else the base bundle's (train.init_from),
    else trained or cached; the model is seeded, takes the base weights, and LoRA adapters when asked.
    Rank 0 prepares the corpus first under torchrun (the others read its cache)."""
    from largo.data.corpus import prepare_corpus
    from largo.models.gpt import GPT

    base = _read_base(cfg) if cfg.train.init_from else None
    if base is not None:  # the base's sizes (its context, unless the config names one: RoPE's tables
        # are not weights) and its special tokens (an imported model's own)
        tokenizer = base.tokenizer if tokenizer is None else tokenizer
        named = base.config.tokenizer.model_dump(include={"eot", "bos", "pad", "stop"})
        tokens = cfg.tokenizer.model_copy(update=named)
        sizes = base.config.model
        if (context := _named_context(cfg)) is not None:
            sizes = sizes.model_copy(update={"context": context})
        cfg = cfg.model_copy(update={"model": sizes, "tokenizer": tokens})
    chat = base.chat_template if base is not None else None
    tokenizer, data = main_first(lambda: prepare_corpus(cfg, tokenizer, log, chat))
    if base is None:
        model = cfg.model.model_copy(update={"vocab_size": tokenizer.get_vocab_size()})
        cfg = cfg.model_copy(update={"model": model})
    seed_everything(cfg.train.seed)
    model = GPT(cfg.model)
    if base is not None:
        model.load_state_dict(base.model.state_dict())
    if cfg.train.lora is not None:
        from largo.train.lora import add_lora

        model = add_lora(model, cfg.train.lora)
    return cfg, tokenizer, data, model, base


def _check_base(cfg: LMConfig) -> None:
    """ConfigError for an adapter-only LoRA run on a Hugging Face folder: the bundle would name a base
    whose weights are not a largo bundle's."""
    from largo.deploy.hf_lm import is_hf_folder

    path, lora = cfg.train.init_from, cfg.train.lora
    if path and is_hf_folder(path) and lora is not None and lora.save == "adapter":
        raise ConfigError(
            f"train.lora.save: adapter needs a largo LM bundle as its base; {path} is a Hugging Face "
            f"folder: `largo import {path} --out DIR` first, or save: merged"
        )


def _read_base(cfg: LMConfig) -> Any:
    """The bundle train.init_from names: a largo LM bundle, or a Hugging Face causal LM folder converted
    in memory."""
    from largo.deploy.generator import read_lm_bundle
    from largo.deploy.hf_lm import import_hf_lm, is_hf_folder

    _check_base(cfg)
    path = cfg.train.init_from
    if not is_hf_folder(path):
        return read_lm_bundle(path)
    return import_hf_lm(path, _named_context(cfg))  # checked against the model's positions


def _named_context(cfg: LMConfig) -> int | None:
    """model.context when the config names it (a fine-tuning run's shorter one: an imported model's own
    is long and costly to train at), else None (the base's)."""
    return cfg.model.context if "context" in cfg.model.model_fields_set else None


def import_lm(folder: str | Path, out: str | Path, *, context: int | None = None) -> Path:
    """Convert a local Hugging Face causal LM folder (Llama, Mistral or Qwen2 architecture, safetensors
    weights, tokenizer.json) into an LM bundle at `out`, which generates, serves, exports and fine-tunes
    like one `pretrain` wrote. `context`: the longest sequence it attends over (default: the model's,
    at most 2048). Returns `out`."""
    from largo.deploy.hf_lm import import_hf_lm, write_imported

    out = Path(out)
    name = out.parent.name if re.fullmatch(r"v\d+", out.name) else out.name  # runs/<name>/v1, or <name>
    return write_imported(import_hf_lm(folder, context, name=name or None), out)


def _pretrain(cfg: LMConfig, resume: bool | str | Path) -> TrainResult:
    import torch
    from tokenizers import Tokenizer

    from largo.api import TrainResult  # here: largo.api imports this module
    from largo.deploy.generator import write_lm_bundle, write_lm_start
    from largo.models.gpt import GPT
    from largo.train.lm import pretrain_fit

    # 1. the run folder: a new version, or the unfinished one being resumed (with its own config)
    run_dir = run_folder(cfg.runs_dir, cfg.name, resume)
    if resume:
        cfg = _as_lm_config(run_dir / "config.yaml")
    log(f"run folder: {run_dir}")

    # 2. tokenizer and token files (the base model's tokenizer when continuing one, else trained or
    # cached; a resumed run's own), 3. the model, seeded, from the base weights, with LoRA when asked
    own = Tokenizer.from_file(str(run_dir / "tokenizer.json")) if resume else None
    cfg, tokenizer, data, model, base = prepare_lm(cfg, own)
    if not resume and is_main_process():  # an imported instruct model's chat template stays with it
        write_lm_start(run_dir, cfg, tokenizer, base.chat_template if base is not None else None)
    meta = data.meta
    log(f"corpus: {meta['train_tokens']:,} train tokens, {meta['valid_tokens']:,} held out")

    # 4. train
    result = pretrain_fit(
        model, data, cfg.train, cfg.model.context, checkpoint_dir=run_dir / "checkpoints", resume=bool(resume)
    )

    # 5. the bundle (a sharded run's weights gathered whole for rank 0; the other ranks write nothing and
    # keep an empty model only to count its parameters)
    if result.state is not None:
        if is_main_process():
            model = GPT(cfg.model)
            model.load_state_dict(result.state)
            result.state = None
        else:
            with torch.device("meta"):
                model = GPT(cfg.model)
    else:
        model.cpu()
    history = result.history
    final = next((r for r in reversed(history) if "valid.loss" in r), None)
    metrics: dict[str, Any] = {
        "name": cfg.name,
        "version": run_dir.name,
        "task": "lm",
        "history": history,
        "steps": result.steps,
        "tokens": result.tokens,
        "train_time_s": result.train_time_s,
        "tokens_per_s": result.tokens_per_s,
        "parameters": sum(p.numel() for p in model.parameters()),
        "corpus": meta,
        "seed": cfg.train.seed,
        "versions": environment(),
        "config": cfg.model_dump(mode="json"),
    }
    if final is not None:
        metrics["valid"] = {
            "lm": {k: final[f"valid.{k}"] for k in ("loss", "perplexity", "bpc")},
        }
    lora = cfg.train.lora
    if lora is not None:  # the adapters merged into full weights, or kept apart beside a named base
        from largo.train.lora import lora_summary, merge_lora

        metrics["lora"] = {**lora_summary(model), "save": lora.save}
        metrics["parameters"] -= metrics["lora"]["adapter_parameters"]  # what the bundle's model holds
        if lora.save == "merged":
            model = merge_lora(model)
    adapter_of = base if lora is not None and lora.save == "adapter" else None
    if not is_main_process():  # rank 0 writes the bundle
        return TrainResult(run_dir, metrics, run_dir / "report.html")
    report = write_lm_bundle(run_dir, model, metrics, adapter_of=adapter_of)
    if not cfg.train.keep_checkpoint:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return TrainResult(run_dir, metrics, report)


def generate(
    bundle: str | Path | TextGenerator,
    prompt: str,
    max_new_tokens: int = 100,
    *,
    stream: bool = False,
    precision: str = "fp32",
    **sampling: Any,
) -> str | Iterator[str]:
    """Continue `prompt` with a language-model bundle (a seq2seq bundle: write the prompt's target,
    greedy or sampled token by token; `translate()` runs its beam search).

    Args:
        bundle: an LM or seq2seq bundle folder, or a loaded TextGenerator or Translator.
        prompt: the text to continue.
        max_new_tokens: most tokens to generate.
        stream: return an iterator of text pieces as they are generated, instead of the whole text.
        precision: fp32, or bf16 (weights and KV cache in bf16: faster) for a bundle folder.
        sampling: temperature (0 = greedy), top_k, top_p, seed, use_cache, stop_at_eot.
    """
    gen = bundle if hasattr(bundle, "stream") else None
    if gen is None and is_seq2seq_bundle(bundle):
        from largo.deploy.translator import Translator

        gen = Translator.load(bundle, precision=precision)
    if gen is None:
        gen = TextGenerator.load(bundle, precision=precision)
    if stream:
        return gen.stream(prompt, max_new_tokens, **sampling)
    return gen.generate(prompt, max_new_tokens, **sampling)
