"""Serving under load: `largo serve`'s dynamic batching against the model's offline speed and against
no batching, driven by 1, 8 and 64 concurrent asyncio clients.

Two bundles, trained here on generated / scikit-learn data (weights do not matter for speed):

    digits       8x8 digit PNGs (base64 in JSON) → cnn-classic → 10 classes: a tiny model, so HTTP,
                 JSON and image decoding dominate
    transformer  Chinese texts → char tokenizer (max_length 128) → Transformer (dim 256, 4 layers,
                 4 heads) → 4 classes: the forward pass dominates. Requests are half short texts
                 (8-16 characters) and half long ones (100-128), in random order

Each bundle is served by separate server processes (`serve_bundle` in a subprocess, torch runtime, the
JSONL sink off) that differ in one option:

    dynamic      max_batch=32, max_wait_ms=5 (the defaults); texts grouped by length (the default)
    batch1       max_batch=1: every request is its own forward pass
    nobucket     (transformer only) dynamic without length grouping: batches mix short and long texts
    h11          dynamic on uvicorn's pure-Python h11 parser and the asyncio loop instead of httptools and
                 uvloop (what `largo[serve]` installs and uvicorn picks when present)

Every round measures, in a rotated order, the offline throughput (one `predictor.predict` call over the
same 512 records in batches of 32, texts sorted by length and each batch cut to its longest: the model's
best batched speed, in this process, no HTTP) and every (server, clients) pair for a fixed number of
requests of one record each. Reported: requests/s, client-side p50 / p99 latency, the mean records per
forward pass (from /metrics), and per-round ratios with their median:

    (a) served/offline   dynamic at 64 clients ÷ offline batched throughput  (goal >= 0.8)
    (b) dynamic/batch1   at 64 clients                                       (goal >= 4)
    (c) bucket gain      dynamic/nobucket at 64 clients: throughput, and the short texts' p50 latency
    (d) httptools gain   dynamic/h11 at 64 clients

The load: N asyncio clients, each with its own keep-alive connection. `--client raw` (default) is a
20-line HTTP/1.1 client on asyncio streams (~0.1 ms CPU a request); `--client httpx` shares one
httpx.AsyncClient, whose own CPU cost capped every server at 60-80 req/s at 64 clients on this 2-core
machine, so it measures httpx, not the server. Client and servers share the machine's cores (2 here,
shared with other work), so HTTP overhead on both sides is part of every served figure. Servers and
the offline run use `--threads` torch threads (default 1: with 2 OpenMP threads on a busy 2-core
machine a request took 3x longer, 22.8 vs 7.5 ms, from spin-waiting).

    .venv/bin/python bench/serve_load.py                 # both models, 3 rounds (~5 min on 2 cores)
    .venv/bin/python bench/serve_load.py --models digits --rounds 2 --requests 256 --client httpx
    .venv/bin/python bench/serve_load.py --quick         # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

import largo
from largo.data.samples import news_rows, write_digits_folder
from largo.deploy.server import free_port, wait_until_serving

OUT = Path(__file__).parent / "out" / "serve"
CLIENTS = (1, 8, 64)
JSON_HEADERS = {"content-type": "application/json"}
GOALS = {"served/offline": 0.8, "dynamic/batch1": 4.0}
SERVER = (
    "import json, sys; from largo.deploy.server import serve_bundle; from largo.deploy.sink import NullSink; "
    "serve_bundle(sys.argv[1], port=int(sys.argv[2]), log_level='warning', "
    "sink=NullSink(), **{'runtime': 'torch', **json.loads(sys.argv[3])})"
)
VARIANTS = {
    "digits": {"dynamic": {}, "batch1": {"max_batch": 1}, "h11": {"http": "h11", "loop": "asyncio"}},
    "transformer": {
        "dynamic": {},
        "batch1": {"max_batch": 1},
        "nobucket": {"group_by_length": False},
        "h11": {"http": "h11", "loop": "asyncio"},
    },
}


# ------------------------------------------------------------------------------------ the bundles


def _train(cfg: dict, name: str) -> Path:
    done = sorted((OUT / "runs" / name).glob("v*/model.safetensors"))
    if done:  # reuse an earlier run's bundle: speed does not depend on the weights
        return done[-1].parent
    return largo.train({**cfg, "name": name, "runs_dir": str(OUT / "runs")}).path


def digits_bundle() -> tuple[Path, list[dict[str, Any]]]:
    """The digits CNN and 512 records: base64 PNGs of real digits."""
    folder = write_digits_folder(OUT / "digits")
    cfg = {
        "data": {"train": str(folder), "valid": 0.1, "test": None},
        "inputs": [{"name": "image", "type": "image", "encoder": "cnn-classic"}],
        "outputs": [{"name": "label", "type": "category"}],
        "train": {"epochs": 1, "progress": False},
    }
    paths = sorted(folder.rglob("*.png"))[:512]
    return _train(cfg, "digits"), [{"image": base64.b64encode(p.read_bytes()).decode()} for p in paths]


def transformer_bundle() -> tuple[Path, list[dict[str, Any]]]:
    """The text Transformer and 512 records, half short and half long texts."""
    data = OUT / "news.jsonl"
    if not data.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in news_rows(800, seed=7)))
    cfg = {
        "data": {"train": str(data), "valid": 0.1, "test": None},
        "inputs": [
            {
                "name": "text",
                "type": "text",
                "tokenizer": {"kind": "char", "max_length": 128},
                "encoder": {"kind": "transformer", "dim": 256, "layers": 4, "heads": 4},
            }
        ],
        "outputs": [{"name": "label", "type": "category"}],
        "train": {"epochs": 1, "batch_size": 64, "progress": False},
    }
    rng = np.random.default_rng(0)
    corpus = "".join(r["text"] for r in news_rows(2000, seed=8, english_share=0.0))
    records = []
    for i in range(512):
        n = int(rng.integers(8, 17)) if i % 2 == 0 else int(rng.integers(100, 129))
        start = int(rng.integers(0, len(corpus) - n))
        records.append({"text": corpus[start : start + n]})
    rng.shuffle(records)
    return _train(cfg, "transformer"), records


# ------------------------------------------------------------------------------------ measuring


def start_server(bundle: Path, options: dict, threads: int) -> tuple[subprocess.Popen, str]:
    """A server subprocess with `threads` torch threads; returns it once /health answers."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    args = [sys.executable, "-c", SERVER, str(bundle), str(port), json.dumps(options)]
    proc = subprocess.Popen(args, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, proc, timeout=120)
    except RuntimeError:
        proc.kill()
        raise
    return proc, url


