"""Inference runtimes side by side: eager fp32 vs bf16 autocast vs torch.compile vs ONNX Runtime fp32/int8.

Two models, trained here from data that needs no download, exported with `largo export`'s own code
(`largo.deploy.export.export_bundle`: ONNX + int8, each parity-checked):

    digits-cnn    scikit-learn's 1,797 8x8 digits as images, the standard ImageCNN (conv-bn stages),
                  hidden [128], 10 epochs; int8 is static (QDQ, per-channel, calibrated on train rows)
    text-tf       generated Chinese/English news (largo.data.samples.news_rows, 4 classes, 3,000 rows),
                  char tokenizer (max_length 128), Transformer dim 128, 2 layers, 4 heads, 4 epochs;
                  int8 is dynamic (int8 weights, activations quantized on the fly)
    text-tf-256   the same with the default large-data Transformer (dim 256, 4 layers, 4 heads)

Every runtime predicts the SAME held-out rows (the run's test split) through its predictor's
`raw_outputs` at batch 32 (texts sorted by length and cut per batch, as in serving):

    torch          eager fp32 (the reference)
    torch-bf16     bf16 autocast (AMX on this CPU)
    torch-compile  torch.compile(model, dynamic=True)
    onnx           ONNX Runtime, model.onnx (fp32)
    onnx-int8      ONNX Runtime, model.int8.onnx

torch and ONNX Runtime get the same thread count. The machine is shared and noisy: every round runs
each runtime once in a rotated order (after a warm-up), each measurement repeats the pass for ~0.3 s,
and the table shows the median rows/s and the median and range of the per-round ratio to eager fp32.
A fixed matmul ("peak probe") is timed every round to show how much the machine's speed drifted.
The winner is the fastest runtime whose accuracy is within 1 point of eager fp32 (what
`load_predictor(path, "auto")` picks); the goal is >= 3x eager fp32.

    .venv/bin/python bench/export.py                    # both models (~5 min on 2 cores)
    .venv/bin/python bench/export.py --models text-tf --rounds 9
    .venv/bin/python bench/export.py --reuse --threads 1  # time the bundles of the last run again
    .venv/bin/python bench/export.py --quick            # smoke test: tiny training, 2 rounds
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import largo
from largo import api
from largo.data.samples import write_digits_folder, write_news_csv
from largo.deploy.bundle import read_bundle
from largo.deploy.export import export_bundle, outputs_of, runtime_predictors
from probe import peak_probe

OUT = Path(__file__).resolve().parent / "out" / "export"
GOAL = 3.0
MAX_DROP = 0.01
PARTS = ("digits-cnn", "text-tf", "text-tf-256")


def _config(name: str, quick: bool) -> dict:
    """The training config of one part."""
    train = {"batch_size": 64, "optimizer": {"name": "adamw", "lr": 2e-3}, "progress": False}
    if name == "digits-cnn":
        folder = OUT / "data" / "digits"
        if not folder.exists():
            write_digits_folder(folder)
        return {
            "name": name,
            "runs_dir": str(OUT / "runs"),
            "data": {"train": str(folder), "valid": 0.1, "test": 0.1},
            "inputs": [{"name": "image", "type": "image", "encoder": "cnn"}],
            "outputs": [{"name": "label", "type": "category"}],
            "model": {"hidden": [128], "dropout": 0.2},
            "train": {**train, "epochs": 2 if quick else 10},
        }
    csv = write_news_csv(OUT / "data" / "news.csv", n=600 if quick else 3000, seed=5)
    # text-tf-256: the Transformer that `largo train` picks for a large text set (data/infer.py)
    size = {"dim": 256, "layers": 4} if name == "text-tf-256" else {"dim": 128, "layers": 2}
    text = {
        "name": "text",
        "type": "text",
        "tokenizer": {"kind": "char", "max_length": 128},
        "encoder": {"kind": "transformer", **size, "heads": 4},
    }
    return {
        "name": name,
        "runs_dir": str(OUT / "runs"),
        "data": {"train": str(csv), "valid": 0.1, "test": 0.1},
        "inputs": [text],
        "outputs": [{"name": "label", "type": "category"}],
        "model": {"hidden": [128], "dropout": 0.1},
        "train": {**train, "epochs": 1 if quick else 4, "optimizer": {"name": "adamw", "lr": 1e-3}},
    }


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _latest(name: str) -> Path | None:
    """The newest exported bundle of a part from an earlier run, if any."""
    done = [p.parent for p in (OUT / "runs" / name).glob("v*/export.json")]
    return max(done, key=lambda p: int(p.name[1:])) if done else None


def run_part(name: str, rounds: int, quick: bool, reuse: bool) -> dict:
    """Train, export (ONNX + int8, parity-checked), then time every runtime on the test split."""
    t0 = time.perf_counter()
    path = _latest(name) if reuse else None
    if path is None:
        path = largo.train(_config(name, quick)).path
    bundle = read_bundle(path)
    rows, calibration = api.held_out_rows(bundle, None)
    record = export_bundle(bundle, rows, "onnx", "int8", calibration)
    how = "re-exported" if reuse else "trained and exported"
    print(f"{name}: {how} in {time.perf_counter() - t0:.0f} s → {path}")
    for fmt, section in record["formats"].items():
        check = section["parity"]["outputs"]["label"]
        how = section.get("exporter") or section.get("method")
        print(
            f"  {fmt:<10} {how:<12} parity {'ok' if section['parity']['passed'] else 'FAILED'}: "
            f"max_abs_diff {check['max_abs_diff']:.2e}, label agreement {check['label_agreement']:.4f}"
        )
    predictors = runtime_predictors(bundle, batch_size=32, compile=True)
    calls = {n: (lambda p=p: outputs_of(p, rows)) for n, p in predictors.items()}
    t0 = time.perf_counter()
    outputs = {n: call() for n, call in calls.items()}  # warm-up, compilation and the accuracy
    print(f"  warm-up (incl. torch.compile) {time.perf_counter() - t0:.0f} s; {len(rows)} rows, batch 32")
    accuracy = {n: float((o["label"].argmax(-1) == rows.targets["label"]).mean()) for n, o in outputs.items()}
    repeats = {}
    for n, call in calls.items():
        t = time.perf_counter()
        call()
        repeats[n] = max(1, int(0.3 / max(time.perf_counter() - t, 1e-6)))
    names = list(calls)
    speeds: dict[str, list[float]] = {n: [] for n in names}
    probes = []
    for r in range(rounds):
        probes.append(peak_probe())
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            for _ in range(repeats[n]):
                calls[n]()
            speeds[n].append(repeats[n] * len(rows) / (time.perf_counter() - t))
    ratios = {n: [s / e for s, e in zip(speeds[n], speeds["torch"], strict=True)] for n in names}
    return {"rows": rows, "speeds": speeds, "ratios": ratios, "accuracy": accuracy, "probes": probes}


def print_table(name: str, res: dict) -> str:
    """The per-runtime table; returns the winner under the ≤ 1-point rule."""
    acc0 = res["accuracy"]["torch"]
    head = f"{'rows/s':>9} {'min':>9} {'max':>9} {'ratio':>7} {'range':>14} {'acc':>7} {'Δacc':>7}"
    print(f"\n{name.upper():<14} {head}")
    for n, xs in res["speeds"].items():
        rs = res["ratios"][n]
        print(
            f"{n:<14} {statistics.median(xs):>9,.0f} {min(xs):>9,.0f} {max(xs):>9,.0f} "
            f"{statistics.median(rs):>6.2f}x [{min(rs):>5.2f}..{max(rs):>5.2f}] "
            f"{res['accuracy'][n]:>7.4f} {100 * (res['accuracy'][n] - acc0):>+6.2f}p"
        )
    p = res["probes"]
    print(
        f"peak probe     {statistics.median(p):>9.0f} GFLOP/s (min {min(p):.0f}, max {max(p):.0f}; "
        f"spread {(max(p) - min(p)) / statistics.median(p):.0%})"
    )
    allowed = [n for n in res["speeds"] if acc0 - res["accuracy"][n] <= MAX_DROP + 1e-12]
    return max(allowed, key=lambda n: statistics.median(res["ratios"][n]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny training, 2 rounds")
    parser.add_argument("--reuse", action="store_true", help="time the newest bundles of an earlier run")
    parser.add_argument("--threads", type=int, default=0, help="torch and ORT threads; 0: torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime

    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {torch.get_num_threads()} "
        f"threads, {os.cpu_count()} cpus, load {_load():.1f}"
    )
    t0 = time.perf_counter()
    verdicts = []
    for name in args.models:
        res = run_part(name, 2 if args.quick else args.rounds, args.quick, args.reuse)
        win = print_table(name, res)
        ratio = statistics.median(res["ratios"][win])
        verdicts.append(
            f"{name.upper()}: fastest within 1 accuracy point = {win}, {ratio:.2f}x eager fp32 "
            f"(goal >= {GOAL}x) {'ok' if ratio >= GOAL else 'BELOW GOAL'}"
        )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    print("\n".join(verdicts))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
