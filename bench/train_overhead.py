"""Training-loop overhead: largo's `fit()` vs a minimal hand-written PyTorch loop, side by side.

Both loops train the SAME model (deep copies of one initialized `FeatureModel`) on the SAME encoded
tensors (scikit-learn's digits tiled 12x, ~21.5k rows), batch 64, Adam lr 1e-3, one epoch per
measurement. Variants:

    largo        `largo.train.loop.fit(model, split, None, cfg.train, loss_fn)` for one epoch
    plain        TensorDataset + DataLoader(shuffle=True) + torch.optim.Adam (default, non-fused)
    plain-fused  the same loop with Adam(fused=True): the reference limit of a plain loop

The machine is shared and noisy, so single times mean little: every round runs each variant once in a
rotated order, and the script reports the median examples/s per variant and the median of the per-round
ratios. A fixed matmul ("peak probe") is timed in every round to show how much the machine's speed
drifted while measuring.

    .venv/bin/python bench/train_overhead.py                 # both models, 9 rounds (~1-3 min)
    .venv/bin/python bench/train_overhead.py --models mlp --rounds 7
    .venv/bin/python bench/train_overhead.py --profile       # + where largo's epoch spends its time
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
from largo.data.loader import EncodedSplit
from largo.models.build import build_model
from largo.train.loop import fit
from largo.train.losses import make_loss_fn

GOALS = {"mlp": 1.2, "cnn": 1.1}  # largo / plain (non-fused Adam) examples/s
VARIANTS = ("largo", "plain", "plain-fused")
BATCH_SIZE = 64
LR = 1e-3


# ------------------------------------------------------------------------------------------- data


def _train_section() -> dict:
    return {
        "epochs": 1,
        "batch_size": BATCH_SIZE,
        "optimizer": {"name": "adam", "lr": LR},
        "schedule": {"name": "constant"},
        "progress": False,
        "device": "cpu",
    }


def mlp_case(repeat: int) -> tuple[Config, EncodedSplit, nn.Module, str]:
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


def cnn_case(repeat: int) -> tuple[Config, EncodedSplit, nn.Module, str]:
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


# ----------------------------------------------------------------------------------------- epochs


def largo_epoch(model: nn.Module, split: EncodedSplit, cfg: Config, key: str) -> None:
    """One epoch of largo's loop (its per-epoch log line is swallowed)."""
    loss_fn = make_loss_fn(cfg.outputs)
    with contextlib.redirect_stderr(io.StringIO()):
        fit(model, split, None, cfg.train, loss_fn)


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


