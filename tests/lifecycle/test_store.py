"""The store on SQLite and PostgreSQL: transactions, and concurrent writers that lose nothing."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from largo.lifecycle.registry import Registry
from largo.lifecycle.sink import StoreSink
from largo.lifecycle.store import Store, StoreError, default_url, feedback, normalize_url, predictions

THREADS, PROCESSES, ROUNDS, BATCH = 8, 4, 20, 5


def _write_load(url: str, writer: str) -> None:
    """One writer: ROUNDS batches of BATCH predictions, each batch followed by one feedback row."""
    store = Store(url)  # each process opens (and creates the schema of) the store itself
    sink = StoreSink(store, "m", 1)
    for i in range(ROUNDS):
        ids = [str(uuid.uuid4()) for _ in range(BATCH)]
        rows = [
            {"id": p, "time": time.time(), "inputs": {"w": writer, "i": i}, "outputs": {"y": "a"}}
            for p in ids
        ]
        sink.log_predictions(rows)
        sink.log_feedback({"prediction_id": ids[0], "output": "y", "label": "b", "predicted": "a"})
    store.close()


def test_threads_and_processes_writing_at_once_lose_nothing(db_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no engine inherited by fork
    procs = [ctx.Process(target=_write_load, args=(db_url, f"p{i}")) for i in range(PROCESSES)]
    for p in procs:
        p.start()
    threads = [threading.Thread(target=_write_load, args=(db_url, f"t{i}")) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = Store(db_url)
    writers = THREADS + PROCESSES
    assert store.count(predictions, "m") == writers * ROUNDS * BATCH
    assert store.count(feedback, "m") == writers * ROUNDS
    store.close()


def test_concurrent_registrations_get_distinct_version_numbers(store: Store, bundle: Path) -> None:
    registry = Registry(store)
    numbers: list[int] = []
    errors: list[BaseException] = []

    def register() -> None:
        try:
            numbers.append(registry.register("iris", bundle).version)
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=register) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(numbers) == list(range(1, THREADS + 1))


def test_sink_rows_land_with_model_version_and_json(store: Store) -> None:
    sink = StoreSink(store, "m", 3)
    pid = str(uuid.uuid4())
    outputs = {"y": "a", "y_probability": np.float32(0.75), "y_probabilities": {"a": 0.75, "b": 0.25}}
    sink.log_predictions([{"id": pid, "time": 1.5, "inputs": {"x": 1, "t": "北京"}, "outputs": outputs}])
    sink.log_feedback({"prediction_id": pid, "output": "y", "label": "b", "predicted": "a", "time": 2.0})
    row = store.predictions_by_id([pid, "unknown"])[pid]
    assert (row["model"], row["version"], row["time"]) == ("m", 3, 1.5)
    assert row["input"] == {"x": 1, "t": "北京"}
    assert row["output"]["y_probability"] == pytest.approx(0.75)
    [fb] = store.feedback_rows("m")
    assert (fb["prediction_id"], fb["label"], fb["predicted"], fb["source"]) == (pid, "b", "a", "api")


def test_a_failed_write_leaves_nothing(store: Store) -> None:
    pid = str(uuid.uuid4())
    row = {"id": pid, "model": "m", "version": 1, "time": 1.0, "input": {}, "output": {}}
    with pytest.raises(Exception):  # noqa: B017 - the duplicate id of the second row fails the whole batch
        store.add_predictions([{**row, "id": str(uuid.uuid4())}, row, row])
    assert store.count(predictions) == 0


def test_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LARGO_DB_URL", raising=False)
    assert default_url(tmp_path) == f"sqlite:///{tmp_path / 'largo.db'}"
    monkeypatch.setenv("LARGO_DB_URL", "postgresql://u@h/db")
    assert normalize_url(default_url()) == "postgresql+psycopg://u@h/db"
    assert normalize_url("runs/x.db") == "sqlite:///runs/x.db"
    with pytest.raises(StoreError, match="cannot open the store at postgresql"):
        Store("postgresql://nobody:secret@127.0.0.1:1/none")
