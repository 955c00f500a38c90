"""`largo serve NAME` against a live server process: 64 concurrent clients, SIGKILL mid-load, and a
promote / rollback hot swap while they hammer it; plus the alias watcher's checks in-process.

Each live test prints its figures (requests, seconds, statuses, rows in the store) for `pytest -s`.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

import largo
from largo.deploy.server import free_port, wait_until_serving
from largo.lifecycle.registry import BundleChangedError, Registry
from largo.lifecycle.serving import AliasWatcher, registered_app
from largo.lifecycle.store import Store, feedback, predictions

LARGO = str(Path(sys.executable).with_name("largo"))
CLIENTS = 64
LABELS = ["setosa", "versicolor", "virginica"]


@pytest.fixture(scope="module")
def iris_v2(iris_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second iris bundle (other weights, same inputs and classes): the version promoted over v1."""
    import yaml

    config = yaml.safe_load((iris_bundle / "config.yaml").read_text())
    config["runs_dir"] = str(tmp_path_factory.mktemp("iris_v2"))
    config["train"]["seed"] = 7
    return largo.train(config).path


def _registered(db: str, v1: Path, v2: Path | None = None) -> Registry:
    registry = Registry(Store(db))
    registry.register("iris", v1)
    if v2 is not None:
        registry.register("iris", v2)
    registry.promote("iris", 1)
    return registry


# ---------------------------------------------------------------------------------- a live server


