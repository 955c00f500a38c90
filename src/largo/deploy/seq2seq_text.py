"""The text side of a seq2seq model, without torch: sources to ids, batched beam-search translation, and
the `TextGenerator`-shaped streaming that `largo serve` uses.

`Translator` (torch) and `OnnxTranslator` (ONNX Runtime) share `Seq2SeqText`; each supplies `search`
(beam search of a batch of sources) and `stream_ids` (one source, greedy or sampled, token by token).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from largo.data.pair_text import EOS, normalize_sources, source_ids
from largo.data.readers import DataError
from largo.deploy.lm_text import LMText, Sampling, check_sampling


class Seq2SeqText(LMText):
    """Sources, targets and translation for a seq2seq model with a `tokenizer` and a `config` (a
    Seq2SeqConfig); `eot` is EOS, where a target ends. `stream` and `generate` are `LMText`'s."""

    path: Path
    config: Any
    tokenizer: Tokenizer
    eot = EOS  # generation stops here (the name TextGenerator's users read)
    stops = frozenset([EOS])
    default_temperature = 0.0  # served requests decode greedily unless they ask otherwise

    @property
    def context(self) -> int:
        """The longest source in tokens."""
        return self.config.tokenizer.max_source_length

    def encode(self, text: str) -> list[int]:
        """A source's token ids as the encoder reads them (EOS last, cut to the longest source)."""
        return source_ids(self.tokenizer, [text], self.config)[0]

    def prompt_tokens(self, prompt: str) -> tuple[int, bool]:
        """(tokens of the source the encoder reads, EOS included; whether it was cut): a source longer
        than max_source_length keeps its start."""
        text = normalize_sources([prompt], self.config)[0]
        n = len(self.tokenizer.encode(text, add_special_tokens=False).ids) + 1
        return min(n, self.context), n > self.context

    def prompt_ids(self, prompt: str) -> list[int]:
        """The source ids the encoder reads (what `stream_ids` encodes)."""
        return self.encode(prompt)

    def decode(self, ids: list[int]) -> str:
        """Target ids → text."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def search(
        self, sources: list[list[int]], max_new_tokens: int, beams: int, length_penalty: float
    ) -> list[list[int]]:
        """The best target ids of each source (ids as `encode` gives them) by beam search."""
        raise NotImplementedError

    def translate(
        self,
        texts: str | list[str],
        *,
        beams: int | None = None,
        length_penalty: float | None = None,
        max_new_tokens: int | None = None,
        batch_size: int = 32,
    ) -> list[str]:
        """The target text of each source, by beam search (defaults: the bundle's `decode` section).

        Sources are decoded in batches of similar length (less padding), results in input order. An
        output is at most `max_new_tokens` long, and never longer than the model's context.
        """
        items = [texts] if isinstance(texts, str) else list(texts)
        bad = next((i for i, x in enumerate(items) if not isinstance(x, str)), None)
        if bad is not None:
            raise DataError(f"source {bad}: expected a text, got {type(items[bad]).__name__} {items[bad]!r}")
        d = self.config.decode
        beams = d.beams if beams is None else beams
        penalty = d.length_penalty if length_penalty is None else length_penalty
        checks = (("beams", beams, 1), ("batch_size", batch_size, 1), ("length_penalty", penalty, 0))
        for key, value, least in checks:
            if value < least:
                raise ValueError(f"{key}: must be ≥ {least} (got {value})")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be ≥ 1 (got {max_new_tokens})")
        limit = max_new_tokens or self.config.max_new_tokens
        ids = source_ids(self.tokenizer, items, self.config)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first, ties in input order
        out: list[str] = [""] * len(items)
        for lo in range(0, len(order), batch_size):
            index = order[lo : lo + batch_size]
            found = self.search([ids[i] for i in index], limit, beams, penalty)
            for i, row in zip(index, found, strict=True):
                out[i] = self.decode(row)
        return out

    def beam_ids(self, prompt: str, max_new_tokens: int, beams: int) -> list[int]:
        """The target ids of one source by beam search (the bundle's length penalty; EOS cut)."""
        return self.search([self.encode(prompt)], max_new_tokens, beams, self.config.decode.length_penalty)[0]

    def sample_ids(self, ids: list[int], max_new_tokens: int, sampling: Sampling, seed: int) -> Iterator[int]:
        """Yield up to `max_new_tokens` target ids of the source `ids` (EOS included when it comes; the
        caller stops there): greedy at temperature 0, else sampled with (temperature, top_k, top_p)."""
        raise NotImplementedError

    def stream_ids(
        self,
        prompt: str,
        max_new_tokens: int = 100,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = 0,
        use_cache: bool = True,
        stop_at_eot: bool = True,
    ) -> Iterator[int]:
        """Yield the target's token ids one at a time for the source `prompt`: greedy at temperature 0
        (the default), else sampled (seeded). `use_cache` is accepted for `TextGenerator`'s callers: the
        decoder always caches. Without `stop_at_eot` the EOS id is yielded and ends the stream."""
        del use_cache
        check_sampling(max_new_tokens, top_k, top_p)
        seed = 0 if seed is None else seed
        for token in self.sample_ids(self.encode(prompt), max_new_tokens, (temperature, top_k, top_p), seed):
            if token == EOS:
                if not stop_at_eot:
                    yield token
                return
            yield token
