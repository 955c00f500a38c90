"""The server's counters and histograms, rendered in the Prometheus text format (version 0.0.4).

Hand-written rather than `prometheus_client`: five metrics fit in ~80 lines, and a serving image
(possibly torch-free, installed with `largo[serve]`) carries one dependency less. Counters are updated
from the event loop thread only; a `Histogram` is also observed from a generation server's decode
threads, so it takes a lock.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = {
        k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in labels.items()
    }
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


class Histogram:
    """Cumulative-bucket histogram of observed values (Prometheus semantics: `le` upper bounds)."""

    def __init__(self, buckets: Sequence[float]):
        self.bounds = list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0
        self.count = 0
        self.lock = threading.Lock()  # observed from decode threads, read by the event loop

    def observe(self, value: float) -> None:
        """Count one value."""
        with self.lock:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
            self.sum += value
            self.count += 1

    def lines(self, name: str, labels: dict[str, str]) -> list[str]:
        """`name_bucket`, `name_sum` and `name_count` sample lines."""
        out, total = [], 0
        with self.lock:
            counts, total_sum, count = list(self.counts), self.sum, self.count
        for bound, n in zip([*self.bounds, float("inf")], counts, strict=True):
            total += n
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f"{name}_bucket{_labels({**labels, 'le': le})} {total}")
        out.append(f"{name}_sum{_labels(labels)} {total_sum:.6f}")
        out.append(f"{name}_count{_labels(labels)} {count}")
        return out

    def block(self, name: str, help: str) -> list[str]:
        """An unlabelled histogram whole: its HELP and TYPE lines, then its samples."""
        return [f"# HELP {name} {help}", f"# TYPE {name} histogram", *self.lines(name, {})]


class ServerMetrics:
    """Requests by endpoint and status, errors by status, latency, batch sizes, queue depth."""

    def __init__(self, queue_depth: Callable[[], int]):
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, Histogram] = {}
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.forward_seconds = Histogram(LATENCY_BUCKETS)
        self.predictions = 0
        self.queue_depth = queue_depth

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        """One answered HTTP request."""
        self.requests[(endpoint, status)] += 1
        self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        """One forward pass over `size` records."""
        self.batch_size.observe(size)
        self.forward_seconds.observe(seconds)
        self.predictions += size

    def render(self) -> str:
        """All metrics in the Prometheus text exposition format."""
        return "\n".join(self.request_lines() + self.batch_lines()) + "\n"

    def request_lines(self) -> list[str]:
        """Requests, errors and latency (what every server has; the LM server adds its own after them)."""
        out = ["# HELP largo_requests_total HTTP requests answered, by endpoint and status code."]
        out.append("# TYPE largo_requests_total counter")
        for (endpoint, code), n in sorted(self.requests.items()):
            out.append(f"largo_requests_total{_labels({'endpoint': endpoint, 'code': str(code)})} {n}")
        out += [
            "# HELP largo_errors_total Responses with status >= 400, by code.",
            "# TYPE largo_errors_total counter",
        ]
        errors: Counter[int] = Counter()
        for (_, code), n in self.requests.items():
            if code >= 400:
                errors[code] += n
        out += [f"largo_errors_total{_labels({'code': str(c)})} {n}" for c, n in sorted(errors.items())]
        out += [
            "# HELP largo_request_seconds Request latency in seconds, by endpoint.",
            "# TYPE largo_request_seconds histogram",
        ]
        for endpoint, hist in sorted(self.latency.items()):
            out += hist.lines("largo_request_seconds", {"endpoint": endpoint})
        return out

    def batch_lines(self) -> list[str]:
        """Batch sizes, forward passes, predictions and the queue (the dynamic batcher's side)."""
        out = self.batch_size.block("largo_batch_size", "Records per forward pass.")
        out += self.forward_seconds.block("largo_forward_seconds", "Seconds per forward pass.")
        out += ["# HELP largo_predictions_total Records predicted.", "# TYPE largo_predictions_total counter"]
        out.append(f"largo_predictions_total {self.predictions}")
        out += [
            "# HELP largo_queue_depth Records waiting for a forward pass.",
            "# TYPE largo_queue_depth gauge",
        ]
        out.append(f"largo_queue_depth {self.queue_depth()}")
        return out
