"""The language-model server against a live uvicorn on a free loopback port: POST /generate as JSON and as
server-sent events, agreement with `TextGenerator`, limits (422, 401, 413, 503), errors, disconnects,
metrics, graceful shutdown, and `largo serve` on an LM bundle. One tiny LM is trained once (~10 s)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import largo
from largo.cli import app as cli
from largo.deploy.generate_service import create_generate_app, generate_app_options
from largo.deploy.generator import TextGenerator
from largo.deploy.server import free_port, serve_in_thread, wait_until_serving
from largo.models.prefill import PromptReader

pytestmark = pytest.mark.usefixtures("one_thread")
LARGO = str(Path(sys.executable).with_name("largo"))
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "从前有座山，山里有座庙。",
    "A bird in the hand is worth two in the bush.",
    "今天天气很好，我们去公园散步吧。",
]


@pytest.fixture(scope="module")
def lm_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 26k-parameter GPT pretrained for 30 steps on repeated English and Chinese sentences."""
    tmp = tmp_path_factory.mktemp("lm")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(f"{SENTENCES[i % 4]} {i % 7}" for i in range(2000)), encoding="utf-8")
    cfg = {
        "name": "lm",
        "runs_dir": str(tmp / "runs"),
        "data": {"paths": [str(corpus)], "valid": 0.1},
        "tokenizer": {"vocab_size": 300},
        "model": {"dim": 32, "layers": 1, "heads": 2, "context": 64},
        "train": {"steps": 30, "micro_batch": 8, "eval_every": 30, "progress": False, "precision": "fp32"},
    }
    return Path(largo.pretrain(cfg).path)


@pytest.fixture(scope="module")
def generator(lm_bundle: Path) -> TextGenerator:
    return TextGenerator.load(lm_bundle)


@pytest.fixture(scope="module")
def live(generator: TextGenerator) -> Iterator[str]:
    with serve_in_thread(create_generate_app(generator, max_new_tokens_limit=60)) as url:
        yield url


class Gated:
    """The real generator with test knobs: once a piece of text is out, each further token waits for
    `gate` (so a test can hold a generation in flight); prompt "boom" fails at once, "boom later" at the
    token after its first whole piece of text (whatever the drawn seed's first bytes are).

    With `batching` the service decodes it in its continuous-batching loop (`decode_rows`, the knobs in
    `GatedRows`); without, each generation runs `stream_ids` in a worker thread. `yielded` counts the
    tokens this model produced either way."""

    def __init__(self, generator: TextGenerator, batching: bool = True):
        self.generator = generator
        self.batching = batching
        self.gate = threading.Event()
        self.gate.set()
        self.yielded = 0

    def __getattr__(self, name: str) -> Any:
        if name == "decode_rows":
            if not self.batching:
                raise AttributeError(name)  # the service falls back to a worker thread per generation
            return lambda slots: GatedRows(self, self.generator.decode_rows(slots))
        return getattr(self.generator, name)

    def piece_out(self, ids: list[int]) -> bool:
        text = self.generator.tokenizer.decode(ids, skip_special_tokens=False)
        return bool(text) and not text.endswith("\ufffd")

    def stream_ids(self, prompt: str, *args: Any, **kwargs: Any) -> Iterator[int]:
        if prompt == "boom":
            raise RuntimeError("the model exploded")
        ids: list[int] = []
        for token in self.generator.stream_ids(prompt, *args, **kwargs):
            if self.piece_out(ids) and not self.gate.wait(20):
                raise TimeoutError("the test never opened the gate")
            if prompt == "boom later" and self.piece_out(ids):
                raise RuntimeError("the model exploded mid-way")
            ids.append(token)
            self.yielded += 1
            yield token


class GatedRows:
    """`Gated`'s knobs on the batched rows: each row's prompt and the tokens fed to it are mirrored, so a
    step waits at the gate once a row has a piece of text out, and fails for a "boom later" row then."""

    def __init__(self, gated: Gated, rows: Any):
        self.gated, self.inner = gated, rows
        self.prompts: list[list[int]] = []
        self.fed: list[list[int]] = []
        self.boom = gated.generator.prompt_ids("boom")
        self.boom_later = gated.generator.prompt_ids("boom later")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def reader(self, ids: list[int]) -> PromptReader:
        """The decode loop reads prompts through this: in one pass here, mirrored as `add` mirrors."""
        return PromptReader.at_once(ids, self.add)

    def add(self, ids: list[int]) -> Any:
        if ids == self.boom:
            raise RuntimeError("the model exploded")
        logits = self.inner.add(ids)
        self.prompts.append(ids)
        self.fed.append([])
        self.gated.yielded += 1
        return logits

    def step(self, tokens: Any) -> Any:
        for fed, token in zip(self.fed, list(tokens), strict=True):
            fed.append(token)
        if any(self.gated.piece_out(fed) for fed in self.fed) and not self.gated.gate.wait(20):
            raise TimeoutError("the test never opened the gate")
        if any(
            p == self.boom_later and self.gated.piece_out(f)
            for p, f in zip(self.prompts, self.fed, strict=True)
        ):
            raise RuntimeError("the model exploded mid-way")
        logits = self.inner.step(tokens)
        self.gated.yielded += len(self.fed)
        return logits

    def remove(self, row: int) -> None:
        self.inner.remove(row)
        for mirror in (self.prompts, self.fed):
            mirror[row] = mirror[-1]
            mirror.pop()

    def clear(self) -> None:
        self.inner.clear()
        self.prompts, self.fed = [], []