def batch_totals(url: str) -> tuple[float, float]:
    """(records, forward passes) so far, from the server's batch-size histogram."""
    text = httpx.get(f"{url}/metrics").text
    total = float(re.search(r"^largo_batch_size_sum (\S+)$", text, re.M).group(1))
    count = float(re.search(r"^largo_batch_size_count (\S+)$", text, re.M).group(1))
    return total, count


class RawClient:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: ~20x less CPU per request than httpx,
    whose connection pool made 64 concurrent clients the bottleneck on 2 cores (see --client)."""

    def __init__(self, url: str):
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
        self.writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        lines = (await self.reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        length = next(int(x.split(b":")[1]) for x in lines if x.lower().startswith(b"content-length:"))
        return int(lines[0].split()[1]), await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _drive(
    url: str, bodies: list[bytes], clients: int, n: int, kind: str, path: str = "/predict"
) -> tuple[float, list[float], list[bytes]]:
    """n requests (of one record each to /predict) from `clients` concurrent clients → (seconds,
    latencies, answers)."""
    latencies, answers = [0.0] * n, [b""] * n
    next_i = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:

        async def client() -> None:
            nonlocal next_i
            raw = RawClient(url)
            try:
                while next_i < n:
                    i, next_i = next_i, next_i + 1
                    body = bodies[i % len(bodies)]
                    t = time.perf_counter()
                    if kind == "raw":
                        status, text = await raw.post(path, body)
                    else:
                        r = await http.post(f"{url}{path}", content=body, headers=JSON_HEADERS)
                        status, text = r.status_code, r.content
                    latencies[i] = time.perf_counter() - t
                    if status != 200:
                        raise RuntimeError(f"{status}: {text[:200]!r}")
                    answers[i] = text
            finally:
                raw.close()

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - t0, latencies, answers


def served(url: str, bodies: list[bytes], clients: int, n: int, kind: str) -> dict[str, Any]:
    """One measurement: throughput, latencies, mean batch size."""
    before = batch_totals(url)
    seconds, lat, _ = asyncio.run(_drive(url, bodies, clients, n, kind))
    after = batch_totals(url)
    return {
        "rate": n / seconds,
        "lat": lat,
        "batch": (after[0] - before[0]) / max(after[1] - before[1], 1),
    }


def offline(predictor: Any, records: list[dict], batch: int = 32) -> float:
    """Records/s of one predictor.predict call over all records in batches of `batch` (texts sorted by
    length and each batch cut to its longest, as the predictor does): the model's best batched speed,
    with the same preprocessing as the server's."""
    decoded = [{k: base64.b64decode(v) if k == "image" else v for k, v in r.items()} for r in records]
    predictor.batch_size = batch
    t = time.perf_counter()
    predictor.predict(decoded)
    return len(decoded) / (time.perf_counter() - t)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1000


# ------------------------------------------------------------------------------------------ bench


