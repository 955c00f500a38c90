"""Seq2seq runtimes side by side: one bundle on torch fp32, torch bf16, ONNX Runtime fp32 and int8.

Bundle: `largo.train` on `write_number_pairs(n=3,000)` (English number words → Chinese numerals,
"three thousand seventy-eight" → "三千零七十八"; valid 5%, test 5%): shared byte-level BPE (vocabulary
≤ 1,000, sources ≤ 32 tokens, targets ≤ 24), a `Seq2SeqTransformer` of dim 128, 2 encoder + 2 decoder
layers, 4 heads, dropout 0.1; 8 epochs, batch 32, AdamW lr 5e-4, 20% warmup + cosine, clipping at 1.0.
(lr 2e-3, the e2e tests' rate for dim 64, collapses at dim 128: the loss stalls at ~3.2 and every source
gets the same output, chrF ~13; `--lr 2e-3` shows it. `--quick` keeps 2e-3 for its dim 64.)
`--bundle PATH` reuses a seq2seq bundle instead (its ONNX files are written again). Then
`largo.export(path, "onnx", "int8")` writes encoder/decoder .onnx and their int8 versions, and the
script prints the parity the export checked (its export.json; a failed check is printed, not fatal;
a bundle whose training file is gone is checked on the test pairs below).

Runtimes, all in this process on the CPU, `--threads` threads each (torch's, ONNX Runtime's intra-op):

    torch        `Translator.load(path)`: eager fp32 with the KV cache
    torch-bf16   `Translator.load(path, precision="bf16")`: weights and cache in bf16
    onnx         `OnnxTranslator(path, "onnx", threads)`: the two graphs on ONNX Runtime, numpy beams
    onnx-int8    `OnnxTranslator(path, "onnx-int8", threads)`: the same, dynamic int8 weights

Test sources: 256 numbers of `number_pairs(..., seed=123)` that are not in the training file (train,
valid and test rows: ~30% of `number_pairs(256, seed=123)` are, so those are skipped) → references.
Metrics:

    beam      `translate(sources, batch_size=32)`: the bundle's beams (4) in length-sorted batches of
              32, as `largo predict` runs it → sources/s
    greedy    the same with beams=1, 4 passes (one takes ~0.1 s) → sources/s
    rows-1    greedy continuous-batch decoding as the server runs it (`export_lm.decode_speed`, the
              runtime's `decode_rows`; 16 new tokens per row whether or not EOS came, reading the source
              included): the first 64 test sources one at a time → tokens/s over the 64 calls
    rows-16   the first 128 test sources as 8 batches of 16 rows → tokens/s over the 8 calls

Quality (once per runtime: every round's outputs are checked to be the same): BLEU (sacrebleu, zh),
chrF and exact match of the beam and greedy outputs against the references, and how many equal torch
fp32's. The machine is shared and noisy: after one warm-up, every round reads the peak probe (a fixed
matmul) and runs each metric on every runtime in a rotated order; the script prints medians, the median
and range of the per-round ratios to torch, and per metric the fastest runtime whose beam chrF is within
1 point of torch's.

    .venv/bin/python bench/seq2seq_onnx.py                # train 8 epochs, 5 rounds (~1 min on 2 idle cores)
    .venv/bin/python bench/seq2seq_onnx.py --threads 1    # when other processes hold the cores
    .venv/bin/python bench/seq2seq_onnx.py --bundle runs/numbers/v1 --rounds 7
    .venv/bin/python bench/seq2seq_onnx.py --quick        # smoke test: 800 pairs, dim 64, 4 epochs, 2 rounds
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import largo
from largo.config_seq2seq import Seq2SeqConfig
from largo.data.readers import DataError
from largo.data.samples import number_pairs, write_number_pairs
from largo.deploy.export_lm import decode_speed
from largo.deploy.metadata import EXPORT_RECORD, ParityError, is_seq2seq_bundle, read_json
from largo.deploy.seq2seq_onnx import OnnxTranslator
from largo.deploy.translator import Translator, read_seq2seq_config
from largo.evaluate.metrics import generation_metrics
from probe import peak_probe

RUNTIMES = ("torch", "torch-bf16", "onnx", "onnx-int8")
BASE = "torch"
METRICS = {"beam": "sources/s", "greedy": "sources/s", "rows-1": "tok/s", "rows-16": "tok/s"}
TEST_SOURCES = 256
TEST_SEED = 123
BATCH = 32  # translate()'s batches
GREEDY_PASSES = 4  # over the test sources, per greedy measurement
ROWS = {"rows-1": (1, 64), "rows-16": (16, 128)}  # metric → (rows per batch, sources decoded)
NEW_TOKENS = 16  # per row, by decode_speed
CHRF_SLACK = 1.0  # a runtime may win a metric when its beam chrF is within this of torch's
SIZES = {
    "full": {"pairs": 3000, "dim": 128, "epochs": 8, "rounds": 5, "lr": 5e-4},
    "quick": {"pairs": 800, "dim": 64, "epochs": 4, "rounds": 2, "lr": 2e-3},
}


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow largo's log lines (stderr); show them when the block fails."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue())
        raise


# ------------------------------------------------------------------------------------------ bundle


def train_config(data: Path, runs: Path, dim: int, epochs: int, lr: float) -> dict[str, Any]:
    """The run's config (as tests/e2e/test_seq2seq.py's, larger, no decoding per epoch)."""
    return {
        "task": "seq2seq",
        "name": "numbers",
        "runs_dir": str(runs),
        "data": {"train": str(data), "source": "english", "target": "chinese", "valid": 0.05, "test": 0.05},
        "tokenizer": {"vocab_size": 1000, "max_source_length": 32, "max_target_length": 24},
        "model": {"dim": dim, "encoder_layers": 2, "decoder_layers": 2, "heads": 4, "dropout": 0.1},
        "train": {
            "epochs": epochs,
            "batch_size": 32,
            "optimizer": {"name": "adamw", "lr": lr},
            "schedule": {"name": "cosine", "warmup": 0.2},
            "clip_grad_norm": 1.0,
            "eval_generate": 0,
            "progress": False,
        },
    }


def train_bundle(folder: Path, pairs: int, dim: int, epochs: int, lr: float) -> Path:
    """Train the number-pairs bundle in `folder`; prints its time and test scores."""
    data = write_number_pairs(folder / "pairs.tsv", n=pairs)
    t = time.perf_counter()
    with _quiet():
        result = largo.train(train_config(data, folder / "runs", dim, epochs, lr))
    test = result.test.get("chinese", {})
    print(
        f"trained {result.path.name}: {pairs:,} pairs, dim {dim}, {epochs} epochs at lr {lr:g} in "
        f"{time.perf_counter() - t:.0f} s ({result.metrics['train_time_s']:.0f} s in fit); "
        f"test chrF {test.get('chrf', float('nan')):.1f}, exact {test.get('exact_match', float('nan')):.3f}",
        flush=True,
    )
    return result.path


def seen_sources(cfg: Seq2SeqConfig) -> set[str] | None:
    """The sources of the bundle's training file (every row: train, valid, test), or None without it."""
    file = Path(cfg.data.train)
    if not file.is_file() or file.suffix != ".tsv":
        return None
    lines = file.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    if cfg.data.source not in header:
        return None
    column = header.index(cfg.data.source)
    return {row.split("\t")[column] for row in lines[1:] if row}