def start_serve(ref: str, db: str, log: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """`largo serve REF --db DB` in a process of its own, answering /health → (process, URL).

    Its output goes to the file `log` (appended): a pipe nobody reads would fill with access-log lines
    and stall the server.
    """
    port = free_port()
    command = [LARGO, "serve", ref, "--db", db, "--runtime", "torch", "--port", str(port), *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("a") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    proc.log = log  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, proc, timeout=90, output=log.read_text)
    except RuntimeError:
        proc.kill()
        raise
    return proc, url


def stop_serve(proc: subprocess.Popen) -> str:
    """SIGTERM (a graceful stop); returns what the server printed."""
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    return proc.log.read_text()  # type: ignore[attr-defined]


def health(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/health", timeout=10).json()


def _record(rng: random.Random) -> dict[str, float]:
    return {f"x{i}": round(rng.uniform(0.1, 7.9), 1) for i in range(4)}


async def _client(
    http: httpx.AsyncClient, url: str, n: int | None, stop: threading.Event, seed: int, log: list[dict]
) -> None:
    """Predict, then post feedback for that prediction; `n` times, or until `stop` (None: forever)."""
    rng = random.Random(seed)
    i = 0
    while (n is None or i < n) and not stop.is_set():
        i += 1
        sent = time.time()
        try:
            answer = await http.post(f"{url}/predict", json=_record(rng))
        except httpx.TransportError as exc:
            log.append({"kind": "predict", "status": None, "error": type(exc).__name__})
            return
        pid = answer.json().get("id") if answer.status_code == 200 else None
        log.append(
            {"kind": "predict", "status": answer.status_code, "id": pid, "sent": sent, "done": time.time()}
        )
        if pid is None:
            continue
        try:
            ack = await http.post(f"{url}/feedback", json={"prediction_id": pid, "label": rng.choice(LABELS)})
        except httpx.TransportError as exc:
            log.append({"kind": "feedback", "status": None, "id": pid, "error": type(exc).__name__})
            return
        log.append({"kind": "feedback", "status": ack.status_code, "id": pid})


def hammer(
    url: str, n: int | None = None, stop: threading.Event | None = None, log: list[dict] | None = None
) -> list[dict]:
    """CLIENTS concurrent clients, each predicting and giving feedback `n` times (or until `stop`).

    Returns the log (appended to `log` as answers come): one entry per request with its status
    (None: the connection failed), the prediction id and, for predictions, when it was sent and answered.
    """
    log = [] if log is None else log
    stop = stop or threading.Event()

    async def go() -> None:
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            await asyncio.gather(*(_client(http, url, n, stop, seed, log) for seed in range(CLIENTS)))

    asyncio.run(go())
    return log


def in_background(url: str) -> tuple[threading.Thread, threading.Event, list[dict]]:
    """hammer() until the returned event is set, in a thread; its log fills as answers come."""
    stop, log = threading.Event(), []
    thread = threading.Thread(target=hammer, args=(url, None, stop, log), daemon=True)
    thread.start()
    return thread, stop, log


def acked(log: list[dict], kind: str) -> set[str]:
    return {e["id"] for e in log if e["kind"] == kind and e["status"] is not None and e["status"] < 300}


def wait_for(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def stored(store: Store, table: sa.Table, column: str = "id") -> set[str]:
    with store.read() as conn:
        return set(conn.execute(sa.select(table.c[column])).scalars())


# ------------------------------------------------------------------------------------- live checks


def test_64_clients_every_prediction_and_feedback_is_stored(
    db_url: str, iris_bundle: Path, tmp_path: Path
) -> None:
    registry = _registered(db_url, iris_bundle)
    proc, url = start_serve("iris", db_url, tmp_path / "serve.log")
    try:
        assert (health(url)["model"], health(url)["version"]) == ("iris", 1)
        t = time.perf_counter()
        log = hammer(url, n=10)
        seconds = time.perf_counter() - t
    finally:
        out = stop_serve(proc)
    statuses = Counter((e["kind"], e["status"]) for e in log)
    sent = CLIENTS * 10
    print(
        f"\n[{db_url.split(':')[0]}] {2 * sent} requests from {CLIENTS} clients in {seconds:.1f} s: "
        f"{dict(statuses)}"
    )
    assert statuses == {("predict", 200): sent, ("feedback", 200): sent}, out
    store = registry.store
    assert store.count(predictions, "iris") == sent and store.count(feedback, "iris") == sent
    assert stored(store, feedback, "prediction_id") == acked(log, "predict")
    with store.read() as conn:
        rows = conn.execute(sa.select(predictions.c.version, predictions.c.latency_ms)).all()
    assert {v for v, _ in rows} == {1} and all(ms is not None and ms > 0 for _, ms in rows)
    print(
        f"    store: {sent} predictions, {sent} feedback rows; median logged latency "
        f"{sorted(m for _, m in rows)[sent // 2]:.1f} ms"
    )


def test_sigkill_mid_load_keeps_the_store_and_every_acknowledged_feedback(
    iris_bundle: Path, tmp_path: Path
) -> None:
    path = tmp_path / "largo.db"
    db = f"sqlite:///{path}"
    _registered(db, iris_bundle)
    proc, url = start_serve("iris", db, tmp_path / "serve.log")
    thread, stop, log = in_background(url)
    try:
        wait_for(lambda: len(acked(log, "feedback")) >= 100)
        proc.send_signal(signal.SIGKILL)  # mid-load: 64 clients have requests in flight
        proc.wait(timeout=30)
        thread.join(60)
    finally:
        stop.set()
        proc.kill()
    assert not thread.is_alive()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    store = Store(db)
    got_feedback, got_predictions = acked(log, "feedback"), acked(log, "predict")
    lost = [e for e in log if e["status"] is None]
    assert not [e for e in log if e["status"] is not None and e["status"] >= 500]
    assert got_feedback <= stored(store, feedback, "prediction_id")  # every 2xx feedback is in the store
    assert got_predictions <= stored(store, predictions)  # every answered prediction too
    before = (store.count(predictions), store.count(feedback))
    print(
        f"\n[sigkill] killed after {len(got_predictions)} answered predictions and {len(got_feedback)} "
        f"acknowledged feedback; {len(lost)} requests cut off; store after the kill: {before[0]} "
        f"predictions, {before[1]} feedback; integrity_check ok"
    )

    proc, url = start_serve("iris", db, tmp_path / "serve.log")
    try:
        again = hammer(url, n=2)
    finally:
        stop_serve(proc)
    assert Counter(e["status"] for e in again) == {200: 2 * CLIENTS * 2}
    assert (store.count(predictions), store.count(feedback)) == (
        before[0] + CLIENTS * 2,
        before[1] + CLIENTS * 2,
    )
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_promote_and_rollback_swap_the_model_while_64_clients_hammer(
    iris_bundle: Path, iris_v2: Path, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'largo.db'}"
    registry = _registered(db, iris_bundle, iris_v2)
    proc, url = start_serve("iris", db, tmp_path / "serve.log", "--poll-s", "0.2")
    thread, stop, log = in_background(url)
    marks: dict[str, float] = {}
    try:
        wait_for(lambda: len(acked(log, "predict")) >= CLIENTS)
        marks["promote"] = time.time()
        registry.promote("iris", 2)  # from this (another) process, as `largo registry promote` would
        wait_for(lambda: health(url)["version"] == 2)
        marks["v2"] = time.time()
        n = len(acked(log, "predict"))
        wait_for(lambda: len(acked(log, "predict")) >= n + CLIENTS)
        marks["rollback"] = time.time()
        registry.rollback("iris")
        wait_for(lambda: health(url)["version"] == 1)
        marks["v1"] = time.time()
        n = len(acked(log, "predict"))
        wait_for(lambda: len(acked(log, "predict")) >= n + CLIENTS)
        assert health(url)["bundle"] == str(iris_bundle.resolve())
    finally:
        stop.set()
        thread.join(60)
        out = stop_serve(proc)
    statuses = Counter((e["kind"], e["status"]) for e in log)
    assert set(statuses) == {("predict", 200), ("feedback", 200)}, (statuses, out)  # not one failed
    versions = {
        r["id"]: r["version"] for r in registry.store.predictions_by_id(list(acked(log, "predict"))).values()
    }
    assert len(versions) == statuses[("predict", 200)]  # every answered prediction is logged
    times = {e["id"]: (e["sent"], e["done"]) for e in log if e["kind"] == "predict"}
    phase = Counter()
    for pid, version in versions.items():
        sent, done = times[pid]
        if done < marks["promote"]:
            assert version == 1  # answered before the promote
            phase["before promote", version] += 1
        elif marks["v2"] < sent and done < marks["rollback"]:
            assert version == 2  # sent once /health showed v2, answered before the rollback
            phase["after promote", version] += 1
        elif sent > marks["v1"]:
            assert version == 1  # sent once /health showed v1 again
            phase["after rollback", version] += 1
        else:
            phase["in flight across a switch", version] += 1
    print(
        f"\n[hot swap] {sum(statuses.values())} requests, {dict(statuses)}; swap seen in /health "
        f"{marks['v2'] - marks['promote']:.2f} s after promote, {marks['v1'] - marks['rollback']:.2f} s "
        f"after rollback; logged versions by phase: {dict(phase)}"
    )
    assert {"before promote", "after promote", "after rollback"} <= {name for name, _ in phase}
    assert "now serving version 2" in out and "now serving version 1" in out


# ------------------------------------------------------------------------------------- in-process


def test_the_watcher_swaps_on_a_move_and_refuses_a_changed_bundle(
    iris_bundle: Path, bundle: Path, tmp_path: Path
) -> None:
    registry = _registered(f"sqlite:///{tmp_path / 'largo.db'}", iris_bundle, bundle)
    swapped: list[tuple[Path, int]] = []
    watcher = AliasWatcher(
        registry, "iris", "production", 1, lambda p, v: swapped.append((p, v)), lambda p: p
    )
    assert watcher.poll() is None  # nothing moved
    registry.promote("iris", 2)
    assert watcher.poll() == 2 and swapped == [(bundle.resolve(), 2)]
    registry.rollback("iris")
    assert watcher.poll() == 1 and watcher.current == 1
    (bundle / "config.yaml").write_text((bundle / "config.yaml").read_text() + "\n# edited\n")
    registry.promote("iris", 2)
    assert watcher.poll() is None and watcher.failed == 2 and watcher.current == 1  # v1 keeps serving
    registry.rollback("iris")
    assert watcher.poll() is None and watcher.failed is None  # back on the served version: v2 may be retried
    with pytest.raises(BundleChangedError):
        registry.verify(registry.get("iris", 2))


def test_a_fixed_version_is_not_watched_and_an_unknown_name_is_clear(
    iris_bundle: Path, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'largo.db'}"
    _registered(db, iris_bundle)
    app, watcher = registered_app("iris@1", db=db, runtime="torch")
    assert watcher is None and app.state.service.version == 1
    app, watcher = registered_app("iris@production", db=db, runtime="torch", poll_s=0.5)
    assert watcher is not None and watcher.alias == "production"
    with pytest.raises(FileNotFoundError, match="'tulip' is neither a bundle folder nor a registered model"):
        registered_app("tulip", db=db)