@pytest.fixture(params=[True, False], ids=["batched", "threads"])
def gated(generator: TextGenerator, request: pytest.FixtureRequest) -> Iterator[Gated]:
    g = Gated(generator, batching=request.param)
    yield g
    g.gate.set()  # never leave a worker thread waiting


def events(body: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each server-sent event in a body."""
    out = []
    for block in body.split("\n\n"):
        if block.strip():
            fields = dict(line.split(": ", 1) for line in block.splitlines())
            out.append((fields["event"], json.loads(fields["data"])))
    return out


def metric(url: str, name: str, headers: dict | None = None, **labels: str) -> float:
    """One sample's value from GET /metrics (0 when absent)."""
    text = httpx.get(f"{url}/metrics", headers=headers).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" (\S+)"
    m = re.search(r"^" + pattern + "$", text, re.M)
    return float(m.group(1)) if m else 0.0


def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until `check()` is true (the server updates some counters just after it answers)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def health(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/health").json()


# ------------------------------------------------------------------------------------ the protocol


def test_health_says_lm_and_predict_points_to_generate(live: str, generator: TextGenerator) -> None:
    h = health(live)
    assert h["task"] == "lm" and h["model"] == "lm" and h["context"] == 64
    assert h["parameters"] == generator.info()["parameters"] and h["active"] == 0 and h["queued"] == 0
    assert h["batching"] is True  # a TextGenerator decodes in the continuous-batching loop
    r = httpx.post(f"{live}/predict", json={"text": "hi"})
    assert r.status_code == 404 and "/generate" in r.json()["detail"]
    page = httpx.get(live)
    assert page.status_code == 200 and "generate" in page.text and "text/event-stream" in page.text


@pytest.mark.parametrize("prompt, stop_at_eot", [("The quick", False), ("从前", True)])
def test_streamed_json_and_in_process_texts_agree(
    live: str, generator: TextGenerator, prompt: str, stop_at_eot: bool
) -> None:
    body = {"prompt": prompt, "max_new_tokens": 40, "seed": 11, "stop_at_eot": stop_at_eot}
    streamed = httpx.post(f"{live}/generate", json={**body, "stream": True})
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    evs = events(streamed.text)
    tokens = [data["text"] for kind, data in evs if kind == "token"]
    assert [kind for kind, _ in evs] == ["token"] * len(tokens) + ["done"]
    done = evs[-1][1]
    plain = httpx.post(f"{live}/generate", json=body)  # no Accept: text/event-stream → JSON
    assert plain.status_code == 200 and plain.headers["content-type"].startswith("application/json")
    expected = generator.generate(prompt, 40, seed=11, stop_at_eot=stop_at_eot)
    assert "".join(tokens) == done["text"] == plain.json()["text"] == expected
    assert done["tokens"] == plain.json()["tokens"] and done["seed"] == 11
    if not stop_at_eot:
        assert len(tokens) >= 2 and done["tokens"] == 40 and done["finish_reason"] == "length"
    by_accept = httpx.post(f"{live}/generate", json=body, headers={"Accept": "text/event-stream"})
    assert events(by_accept.text)[-1][1]["text"] == expected
    # every generation is a row in the bundle's serving/predictions.jsonl, written before it is answered
    logged = [json.loads(line) for line in (generator.path / "serving" / "predictions.jsonl").open()]
    rows = {r["id"]: r for r in logged}
    assert done["version"] is None and "version" not in rows[done["id"]]
    row = rows[plain.json()["id"]]
    assert row["inputs"] == {
        "prompt": prompt,
        "max_new_tokens": 40,
        "temperature": 0.8,
        "top_k": 50,
        "top_p": None,
        "seed": 11,
        "stop_at_eot": stop_at_eot,
    }
    assert row["outputs"]["text"] == expected and row["outputs"]["tokens"] == done["tokens"]
    assert row["outputs"]["finish_reason"] == done["finish_reason"] and row["latency_ms"] > 0


def test_concurrent_generations_are_decoded_together_and_each_gets_its_own_text(
    generator: TextGenerator,
) -> None:
    """Continuous batching: requests that arrive while others run join their batch (the decode-batch
    histogram sees steps of several rows), and each text is the one its settings give alone, greedy or
    sampled, whatever else ran beside it; one that ends early frees its row for a later one."""
    gated = Gated(generator)
    app = create_generate_app(gated, max_concurrent=4, max_queued=8)
    bodies = [
        {"prompt": "The quick", "max_new_tokens": 24, "seed": 1, "stop_at_eot": False},
        {"prompt": "从前", "max_new_tokens": 17, "seed": 2, "temperature": 1.2, "top_k": None},
        {"prompt": "A bird in the hand", "max_new_tokens": 30, "temperature": 0, "stop_at_eot": False},
        {"prompt": "", "max_new_tokens": 9, "seed": 4, "top_p": 0.9, "stop_at_eot": False},
        {"prompt": "Once", "max_new_tokens": 12, "seed": 5},  # waits for a row, then takes one
        {"prompt": "The lazy dog", "max_new_tokens": 0, "seed": 6},
    ]
    answers: dict[int, httpx.Response] = {}
    with serve_in_thread(app) as url:
        gated.gate.clear()  # hold the first steps so the others arrive and queue up for the batch
        threads = [
            threading.Thread(
                target=lambda i=i, b=b: answers.update({i: httpx.post(f"{url}/generate", json=b, timeout=60)})
            )
            for i, b in enumerate(bodies)
        ]
        for t in threads:
            t.start()
        # every request admitted or answered (the 0-token one ends at once, without a step)
        until(lambda: sum(health(url)[k] for k in ("active", "queued")) + len(answers) == len(bodies))
        gated.gate.set()
        for t in threads:
            t.join(60)
        assert sorted(answers) == list(range(len(bodies)))
        rows = metric(url, "largo_decode_batch_size_sum") / metric(url, "largo_decode_batch_size_count")
        assert rows > 2.0, rows  # steps ran several generations at once
        assert metric(url, "largo_decode_batch_size_bucket", le="4") == metric(
            url, "largo_decode_batch_size_count"
        )  # never more rows than max_concurrent
    for i, body in enumerate(bodies):
        out = answers[i].json()
        sampling = {k: body[k] for k in ("seed", "temperature", "top_k", "top_p", "stop_at_eot") if k in body}
        sampling.setdefault("temperature", 0.8)
        alone = generator.generate(body["prompt"], body["max_new_tokens"], **sampling)
        assert answers[i].status_code == 200 and out["text"] == alone, (i, out["text"], alone)
        if not body.get("stop_at_eot", True) or i == 5:
            assert out["tokens"] == body["max_new_tokens"] and out["finish_reason"] == "length"


class Recording:
    """The real generator whose rows log each call: ("read", prompt tokens, tokens read) per pass over a
    prompt and ("step", rows, 0) per step, each step held 5 ms so a generation runs long enough for
    others to join."""

    def __init__(self, generator: TextGenerator):
        self.generator, self.calls = generator, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.generator, name)

    def decode_rows(self, slots: int) -> Any:
        rows, calls = self.generator.decode_rows(slots), self.calls

        class Rows:
            def __getattr__(self, name: str) -> Any:
                return getattr(rows, name)

            def reader(self, ids: list[int]) -> PromptReader:
                inner = rows.reader(ids)

                def run(tokens: list[int], start: int) -> Any:
                    calls.append(("read", len(ids), len(tokens)))
                    return inner.read(len(tokens))

                return PromptReader(ids, run, lambda: None)

            def step(self, tokens: list[int]) -> Any:
                calls.append(("step", len(tokens), 0))
                time.sleep(0.005)
                return rows.step(tokens)

        return Rows()


def test_a_long_prompt_is_read_in_chunks_while_running_generations_step(generator: TextGenerator) -> None:
    """Chunked prefill: prompts that arrive while a generation runs are read at most 4 tokens between two
    of its steps; a short prompt that arrives while a long one is being read goes first; every text is
    the one it gets alone."""
    recording = Recording(generator)
    app = create_generate_app(recording, max_concurrent=4, prefill_chunk=4)
    bodies = {
        "first": {"prompt": "The", "max_new_tokens": 60, "temperature": 0, "stop_at_eot": False},
        "long": {"prompt": SENTENCES[0] + " " + SENTENCES[2], "max_new_tokens": 5, "temperature": 0},
        "short": {"prompt": "A bird", "max_new_tokens": 5, "temperature": 0},
    }
    answers: dict[str, dict] = {}

    def post(name: str) -> threading.Thread:
        body = bodies[name]
        thread = threading.Thread(
            target=lambda: answers.update({name: httpx.post(f"{url}/generate", json=body, timeout=60).json()})
        )
        thread.start()
        return thread

    def steps() -> int:
        return sum(kind == "step" for kind, _, _ in recording.calls)

    app.state.service.decoder.patience = 10**6  # here shortest first always (the next test bounds it)
    with serve_in_thread(app) as url:
        assert health(url)["prefill_chunk"] == 4
        threads = [post("first")]
        until(lambda: steps() >= 3)
        threads.append(post("long"))
        until(lambda: any(kind == "read" and n > 12 for kind, n, _ in recording.calls))
        threads.append(post("short"))
        for t in threads:
            t.join(60)
    for name, body in bodies.items():
        settings = {"temperature": 0, "stop_at_eot": body.get("stop_at_eot", True)}
        assert answers[name]["text"] == generator.generate(body["prompt"], body["max_new_tokens"], **settings)
    calls, long, short = recording.calls, answers["long"]["prompt_tokens"], answers["short"]["prompt_tokens"]
    assert long > 12 > short
    reads = {
        n: [i for i, (kind, m, _) in enumerate(calls) if kind == "read" and m == n] for n in (long, short)
    }
    assert sum(calls[i][2] for i in reads[long]) == long and sum(calls[i][2] for i in reads[short]) == short
    assert len(reads[long]) >= -(-long // 4) and reads[short][-1] < reads[long][-1]  # the short one first
    read = 0  # prompt tokens read between two steps of the running generation: never more than 4
    for kind, _, n in calls[reads[long][0] : reads[long][-1]]:
        read = 0 if kind == "step" else read + n
        assert read <= 4


class _Now:
    """An event loop stand-in for a decode loop driven without a server: events go straight onto the
    generation's queue."""

    def call_soon_threadsafe(self, fn: Callable, *args: Any) -> None:
        fn(*args)


def test_a_flow_of_short_prompts_cannot_starve_a_long_one(generator: TextGenerator) -> None:
    """Shortest first, but a prompt that has waited `patience` steps goes first: with two short requests
    always waiting, a long prompt is still read within patience + its chunks steps."""
    import queue

    from largo.deploy.decode_loop import DecodeLoop
    from largo.deploy.generate_service import GenerateRequest, Generation

    def job(prompt: str, tokens: int) -> Generation:
        settings = GenerateRequest(prompt=prompt, max_new_tokens=tokens, temperature=0, stop_at_eot=False)
        return Generation(settings, 0, _Now(), events=queue.Queue())  # type: ignore[arg-type]

    def first_token(j: Generation) -> None:
        while (event := j.events.get(timeout=30))[0] not in ("token", "done", "error"):
            pass
        assert event[0] != "error", event

    steps, shorts = [0], []
    recording = Recording(generator)
    loop: DecodeLoop | None = None

    def on_step(rows: int, seconds: float) -> None:
        steps[0] += 1
        while sum(j.ended is None for j in shorts) < 2:  # keep two short requests waiting
            shorts.append(job("A bird in the hand", 1))
            loop.submit(shorts[-1])

    loop = DecodeLoop(recording, 4, lambda job, ok: None, on_step=on_step, prefill_chunk=8, patience=3)
    try:
        runner = job("The", 60)
        loop.submit(runner)
        until(lambda: steps[0] >= 3)
        long = job(SENTENCES[0] + " " + SENTENCES[2], 1)
        loop.submit(long)
        start = steps[0]
        first_token(long)
        tokens = len(generator.prompt_ids(long.settings.prompt))
        assert tokens > 24 and len(shorts) > 4  # short prompts kept coming all along
        assert steps[0] - start <= 3 + -(-tokens // 8) + 2, (steps[0] - start, tokens)
        assert runner.ended is None  # read while the runner still ran, not after it
    finally:
        loop.close()
        loop.join(30)


def test_no_seed_draws_one_that_repeats_the_text(live: str) -> None:
    first = httpx.post(f"{live}/generate", json={"prompt": "A bird", "max_new_tokens": 20}).json()
    again = httpx.post(
        f"{live}/generate", json={"prompt": "A bird", "max_new_tokens": 20, "seed": first["seed"]}
    )
    assert again.json()["text"] == first["text"]


def test_a_prompt_longer_than_the_context_keeps_its_end(live: str, generator: TextGenerator) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 20
    r = httpx.post(f"{live}/generate", json={"prompt": prompt, "max_new_tokens": 10, "seed": 1})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["prompt_truncated"] is True and out["prompt_tokens"] == 63
    assert out["text"] == generator.generate(prompt, 10, seed=1)


def test_events_arrive_as_tokens_are_generated(gated: Gated) -> None:
    with serve_in_thread(create_generate_app(gated)) as url:
        gated.gate.clear()
        body = {"prompt": "The quick", "max_new_tokens": 30, "seed": 5, "stop_at_eot": False, "stream": True}
        with httpx.stream("POST", f"{url}/generate", json=body, timeout=20) as r:
            chunks = r.iter_raw()
            first = next(chunks)  # arrives while the generation waits at the gate
            assert b"event: token" in first and b"event: done" not in first
            assert health(url)["active"] == 1 and gated.yielded < 30
            gated.gate.set()
            rest = b"".join(chunks)
        evs = events((first + rest).decode())
        assert evs[-1][0] == "done" and evs[-1][1]["tokens"] == 30
        assert "".join(d["text"] for k, d in evs if k == "token") == evs[-1][1]["text"]


# --------------------------------------------------------------------------------------- limits


def test_bad_fields_are_422_naming_the_field(live: str) -> None:
    cases = [
        ({"prompt": "a", "max_new_tokens": -1}, "max_new_tokens"),
        ({"prompt": "a", "max_new_tokens": 61}, "max_new_tokens"),  # over the server's limit of 60
        ({"prompt": "a", "max_new_tokens": "5"}, "max_new_tokens"),
        ({"prompt": "a", "max_new_tokens": 2.5}, "max_new_tokens"),
        ({"prompt": 5}, "prompt"),
        ({"max_new_tokens": 5}, "prompt"),
        ({"prompt": "a", "temperature": -0.5}, "temperature"),
        ({"prompt": "a", "top_k": 0}, "top_k"),
        ({"prompt": "a", "top_p": 1.5}, "top_p"),
        ({"prompt": "a", "seed": -3}, "seed"),
        ({"prompt": "a", "stream": "yes"}, "stream"),
        ({"prompt": "a", "max_tokens": 5}, "max_tokens"),  # a typo is not silently ignored
    ]
    for body, field in cases:
        r = httpx.post(f"{live}/generate", json=body)
        assert r.status_code == 422, (body, r.text)
        assert any(e["loc"][-1] == field for e in r.json()["detail"]), (body, r.text)
    for raw in (b"not json", b"[1, 2]", b""):
        r = httpx.post(f"{live}/generate", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (raw, r.text)
    assert httpx.post(f"{live}/generate", json={"prompt": "a", "max_new_tokens": 60}).status_code == 200


def test_beam_search_is_refused_for_a_language_model(live: str) -> None:
    r = httpx.post(f"{live}/generate", json={"prompt": "The", "max_new_tokens": 4, "beams": 2})
    assert r.status_code == 422 and "beam search is for a seq2seq model" in r.text


def test_api_key_and_body_limit(generator: TextGenerator) -> None:
    app = create_generate_app(generator, api_key="k-123", max_body_bytes=2000)
    key = {"Authorization": "Bearer k-123"}
    with serve_in_thread(app) as url:
        body = {"prompt": "The", "max_new_tokens": 5}
        assert httpx.post(f"{url}/generate", json=body).status_code == 401
        wrong = httpx.post(f"{url}/generate", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert httpx.post(f"{url}/generate", json=body, headers=key).status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 401 and health(url)["task"] == "lm"
        big = httpx.post(f"{url}/generate", json={"prompt": "x" * 5000}, headers=key)
        assert big.status_code == 413 and "2,000 bytes" in big.json()["detail"]
        assert httpx.post(f"{url}/generate", json=body, headers=key).status_code == 200


def test_more_than_running_plus_queued_is_503(gated: Gated) -> None:
    app = create_generate_app(gated, max_concurrent=1, max_queued=1, queue_timeout_s=0.5)
    body = {"prompt": "The quick", "max_new_tokens": 20, "seed": 2, "stop_at_eot": False}
    with serve_in_thread(app) as url:
        answers: dict[str, httpx.Response] = {}

        def post(name: str, stream: bool) -> None:
            answers[name] = httpx.post(f"{url}/generate", json={**body, "stream": stream}, timeout=20)

        for round_ in ("queue then run", "queue times out"):
            gated.gate.clear()
            answers.clear()
            running = threading.Thread(target=post, args=("running", True))
            running.start()
            until(lambda: health(url)["active"] == 1)
            queued = threading.Thread(target=post, args=("queued", False))
            queued.start()
            until(lambda: health(url)["queued"] == 1)
            busy = httpx.post(f"{url}/generate", json=body)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "busy" in busy.text
            if round_ == "queue times out":
                queued.join(10)  # waits queue_timeout_s for the slot the running one holds
                assert answers["queued"].status_code == 503 and "0.5 s" in answers["queued"].text
            gated.gate.set()
            running.join(20)
            queued.join(20)
            assert events(answers["running"].text)[-1][1]["tokens"] == 20
            if round_ == "queue then run":
                assert answers["queued"].status_code == 200 and answers["queued"].json()["tokens"] == 20
        until(lambda: health(url)["active"] == 0)
        assert metric(url, "largo_errors_total", code="503") == 3


def test_a_swap_serves_new_requests_while_a_running_generation_finishes_on_the_old_model(
    gated: Gated, generator: TextGenerator
) -> None:
    app = create_generate_app(gated, version=1)
    body = {"prompt": "The quick", "max_new_tokens": 20, "stop_at_eot": False, "seed": 1}
    answers: dict[str, httpx.Response] = {}
    with serve_in_thread(app) as url:
        gated.gate.clear()
        running = threading.Thread(
            target=lambda: answers.update(
                old=httpx.post(f"{url}/generate", json={**body, "stream": True}, timeout=30)
            )
        )
        running.start()
        until(lambda: gated.yielded > 0)  # held after its first piece of text, on the old model
        fresh = Gated(generator, gated.batching)  # the same weights in another object: counts its own
        app.state.service.swap(fresh, 2)
        new = httpx.post(f"{url}/generate", json=body, timeout=30)  # runs beside the held one
        assert new.json()["version"] == 2 and fresh.yielded == 20 and health(url)["version"] == 2
        assert running.is_alive()
        gated.gate.set()
        running.join(20)
    old = events(answers["old"].text)[-1][1]
    assert old["version"] == 1 and old["tokens"] == 20 and gated.yielded == 20  # all on the old model
    assert old["text"] == new.json()["text"]


def test_a_model_error_is_500_with_an_id_and_the_server_keeps_serving(gated: Gated) -> None:
    with serve_in_thread(create_generate_app(gated)) as url:
        for stream in (True, False):
            r = httpx.post(f"{url}/generate", json={"prompt": "boom", "stream": stream}, timeout=30)
            assert r.status_code == 500 and r.json()["error_id"] in r.json()["detail"]
        later = {"prompt": "boom later", "max_new_tokens": 10, "stop_at_eot": False, "stream": True}
        r = httpx.post(f"{url}/generate", json=later, timeout=30)
        evs = events(r.text)  # the status line was sent before the error: an error event ends the stream
        assert r.status_code == 200 and evs[-1][0] == "error" and evs[-1][1]["error_id"]
        ok = httpx.post(f"{url}/generate", json={"prompt": "The", "max_new_tokens": 5}, timeout=30)
        assert ok.status_code == 200
        until(lambda: health(url)["active"] == 0)


def test_a_client_that_leaves_stops_its_generation(gated: Gated) -> None:
    app = create_generate_app(gated)
    service = app.state.service
    body = {"prompt": "The quick", "max_new_tokens": 50, "seed": 3, "stop_at_eot": False}
    with serve_in_thread(app) as url:
        gated.gate.clear()
        with httpx.stream("POST", f"{url}/generate", json={**body, "stream": True}, timeout=20) as r:
            assert b"event: token" in next(r.iter_raw())
        until(lambda: all(job.cancel.is_set() for job in service.running.values()))
        gated.gate.set()
        until(lambda: health(url)["active"] == 0)
        assert gated.yielded < 10 and metric(url, "largo_generations_total", finish_reason="cancelled") == 1
        gated.gate.clear()
        with pytest.raises(httpx.ReadTimeout):  # a JSON client that gives up
            httpx.post(f"{url}/generate", json={**body, "stream": False}, timeout=0.5)
        until(lambda: all(job.cancel.is_set() for job in service.running.values()))
        gated.gate.set()
        until(lambda: metric(url, "largo_generations_total", finish_reason="cancelled") == 2)


def test_feedback_rates_or_corrects_a_generation(live: str, generator: TextGenerator) -> None:
    gen = httpx.post(f"{live}/generate", json={"prompt": "A bird", "max_new_tokens": 8, "seed": 3}).json()
    r = httpx.post(f"{live}/feedback", json={"prediction_id": gen["id"], "completion": " in the hand"})
    assert r.status_code == 200 and r.json()["predicted"] == gen["text"]
    assert r.json()["label"] == {"rating": None, "completion": " in the hand"}
    rated = httpx.post(f"{live}/feedback", json={"prediction_id": gen["id"], "rating": "good"})
    assert rated.status_code == 200
    stored = [json.loads(line) for line in (generator.path / "serving" / "feedback.jsonl").open()]
    mine = [x["label"] for x in stored if x["prediction_id"] == gen["id"]]
    assert mine == [{"rating": None, "completion": " in the hand"}, {"rating": "good", "completion": None}]
    unknown = httpx.post(f"{live}/feedback", json={"prediction_id": str(uuid.uuid4()), "rating": "bad"})
    assert unknown.status_code == 404 and "unknown generation id" in unknown.json()["detail"]
    for bad, word in [
        ({"prediction_id": gen["id"]}, "rating"),  # neither a rating nor a completion
        ({"prediction_id": gen["id"], "rating": "great"}, "rating"),
        ({"prediction_id": "nope", "rating": "good"}, "prediction_id"),
        ({"prediction_id": gen["id"], "rating": "good", "label": "x"}, "label"),
    ]:
        r = httpx.post(f"{live}/feedback", json=bad)
        assert r.status_code == 422 and word in r.text, (bad, r.text)


def test_metrics_count_requests_and_generated_tokens(live: str) -> None:
    before = {
        "requests": metric(live, "largo_requests_total", endpoint="/generate", code="200"),
        "tokens": metric(live, "largo_generated_tokens_total"),
        "first": metric(live, "largo_time_to_first_token_seconds_count"),
    }
    r = httpx.post(f"{live}/generate", json={"prompt": "The", "max_new_tokens": 12, "stop_at_eot": False})
    until(
        lambda: (
            metric(live, "largo_requests_total", endpoint="/generate", code="200") == before["requests"] + 1
        )
    )
    until(lambda: metric(live, "largo_generated_tokens_total") == before["tokens"] + r.json()["tokens"])
    assert metric(live, "largo_time_to_first_token_seconds_count") == before["first"] + 1
    assert metric(live, "largo_tokens_per_second_count") >= 1
    assert metric(live, "largo_generations_total", finish_reason="length") >= 1
    text = httpx.get(f"{live}/metrics").text
    assert "largo_request_seconds_bucket" in text and "largo_generations_active 0" in text


# -------------------------------------------------------------------------------- shutting down


def test_graceful_shutdown_lets_a_generation_finish(gated: Gated) -> None:
    body = {"prompt": "The quick", "max_new_tokens": 20, "seed": 4, "stop_at_eot": False, "stream": True}
    answer: list[httpx.Response] = []
    with serve_in_thread(create_generate_app(gated)) as url:
        gated.gate.clear()
        client = threading.Thread(
            target=lambda: answer.append(httpx.post(f"{url}/generate", json=body, timeout=20))
        )
        client.start()
        until(lambda: health(url)["active"] == 1)
        threading.Timer(0.3, gated.gate.set).start()  # opens while the server is shutting down
    client.join(20)
    assert events(answer[0].text)[-1][1]["tokens"] == 20


def test_after_stop_a_new_generation_is_503_not_left_waiting(generator: TextGenerator) -> None:
    app = create_generate_app(generator)
    with serve_in_thread(app) as url:
        assert httpx.post(f"{url}/generate", json={"prompt": "The", "max_new_tokens": 3}).status_code == 200
        app.state.service.stop()  # as the lifespan does once uvicorn stopped accepting
        late = httpx.post(f"{url}/generate", json={"prompt": "The", "max_new_tokens": 3}, timeout=10)
        assert late.status_code == 503 and "shutting down" in late.text
        assert health(url)["active"] == 0


def test_the_batching_options_of_a_classifier_server_map_to_the_decode_batch() -> None:
    options = {"max_batch": 5, "max_wait_ms": 2.0, "api_key": "k", "max_body_bytes": 10}
    assert generate_app_options(options) == {"max_concurrent": 5, "api_key": "k", "max_body_bytes": 10}


def test_largo_serve_serves_an_lm_bundle(lm_bundle: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [LARGO, "serve", str(lm_bundle), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, proc, timeout=60, output=lambda: proc.stdout.read())
        h = health(url)
        assert h["task"] == "lm" and h["batching"] is True and h["max_concurrent"] == 32  # --max-batch
        r = httpx.post(
            f"{url}/generate", json={"prompt": "从前", "max_new_tokens": 8, "seed": 0, "stream": False}
        )
        assert r.status_code == 200 and r.json()["tokens"] <= 8
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert "TextGenerator" in out and "Application shutdown complete" in out, out


def test_a_registered_language_model_is_served_by_name(
    lm_bundle: Path, generator: TextGenerator, tmp_path: Path
) -> None:
    import shutil

    from largo.lifecycle.registry import Registry, RegistryError
    from largo.lifecycle.serving import registered_app
    from largo.lifecycle.store import Store

    db = str(tmp_path / "registry.db")
    registry = Registry(Store(db))
    version = registry.register("tinylm", lm_bundle)
    assert version.version == 1 and version.path == lm_bundle.resolve()
    assert version.lineage["data"][0]["split"] == "corpus"  # the LM config's corpus paths, hashed
    registry.verify(version)  # its files (config, tokenizer, weights) were hashed
    registry.promote("tinylm", 1)
    second = tmp_path / "second"
    shutil.copytree(lm_bundle, second, ignore=shutil.ignore_patterns("serving"))
    assert registry.register("tinylm", second).version == 2
    # the CLI's options (the batching ones an LM has no use for); no thread: the test polls itself
    app, watcher = registered_app("tinylm", db=db, max_batch=32, max_wait_ms=5.0, poll_s=60)
    assert watcher is not None and watcher.alias == "production"
    body = {"prompt": "The quick", "max_new_tokens": 12, "seed": 5}
    answers = []
    with serve_in_thread(app) as url:
        answers.append(httpx.post(f"{url}/generate", json=body).json())
        assert health(url)["model"] == "tinylm" and health(url)["bundle"] == str(lm_bundle.resolve())
        assert health(url)["version"] == 1
        registry.promote("tinylm", 2)
        assert watcher.poll() == 2  # loaded, checked and swapped in; the next request runs on it
        answers.append(httpx.post(f"{url}/generate", json={**body, "stream": True}))
        answers[1] = events(answers[1].text)[-1][1]
        assert health(url)["version"] == 2 and health(url)["bundle"] == str(second.resolve())
        registry.rollback("tinylm")
        assert watcher.poll() == 1 and health(url)["version"] == 1
    expected = generator.generate("The quick", 12, seed=5)
    assert [a["text"] for a in answers] == [expected] * 2 and [a["version"] for a in answers] == [1, 2]
    stored = Store(db).predictions_by_id([a["id"] for a in answers])  # logged to the store, by version
    rows = [stored[a["id"]] for a in answers]
    assert [(r["model"], r["version"]) for r in rows] == [("tinylm", 1), ("tinylm", 2)]
    assert stored[answers[1]["id"]]["input"]["prompt"] == "The quick"
    assert stored[answers[1]["id"]]["output"]["text"] == expected
    assert not (second / "serving").exists()  # the store, not the bundle's JSONL, got them
    # feedback on both generations, then the fine-tuning corpus it makes
    with serve_in_thread(registered_app("tinylm", db=db, poll_s=0)[0]) as url:
        bad = httpx.post(f"{url}/generate", json={**body, "seed": 6}).json()
        for pid, fb in [
            (answers[0]["id"], {"rating": "bad"}),
            (answers[0]["id"], {"rating": "bad", "completion": " brown fox"}),  # the latest counts
            (answers[0]["id"], {"rating": "good"}),  # a rating after a correction keeps the correction
            (answers[1]["id"], {"rating": "good"}),  # fed back to the server that did not generate it
            (bad["id"], {"rating": "bad"}),
        ]:
            assert httpx.post(f"{url}/feedback", json={"prediction_id": pid, **fb}).status_code == 200
    out = tmp_path / "feedback.jsonl"
    result = CliRunner().invoke(cli, ["feedback", "export", "tinylm", str(out), "--db", db])
    assert result.exit_code == 0 and "wrote 2 texts" in result.output, result.output
    assert "1 corrections, 1 rated good; 1 only rated bad" in result.output
    lines = {x["kind"]: x for x in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    assert set(lines) == {"correction", "rated good"}
    assert lines["correction"]["text"] == "The quick brown fox" and lines["correction"]["version"] == 1
    assert lines["rated good"]["text"] == "The quick" + expected and lines["rated good"]["version"] == 2
    refused = CliRunner().invoke(cli, ["update", "tinylm", "--db", db, "--set", "update.mode=retrain"])
    assert refused.exit_code != 0 and "does not apply to a language model" in refused.output, refused.output
    adapter_only = tmp_path / "adapter-only"
    shutil.copytree(lm_bundle, adapter_only)
    (adapter_only / "adapter.json").write_text("{}", encoding="utf-8")
    with pytest.raises(RegistryError, match="adapter-only"):
        registry.register("tinylm", adapter_only)
