"""Training-loop overhead: largo's `fit()` vs a minimal hand-written PyTorch loop, side by side.

Every loop trains the SAME model (deep copies of one initialized `FeatureModel`) on the SAME encoded
tensors, batch 64, Adam lr 1e-3, one epoch per measurement.

Image parts (`mlp`, `cnn`): scikit-learn's digits tiled 12x (~21.5k rows). Variants:

    largo        `largo.train.loop.fit(model, split, None, cfg.train, loss_fn)` for one epoch
    plain        TensorDataset + DataLoader(shuffle=True) + torch.optim.Adam (default, non-fused)
    plain-fused  the same loop with Adam(fused=True): the reference limit of a plain loop

Text parts (`textcnn`; `transformer`: dim 128, 2 layers, 4 heads): generated token ids, 1,024 texts
of 8..128 tokens (vocabulary 8,000, 4 classes; each text carries 4 ids of its class's 50 topic ids),
stored right-padded to [n, 128] with pad id 0; encoder → combiner [128] → head. Variants:

    largo         fit() with train.length_buckets on (the default)
    largo-nb      fit() with length_buckets off
    plain         hand loop: shuffled index batches, each cut to its longest row (ids[idx, :max_len]),
                  forward, cross entropy, backward, Adam(fused=True) step (largo's optimizer)
    plain-bucket  the same hand loop fed largo's bucketed order (`epoch_order(..., lengths=...)`)
    plain-full    the hand loop without the cut: every batch is the full padded width (what Keras'
                  pad_sequences + fit does)

The hand loops take their order from `largo.data.loader.epoch_order` with largo's seed, so largo-nb and
plain (and largo and plain-bucket) run identical batches: the same padding and the same arithmetic, and
they end with the same weights (checked). Those two pairs measure the loop's cost ("same work"; goal
>= 0.97); largo / largo-nb is what bucketing buys, largo / plain-full what largo gives over the naive loop.

The machine is shared and noisy, so single times mean little: every round runs each variant once in a
rotated order (9 rounds per image part, 5 per text part, after a warm-up epoch on 512 rows), and the
script reports the median examples/s per variant and the median, range and values of the per-round
ratios. A fixed matmul ("peak probe") is timed in every round to show how much the machine's speed
drifted while measuring.

    .venv/bin/python bench/train_overhead.py                   # all four parts (~5-10 min on 2 cores)
    .venv/bin/python bench/train_overhead.py --models textcnn transformer --threads 2
    .venv/bin/python bench/train_overhead.py --models mlp --rounds 7
    .venv/bin/python bench/train_overhead.py --quick           # smoke test: tiny data, 2 rounds
    .venv/bin/python bench/train_overhead.py --profile         # + where largo's epoch spends its time
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from largo.api import encode_split, fit_processors
from largo.config import Config, validate_config
from largo.data.features import CategoryProcessor, ImageProcessor
from largo.data.loader import EncodedSplit, epoch_order
from largo.models.build import FeatureModel, build_model
from largo.models.heads import ClassificationHead
from largo.models.mlp import Combiner
from largo.models.zoo import TEXT_ENCODERS
from largo.train.loop import fit
from largo.train.losses import make_loss_fn
from probe import peak_probe

# largo / plain examples/s: the image parts against the non-fused textbook loop, the text parts against
# the hand loop running the same batches (the two "same work" pairs)
GOALS = {"mlp": 1.2, "cnn": 1.1, "textcnn": 0.97, "transformer": 0.97}
IMAGE_VARIANTS = ("largo", "plain", "plain-fused")
TEXT_VARIANTS = ("largo", "largo-nb", "plain", "plain-bucket", "plain-full")
# (label, numerator, denominator, note); the goal applies to the first pair (image) or first two (text)
IMAGE_RATIOS = (
    ("largo/plain", "largo", "plain", "vs DataLoader + Adam"),
    ("largo/plain-fused", "largo", "plain-fused", "vs DataLoader + fused Adam"),
)
TEXT_RATIOS = (
    ("largo-nb/plain", "largo-nb", "plain", "same batches, no buckets"),
    ("largo/plain-bucket", "largo", "plain-bucket", "same batches, buckets"),
    ("largo/largo-nb", "largo", "largo-nb", "bucketing speed-up"),
    ("largo/plain", "largo", "plain", "largo vs trimmed hand loop"),
    ("largo/plain-full", "largo", "plain-full", "largo vs full-width hand loop"),
)
BATCH_SIZE = 64
LR = 1e-3
SEED = 42  # TrainConfig's default seed: the hand loops use it for the same batch order
VOCAB, MIN_LEN, MAX_LEN, CLASSES, TOPIC_IDS = 8000, 8, 128, 4, 50
TEXT_ENCODER_CONFIGS = {
    "textcnn": {"kind": "cnn", "dim": 128, "filters": 128, "kernel_sizes": [2, 3, 4, 5]},
    "transformer": {"kind": "transformer", "dim": 128, "layers": 2, "heads": 4},
}
Case = tuple[Config, EncodedSplit, nn.Module, str]  # config, data, initialized model, input key
Runner = Callable[[nn.Module, EncodedSplit], None]  # trains a model for one epoch on a split


# ------------------------------------------------------------------------------------------- data


def _train_section() -> dict:
    return {
        "epochs": 1,
        "batch_size": BATCH_SIZE,
        "optimizer": {"name": "adam", "lr": LR},
        "schedule": {"name": "constant"},
        "progress": False,
        "device": "cpu",
        "seed": SEED,
    }


def mlp_case(repeat: int) -> Case:
    """64 pixel columns as number inputs → MLP [128, 64] → `label`; encoded through largo's processors."""
    digits = load_digits()
    x = np.tile(digits.data.astype(np.float64), (repeat, 1))
    y = np.tile(digits.target, repeat)
    columns = {f"p{i}": pa.array(x[:, i]) for i in range(x.shape[1])}
    table = pa.table({**columns, "label": pa.array([str(v) for v in y])})
    cfg = validate_config(
        {
            "name": "bench-mlp",
            "data": {"train": "unused.parquet", "valid": None, "test": None},
            "inputs": [{"name": name, "type": "number"} for name in columns],
            "outputs": [{"name": "label", "type": "category"}],
            "model": {"hidden": [128, 64], "dropout": 0.0},
            "train": _train_section(),
        }
    )
    processors = fit_processors(table, cfg)
    split = encode_split(table, cfg, processors)
    return cfg, split, build_model(cfg, processors), "__numbers__"


