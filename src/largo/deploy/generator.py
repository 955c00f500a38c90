"""Language-model bundles: write and read them, and `TextGenerator` (prompt → text, or a token stream).

runs/<name>/v<N>/ of an LM holds config.yaml (an LMConfig, `task: lm`), model.safetensors,
tokenizer.json (a standard HF tokenizers file), metrics.json (per-evaluation history, perplexity, bits
per character, throughput) and report.html. Weights are safetensors only; nothing here unpickles.

A LoRA run with `train.lora.save: adapter` writes adapter.safetensors (the adapter weights alone, in
peft's format) and adapter.json (the base bundle's path and the sha256 of its weights file) instead of
model.safetensors; reading it builds the base, checks the hash, and merges the adapter in.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from tokenizers import Tokenizer

from largo.config_lm import LMConfig, dump_lm_config, validate_lm_config
from largo.deploy.chat import ChatTemplate
from largo.deploy.lm_text import LMText, check_sampling
from largo.deploy.metadata import (
    ADAPTER_RECORD,
    WEIGHTS,
    BundleError,
    check_files,
    read_json,
    read_task_config,
)
from largo.evaluate.report import write_metrics_json, write_report
from largo.models.gpt import GPT, GPTRows, generate_ids

TOKENIZER = "tokenizer.json"
GENERATOR_PRECISIONS = ("fp32", "bf16")  # the dtype TextGenerator keeps the weights in
ADAPTER = "adapter.safetensors"  # LoRA adapter weights of an adapter-only bundle


def write_lm_start(
    run_dir: Path, config: LMConfig, tokenizer: Tokenizer, chat_template: ChatTemplate | None = None
) -> None:
    """The resolved config, the tokenizer and a chat template (an imported instruct model's, kept by
    the runs that fine-tune it), written before training starts (what resume reads)."""
    (run_dir / "config.yaml").write_text(dump_lm_config(config), encoding="utf-8")
    tokenizer.save(str(run_dir / TOKENIZER))
    if chat_template is not None:
        chat_template.write(run_dir)


def write_lm_bundle(
    run_dir: Path, model: GPT, metrics: dict[str, Any], adapter_of: LMBundle | None = None
) -> Path:
    """Weights (tied embedding stored once), metrics.json and report.html; returns the report's path.

    With `adapter_of` (the base bundle of a LoRA run that keeps its adapter apart) the weights are only
    the model's LoRA adapters, with the base bundle named and hash-checked in adapter.json.
    """
    if adapter_of is None:
        save_model(model, str(run_dir / WEIGHTS))
    else:
        write_lm_adapter(run_dir, model, adapter_of)
    write_metrics_json(run_dir, metrics)
    return write_report(run_dir, metrics)


def write_lm_adapter(run_dir: Path, model: GPT, base: LMBundle) -> None:
    """adapter.safetensors (the adapters of a LoRA-adapted GPT) and adapter.json (which base, its hash)."""
    from largo.train.lora import adapter_state_dict, import_peft

    save_file(adapter_state_dict(model), str(run_dir / ADAPTER))
    base_path = base.path.resolve()
    weights = lm_weights_file(base_path)
    record = {
        "format": 1,
        "base": {
            "path": str(base_path),
            # the base found again from here when the whole runs folder moved
            "relative": os.path.relpath(base_path, run_dir.resolve()),
            "weights": weights.name,
            "sha256": file_sha256(weights),
        },
        "peft": import_peft().__version__,
    }
    # written last: its presence marks the adapter bundle complete
    (run_dir / ADAPTER_RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")


def lm_weights_file(path: Path) -> Path:
    """The file that holds an LM bundle's own weights: model.safetensors, or an adapter-only bundle's
    adapter.safetensors (whose base is checked in turn when it is read)."""
    return path / (ADAPTER if (path / ADAPTER_RECORD).exists() else WEIGHTS)


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class LMBundle:
    """An LM bundle read from disk."""

    path: Path
    config: LMConfig
    tokenizer: Tokenizer
    model: GPT
    metrics: dict[str, Any]
    chat_template: ChatTemplate | None = None  # an imported instruct model's


def read_lm_config(path: str | Path) -> LMConfig:
    """The LM bundle's resolved config."""
    return read_task_config(path, "lm", validate_lm_config)