def run_model(
    name: str, rounds: int, requests: int, threads: int, kind: str, device: str = "cpu"
) -> dict[str, Any]:
    """Start the variants' servers, then measure offline and served throughput in rotated rounds."""
    bundle, records = digits_bundle() if name == "digits" else transformer_bundle()
    bodies = [json.dumps(r, ensure_ascii=False).encode() for r in records]
    predictor = largo.load(bundle, device=device)
    servers = {
        v: start_server(bundle, {**opts, "device": device}, threads) for v, opts in VARIANTS[name].items()
    }
    keys = [("offline", 0)] + [(v, c) for v in servers for c in CLIENTS]
    results: dict[tuple[str, int], list[dict]] = {k: [] for k in keys}
    print(f"\n== {name.upper()}: {bundle}, {len(records)} distinct records, {rounds} rounds", flush=True)
    try:
        for _, url in servers.values():  # warm-up: imports, allocator, first batches
            served(url, bodies, 8, 64, kind)
        offline(predictor, records[:64])
        for r in range(rounds):
            order = keys[r % len(keys) :] + keys[: r % len(keys)]
            for variant, clients in order:
                if variant == "offline":
                    res = {"rate": offline(predictor, records), "lat": [], "batch": 32}
                else:
                    n = requests // 4 if clients == 1 else requests
                    res = served(servers[variant][1], bodies, clients, n, kind)
                results[(variant, clients)].append(res)
            line = "  ".join(f"{v}@{c}={results[(v, c)][-1]['rate']:.0f}" for v, c in keys)
            print(f"  round {r + 1} req/s: {line}", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    return {"results": results, "records": records, "rounds": rounds}


def ratios(name: str, res: dict) -> dict[str, list[float]]:
    """Per-round ratios (a), (b) and for texts (c)."""
    r = res["results"]
    rate = {k: [x["rate"] for x in v] for k, v in r.items()}
    out = {
        "served/offline": [a / b for a, b in zip(rate[("dynamic", 64)], rate[("offline", 0)], strict=True)],
        "dynamic/batch1": [a / b for a, b in zip(rate[("dynamic", 64)], rate[("batch1", 64)], strict=True)],
    }
    if ("h11", 64) in r:
        out["httptools gain"] = [a / b for a, b in zip(rate[("dynamic", 64)], rate[("h11", 64)], strict=True)]
    if ("nobucket", 64) in r:
        out["bucket gain (req/s)"] = [
            a / b for a, b in zip(rate[("dynamic", 64)], rate[("nobucket", 64)], strict=True)
        ]
        n = len(res["records"])
        short = {i for i, rec in enumerate(res["records"]) if len(rec["text"]) <= 16}

        def short_p50(x: dict) -> float:
            return statistics.median(t for i, t in enumerate(x["lat"]) if i % n in short)

        out["bucket gain (short p50)"] = [
            short_p50(b) / short_p50(a) for a, b in zip(r[("dynamic", 64)], r[("nobucket", 64)], strict=True)
        ]
    return out


def print_table(name: str, res: dict) -> None:
    head = f"{'clients':>7} {'req/s':>8} {'min':>7} {'max':>7} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6}"
    print(f"\n{name.upper():<12} {head}")
    for (variant, clients), xs in res["results"].items():
        rates = [x["rate"] for x in xs]
        lat = [v for x in xs for v in x["lat"]]
        p50, p99 = (f"{pct(lat, 50):8.1f}", f"{pct(lat, 99):8.1f}") if lat else (f"{'-':>8}", f"{'-':>8}")
        batch = statistics.mean(x["batch"] for x in xs)
        shown = "-" if variant == "offline" else str(clients)
        print(
            f"{variant:<12} {shown:>7} {statistics.median(rates):8.0f} {min(rates):7.0f} {max(rates):7.0f} "
            f"{p50} {p99} {batch:6.1f}"
        )
    for label, xs in ratios(name, res).items():
        goal = f" (goal >= {GOALS[label]})" if label in GOALS else ""
        print(
            f"{label:<24} median {statistics.median(xs):6.2f}x  [{min(xs):.2f}..{max(xs):.2f}]  "
            f"rounds {' '.join(f'{x:.2f}' for x in xs)}{goal}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=512, help="requests per measurement (1 client: /4)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round, 128 requests")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads in the servers and the offline run"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the servers and the offline run put the model (cpu, cuda, auto)",
    )
    parser.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="HTTP client driving the load (see RawClient)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds, requests = (1, 128) if args.quick else (args.rounds, args.requests)
    load = os.getloadavg()[0]
    print(
        f"{os.cpu_count()} cpus, load {load:.1f}; torch runtime on {args.device}, {args.threads} torch "
        "thread(s) per server "
        f"and offline; one server process per variant; {args.client} HTTP client"
    )
    t0 = time.perf_counter()
    results = {
        name: run_model(name, rounds, requests, args.threads, args.client, args.device)
        for name in args.models
    }
    for name, res in results.items():
        print_table(name, res)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    for name, res in results.items():
        medians = {k: statistics.median(v) for k, v in ratios(name, res).items()}
        verdict = ", ".join(
            f"{k} = {m:.2f}x"
            + (f" ({'ok' if m >= GOALS[k] else 'BELOW GOAL'} {GOALS[k]})" if k in GOALS else "")
            for k, m in medians.items()
        )
        print(f"{name.upper()}: {verdict}")


if __name__ == "__main__":
    main()