def cnn_case(repeat: int) -> Case:
    """Digits as 8x8 uint8 images → cnn-classic (conv32-pool-conv64-pool) → [128] → `label`."""
    digits = load_digits()
    images = [np.round(im * 255 / 16).astype(np.uint8) for im in digits.images]  # 0..16 → 0..255
    labels = pa.array([str(v) for v in digits.target])
    cfg = validate_config(
        {
            "name": "bench-cnn",
            "data": {"train": "unused-folder", "valid": None, "test": None},
            "inputs": [{"name": "image", "type": "image", "encoder": "cnn-classic"}],
            "outputs": [{"name": "label", "type": "category"}],
            "model": {"hidden": [128], "dropout": 0.0},
            "train": _train_section(),
        }
    )
    image_proc = ImageProcessor(cfg.inputs[0])
    image_proc.fit(images)  # a list of arrays: the processor's own decode path, no files needed
    label_proc = CategoryProcessor(cfg.outputs[0], is_output=True)
    label_proc.fit(pa.chunked_array([labels]))
    processors = {"image": image_proc, "label": label_proc}
    x = image_proc.encode(images).repeat(repeat, 1, 1, 1)  # uint8 [n, 1, 8, 8]
    y = label_proc.encode(labels).repeat(repeat)
    split = EncodedSplit({"image": x}, {"label": y})
    return cfg, split, build_model(cfg, processors), "image"


