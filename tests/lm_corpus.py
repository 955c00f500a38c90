"""Small generated corpora for the language-model tests (English and Chinese, no downloads)."""

from __future__ import annotations

import random
from pathlib import Path

EN_WORDS = (
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "the",
    "dog",
    "ran",
    "to",
    "the",
    "park",
    "while",
    "birds",
    "sang",
    "songs",
    "of",
    "joy",
    "under",
    "old",
    "trees",
)
ZH_SENTENCES = [
    "今天天气很好，我们去公园散步。",
    "明天下雨，我们在家看书。",
    "经济发展需要科技创新。",
    "这场比赛非常精彩，球迷很高兴。",
]


def write_corpus(folder: Path, lines: int = 3000, seed: int = 0, encoding: str = "utf-8") -> Path:
    """A .txt corpus mixing random English word sequences and Chinese sentences; returns its path."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.txt"
    with open(path, "w", encoding=encoding) as f:
        for i in range(lines):
            if i % 3 == 2:
                f.write("".join(rng.choice(ZH_SENTENCES) for _ in range(2)) + "\n")
            else:
                f.write(" ".join(rng.choice(EN_WORDS) for _ in range(10)) + ".\n")
    return path


def tiny_lm_config(corpus: Path | list[Path], runs: Path, **train: object) -> dict:
    """A pretraining config small enough for a test: ~30k parameters, 64-token context."""
    paths = [str(p) for p in corpus] if isinstance(corpus, list) else [str(corpus)]
    return {
        "name": "lm",
        "runs_dir": str(runs),
        "data": {"paths": paths, "valid": 0.1},
        "tokenizer": {"vocab_size": 300},
        "model": {"dim": 32, "layers": 2, "heads": 2, "context": 64},
        "train": {
            "steps": 40,
            "micro_batch": 8,
            "eval_every": 20,
            "checkpoint_every": 20,
            "progress": False,
            "precision": "fp32",
            **train,
        },
    }