def test_pairs(cfg: Seq2SeqConfig) -> tuple[list[str], list[str]]:
    """`TEST_SOURCES` numbers of `number_pairs(seed=TEST_SEED)` not in the training file → (sources,
    references); prints how many of `number_pairs(TEST_SOURCES, seed=TEST_SEED)` it had to skip."""
    seen = seen_sources(cfg)
    plain = number_pairs(TEST_SOURCES, seed=TEST_SEED)
    if seen is None:
        print(f"test: number_pairs({TEST_SOURCES}, seed={TEST_SEED}) (no training file to exclude)")
        rows = plain
    else:
        overlap = sum(r["english"] in seen for r in plain)
        rows = [r for r in number_pairs(3 * TEST_SOURCES, seed=TEST_SEED) if r["english"] not in seen]
        rows = rows[:TEST_SOURCES]
        print(
            f"test: {len(rows)} numbers of number_pairs(seed={TEST_SEED}) that the training file lacks "
            f"({overlap} of number_pairs({TEST_SOURCES}, seed={TEST_SEED}) are in it, so skipped)"
        )
    return [r["english"] for r in rows], [r["chinese"] for r in rows]


def write_pairs(file: Path, cfg: Seq2SeqConfig, sources: list[str], references: list[str]) -> Path:
    """The test pairs as a TSV with the bundle's source and target columns."""
    rows = [
        f"{a}\t{b}" for a, b in zip([cfg.data.source, *sources], [cfg.data.target, *references], strict=True)
    ]
    file.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return file