def token_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n texts of MIN_LEN..MAX_LEN ids, right-padded with 0 → ids int64 [n, MAX_LEN], labels [n].

    Filler ids are Zipf-distributed over the vocabulary; each text also carries 4 ids drawn from its
    class's own 50 topic ids (the top of the vocabulary, where filler is rare), so one epoch learns.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(MIN_LEN, MAX_LEN + 1, n)
    labels = rng.integers(0, CLASSES, n)
    ids = (rng.zipf(1.2, (n, MAX_LEN)) - 1) % (VOCAB - 1) + 1  # 1..VOCAB-1; 0 is padding
    topic = VOCAB - CLASSES * TOPIC_IDS + labels[:, None] * TOPIC_IDS + rng.integers(0, TOPIC_IDS, (n, 4))
    where = (rng.random((n, 4)) * lengths[:, None]).astype(np.int64)  # positions inside each text
    ids[np.arange(n)[:, None], where] = topic
    ids[np.arange(MAX_LEN)[None, :] >= lengths[:, None]] = 0
    return torch.from_numpy(ids), torch.from_numpy(labels)


def text_case(name: str, rows: int) -> Case:
    """Generated token ids → the named text encoder → combiner [128] → 4 classes, as build_model does."""
    cfg = validate_config(
        {
            "name": f"bench-{name}",
            "data": {"train": "unused.parquet", "valid": None, "test": None},
            "inputs": [{"name": "text", "type": "text", "encoder": TEXT_ENCODER_CONFIGS[name]}],
            "outputs": [{"name": "label", "type": "category"}],
            "model": {"hidden": [128], "dropout": 0.0},
            "train": _train_section(),
        }
    )
    enc_cfg, m = cfg.inputs[0].encoder, cfg.model
    torch.manual_seed(0)
    encoder = TEXT_ENCODERS[enc_cfg.kind](VOCAB, 0, enc_cfg, m.dropout, MAX_LEN)
    combiner = Combiner(encoder.out_dim, list(m.hidden), m.activation, m.dropout, m.norm)
    head = ClassificationHead(combiner.out_dim, CLASSES)
    model = FeatureModel({"text": encoder}, combiner, {"label": head})
    ids, labels = token_data(rows)
    return cfg, EncodedSplit({"text": ids}, {"label": labels}, pad={"text": 0}), model, "text"


def head_rows(split: EncodedSplit, rows: int) -> EncodedSplit:
    """The first `rows` examples of a split (for warm-up epochs)."""
    return EncodedSplit(
        {k: v[:rows] for k, v in split.inputs.items()},
        {k: v[:rows] for k, v in split.targets.items()},
        split.pad,
        {k: v[:rows] for k, v in split.lengths.items()},
    )


# ----------------------------------------------------------------------------------------- epochs


def largo_epoch(model: nn.Module, split: EncodedSplit, cfg: Config, buckets: bool = True) -> None:
    """One epoch of largo's loop (its per-epoch log line is swallowed)."""
    loss_fn = make_loss_fn(cfg.outputs)
    train_cfg = cfg.train.model_copy(update={"length_buckets": buckets})
    with contextlib.redirect_stderr(io.StringIO()):
        fit(model, split, None, train_cfg, loss_fn)


def plain_epoch(model: nn.Module, split: EncodedSplit, key: str, fused: bool) -> None:
    """One epoch of the textbook loop, feeding the model the same batch dict as largo does."""
    dataset = torch.utils.data.TensorDataset(split.inputs[key], split.targets["label"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)
    opt = (
        torch.optim.Adam(model.parameters(), lr=LR, fused=True)
        if fused
        else torch.optim.Adam(model.parameters(), lr=LR)
    )
    model.train()
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model({key: x})["label"], y)
        loss.backward()
        opt.step()


def plain_text_epoch(model: nn.Module, split: EncodedSplit, trim: bool, buckets: bool) -> None:
    """One epoch of a hand-written text loop over index batches of the padded [n, MAX_LEN] ids.

    The order is largo's (seed, epoch 0), bucketed or not, so the batches equal largo's; `trim` cuts
    each batch to its longest row, as any competent loop does; without it every batch is MAX_LEN wide.
    """
    ids, y, lengths = split.inputs["text"], split.targets["label"], split.lengths["text"]
    n = len(ids)
    order = epoch_order(n, SEED, 0, lengths=lengths if buckets else None, batch_size=BATCH_SIZE)
    opt = torch.optim.Adam(model.parameters(), lr=LR, fused=True)
    model.train()
    for lo in range(0, n, BATCH_SIZE):
        idx = order[lo : lo + BATCH_SIZE]
        x = ids[idx, : int(lengths[idx].max())] if trim else ids[idx]
        opt.zero_grad()
        loss = F.cross_entropy(model({"text": x})["label"], y[idx])
        loss.backward()
        opt.step()


