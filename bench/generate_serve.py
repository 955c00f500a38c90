"""Serving generations: continuous batching vs a worker thread per generation, on the same server code.

One GPT bundle (dim 256, 4 layers, 4 heads, context 256, a 2,000-token byte-level BPE; pretrained for
one step: speed does not depend on the weights) is served by two `largo serve`-style subprocesses
(`serve_bundle`, 2 torch threads each, a null sink), identical but for `batching`:

    batched    the running generations are rows of one batch, one forward pass per step for all of
               them (`deploy/decode_loop.py`); `max_batch` 16 rows
    threads    each generation runs `TextGenerator.stream_ids` in a worker thread of its own, up to 16
               at once (what `largo serve` did before continuous batching)
    onnx       batched, on ONNX Runtime: the bundle exported with `largo export --format onnx` and
               served with `--runtime onnx` (`lm_onnx.OnnxRows`; no torch in that server)

Clients (1, 4, 16 at once, each posting its next request as soon as the last is answered) send JSON
POST /generate requests: a prompt of 8-64 tokens cut from a generated news corpus, 64 new tokens
sampled at temperature 0.8 with a seed per request, `stop_at_eot` false, so every request makes
exactly 64 tokens. The rounds interleave the two servers (in a rotated order) and the clients, with a
matmul probe between rounds (the machine is shared and noisy). Printed per server and client count:
generated tokens/s, request latency p50/p99, and (batched) the mean rows per decode step from /metrics;
then the batched/threads and onnx/batched throughput ratios per round. Offline ceilings, measured in
this process with the same weights: `generate_ids` on one static batch of 16 prompts of 32 tokens (the
best a server can hope for at 16 clients, where every row starts and ends together) and on one prompt
alone.

    .venv/bin/python bench/generate_serve.py              # 3 rounds (~3 min on 2 idle cores)
    .venv/bin/python bench/generate_serve.py --rounds 5 --new-tokens 128
    .venv/bin/python bench/generate_serve.py --quick      # smoke test: 1 round, 16 new tokens (~40 s)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import torch

import largo
from largo.data.samples import news_rows
from largo.deploy.generator import TextGenerator
from largo.models.gpt import generate_ids
from probe import peak_probe
from serve_load import _drive, start_server

OUT = Path(__file__).parent / "out" / "generate_serve"
CLIENTS = (1, 4, 16)
SLOTS = 16
VARIANTS = {
    "batched": {"max_batch": SLOTS},
    "threads": {"max_batch": SLOTS, "batching": False},
    "onnx": {"max_batch": SLOTS, "runtime": "onnx"},
}


def lm_bundle(out: Path = OUT, context: int = 256, texts: int = 3000) -> Path:
    """The benchmark's GPT bundle, pretrained one step on `texts` generated news texts (reused from an
    earlier run in `out`: speed does not depend on the weights)."""
    done = sorted((out / "runs" / "gen").glob("v*/model.safetensors"))
    if done:
        return done[-1].parent
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(r["text"] for r in news_rows(texts, seed=3)), encoding="utf-8")
    cfg = {
        "name": "gen",
        "runs_dir": str(out / "runs"),
        "data": {"paths": [str(corpus)], "valid": 0.05},
        "tokenizer": {"vocab_size": 2000},
        "model": {"dim": 256, "layers": 4, "heads": 4, "context": context},
        "train": {"steps": 1, "micro_batch": 4, "eval_every": 1, "progress": False, "precision": "fp32"},
    }
    return Path(largo.pretrain(cfg).path)


def exported(bundle: Path) -> None:
    """model.onnx in the bundle (exported and parity-checked once)."""
    if not (bundle / "model.onnx").exists():
        largo.export(bundle, "onnx")


def prompts(generator: TextGenerator, n: int = 64) -> list[str]:
    """n prompts of 8 to 64 tokens, cut from the corpus at seeded places."""
    ids = generator.tokenizer.encode((OUT / "corpus.txt").read_text(encoding="utf-8")).ids
    out = []
    for i in range(n):
        length = 8 + (i * 37) % 57
        start = (i * 7919) % (len(ids) - length)
        out.append(generator.tokenizer.decode(ids[start : start + length]))
    return out


def totals(url: str, name: str) -> tuple[float, float]:
    """(sum, count) of a histogram in /metrics (0, 0 when absent)."""
    text = httpx.get(f"{url}/metrics").text
    found = [re.search(rf"^{name}_{part} (\S+)$", text, re.M) for part in ("sum", "count")]
    return tuple(float(m.group(1)) if m else 0.0 for m in found)  # type: ignore[return-value]


def served(url: str, bodies: list[bytes], clients: int) -> dict[str, Any]:
    n = max(2 * clients, 6)
    before = totals(url, "largo_decode_batch_size")
    seconds, lat, answers = asyncio.run(_drive(url, bodies, clients, n, "raw", "/generate"))
    tokens = sum(json.loads(text)["tokens"] for text in answers)
    after = totals(url, "largo_decode_batch_size")
    steps = after[1] - before[1]
    return {
        "rate": tokens / seconds,
        "lat": lat,
        "rows": (after[0] - before[0]) / steps if steps else None,
    }


def offline(generator: TextGenerator, batch: int, new_tokens: int) -> float:
    """Tokens/s of `generate_ids` on one static batch of `batch` 32-token prompts (sampled at 0.8)."""
    ids = generator.tokenizer.encode((OUT / "corpus.txt").read_text(encoding="utf-8")).ids
    prompt = torch.tensor([ids[i * 100 : i * 100 + 32] for i in range(batch)])
    sampler = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    steps = sum(
        1
        for _ in generate_ids(
            generator.model, prompt, new_tokens, temperature=0.8, top_k=50, generator=sampler
        )
    )
    return batch * steps / (time.perf_counter() - t)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="1 round, 16 new tokens")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.new_tokens = 1, 16
    torch.set_num_threads(2)
    bundle = lm_bundle()
    exported(bundle)
    generator = TextGenerator.load(bundle)
    texts = prompts(generator)
    bodies = [
        json.dumps(
            {
                "prompt": p,
                "max_new_tokens": args.new_tokens,
                "temperature": 0.8,
                "seed": i,
                "stop_at_eot": False,
            }
        ).encode()
        for i, p in enumerate(texts)
    ]
    load = os.getloadavg()[0]
    print(
        f"bundle {bundle} ({generator.info()['parameters']:,} parameters), {args.new_tokens} new tokens per "
        f"request, torch {torch.__version__}, {os.cpu_count()} cpus, load {load:.1f}"
    )
    if load > (os.cpu_count() or 1) - 0.5:
        print("  note: other processes are using the CPUs; the ratios are what to read, not the rates")
    servers = {name: start_server(bundle, opts, threads=2) for name, opts in VARIANTS.items()}
    results: dict[tuple[str, int], list[dict]] = {}
    try:
        for _, url in servers.values():  # warm-up: first requests pay for allocations
            served(url, bodies, 4)
        for r in range(args.rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for clients in CLIENTS:
                for name in order:
                    results.setdefault((name, clients), []).append(served(servers[name][1], bodies, clients))
            print(
                f"  round {r + 1}: probe {peak_probe():.0f} GFLOP/s, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    ceiling = {b: offline(generator, b, args.new_tokens) for b in (1, SLOTS)}
    print(f"\n{'server':<9} {'clients':>7} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7} {'rows/step':>9}")
    for (name, clients), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lat = [x for run in runs for x in run["lat"]]
        rows = [run["rows"] for run in runs if run["rows"] is not None]
        shown = f"{statistics.median(rows):9.1f}" if rows else f"{'-':>9}"
        rate = statistics.median(run["rate"] for run in runs)
        print(f"{name:<9} {clients:>7} {rate:9.0f} {pct(lat, 0.5):7.2f} {pct(lat, 0.99):7.2f} {shown}")
    for a, b in (("batched", "threads"), ("onnx", "batched")):
        print(f"\n{a} / {b}, tokens/s per round (median [min..max]):")
        for clients in CLIENTS:
            ratios = [
                x["rate"] / y["rate"]
                for x, y in zip(results[(a, clients)], results[(b, clients)], strict=True)
            ]
            spread = f"[{min(ratios):.2f}..{max(ratios):.2f}]"
            print(f"  {clients:>2} clients: {statistics.median(ratios):.2f}x {spread}")
    best = statistics.median(run["rate"] for run in results[("batched", SLOTS)])
    print(
        f"\noffline generate_ids: batch 1 {ceiling[1]:.0f} tokens/s, static batch {SLOTS} "
        f"{ceiling[SLOTS]:.0f} tokens/s;\nbatched server at {SLOTS} clients / static batch: "
        f"{best / ceiling[SLOTS]:.2f}"
    )


if __name__ == "__main__":
    main()
