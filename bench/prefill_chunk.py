"""Chunked prefill: how long running streams stall while a long prompt is read, at prefill_chunk 0 (a
whole prompt per pass), 64, 128 and 256 tokens.

One GPT bundle (dim 256, 4 layers, 4 heads, context 1024, a 2,000-token byte-level BPE on a generated
news corpus of 8,000 texts, ~70k tokens; pretrained for one step: speed does not depend on the
weights) is served by four `largo serve`-style subprocesses (`serve_bundle`, torch runtime, 2 torch
threads each, a null sink, `max_batch` 8 rows), identical but for `prefill_chunk`:

    chunk 0     a joining prompt is read in one forward pass, which every running stream waits for
    chunk N     at most N prompt tokens are read between two decoding steps of the running rows, the
                prompt with the fewest tokens left first (`deploy/decode_loop.py`, `DecodeLoop._prefill`);
                256 is `largo serve`'s default

Subprocesses rather than `serve_in_thread`: the client (httpx, parsing every SSE event and stamping its
arrival) then runs in another interpreter, so its Python work neither takes the server's GIL between
decoding steps nor is delayed by it; the timestamps are what a remote client would see, less the
network. The four servers start once and wait idle (the decode loop blocks) while another is measured.

One run, against one server: 4 streaming clients POST /generate at once (`stream: true`, a ~16-token
prompt each, 96 new tokens, temperature 0, `stop_at_eot` false) and stamp each `token` event; meanwhile
3 "long" requests (a ~900-token prompt cut from the corpus, 8 new tokens, streamed too, for the time to
their first token) go one after another: long i is sent once the previous one is answered and the first
stream has received 8 + 24·i token events, so every long prompt is read while the streams run, at the
same point of their progress whatever the speed of the machine. Measured per run:

    gap p50/p99/max   the intervals between two token events of one stream, all 4 streams pooled (~380;
                      the streams step together, so one stall is 4 gaps and p99 is mostly the max)
    prefill gaps      the gaps that overlap a long prompt's prefill (a gap ending after a long request was
                      sent and starting before its first token came): how many (all streams, all longs),
                      and the delay per stream per long prompt: their sum less as many typical gaps
                      (the median of the gaps that overlap no prefill)
    long TTFT / lat   a long request's time to its first token event / to its `done` event (mean of 3)
    tokens/s          every generated token (4·96 + 3·8) over the run's wall time
    alone TTFT        after the run, the first long prompt sent again to the idle server (1 new token):
                      nothing waits for it, and the decode loop reads it whole

Greedy decoding makes every variant generate the same texts (chunked reading computes the same logits up
to float rounding); the script checks it, per run, against chunk 0's texts of the same round. One warm-up
run per server, then `--rounds` rounds (3; each runs every server once, in an order rotated by one per
round), a matmul probe (`probe.peak_probe`) after each: the machine is shared and noisy.

    .venv/bin/python bench/prefill_chunk.py             # 3 rounds (~40 s on 2 cores; first run +30 s)
    .venv/bin/python bench/prefill_chunk.py --rounds 5
    .venv/bin/python bench/prefill_chunk.py --quick     # smoke test: 1 round, 48 new tokens (~25 s)

How to read it. The first table has medians over rounds per variant (ms unless marked). Chunk 0's max
gap is about one whole-prompt prefill plus a step; a chunked server's is about one chunk's pass plus a
step, so it falls as the chunk shrinks, and the p99 with it (at chunk 0 the 12 stalled gaps are the top
percent of ~380). The price is the long requests' time to first token: a prompt is read over
ceil(900 / N) passes, each followed by a step of the running rows, so long TTFT grows as the chunk
shrinks. The prefill gaps' count grows too (about 4 streams x 3 longs x (passes + 1)), while the delay,
the stall a stream accumulates per long prompt, stays about one whole prefill or grows: chunking spreads
the same work over more, shorter stalls; it does not remove it. Stream s (the streams' median request
time) and tokens/s show what the extra passes (smaller forward passes, each reading the weights again)
cost in all. The ratio lines divide each round's figure by chunk 0's in the same round, median
[min..max] over rounds: a max-gap ratio well under 1 is the point of the feature, a long-TTFT ratio
above 1 its cost. A note line flags a run whose longest gap came while no long prompt was read (the
machine stalled the server, not the prefill) and long prompts read after the streams had ended.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

import generate_serve
from largo.deploy.generator import TextGenerator
from probe import peak_probe
from serve_load import start_server

OUT = Path(__file__).parent / "out" / "prefill_chunk"
CHUNKS = (0, 64, 128, 256)
SLOTS = 8  # max_concurrent: 4 streams and 1 long at a time fit
STREAMS = 4
SHORT_TOKENS = 16


@dataclass
class Sizes:
    new_tokens: int = 96  # per stream
    long_tokens: int = 900  # per long prompt
    longs: int = 3
    long_new: int = 8

    @property
    def triggers(self) -> list[int]:
        """Token events of the first stream before each long request is sent (8, 32, 56 for 96)."""
        first, spacing = max(2, self.new_tokens // 12), self.new_tokens // 4
        return [first + i * spacing for i in range(self.longs)]


def lm_bundle() -> Path:
    """The benchmark's GPT bundle, context 1024 (reused from an earlier run): ~70k tokens of news text
    (generate_serve's 3,000 texts hold ~26k, leaving a held-out split of barely one window)."""
    return generate_serve.lm_bundle(OUT, context=1024, texts=8000)


def cut(generator: TextGenerator, ids: list[int], start: int, length: int) -> str:
    """The text of about `length` corpus tokens from `start` (a cut inside a character is dropped)."""
    return generator.tokenizer.decode(ids[start : start + length]).strip("\ufffd")


def prompts(generator: TextGenerator, sizes: Sizes) -> tuple[list[str], list[str]]:
    """(STREAMS short prompts, `sizes.longs` long ones), cut from the corpus at fixed places."""
    ids = generator.tokenizer.encode((OUT / "corpus.txt").read_text(encoding="utf-8")).ids
    shorts = [cut(generator, ids, 1000 + i * 997, SHORT_TOKENS) for i in range(STREAMS)]
    room = len(ids) - sizes.long_tokens
    longs = [cut(generator, ids, (7919 + i * 20011) % room, sizes.long_tokens) for i in range(sizes.longs)]
    return shorts, longs


# ------------------------------------------------------------------------------------ one run


class Progress:
    """Token events of one stream so far; `wait(n)` returns once there are n (or the stream ended)."""

    def __init__(self) -> None:
        self.count, self.ended = 0, False
        self.waiters: list[tuple[int, asyncio.Future]] = []

    def tick(self, ended: bool = False) -> None:
        self.count += not ended
        self.ended = self.ended or ended
        for n, fut in list(self.waiters):
            if (self.count >= n or self.ended) and not fut.done():
                fut.set_result(None)
                self.waiters.remove((n, fut))

    async def wait(self, n: int) -> None:
        if self.count >= n or self.ended:
            return
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append((n, fut))
        await fut


async def sse(http: httpx.AsyncClient, url: str, body: dict, progress: Progress | None = None) -> dict:
    """One streamed POST /generate → {sent, times (each token event's arrival), done (its event)}."""
    times: list[float] = []
    done: dict[str, Any] | None = None
    sent = time.perf_counter()
    try:
        async with http.stream("POST", f"{url}/generate", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {(await r.aread())[:200]!r}")
            event = None
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    if event == "token":
                        times.append(time.perf_counter())
                        if progress is not None:
                            progress.tick()
                    elif event == "done":
                        done = json.loads(line[6:])
                    elif event == "error":
                        raise RuntimeError(f"error event: {line[6:200]}")
    finally:
        if progress is not None:
            progress.tick(ended=True)
    if done is None:
        raise RuntimeError("the stream ended without a done event")
    return {"sent": sent, "times": times, "done": done, "end": time.perf_counter()}


def body(prompt: str, new_tokens: int) -> dict:
    return {
        "prompt": prompt,
        "max_new_tokens": new_tokens,
        "temperature": 0.0,
        "stop_at_eot": False,
        "stream": True,
    }


async def _run(url: str, sizes: Sizes, shorts: list[str], longs: list[str]) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=SLOTS, max_keepalive_connections=SLOTS)
    async with httpx.AsyncClient(limits=limits, timeout=300) as http:
        progress = Progress()
        t0 = time.perf_counter()
        streams = [
            asyncio.create_task(sse(http, url, body(p, sizes.new_tokens), progress if i == 0 else None))
            for i, p in enumerate(shorts)
        ]
        answered = []
        for prompt, trigger in zip(longs, sizes.triggers, strict=True):
            await progress.wait(trigger)
            answered.append(await sse(http, url, body(prompt, sizes.long_new)))
        streamed = await asyncio.gather(*streams)
        end = max(x["end"] for x in streamed + answered)
        alone = await sse(http, url, body(longs[0], 1))  # nothing runs: read in passes back to back
    return {"t0": t0, "end": end, "streams": streamed, "longs": answered, "alone": alone}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure(url: str, sizes: Sizes, shorts: list[str], longs: list[str]) -> dict[str, Any]:
    """One run's figures (seconds), and its texts for the parity check."""
    raw = asyncio.run(_run(url, sizes, shorts, longs))
    windows = [(x["sent"], x["times"][0]) for x in raw["longs"]]  # each long prompt's prefill
    gaps, prefill_gaps, clear_gaps = [], [], []
    for s in raw["streams"]:
        for a, b in zip(s["times"], s["times"][1:], strict=False):
            gaps.append(b - a)
            overlaps = any(b > lo and a < hi for lo, hi in windows)
            (prefill_gaps if overlaps else clear_gaps).append(b - a)
    typical = statistics.median(clear_gaps or gaps)
    stream_end = max(s["times"][-1] for s in raw["streams"])
    tokens = sum(x["done"]["tokens"] for x in raw["streams"] + raw["longs"])
    return {
        "p50": pct(gaps, 0.5),
        "p99": pct(gaps, 0.99),
        "max": max(gaps),
        "clear_max": max(clear_gaps, default=0.0),  # the longest gap while no long prompt was read
        "pf_n": len(prefill_gaps),
        # what a stream lost to each long prompt: its prefill-time gaps beyond a gap without prefill
        "extra": (sum(prefill_gaps) - len(prefill_gaps) * typical) / (len(windows) * STREAMS),
        "ttft": statistics.mean(hi - lo for lo, hi in windows),
        "lat": statistics.mean(x["end"] - x["sent"] for x in raw["longs"]),
        "alone": raw["alone"]["times"][0] - raw["alone"]["sent"],
        "stream_s": statistics.median(s["end"] - s["sent"] for s in raw["streams"]),
        "rate": tokens / (raw["end"] - raw["t0"]),
        "overlapped": sum(hi < stream_end for _, hi in windows),  # long prompts read while streams ran
        "events": sum(len(s["times"]) for s in raw["streams"]),
        "tokens": sum(s["done"]["tokens"] for s in raw["streams"]),
        "prompt_tokens": [x["done"]["prompt_tokens"] for x in raw["streams"] + raw["longs"]],
        "truncated": any(x["done"]["prompt_truncated"] for x in raw["streams"] + raw["longs"]),
        "texts": [x["done"]["text"] for x in raw["streams"] + raw["longs"]],
    }


# ------------------------------------------------------------------------------------------ bench


def check_health(url: str, chunk: int) -> None:
    health = httpx.get(f"{url}/health").json()
    if health.get("prefill_chunk") != (chunk or None) or not health.get("batching"):
        raise RuntimeError(f"the chunk {chunk} server reports {health}")


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f}x [{min(xs):.2f}..{max(xs):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round, 48 new tokens, 2 long prompts of ~600")
    args = parser.parse_args()
    sizes = Sizes()
    if args.quick:
        args.rounds, sizes = 1, Sizes(new_tokens=48, long_tokens=600, longs=2)
    torch.set_num_threads(2)
    bundle = lm_bundle()
    generator = TextGenerator.load(bundle)
    shorts, longs = prompts(generator, sizes)
    load = os.getloadavg()[0]
    print(
        f"bundle {bundle} ({generator.info()['parameters']:,} parameters, context {generator.context}); "
        f"{STREAMS} streams x {sizes.new_tokens} new tokens, {sizes.longs} long prompts x "
        f"{sizes.long_new} new tokens sent at stream events {sizes.triggers}; torch {torch.__version__}, "
        f"{os.cpu_count()} cpus, load {load:.1f}",
        flush=True,
    )
    if load > (os.cpu_count() or 1) - 0.5:
        print("  note: other processes are using the CPUs; the ratios are what to read, not the times")
    servers = {
        chunk: start_server(bundle, {"max_batch": SLOTS, "prefill_chunk": chunk}, threads=2)
        for chunk in CHUNKS
    }
    results: dict[int, list[dict[str, Any]]] = {chunk: [] for chunk in CHUNKS}
    try:
        for chunk, (_, url) in servers.items():
            check_health(url, chunk)
            first = measure(url, sizes, shorts, longs)  # warm-up: the cache grows to 8 rows, allocations
        lengths = first["prompt_tokens"]
        print(
            f"prompt tokens (server's count): streams {lengths[:STREAMS]}, longs {lengths[STREAMS:]}"
            f"{' (TRUNCATED)' if first['truncated'] else ''}; token events per stream token "
            f"{first['events'] / first['tokens']:.2f}",
            flush=True,
        )
        for r in range(args.rounds):
            order = list(CHUNKS[r % len(CHUNKS) :] + CHUNKS[: r % len(CHUNKS)])
            for chunk in order:
                results[chunk].append(measure(servers[chunk][1], sizes, shorts, longs))
            print(
                f"  round {r + 1} (order {order}): probe {peak_probe():.0f} GFLOP/s, "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)

    def med(chunk: int, key: str, scale: float = 1000.0) -> float:
        return statistics.median(run[key] for run in results[chunk]) * scale

    print(
        f"\nmedians over {args.rounds} round(s); stream gaps, prefill delay and long TTFT/latency in ms\n"
        f"{'chunk':>5} {'gap p50':>8} {'p99':>7} {'max':>7} {'prefill gaps':>12} {'delay':>6} "
        f"{'long TTFT':>10} {'long lat':>9} {'stream s':>9} {'tokens/s':>9} {'alone TTFT':>11} "
        f"{'same text':>10}"
    )
    base = results[0]
    for chunk in CHUNKS:
        runs = results[chunk]
        pairs = [zip(run["texts"], ref["texts"], strict=True) for run, ref in zip(runs, base, strict=True)]
        same = sum(a == b for texts in pairs for a, b in texts)
        pf_n = statistics.median(run["pf_n"] for run in runs)
        print(
            f"{chunk:>5} {med(chunk, 'p50'):8.1f} {med(chunk, 'p99'):7.1f} {med(chunk, 'max'):7.1f} "
            f"{pf_n:12.0f} {med(chunk, 'extra'):6.0f} {med(chunk, 'ttft'):10.0f} {med(chunk, 'lat'):9.0f} "
            f"{med(chunk, 'stream_s', 1):9.2f} {med(chunk, 'rate', 1):9.0f} {med(chunk, 'alone'):11.0f} "
            f"{same:>4}/{sum(len(run['texts']) for run in runs):<5}"
        )
    for chunk, runs in results.items():
        for r, run in enumerate(runs):
            if run["clear_max"] > 0.5 * run["max"] and run["clear_max"] > 5 * run["p50"]:
                print(
                    f"  note: chunk {chunk} round {r + 1}: a {run['clear_max'] * 1000:.0f} ms gap while no "
                    "long prompt was read (the machine, not the prefill)"
                )
    missed = sum(sizes.longs - run["overlapped"] for runs in results.values() for run in runs)
    if missed:
        print(f"  note: {missed} long prompt(s) were read after the streams ended (no stall to measure)")
    print("\nvs chunk 0, per round (median [min..max])")
    heads = ("max gap", "p99 gap", "long TTFT", "tokens/s", "alone TTFT")
    print(f"{'chunk':>5} " + " ".join(f"{h:>20}" for h in heads))
    for chunk in CHUNKS[1:]:
        cells = [
            spread([run[key] / ref[key] for run, ref in zip(results[chunk], base, strict=True)])
            for key in ("max", "p99", "ttft", "rate", "alone")
        ]
        print(f"{chunk:>5} " + " ".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main()
