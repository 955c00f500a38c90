"""A prompt read into a decoding batch in passes (chunked prefill), for any runtime, without torch.

The server's decode loop reads a long prompt a chunk at a time between two steps of the running rows
(`deploy/decode_loop.py`); `GPTRows.reader` and `lm_onnx.OnnxRows.reader` give a `PromptReader` whose
`read(n)` runs the model over the prompt's next n tokens after the ones already read, and whose last
read puts the whole prompt into a new row of the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class PromptReader:
    """`read(n)` reads the next n tokens of `ids` (None: all the rest) through `run(tokens, start)`,
    which returns the logits after them; it returns None while tokens remain, and after the last read
    calls `finish()` (the prompt joins the batch as its last row) and returns the last logits. A `whole`
    reader reads everything at its first read, whatever n (a seq2seq source: one encoder pass)."""

    def __init__(
        self,
        ids: list[int],
        run: Callable[[list[int], int], Any],
        finish: Callable[[], None],
        whole: bool = False,
    ):
        self.ids, self.run, self.finish, self.whole = ids, run, finish, whole
        self.done = 0  # tokens read so far

    @classmethod
    def at_once(cls, ids: list[int], add: Callable[[list[int]], Any]) -> PromptReader:
        """A reader whose first read is `add(ids)` (a row added in one pass: a seq2seq source)."""
        return cls(ids, lambda tokens, start: add(tokens), lambda: None, whole=True)

    @property
    def unread(self) -> int:
        return len(self.ids) - self.done

    def read(self, n: int | None = None) -> Any:
        if not self.unread:
            raise RuntimeError("the prompt has been read")
        n = self.unread if n is None or self.whole else max(1, min(n, self.unread))
        logits = self.run(self.ids[self.done : self.done + n], self.done)
        self.done += n
        if self.unread:
            return None
        self.finish()
        return logits
