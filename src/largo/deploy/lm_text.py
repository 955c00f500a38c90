"""The text side of a language model, without torch: prompt ids, token pieces, sampling settings.

`TextGenerator` (torch) and `OnnxTextGenerator` (ONNX Runtime) share `LMText`: how a prompt becomes
the ids a model reads (cut to the context), and how generated ids become text pieces (`text_pieces`,
`TextPieces`: never a piece that ends inside a multi-byte character).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from tokenizers import Tokenizer

from largo.deploy.chat import ChatPrompt
from largo.deploy.metadata import BundleError

Sampling = tuple[float, int | None, float | None]  # (temperature, top_k, top_p) of one generation


def text_pieces(tokens: Iterable[int], tokenizer: Tokenizer) -> Iterator[str]:
    """The text of a stream of token ids, piece by piece as the ids arrive.

    A byte-level token can end inside a multi-byte character (a Chinese character is 3 bytes), so a
    piece is yielded only once the text decoded so far ends on a whole character; the pieces join to
    the decoded text of all the ids.
    """
    pieces = TextPieces(tokenizer)
    for token in tokens:
        if piece := pieces.push(token):
            yield piece
    if piece := pieces.end():
        yield piece


def encode_prompt(tokenizer: Tokenizer, prompt: str, eot: int, bos: int | None = None) -> list[int]:
    """A prompt's token ids as a language model reads it: after the beginning-of-text token `bos`
    when the model reads one and the prompt does not open with it (else an empty prompt starts from
    the end-of-text token `eot`); a `ChatPrompt` is read as its template laid it out."""
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if bos is not None and ids[:1] != [bos] and not isinstance(prompt, ChatPrompt):
        return [bos, *ids]  # (a chat template's prompt has it where the template put it)
    return ids or [eot]


class TextPieces:
    """`text_pieces` one token at a time: `push(token)` gives the new text ("" while a character is
    unfinished), `end()` whatever is left (for a loop that serves many streams at once).

    Each push decodes only a short window, not every id so far (which made a long stream quadratic):
    the ids since the last piece, after the ids of that piece (`_start:_shown`). The new piece is the
    window's text less the text of those earlier ids, so a decoder whose output depends on what comes
    before (a leading space dropped at the start) still joins to the text of all the ids.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._start = 0  # the window's first id: the first of the last piece's ids
        self._shown = 0  # ids already given out as text

    def _new_text(self) -> str:
        decode = self.tokenizer.decode
        before = decode(self.ids[self._start : self._shown], skip_special_tokens=False)
        window = decode(self.ids[self._start :], skip_special_tokens=False)
        return window[len(before) :] if len(window) > len(before) else ""

    def _advance(self) -> None:
        self._start, self._shown = self._shown, len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        piece = self._new_text()
        if not piece or piece.endswith("\ufffd"):
            return ""  # an unfinished character: wait for its next byte
        self._advance()
        return piece

    def end(self) -> str:
        piece = self._new_text()
        self._advance()
        return piece