def export(path: Path, fallback: Path) -> dict[str, Any]:
    """`largo.export(path, "onnx", "int8")` (checked on the pairs file `fallback` when the run's test
    split cannot be re-created); prints the parity of each runtime (a failed check is printed, and the
    runtime is benchmarked anyway)."""
    t = time.perf_counter()
    note = ""
    try:
        with _quiet():
            try:
                record = largo.export(path, "onnx", "int8")
            except DataError:
                note = f"  (checked on {fallback.name}: the run's training file is gone)"
                record = largo.export(path, "onnx", "int8", data=fallback)
    except ParityError as exc:
        record, note = read_json(path / EXPORT_RECORD), f"{note}  ({exc})"
    print(f"\n== EXPORT: onnx + int8 in {time.perf_counter() - t:.0f} s{note}")
    for runtime, section in record.get("formats", {}).items():
        p = section["parity"]
        print(
            f"{runtime:<10} {'passed' if p['passed'] else 'FAILED'}  {p['pairs']} pairs, {p['tokens']} "
            f"tokens; perplexity {p['perplexity']['before']:.4f} → {p['perplexity']['after']:.4f} "
            f"(worst {p['perplexity']['increase']:+.2%})"
        )
        for way in ("whole", "rows"):
            w = p[way]
            print(
                f"  {way:<5}  max |Δlogit| {w['max_abs_diff']:.2e}  argmax agreement "
                f"{w['argmax_agreement']:.4f}  perplexity {w['perplexity_increase']:+.2%} "
                f"({w['positions']} positions)"
            )
        o = p["outputs"]
        print(
            f"  outputs ({o['beams']} beams): {o['same']:.0%} same as eager fp32; chrF "
            f"{o['before']['chrf']:.1f} → {o['after']['chrf']:.1f}, BLEU {o['before']['bleu']:.1f} → "
            f"{o['after']['bleu']:.1f}"
        )
    return record


def load_runtimes(path: Path, threads: int | None) -> dict[str, Any]:
    """Each runtime's translator of the bundle (see the module docstring)."""
    return {
        "torch": Translator.load(path),
        "torch-bf16": Translator.load(path, precision="bf16"),
        "onnx": OnnxTranslator(path, "onnx", threads),
        "onnx-int8": OnnxTranslator(path, "onnx-int8", threads),
    }


# ------------------------------------------------------------------------------------------ timing


def rows_speed(gen: Any, prompts: list[list[int]], rows: int) -> float:
    """Tokens/s of `decode_speed` over the prompts in batches of `rows` (total tokens / total time)."""
    seconds = 0.0
    for lo in range(0, len(prompts), rows):
        batch = prompts[lo : lo + rows]
        seconds += len(batch) * NEW_TOKENS / decode_speed(gen, batch, NEW_TOKENS)
    return len(prompts) * NEW_TOKENS / seconds


def runners(
    gens: dict[str, Any], sources: list[str], outputs: dict[str, dict[str, list[list[str]]]]
) -> dict[str, Callable[[str], float]]:
    """metric → (runtime → its rate); beam and greedy outputs are appended to outputs[metric][runtime]."""
    most = max(n for _, n in ROWS.values())
    prompts = {name: [g.encode(s) for s in sources[:most]] for name, g in gens.items()}

    def translate(metric: str, beams: int | None, passes: int) -> Callable[[str], float]:
        def run(name: str) -> float:
            t = time.perf_counter()
            for _ in range(passes):
                out = gens[name].translate(sources, beams=beams, batch_size=BATCH)
            rate = passes * len(sources) / (time.perf_counter() - t)
            outputs[metric][name].append(out)
            return rate

        return run

    def rows(metric: str) -> Callable[[str], float]:
        width, n = ROWS[metric]
        return lambda name: rows_speed(gens[name], prompts[name][:n], width)

    return {"beam": translate("beam", None, 1), "greedy": translate("greedy", 1, GREEDY_PASSES)} | {
        metric: rows(metric) for metric in ROWS
    }


