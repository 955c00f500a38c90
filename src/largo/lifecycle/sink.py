"""`StoreSink`: the server's sink (`create_app(..., sink=StoreSink(...))`) backed by the store.

The server calls `log_predictions(rows)` from its batch worker thread (an LM server: from its generation
threads, several at once) with rows
`{id, time, inputs, outputs}` and `log_feedback(row)` with `{prediction_id, output, label, predicted,
time}`; this sink adds the model name and version it was made for and writes them to the store's
`predictions` and `feedback` tables, one transaction per call.
"""

from __future__ import annotations

import time
from typing import Any

from largo.lifecycle.store import Store


class StoreSink:
    """Predictions and feedback of one served model (name, version) into a `Store`."""

    def __init__(self, store: Store, model: str, version: int | None = None):
        self.store, self.model, self.version = store, model, version

    def log_predictions(self, rows: list[dict[str, Any]]) -> None:
        """Store one row per served prediction; a `latency_ms` key, when a row has one, is kept."""
        self.store.add_predictions(
            [
                {
                    "id": r["id"],
                    "model": self.model,
                    "version": r.get("version", self.version),
                    "time": r.get("time") or time.time(),
                    "input": r.get("inputs", {}),
                    "output": r.get("outputs", {}),
                    "latency_ms": r.get("latency_ms"),
                }
                for r in rows
            ]
        )

    def find_prediction(self, prediction_id: str) -> dict[str, Any] | None:
        """The outputs of a prediction this model served (any version, before any restart), or None.

        The server asks when an id is not among the predictions it answered since it started, so
        feedback on yesterday's prediction, or on another replica's, is accepted."""
        row = self.store.predictions_by_id([prediction_id]).get(prediction_id)
        return row["output"] if row is not None and row["model"] == self.model else None

    def log_feedback(self, row: dict[str, Any]) -> None:
        """Store one feedback row from POST /feedback (source 'api')."""
        self.store.add_feedback(
            [
                {
                    "prediction_id": row["prediction_id"],
                    "model": self.model,
                    "output": row["output"],
                    "label": row["label"],
                    "predicted": row.get("predicted"),
                    "input": None,
                    "time": row.get("time") or time.time(),
                    "source": "api",
                }
            ]
        )
