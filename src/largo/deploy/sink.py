"""Where the server writes predictions and feedback: `log_predictions(rows)` and `log_feedback(row)`.

`deploy/` ships `JsonlSink` (two append-only JSONL files in the bundle's `serving/` folder);
`lifecycle/` passes a store-backed sink with the same two methods. The server never imports lifecycle.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Protocol


class Sink(Protocol):
    """What `create_app()` needs from a sink. Both methods may be called from a worker thread."""

    def log_predictions(self, rows: list[dict[str, Any]]) -> None:
        """Store one row per served prediction (id, time, inputs, outputs, latency_ms, version if any)."""

    def log_feedback(self, row: dict[str, Any]) -> None:
        """Store one feedback row (prediction_id, output, label, time)."""


class JsonlSink:
    """Appends predictions to `<folder>/predictions.jsonl` and feedback to `<folder>/feedback.jsonl`.

    One line per row, UTF-8, flushed on every call; a lock keeps lines whole when threads share it.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.predictions_path = self.folder / "predictions.jsonl"
        self.feedback_path = self.folder / "feedback.jsonl"
        self._lock = threading.Lock()

    def _append(self, path: Path, rows: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
        with self._lock, path.open("a", encoding="utf-8") as f:
            f.write(text)

    def log_predictions(self, rows: list[dict[str, Any]]) -> None:
        """Append prediction rows to predictions.jsonl."""
        self._append(self.predictions_path, rows)

    def log_feedback(self, row: dict[str, Any]) -> None:
        """Append one feedback row to feedback.jsonl."""
        self._append(self.feedback_path, [row])


class NullSink:
    """A sink that keeps nothing (for benchmarks and tests that do not look at the logs)."""

    def log_predictions(self, rows: list[dict[str, Any]]) -> None:
        """Drop the rows."""

    def log_feedback(self, row: dict[str, Any]) -> None:
        """Drop the row."""