def warm_up(gens: dict[str, Any], sources: list[str]) -> None:
    """Each runtime once through every path (allocator, kernels, lazy imports), on fewer sources."""
    for gen in gens.values():
        gen.translate(sources[: 2 * BATCH], batch_size=BATCH)
        gen.translate(sources[: 2 * BATCH], beams=1, batch_size=BATCH)
        prompts = [gen.encode(s) for s in sources[:16]]
        decode_speed(gen, prompts[:1], NEW_TOKENS)
        decode_speed(gen, prompts, NEW_TOKENS)


def measure(
    gens: dict[str, Any], sources: list[str], rounds: int
) -> tuple[dict[str, dict[str, list[float]]], list[float], dict[str, dict[str, list[list[str]]]]]:
    """`rounds` rounds: a peak probe, then every metric on every runtime in a rotated order → rates
    [metric][runtime] per round, the probes, and the outputs [metric][runtime] of every round."""
    names = list(gens)
    rates = {m: {n: [] for n in names} for m in METRICS}
    outputs: dict[str, dict[str, list[list[str]]]] = {m: {n: [] for n in names} for m in ("beam", "greedy")}
    run = runners(gens, sources, outputs)
    probes = []
    for r in range(rounds):
        probes.append(peak_probe())
        t = time.perf_counter()
        for metric in METRICS:
            for name in names[r % len(names) :] + names[: r % len(names)]:
                rates[metric][name].append(run[metric](name))
        print(
            f"  round {r + 1} ({time.perf_counter() - t:.0f} s, probe {probes[-1]:.0f} GFLOP/s, load "
            f"{_load():.1f}): "
            + "  ".join(f"{m} " + "/".join(f"{rates[m][n][-1]:,.0f}" for n in names) for m in METRICS),
            flush=True,
        )
    return rates, probes, outputs


# ----------------------------------------------------------------------------------------- reports


def probe_line(probes: list[float]) -> str:
    """The peak probes' median and spread, with a hint when the machine's speed swung widely."""
    middle = statistics.median(probes)
    spread = (max(probes) - min(probes)) / middle
    line = (
        f"peak probe {middle:.0f} GFLOP/s (min {min(probes):.0f}, max {max(probes):.0f}; spread {spread:.0%})"
    )
    if spread > 0.5 and torch.get_num_threads() > 1:
        line += "\n  note: the machine's speed swung widely; other processes hold the cores: try --threads 1"
    return line


def quality(
    outputs: dict[str, dict[str, list[list[str]]]], references: list[str]
) -> dict[str, dict[str, dict[str, Any]]]:
    """[decoding][runtime] → BLEU, chrF, exact match of its outputs, how many equal torch's, and the
    rounds whose outputs differ from its first round's."""
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for decoding, by_runtime in outputs.items():
        base = by_runtime[BASE][0]
        scores[decoding] = {}
        for name, per_round in by_runtime.items():
            first = per_round[0]
            s = generation_metrics(first, references)
            s["same_as_torch"] = sum(a == b for a, b in zip(first, base, strict=True))
            s["unsteady_rounds"] = sum(out != first for out in per_round[1:])
            scores[decoding][name] = s
    return scores


def print_quality(scores: dict[str, dict[str, dict[str, Any]]], n: int) -> None:
    print(f"\n== QUALITY of the {n} test outputs (each runtime's first round)")
    print(
        f"{'runtime':<11} {'decoding':<8} {'BLEU':>6} {'chrF':>6} {'exact':>6} {'same as torch':>14} "
        f"{'Δ chrF':>7}"
    )
    for name in RUNTIMES:
        for decoding, by_runtime in scores.items():
            s, base = by_runtime[name], by_runtime[BASE]
            steady = "" if not s["unsteady_rounds"] else f"  ({s['unsteady_rounds']} rounds differ!)"
            print(
                f"{name:<11} {decoding:<8} {s['bleu']:>6.1f} {s['chrf']:>6.1f} {s['exact_match']:>6.3f} "
                f"{s['same_as_torch']:>8} / {n:<3} {s['chrf'] - base['chrf']:>+7.2f}{steady}"
            )