@torch.no_grad()
def accuracy(model: nn.Module, split: EncodedSplit, key: str) -> float:
    """Accuracy on the (train) tensors: a sanity check that every variant really trained."""
    model.eval()
    logits = torch.cat([model({key: x})["label"] for x in split.inputs[key].split(4096)])
    return float((logits.argmax(1) == split.targets["label"]).float().mean())


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def peak_probe() -> float:
    """GFLOP/s of a fixed 512x512 matmul: the machine's speed right now."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    return 20 * 2 * 512**3 / (time.perf_counter() - t) / 1e9


# ------------------------------------------------------------------------------------------ bench


def run_case(name: str, case: Callable, repeat: int, rounds: int) -> dict:
    """Interleaved rounds for one model; returns per-variant rates, ratios and probes."""
    cfg, split, model0, key = case(repeat)
    n = len(split)
    runners = {
        "largo": lambda m: largo_epoch(m, split, cfg, key),
        "plain": lambda m: plain_epoch(m, split, key, fused=False),
        "plain-fused": lambda m: plain_epoch(m, split, key, fused=True),
    }
    params = sum(p.numel() for p in model0.parameters())
    print(f"\n== {name.upper()}: {n:,} rows, {params:,} parameters, batch {BATCH_SIZE}, {rounds} rounds")
    for variant in VARIANTS:  # warm-up: allocator, kernels, lazy imports
        runners[variant](copy.deepcopy(model0))
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    probes: list[float] = []
    accs: dict[str, float] = {}
    for r in range(rounds):
        probes.append(peak_probe())
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for variant in order:
            model = copy.deepcopy(model0)
            t = time.perf_counter()
            runners[variant](model)
            rates[variant].append(n / (time.perf_counter() - t))
            if r == rounds - 1:
                accs[variant] = accuracy(model, split, key)
        shown = "  ".join(f"{v}={rates[v][-1]:>8,.0f}" for v in VARIANTS)
        print(
            f"  round {r + 1}: {shown} ex/s   probe {probes[-1]:.0f} GFLOP/s   load {_load():.1f}", flush=True
        )
    ratio = [a / b for a, b in zip(rates["largo"], rates["plain"], strict=True)]
    ratio_fused = [a / b for a, b in zip(rates["largo"], rates["plain-fused"], strict=True)]
    return {"rates": rates, "ratio": ratio, "ratio_fused": ratio_fused, "probes": probes, "accs": accs}


def print_table(name: str, res: dict) -> None:
    """Median, min and max per variant; then the median per-round ratios and the goal line."""
    print(f"\n{name.upper():<12} {'median ex/s':>12} {'min':>9} {'best':>9} {'acc after 1 ep':>15}")
    for v in VARIANTS:
        xs, acc = res["rates"][v], res["accs"][v]
        print(f"{v:<12} {statistics.median(xs):>12,.0f} {min(xs):>9,.0f} {max(xs):>9,.0f} {acc:>15.3f}")
    p = res["probes"]
    print(
        f"peak probe   {statistics.median(p):>12.0f} GFLOP/s (min {min(p):.0f}, max {max(p):.0f}; "
        f"spread {(max(p) - min(p)) / statistics.median(p):.0%})"
    )
    r, rf = res["ratio"], res["ratio_fused"]
    print(f"per-round largo/plain       {' '.join(f'{x:.2f}' for x in r)}")
    print(f"per-round largo/plain-fused {' '.join(f'{x:.2f}' for x in rf)}")
    best = {v: max(res["rates"][v]) for v in VARIANTS}
    print(
        f"best / best: largo/plain {best['largo'] / best['plain']:.2f}, "
        f"largo/plain-fused {best['largo'] / best['plain-fused']:.2f}"
    )


def profile_largo(case: Callable, repeat: int) -> None:
    """cProfile one largo epoch and print the top functions by own time and by cumulative time."""
    import cProfile
    import pstats

    cfg, split, model0, key = case(repeat)
    largo_epoch(copy.deepcopy(model0), split, cfg, key)
    prof = cProfile.Profile()
    prof.enable()
    largo_epoch(copy.deepcopy(model0), split, cfg, key)
    prof.disable()
    stats = pstats.Stats(prof, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(18)
    stats.sort_stats("cumulative").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["mlp", "cnn"], default=["mlp", "cnn"])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per model")
    parser.add_argument("--repeat", type=int, default=12, help="tile the 1,797 digits this many times")
    parser.add_argument("--profile", action="store_true", help="cProfile one largo epoch per model")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = {"mlp": mlp_case, "cnn": cnn_case}
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
        results[name] = run_case(name, cases[name], args.repeat, args.rounds)
        print_table(name, results[name])
        if args.profile:
            profile_largo(cases[name], args.repeat)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    for name, res in results.items():
        r, rf = statistics.median(res["ratio"]), statistics.median(res["ratio_fused"])
        verdict = "ok" if r >= GOALS[name] else "BELOW GOAL"
        print(
            f"{name.upper()}: largo / plain = {r:.2f}x (goal >= {GOALS[name]}) {verdict}; "
            f"largo / plain-fused = {rf:.2f}x"
        )


if __name__ == "__main__":
    main()
