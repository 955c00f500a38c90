"""Beam-search bookkeeping in numpy, shared by the torch decoder (`seq2seq.beam_search`) and the ONNX
Runtime one (`deploy/seq2seq_onnx.py`), so both runtimes rank, finish and stop beams by one rule.

A runtime computes each step's log-probabilities, adds them to `Beams.scores` and takes the best
2·beams candidates of every source (on its own device: `Beams.top` is the numpy way); `advance` then
moves the search on and returns the rows its cache must be reordered by.

The rule: every step each of the `beams` live hypotheses of a source proposes its best tokens; of the
2·beams best extensions, those ending in EOS (ranked among the first `beams`) become finished
hypotheses, scored log p / length^length_penalty, and the first `beams` others live on. With
`early_stopping` a source is done once it holds `beams` finished hypotheses and the best score its
best live one could still reach cannot beat the worst of them: log-probabilities only fall as a
hypothesis grows, so that best is its score now over the largest length norm it can reach (the
longest length when length_penalty > 0).
"""

from __future__ import annotations

import heapq

import numpy as np

from largo.data.pair_text import EOS


def strip_eos(row: list[int]) -> list[int]:
    """Generated ids up to (without) the first EOS."""
    return row[: row.index(EOS)] if EOS in row else row


class Beams:
    """The search state of `sources` rows × `beams` hypotheses (row i's are rows i·beams … i·beams +
    beams − 1 of the decoder's batch) over at most `steps` steps."""

    def __init__(
        self, sources: int, beams: int, steps: int, length_penalty: float, early_stopping: bool = True
    ):
        self.b, self.k, self.steps = sources, beams, steps
        self.penalty, self.early_stopping = length_penalty, early_stopping
        self.scores = np.full((sources, beams), -np.inf, np.float32)
        self.scores[:, 0] = 0.0  # one live beam at first, so the first step does not pick a token k times
        self.seqs = np.zeros((sources * beams, 0), np.int64)  # each live hypothesis's tokens so far
        self.finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(sources)]
        self.kept: list[list[float]] = [[] for _ in range(sources)]  # min-heaps of the best k finished
        self.done = [False] * sources
        self.step = 0

    @property
    def over(self) -> bool:
        """Whether every source is done, or the last step has been taken."""
        return all(self.done) or self.step >= self.steps

    @property
    def tokens(self) -> np.ndarray:
        """The last token of every live hypothesis [sources · beams] (what the next step feeds)."""
        return self.seqs[:, -1]

    def top(self, logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The best candidates of each source from log-probabilities [sources · beams, vocab] (numpy):
        (their scores, their flat indices beam · vocab + token) [sources, min(2·beams, beams · vocab)],
        best first."""
        cand = (self.scores[..., None] + logp.reshape(self.b, self.k, -1)).reshape(self.b, -1)
        n = min(2 * self.k, cand.shape[-1])
        index = np.argpartition(-cand, n - 1, axis=-1)[:, :n]
        order = np.argsort(-np.take_along_axis(cand, index, -1), -1, kind="stable")
        index = np.take_along_axis(index, order, -1)
        return np.take_along_axis(cand, index, -1), index

    def advance(self, top: np.ndarray, index: np.ndarray, vocab: int) -> np.ndarray:
        """Take one step from the best candidates (`top`'s pair, from any runtime) → the rows
        [sources · beams] the live hypotheses continue (the decoder's cache is reordered by them)."""
        b, k, step = self.b, self.k, self.step
        top = top.astype(np.float32, copy=False)
        beam, token = index // vocab, index % vocab
        norm = (step + 1) ** self.penalty
        is_eos = (token == EOS) | (step == self.steps - 1)  # the last step ends every hypothesis
        for i, j in np.argwhere(is_eos[:, :k] & np.isfinite(top[:, :k])).tolist():
            if not self.done[i]:
                ended = [] if token[i, j] == EOS else [int(token[i, j])]  # the last step's token stays
                ids = self.seqs[i * k + beam[i, j]].tolist() + ended
                score = float(top[i, j]) / norm
                self.finished[i].append((score, ids))
                (heapq.heappush if len(self.kept[i]) < k else heapq.heappushpop)(self.kept[i], score)
        # the first k extensions that do not end, in rank order (a stable sort puts them first)
        keep = np.argsort(is_eos.astype(np.int8), axis=1, kind="stable")[:, :k]
        self.scores = np.take_along_axis(top, keep, 1)
        self.scores[np.take_along_axis(is_eos, keep, 1)] = -np.inf
        rows = (np.arange(b)[:, None] * k + np.take_along_axis(beam, keep, 1)).reshape(-1)
        self.seqs = np.concatenate([self.seqs[rows], np.take_along_axis(token, keep, 1).reshape(-1, 1)], 1)
        self.step += 1
        if self.early_stopping:
            reachable = max(norm, self.steps**self.penalty)  # the largest norm a live hypothesis can get
            for i in range(b):
                if not self.done[i] and len(self.kept[i]) == k:  # the worst of the best k: the heap's top
                    self.done[i] = float(self.scores[i, 0]) / reachable <= self.kept[i][0]
        return rows

    def best(self) -> list[list[int]]:
        """The best finished hypothesis of each source (EOS cut; [] when none finished)."""
        return [strip_eos(max(f)[1]) if f else [] for f in self.finished]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis in float32 (-inf logits stay -inf)."""
    x = logits.astype(np.float32, copy=False)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