def image_runners(cfg: Config, key: str) -> dict[str, Runner]:
    """The image parts' variants: largo, the DataLoader loop with default Adam, and with fused Adam."""
    return {
        "largo": lambda m, s: largo_epoch(m, s, cfg),
        "plain": lambda m, s: plain_epoch(m, s, key, fused=False),
        "plain-fused": lambda m, s: plain_epoch(m, s, key, fused=True),
    }


def text_runners(cfg: Config, key: str) -> dict[str, Runner]:
    """The text parts' variants (see the module docstring)."""
    return {
        "largo": lambda m, s: largo_epoch(m, s, cfg, buckets=True),
        "largo-nb": lambda m, s: largo_epoch(m, s, cfg, buckets=False),
        "plain": lambda m, s: plain_text_epoch(m, s, trim=True, buckets=False),
        "plain-bucket": lambda m, s: plain_text_epoch(m, s, trim=True, buckets=True),
        "plain-full": lambda m, s: plain_text_epoch(m, s, trim=False, buckets=False),
    }


@torch.no_grad()
def accuracy(model: nn.Module, split: EncodedSplit, key: str) -> float:
    """Accuracy on the (train) tensors: a sanity check that every variant really trained."""
    model.eval()
    logits = torch.cat([model({key: x})["label"] for x in split.inputs[key].split(1024)])
    return float((logits.argmax(1) == split.targets["label"]).float().mean())


@torch.no_grad()
def max_weight_diff(a: nn.Module, b: nn.Module) -> float:
    """Largest absolute difference between the parameters of two copies of one model."""
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# ------------------------------------------------------------------------------------------ bench

TEXT_PARTS = ("textcnn", "transformer")
PARTS = ("mlp", "cnn", *TEXT_PARTS)


def make_case(name: str, size: dict) -> tuple[Case, dict[str, Runner], tuple[str, ...], tuple]:
    """One part's (case, runners, variants, ratio pairs)."""
    if name in TEXT_PARTS:
        case = text_case(name, size["rows"])
        return case, text_runners(case[0], case[3]), TEXT_VARIANTS, TEXT_RATIOS
    case = mlp_case(size["repeat"]) if name == "mlp" else cnn_case(size["repeat"])
    return case, image_runners(case[0], case[3]), IMAGE_VARIANTS, IMAGE_RATIOS


def run_case(name: str, size: dict, rounds: int) -> dict:
    """Interleaved rounds for one part; returns per-variant rates, ratios, probes and sanity checks."""
    (cfg, split, model0, key), runners, variants, pairs = make_case(name, size)
    n = len(split)
    params = sum(p.numel() for p in model0.parameters())
    extra = ""
    if split.lengths:
        lengths = split.lengths[key].float()
        extra = f", {lengths.mean():.0f} tokens/text on average (padded width {split.inputs[key].shape[1]})"
    print(
        f"\n== {name.upper()}: {n:,} rows, {params:,} parameters, batch {BATCH_SIZE}, {rounds} rounds" + extra
    )
    warm = head_rows(split, min(n, 512))
    for variant in variants:  # warm-up: allocator, kernels, lazy imports
        runners[variant](copy.deepcopy(model0), warm)
    rates: dict[str, list[float]] = {v: [] for v in variants}
    probes: list[float] = []
    accs: dict[str, float] = {}
    last: dict[str, nn.Module] = {}
    for r in range(rounds):
        probes.append(peak_probe())
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for variant in order:
            model = copy.deepcopy(model0)
            t = time.perf_counter()
            runners[variant](model, split)
            rates[variant].append(n / (time.perf_counter() - t))
            if r == rounds - 1:
                accs[variant], last[variant] = accuracy(model, split, key), model
        shown = "  ".join(f"{v}={rates[v][-1]:>7,.0f}" for v in variants)
        probe = f"probe {probes[-1]:.0f} GFLOP/s   load {_load():.1f}"
        print(f"  round {r + 1}: {shown} ex/s   {probe}", flush=True)
    ratios = {label: [x / y for x, y in zip(rates[a], rates[b], strict=True)] for label, a, b, _ in pairs}
    notes = {label: note for label, _, _, note in pairs}
    same = {
        f"{a} vs {b}": max_weight_diff(last[a], last[b]) for _, a, b, _ in pairs[:2] if name in TEXT_PARTS
    }
    return {
        "variants": variants,
        "rates": rates,
        "ratios": ratios,
        "notes": notes,
        "probes": probes,
        "accs": accs,
        "same": same,
    }