def read_lm_bundle(path: str | Path) -> LMBundle:
    """Load an LM bundle (weights from safetensors, never pickle) with the model in eval mode.

    An adapter-only LoRA bundle loads its base bundle, checks that the base's weights are the ones the
    adapter was trained on, and returns the base with the adapter merged in (a plain GPT).
    """
    path = Path(path)
    adapter_only = (path / ADAPTER_RECORD).exists()
    check_files(path, ("config.yaml", TOKENIZER, *((ADAPTER,) if adapter_only else (WEIGHTS,))))
    config = read_lm_config(path)
    tokenizer = Tokenizer.from_file(str(path / TOKENIZER))
    if adapter_only:
        model = _adapted_model(path, config)
    else:
        model = GPT(config.model)
        load_model(model, str(path / WEIGHTS))
    chat = ChatTemplate.read(path)
    return LMBundle(path, config, tokenizer, model.eval(), read_json(path / "metrics.json"), chat)


def _adapted_model(path: Path, config: LMConfig) -> GPT:
    """The base bundle's GPT with this adapter-only bundle's LoRA weights merged in."""
    from largo.train.lora import load_adapter

    base = read_json(path / ADAPTER_RECORD).get("base") or {}
    if config.train.lora is None or not {"path", "relative", "weights", "sha256"} <= base.keys():
        raise BundleError(
            f"{path}: {ADAPTER_RECORD} does not name a base bundle, or config.yaml has no train.lora"
        )
    # the recorded absolute path, else the same place relative to this bundle (a moved runs folder)
    found = next(
        (p for p in (Path(base["path"]), path / base["relative"]) if (p / "config.yaml").exists()), None
    )
    if found is None:
        raise BundleError(
            f"{path}: its base bundle {base['path']} is missing; an adapter-only bundle needs the bundle it "
            "was trained from (train.lora.save: merged writes a self-contained one)"
        )
    weights = found / base["weights"]
    if not weights.exists() or file_sha256(weights) != base["sha256"]:
        raise BundleError(
            f"{path}: its base bundle {found} changed since the adapter was trained ({weights.name} is "
            f"{'missing' if not weights.exists() else 'different'}; expected sha256 {base['sha256'][:16]}…); "
            "restore that base or train the adapter again"
        )
    base_bundle = read_lm_bundle(found)
    if base_bundle.config.model != config.model:
        raise BundleError(f"{path}: the base bundle {found} has another model architecture than the adapter")
    try:
        return load_adapter(base_bundle.model, config.train.lora, load_file(str(path / ADAPTER)))
    except ValueError as e:
        raise BundleError(f"{path}: {e}") from None


class TextGenerator(LMText):
    """A loaded LM bundle that continues prompts: `generate()` returns text, `stream()` yields pieces.

    Sampling is seeded per call, so the same prompt, settings and seed give the same text.
    `precision="bf16"` stores the weights (and the KV cache) in bf16: one token costs half the memory
    traffic of fp32, 1.48× the tokens/s of fp32 on this repo's CPU (`bench/generate.py`, where bf16
    autocast over fp32 weights gave 1.25×) with the same greedy tokens; the sampler works in fp32.
    """

    def __init__(self, bundle: LMBundle, precision: str = "fp32", device: str | torch.device = "cpu"):
        if precision not in GENERATOR_PRECISIONS:
            raise ValueError(f"precision {precision!r}: one of {', '.join(GENERATOR_PRECISIONS)}")
        self.bundle = bundle
        self.config = bundle.config
        self.path = bundle.path
        self.tokenizer = bundle.tokenizer
        self.device = torch.device(device)
        self.model = bundle.model.to(self.device)
        if precision == "bf16":
            self.model = self.model.to(torch.bfloat16)
        self.precision = precision
        self.read_special_ids(self.path)
        self.chat_template = bundle.chat_template

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> TextGenerator:
        """Read an LM bundle folder."""
        return cls(read_lm_bundle(path), **kwargs)

    def decode_rows(self, slots: int) -> GPTRows:
        """A batch of up to `slots` sequences decoded together (the server's continuous batching)."""
        return GPTRows(self.model, slots)

    def stream_ids(
        self,
        prompt: str,
        max_new_tokens: int = 100,
        temperature: float = 0.8,
        top_k: int | None = 50,
        top_p: float | None = None,
        seed: int | None = 0,
        use_cache: bool = True,
        stop_at_eot: bool = True,
    ) -> Iterator[int]:
        """Yield generated token ids one at a time (see `stream` for the arguments)."""
        check_sampling(max_new_tokens, top_k, top_p)
        prompt_ids = torch.tensor([self.prompt_ids(prompt)], device=self.device)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(0 if seed is None else seed)
        for nxt in generate_ids(  # in the weights' dtype: no autocast
            self.model,
            prompt_ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            use_cache=use_cache,
            stop_id=self.eot if stop_at_eot else None,
        ):
            token = int(nxt[0])
            if stop_at_eot and token in self.stops:
                return
            yield token

    def info(self) -> dict[str, Any]:
        """What the bundle holds (`LMText.lm_info`)."""
        return self.lm_info(self.bundle.metrics, self.model.num_parameters())