def print_speed(rates: dict[str, dict[str, list[float]]], probes: list[float]) -> dict[str, dict[str, float]]:
    """The medians table and the ratio table; returns the median per-round ratios [metric][runtime]."""
    print(f"\n== SPEED: medians over {len(probes)} rounds (min..max)")
    header = "".join(f"{m + ' ' + u:>26}" for m, u in METRICS.items())
    print(f"{'runtime':<11}{header}")
    for name in RUNTIMES:
        cells = []
        for m in METRICS:
            xs = rates[m][name]
            cells.append(f"{statistics.median(xs):>10,.0f} ({min(xs):,.0f}..{max(xs):,.0f})")
        print(f"{name:<11}" + "".join(f"{c:>26}" for c in cells))
    print(probe_line(probes))
    print(f"\nratio to {BASE} (median of the per-round ratios [min..max])")
    print(f"{'runtime':<11}" + "".join(f"{m:>26}" for m in METRICS))
    ratios: dict[str, dict[str, float]] = {m: {BASE: 1.0} for m in METRICS}
    for name in RUNTIMES:
        if name == BASE:
            continue
        cells = []
        for m in METRICS:
            xs = [a / b for a, b in zip(rates[m][name], rates[m][BASE], strict=True)]
            ratios[m][name] = statistics.median(xs)
            cells.append(f"{ratios[m][name]:.2f}x [{min(xs):.2f}..{max(xs):.2f}]")
        print(f"{name:<11}" + "".join(f"{c:>26}" for c in cells))
    return ratios


def print_summary(
    rates: dict[str, dict[str, list[float]]],
    ratios: dict[str, dict[str, float]],
    scores: dict[str, dict[str, dict[str, Any]]],
) -> None:
    """Per metric: the fastest runtime (by median) whose beam chrF is within CHRF_SLACK of torch's."""
    beam = scores["beam"]
    ok = [n for n in RUNTIMES if beam[n]["chrf"] >= beam[BASE]["chrf"] - CHRF_SLACK]
    for m, unit in METRICS.items():
        by_speed = sorted(RUNTIMES, key=lambda n: -statistics.median(rates[m][n]))
        best = next(n for n in by_speed if n in ok)
        line = (
            f"{m.upper()}: fastest within {CHRF_SLACK:g} chrF of torch: {best} "
            f"({statistics.median(rates[m][best]):,.0f} {unit}, {ratios[m][best]:.2f}x torch; beam chrF "
            f"{beam[best]['chrf']:.1f} vs {beam[BASE]['chrf']:.1f})"
        )
        if by_speed[0] != best:
            gap = beam[BASE]["chrf"] - beam[by_speed[0]]["chrf"]
            line += f"; {by_speed[0]} is faster but its chrF is {gap:.1f} lower"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a seq2seq bundle to use instead of training one")
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds (0: 5, quick 2)")
    parser.add_argument("--lr", type=float, default=0, help="learning rate (0: 5e-4, quick 2e-3)")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads (0: default)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 800 pairs, dim 64, 4 epochs, 2 rounds"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES["quick" if args.quick else "full"]
    rounds = args.rounds or size["rounds"]
    t_start = time.perf_counter()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
        f"load {_load():.1f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="largo-bench-s2s-onnx-") as tmp:
        if args.bundle is not None:
            if not is_seq2seq_bundle(args.bundle):
                parser.error(f"--bundle {args.bundle}: not a seq2seq bundle (its config.yaml)")
            path = args.bundle
        else:
            path = train_bundle(Path(tmp), size["pairs"], size["dim"], size["epochs"], args.lr or size["lr"])
        cfg = read_seq2seq_config(path)
        sources, references = test_pairs(cfg)
        export(path, write_pairs(Path(tmp) / "test-pairs.tsv", cfg, sources, references))
        gens = load_runtimes(path, args.threads or None)
        model = gens[BASE].model
        m = cfg.model
        print(
            f"\nmodel: dim {m.dim}, {m.encoder_layers}+{m.decoder_layers} layers, {m.heads} heads, "
            f"vocabulary {m.vocab_size:,}, context {m.context}: {model.num_parameters():,} parameters; "
            f"beams {cfg.decode.beams}, length penalty {cfg.decode.length_penalty:g}, up to "
            f"{cfg.max_new_tokens} new tokens"
        )
        warm_up(gens, sources)
        print(
            f"\n== TIMING: {rounds} rounds; in each, every metric on {', '.join(RUNTIMES)} (rotated); "
            f"rates {'/'.join(RUNTIMES)}"
        )
        rates, probes, outputs = measure(gens, sources, rounds)
    scores = quality(outputs, references)
    ratios = print_speed(rates, probes)
    print_quality(scores, len(sources))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    print_summary(rates, ratios, scores)


if __name__ == "__main__":
    main()
