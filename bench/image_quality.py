"""Image quality: largo's default CNN on Fashion-MNIST beside a scikit-learn LogisticRegression.

The data is Debian's `dataset-fashion-mnist` (70,000 real 28x28 images: the official 60,000 train and
10,000 test, as idx-ubyte .gz files under /usr/share/datasets/fashion-mnist/; `make bench-data`
installs it; FASHION_MNIST_DIR points elsewhere). The script writes it out once, cached under
bench/out/fashion-mnist/ (git-ignored):

    train/<class>/<n>.png, test/<class>/<n>.png    image folders, one sub-folder per class
    train.parquet, test.parquet                     tables: `image` (path relative to the file) + `label`

then trains with the config `largo.api.infer_config(folder, "label")` proposes (the defaults a user
gets from `largo train folder --target label`), except that the official test set is the test split
(data.test = the test folder or table) and valid stays a 0.1 fraction of train. The baseline is a
LogisticRegression on the pixels scaled to [0, 1], trained on the same train rows (all of them: it
needs no validation split) and scored on the same test rows.

    .venv/bin/python bench/image_quality.py                    # defaults, the real run (~20 min, 2 cores)
    .venv/bin/python bench/image_quality.py --limit 3000 --epochs 2       # a quick check (~1-2 min)
    .venv/bin/python bench/image_quality.py --source table --limit 3000 --epochs 2
    .venv/bin/python bench/image_quality.py --skip-baseline --set inputs.0.augment.crop=2   # try a default
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

RAW_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
OUT_DIR = Path(__file__).resolve().parent / "out"
DATA_DIR = OUT_DIR / "fashion-mnist"
# the official label order 0..9; folder-safe names (the dataset's "T-shirt/top" has a slash)
CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
GOAL = 0.92
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


# ------------------------------------------------------------------------------------------- data


def read_idx(path: Path) -> np.ndarray:
    """An idx-ubyte file (optionally .gz) → numpy array; the header gives dtype and shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:  # 0x08 = unsigned byte, the only type Fashion-MNIST uses
        raise ValueError(f"{path}: not an idx-ubyte file (magic {data[:4].hex()})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_raw(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels uint8 [n]) of the official split."""
    images, labels = (RAW_DIR / name for name in FILES[split])
    if not images.exists():
        sys.exit(f"{images} not found: `make bench-data`, or set FASHION_MNIST_DIR to the idx files' folder")
    return read_idx(images), read_idx(labels)


def write_split(split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write <split>/<class>/<n>.png and <split>.parquet once; a marker file says the write finished."""
    done = DATA_DIR / f".{split}-complete"
    if done.exists():
        return
    t = time.perf_counter()
    for name in CLASSES:
        (DATA_DIR / split / name).mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        rel = f"{split}/{CLASSES[y]}/{i:05d}.png"
        Image.fromarray(img, mode="L").save(DATA_DIR / rel)
        paths.append(rel)
    table = pa.table({"image": paths, "label": [CLASSES[y] for y in labels]})
    pq.write_table(table, DATA_DIR / f"{split}.parquet")
    done.touch()
    print(f"wrote {len(paths):,} {split} images and {split}.parquet in {time.perf_counter() - t:.0f} s")


def limited_train(source: str, n: int, seed: int) -> Path:
    """A train subset of n rows (a seeded, class-balanced-in-expectation sample), cached by n."""
    table = pq.read_table(DATA_DIR / "train.parquet")
    keep = np.sort(np.random.default_rng(seed).permutation(table.num_rows)[:n])
    subset = table.take(pa.array(keep))
    if source == "table":  # beside train.parquet, so the relative image paths still resolve
        path = DATA_DIR / f"train-limit{n}.parquet"
        if not path.exists():
            pq.write_table(subset, path)
        return path
    folder = DATA_DIR / f"train-limit{n}"
    if not (folder / ".complete").exists():
        for rel in subset.column("image").to_pylist():
            dst = folder / Path(rel).relative_to("train")
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                os.link(DATA_DIR / rel, dst)  # hard links: no copies of the pixels
        (folder / ".complete").touch()
    return folder


def train_pixels(train_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The pixels and labels of the rows a train folder or table holds, from the raw arrays."""
    images, labels = load_raw("train")
    if train_path == DATA_DIR / "train" or train_path == DATA_DIR / "train.parquet":
        return images, labels
    if train_path.is_dir():
        index = sorted(int(p.stem) for p in train_path.rglob("*.png"))
    else:
        index = sorted(int(Path(p).stem) for p in pq.read_table(train_path).column("image").to_pylist())
    return images[index], labels[index]


# ---------------------------------------------------------------------------------------- models


def logistic_baseline(train_path: Path, max_iter: int) -> dict[str, float]:
    """LogisticRegression (lbfgs) on pixels / 255: test accuracy, macro-F1 and minutes."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    x, y = train_pixels(train_path)
    x_test, y_test = load_raw("test")
    t = time.perf_counter()
    clf = LogisticRegression(max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x.reshape(len(x), -1) / 255.0, y)
    pred = clf.predict(x_test.reshape(len(x_test), -1) / 255.0)
    return {
        "accuracy": float(accuracy_score(y_test, pred)),
        "f1_macro": float(f1_score(y_test, pred, average="macro")),
        "minutes": (time.perf_counter() - t) / 60,
        "train_rows": len(x),
    }


def largo_run(train_path: Path, test_path: Path, args: argparse.Namespace) -> dict:
    """Train largo's inferred default config; returns test metrics, minutes and the resolved config."""
    import largo
    from largo.api import infer_config
    from largo.config import apply_overrides

    cfg, inferred = infer_config(train_path, "label", name="fashion-mnist")
    d = cfg.model_dump(mode="json")
    d["runs_dir"] = str(OUT_DIR / "runs")
    d["data"].update(train=str(train_path), test=str(test_path), valid=0.1)
    if args.epochs is not None:
        d["train"]["epochs"] = args.epochs
    if args.precision is not None:
        d["train"]["precision"] = args.precision
    apply_overrides(d, args.set)
    cfg = largo.validate_config(d)
    shown = {k: d[k] for k in ("inputs", "model", "train")}
    overrides = f", overrides: {' '.join(args.set)}" if args.set else ""
    print(f"largo config (inferred defaults{overrides}):", json.dumps(shown))
    t = time.perf_counter()
    result = largo.train(cfg)
    minutes = (time.perf_counter() - t) / 60
    test = result.test["label"]
    history = result.metrics["history"]
    return {
        "accuracy": float(test["accuracy"]),
        "f1_macro": float(test["f1_macro"]),
        "minutes": minutes,
        "train_minutes": result.metrics["train_time_s"] / 60,
        "epochs_run": len(history),
        "best_epoch": result.metrics["best_epoch"],
        "splits": result.metrics["splits"],
        "history": history,
        "path": str(result.path),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source",
        choices=["folder", "table"],
        default="folder",
        help="train from the image folders or from the parquet tables of image paths",
    )
    parser.add_argument("--epochs", type=int, default=None, help="override the default epochs")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="override fp32")
    parser.add_argument("--limit", type=int, default=None, help="train on a random subset of N train rows")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    parser.add_argument("--lr-max-iter", type=int, default=100, help="LogisticRegression max_iter")
    parser.add_argument("--skip-baseline", action="store_true", help="only train largo")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a config value after inference, e.g. inputs.0.augment.crop=2",
    )
    args = parser.parse_args()

    # 1. data: raw idx → image folders and parquet tables, once
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for split in FILES:
        write_split(split, *load_raw(split))
    if args.limit:
        train_path = limited_train(args.source, args.limit, args.seed)
    else:
        train_path = DATA_DIR / ("train" if args.source == "folder" else "train.parquet")
    test_path = DATA_DIR / ("test" if args.source == "folder" else "test.parquet")
    print(f"train: {train_path}\ntest:  {test_path}")

    # 2. the baseline first (it takes a minute or two), then largo; never both at once on 2 cores
    base = None
    if not args.skip_baseline:
        base = logistic_baseline(train_path, args.lr_max_iter)
        print(
            f"LogisticRegression: accuracy {base['accuracy']:.4f}, macro-F1 {base['f1_macro']:.4f}, "
            f"{base['minutes']:.1f} min on {base['train_rows']:,} rows",
            flush=True,
        )
    res = largo_run(train_path, test_path, args)

    # 3. report
    print(f"\n{'model':<28} {'accuracy':>9} {'macro-F1':>9} {'minutes':>8}")
    print(f"{'largo default CNN':<28} {res['accuracy']:>9.4f} {res['f1_macro']:>9.4f} {res['minutes']:>8.1f}")
    if base:
        print(
            f"{'LogisticRegression (lbfgs)':<28} {base['accuracy']:>9.4f} {base['f1_macro']:>9.4f} "
            f"{base['minutes']:>8.1f}"
        )
    print(
        f"largo: {res['epochs_run']} epochs (best {res['best_epoch']}), "
        f"training {res['train_minutes']:.1f} min, splits {res['splits']}, bundle {res['path']}"
    )
    summary = OUT_DIR / f"image_quality-{args.source}{f'-limit{args.limit}' if args.limit else ''}.json"
    summary.write_text(json.dumps({"args": vars(args), "largo": res, "logistic": base}, indent=1))
    versus = f" vs LogisticRegression {base['accuracy']:.3f}" if base else ""
    print(f"Fashion-MNIST: largo default CNN accuracy {res['accuracy']:.3f} (goal >= {GOAL}){versus}")


if __name__ == "__main__":
    main()