def print_table(name: str, res: dict) -> None:
    """Median, min and max per variant; then the per-round ratios and their median and spread."""
    print(f"\n{name.upper():<13} {'median ex/s':>12} {'min':>9} {'best':>9} {'acc after 1 ep':>15}")
    for v in res["variants"]:
        xs, acc = res["rates"][v], res["accs"][v]
        print(f"{v:<13} {statistics.median(xs):>12,.0f} {min(xs):>9,.0f} {max(xs):>9,.0f} {acc:>15.3f}")
    p = res["probes"]
    print(
        f"peak probe    {statistics.median(p):>12.0f} GFLOP/s (min {min(p):.0f}, max {max(p):.0f}; "
        f"spread {(max(p) - min(p)) / statistics.median(p):.0%})"
    )
    for label, xs in res["ratios"].items():
        note = f"({res['notes'][label]})"
        print(
            f"{label:<18} {note:<31} median {statistics.median(xs):.3f}  [{min(xs):.3f}..{max(xs):.3f}]  "
            f"rounds {' '.join(f'{x:.3f}' for x in xs)}"
        )
    for pair, diff in res["same"].items():
        print(f"same batches → same weights: {pair} max |Δw| = {diff:.1e}")


def profile_largo(name: str, size: dict) -> None:
    """cProfile one largo epoch and print the top functions by own time and by cumulative time."""
    import cProfile
    import pstats

    (cfg, split, model0, _), *_ = make_case(name, size)
    largo_epoch(copy.deepcopy(model0), split, cfg)
    prof = cProfile.Profile()
    prof.enable()
    largo_epoch(copy.deepcopy(model0), split, cfg)
    prof.disable()
    stats = pstats.Stats(prof, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(18)
    stats.sort_stats("cumulative").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--rounds", type=int, default=0, help="rounds per part; 0: 9 image, 5 text")
    parser.add_argument("--repeat", type=int, default=12, help="tile the 1,797 digits this many times")
    parser.add_argument("--rows", type=int, default=1024, help="generated texts for the text parts")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny data, 2 rounds")
    parser.add_argument("--profile", action="store_true", help="cProfile one largo epoch per model")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = {"repeat": 1, "rows": 256} if args.quick else {"repeat": args.repeat, "rows": args.rows}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
        f"load {_load():.1f}"
    )
    if _load() > (os.cpu_count() or 1) - 0.5:
        print(
            "  note: other processes are using the CPUs; with 2 threads a busy core can stall an epoch "
            "10x (OpenMP spin-waits), so compare rounds, or try --threads 1"
        )
    t0 = time.perf_counter()
    results = {}
    for name in args.models:
        rounds = 2 if args.quick else args.rounds or (5 if name in TEXT_PARTS else 9)
        results[name] = run_case(name, size, rounds)
        print_table(name, results[name])
        if args.profile:
            profile_largo(name, size)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    for name, res in results.items():
        medians = {label: statistics.median(xs) for label, xs in res["ratios"].items()}
        checked = list(medians)[:2] if name in TEXT_PARTS else list(medians)[:1]
        verdict = "ok" if all(medians[c] >= GOALS[name] for c in checked) else "BELOW GOAL"
        goal = ", ".join(f"{c} = {medians[c]:.3f}x" for c in checked)
        rest = ", ".join(f"{label} = {r:.3f}x" for label, r in medians.items() if label not in checked)
        print(f"{name.upper()}: {goal} (goal >= {GOALS[name]}) {verdict}; {rest}")


if __name__ == "__main__":
    main()
