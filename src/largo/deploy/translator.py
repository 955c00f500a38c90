"""Sequence-to-sequence bundles: write and read them, and `Translator` (source text → target text).

runs/<name>/v<N>/ of a seq2seq run holds config.yaml (a Seq2SeqConfig, `task: seq2seq`),
model.safetensors, tokenizer.json (the shared byte-level BPE, a standard HF tokenizers file),
metrics.json (per-epoch history, test BLEU / chrF / perplexity, sample outputs) and report.html.
Weights are safetensors only; nothing here unpickles.

`Translator` has two faces: `translate()` decodes many sources in length-sorted batches with beam
search (the quality path, used by `largo predict` and the test scores), and `stream_ids()` / `stream()` /
`generate()` decode one source greedily or sampled, token by token, with the same signature as the
language model's `TextGenerator`, so `largo serve` streams a seq2seq bundle over POST /generate.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer

from largo.config_seq2seq import Seq2SeqConfig, dump_seq2seq_config, validate_seq2seq_config
from largo.data.pair_text import literal_specials
from largo.data.pairs import encode_pairs, padded, texts
from largo.deploy.generator import TOKENIZER
from largo.deploy.lm_text import Sampling
from largo.deploy.metadata import WEIGHTS, check_files, read_json, read_task_config
from largo.deploy.seq2seq_text import Seq2SeqText
from largo.evaluate.metrics import generation_metrics
from largo.evaluate.report import write_metrics_json, write_report
from largo.models.seq2seq import Seq2SeqRows, Seq2SeqTransformer, beam_search, stream_ids
from largo.train.distributed import log
from largo.train.loop import forward_in_batches
from largo.train.seq2seq import token_scores

PRECISIONS = ("fp32", "bf16")
EXAMPLES = 20  # rows shown beside their references in a report and metrics.json


def write_seq2seq_start(run_dir: Path, config: Seq2SeqConfig, tokenizer: Tokenizer) -> None:
    """The resolved config and the tokenizer, written before training starts (what resume reads)."""
    (run_dir / "config.yaml").write_text(dump_seq2seq_config(config), encoding="utf-8")
    tokenizer.save(str(run_dir / TOKENIZER))


def write_seq2seq_bundle(run_dir: Path, model: Seq2SeqTransformer, metrics: dict[str, Any]) -> Path:
    """Weights (the tied embedding once), metrics.json and report.html; returns the report's path."""
    save_model(model, str(run_dir / WEIGHTS))
    write_metrics_json(run_dir, metrics)
    return write_report(run_dir, metrics)


def read_seq2seq_config(path: str | Path) -> Seq2SeqConfig:
    """A seq2seq bundle's resolved config."""
    return read_task_config(path, "seq2seq", validate_seq2seq_config)


class Translator(Seq2SeqText):
    """A loaded seq2seq bundle: `translate(["text", ...])` → target texts.

    `precision="bf16"` keeps the weights and the cache in bf16 (faster on CPUs with bf16 units and on
    GPUs); beam scores are summed in fp32 either way.
    """

    def __init__(
        self,
        path: Path,
        config: Seq2SeqConfig,
        tokenizer: Tokenizer,
        model: Seq2SeqTransformer,
        metrics: dict[str, Any] | None = None,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
        self.path, self.config, self.tokenizer = Path(path), config, literal_specials(tokenizer)
        self.metrics = metrics or {}
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        if precision == "bf16":
            self.model = self.model.to(torch.bfloat16)
        self.precision = precision

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> Translator:
        """Read a seq2seq bundle folder (weights from safetensors)."""
        path = Path(path)
        config = read_seq2seq_config(path)  # first: a bundle of another task is named as such
        check_files(path, (TOKENIZER, WEIGHTS))
        model = Seq2SeqTransformer(config.model)
        load_model(model, str(path / WEIGHTS))
        tokenizer = Tokenizer.from_file(str(path / TOKENIZER))
        return cls(path, config, tokenizer, model, read_json(path / "metrics.json"), **kwargs)

    def decode_rows(self, slots: int) -> Seq2SeqRows:
        """A batch of up to `slots` sources decoded together (the server's continuous batching)."""
        return Seq2SeqRows(self.model, slots, self.context)

    def search(
        self, sources: list[list[int]], max_new_tokens: int, beams: int, length_penalty: float
    ) -> list[list[int]]:
        """The best target ids of each source by beam search (`models.seq2seq.beam_search`)."""
        return beam_search(self.model, padded(sources).to(self.device), max_new_tokens, beams, length_penalty)

    def score(self, table: pa.Table, label: str = "data") -> tuple[dict[str, Any], list[dict[str, str]]]:
        """Score the model on a cleaned table of pairs: `{target column: {"type": "text", loss,
        perplexity, token_accuracy, bleu, chrf, exact_match, bleu_tokenize, support}}` (token figures
        from the references, text figures from beam-searched outputs) and its first `EXAMPLES` rows as
        {source, reference, output}."""
        d = self.config.data
        split = encode_pairs(table, self.config, self.tokenizer, label, log)
        batch = self.config.train.eval_batch_size
        outputs = forward_in_batches(self.model, split.inputs, batch, self.precision, pad=split.pad)
        sources, references = texts(table, d.source), texts(table, d.target)
        hyps = self.translate(sources)
        scores = {"type": "text", **token_scores(outputs), **generation_metrics(hyps, references)}
        rows = zip(sources, references, hyps, strict=True)
        examples = [{"source": s, "reference": r, "output": h} for s, r, h in list(rows)[:EXAMPLES]]
        return {d.target: scores}, examples

    def sample_ids(self, ids: list[int], max_new_tokens: int, sampling: Sampling, seed: int) -> Iterator[int]:
        """Target ids of one source as `models.seq2seq.stream_ids` decodes them (a torch generator
        seeded `seed`)."""
        source = torch.tensor([ids], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        temperature, top_k, top_p = sampling
        for nxt in stream_ids(
            self.model, source, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            generator=generator,
        ):  # fmt: skip
            yield int(nxt[0])

    def info(self) -> dict[str, Any]:
        """What the bundle holds: sizes, parameter count, test scores."""
        return {
            "path": str(self.path),
            "name": self.config.name,
            "task": "seq2seq",
            "model": self.config.model.model_dump(mode="json"),
            "parameters": self.model.num_parameters(),
            "vocab_size": self.tokenizer.get_vocab_size(),
            "test": self.metrics.get("test"),
            "decode": self.config.decode.model_dump(mode="json"),
        }