def check_sampling(max_new_tokens: int, top_k: int | None, top_p: float | None) -> None:
    """ValueError naming the first sampling setting out of range (shared by the LM and seq2seq)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be ≥ 0 (got {max_new_tokens})")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: must be ≥ 1 (got {top_k})")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: must be in (0, 1] (got {top_p})")


class LMText:
    """Prompt handling and text streaming over `stream_ids`, for a generator with a `tokenizer`, an
    end-of-text id `eot` and a `config` whose `model.context` is the longest sequence it reads (a
    seq2seq model's `Seq2SeqText` reads its sources its own way and shares the streaming)."""

    path: Any  # the bundle folder
    tokenizer: Tokenizer
    eot: int
    bos: int | None = None  # put before every prompt (an imported model that reads one)
    stops: frozenset[int] = frozenset()  # what ends a generation: eot, and any tokenizer.stop
    chat_template: Any = None  # an imported instruct model's `ChatTemplate` (deploy/chat.py)
    config: Any
    default_temperature = 0.8  # what a served request that names no temperature gets

    def read_special_ids(self, where: object) -> None:
        """`eot` and `bos`: the ids of the tokens config.tokenizer names; BundleError naming `where`
        (the bundle) when the tokenizer lacks one."""

        def find(token: str) -> int:
            found = self.tokenizer.token_to_id(token)
            if found is None:
                raise BundleError(f"{where}: the tokenizer has no {token} token")
            return found

        named = self.config.tokenizer
        self.eot = find(named.eot)
        self.bos = None if named.bos is None else find(named.bos)
        self.stops = frozenset([self.eot, *map(find, named.stop)])

    @property
    def context(self) -> int:
        """The longest sequence the model attends over, in tokens."""
        return self.config.model.context

    def encode(self, prompt: str) -> list[int]:
        """A prompt's token ids (`encode_prompt` with the model's eot and bos)."""
        return encode_prompt(self.tokenizer, prompt, self.eot, self.bos)

    def prompt_tokens(self, prompt: str) -> tuple[int, bool]:
        """(tokens of the prompt the model reads, whether it was cut): see `prompt_ids`."""
        n = len(self.encode(prompt))
        read = n if n < self.context else self.context - 1
        return read, read < n

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's ids the model reads: a prompt longer than the context keeps its last
        `context - 1` tokens (its beginning-of-text token first, when it has one), leaving room for one
        generated."""
        ids = self.encode(prompt)
        if len(ids) < self.context:
            return ids
        keep = ids[-(self.context - 1) :]
        return keep if self.bos is None else [self.bos, *keep[1:]]

    def stream_ids(self, prompt: str, max_new_tokens: int = 100, **sampling: Any) -> Iterator[int]:
        raise NotImplementedError

    def stream(self, prompt: str, max_new_tokens: int = 100, **sampling: Any) -> Iterator[str]:
        """Yield the generated text piece by piece as tokens arrive.

        Args:
            prompt: the text to continue.
            max_new_tokens: most tokens to generate.
            sampling: temperature (0 = greedy), top_k, top_p, seed, use_cache, stop_at_eot, with the
                defaults of the generator's `stream_ids` (a language model: 0.8, 50, None, 0, True,
                True; a seq2seq model: greedy).

        Pieces never end inside a multi-byte character (see `text_pieces`).
        """
        yield from text_pieces(self.stream_ids(prompt, max_new_tokens, **sampling), self.tokenizer)

    def generate(self, prompt: str, max_new_tokens: int = 100, **sampling: Any) -> str:
        """The generated continuation of `prompt` (without the prompt); arguments as `stream`."""
        return "".join(self.stream(prompt, max_new_tokens, **sampling))

    def lm_info(self, metrics: dict[str, Any], parameters: int | None) -> dict[str, Any]:
        """What a language-model bundle holds, from its config and metrics.json: sizes, parameter count,
        held-out perplexity, its special tokens, whether it chats, where it was imported from."""
        history = metrics.get("history") or []
        return {
            "path": str(self.path),
            "name": self.config.name,
            "task": "lm",
            "model": self.config.model.model_dump(mode="json"),
            "parameters": parameters,
            "vocab_size": self.tokenizer.get_vocab_size(),
            "valid": metrics.get("valid"),
            "steps": history[-1]["step"] if history else None,
            "tokens": self.config.tokenizer.model_dump(include={"eot", "bos", "pad", "stop"}),
            "chat": self.chat_template is not None,
            "imported": metrics.get("imported"),
        }

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """The prompt of chat `messages` ([{"role": "user", "content": "…"}, …]) laid out by the model's
        chat template with the assistant's turn opened; ValueError when the model has none, or the
        template refuses the messages."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template (an imported instruct model has one)")
        return self.chat_template.render(messages)

    def chat(self, messages: list[dict[str, str]], max_new_tokens: int = 100, **sampling: Any) -> str:
        """The assistant's answer to chat `messages` (see `chat_prompt`); sampling as `stream`."""
        return self.generate(self.chat_prompt(messages), max_new_tokens, **sampling)
