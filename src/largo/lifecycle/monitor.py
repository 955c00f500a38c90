"""`largo monitor NAME`: how served inputs and predictions compare with the training data.

The reference is the version's training data file (read and cleaned as training read it); the
current rows are the model's logged predictions (optionally since a time). Per input:
- number: PSI over ten quantile bins of the reference (missing values their own bin)
- category: PSI over the reference's categories plus one bin for values it never saw
- text: PSI of the length in tokens, mean length, and the unknown-token rate of the bundle's tokenizer
- image: not monitored (the log keeps a hash of image bytes, not the image)
Per output: the predicted class distribution against the training labels (PSI), the confidence
(the top class's probability), and for numbers the predicted values' PSI. Then the accuracy of
the logged predictions that received feedback, per day (per hour within two days), and the latency
when rows carry `latency_ms`. PSI reads < 0.1 stable, 0.1–0.25 moderate, > 0.25 drift.

Torch-free: the store, the bundle's metadata and the data readers. The HTML report is one file
with its plots embedded as base64 PNGs, in the style of the training report.
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import sqlalchemy as sa

from largo.config import Config
from largo.data.clean import clean_table
from largo.data.features import CategoryProcessor
from largo.data.readers import DataError, read_table
from largo.data.text import array_lengths
from largo.deploy.metadata import read_bundle_info
from largo.evaluate.report import _CSS, _DPI, _esc, _fmt, _plot_style, plt
from largo.lifecycle.registry import Registry
from largo.lifecycle.store import feedback, predictions

BINS = 10
EPS = 1e-4  # floor of a bin's share: an empty bin must not make the PSI infinite
MODERATE, DRIFT = 0.1, 0.25
MAX_REFERENCE = 20_000  # rows of the training data compared (evenly spaced)
MAX_TEXTS = 2_000  # texts tokenized per side for length and unknown-token rate
MAX_ROWS = 100_000  # newest predictions read
HISTOGRAMS = 6  # the most drifted inputs drawn as histograms


# ------------------------------------------------------------------------------------------ numbers


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index Σ (c − r) · ln(c / r) over bins of shares (each floored at EPS)."""
    r = np.maximum(reference / max(reference.sum(), 1), EPS)
    c = np.maximum(current / max(current.sum(), 1), EPS)
    return float(np.sum((c - r) * np.log(c / r)))


def status(value: float | None) -> str:
    """stable, moderate or drift for a PSI."""
    if value is None:
        return "—"
    return "drift" if value > DRIFT else "moderate" if value > MODERATE else "stable"


def number_psi(reference: np.ndarray, current: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """PSI over quantile bins of the reference (missing values in a bin of their own); returns
    (psi, reference counts, current counts)."""
    finite = reference[np.isfinite(reference)]
    edges = np.unique(np.quantile(finite, np.linspace(0, 1, BINS + 1)[1:-1])) if finite.size else np.array([])

    def counts(x: np.ndarray) -> np.ndarray:
        ok = np.isfinite(x)
        binned = np.bincount(np.searchsorted(edges, x[ok], side="right"), minlength=len(edges) + 1)
        return np.append(binned, (~ok).sum())

    ref, cur = counts(reference), counts(current)
    return psi(ref, cur), ref, cur


def category_psi(reference: list[Any], current: list[Any]) -> tuple[float, list[str], np.ndarray, np.ndarray]:
    """PSI over the reference's categories plus an 'unseen' bin; returns (psi, labels, ref, cur counts)."""
    ref_values = [str(v) for v in reference]
    labels = sorted(set(ref_values))
    index = {v: i for i, v in enumerate(labels)}

    def counts(values: list[str]) -> np.ndarray:
        return np.bincount([index.get(v, len(labels)) for v in values], minlength=len(labels) + 1)

    ref, cur = counts(ref_values), counts([str(v) for v in current])
    return psi(ref, cur), [*labels, "(unseen)"], ref, cur


def _floats(values: list[Any]) -> np.ndarray:
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        with contextlib.suppress(TypeError, ValueError):  # not a number: missing
            out[i] = float(v)
    return out


def _spaced(values: list[Any], limit: int) -> list[Any]:
    return values[:: max(1, len(values) // limit)][:limit] if len(values) > limit else values


# ------------------------------------------------------------------------------------------- inputs


@dataclass
class Drift:
    """One monitored quantity: its reference and current summaries, PSI and what to draw."""

    name: str
    kind: str
    reference: str
    current: str
    psi: float | None
    plot: tuple[str, Any, Any] | None = (
        None  # ("hist", ref values, cur values) or ("bars", labels, (ref, cur))
    )

    @property
    def status(self) -> str:
        """stable, moderate or drift."""
        return status(self.psi)


def _text_stats(proc: Any, texts: list[Any]) -> tuple[np.ndarray, float]:
    """Lengths in tokens and the unknown-token rate of texts under the bundle's tokenizer."""
    if not texts:
        return np.array([]), 0.0
    ids = proc.encode_array(texts)
    lengths = array_lengths(ids, proc.pad_id)
    unk = proc.unk_id
    rate = float((ids == unk).sum() / max(1, lengths.sum())) if unk is not None else 0.0
    return lengths.astype(float), rate


def input_drift(f: Any, proc: Any, reference: list[Any], current: list[Any]) -> Drift:
    """The drift of one input feature."""
    if f.type == "number":
        ref, cur = _floats(reference), _floats(current)
        value, _, _ = number_psi(ref, cur)
        return Drift(
            f.name,
            "number",
            f"mean {np.nanmean(ref):.4g}",
            f"mean {np.nanmean(cur):.4g}" if np.isfinite(cur).any() else "no values",
            value,
            ("hist", ref, cur),
        )
    if f.type == "category":
        value, labels, ref, cur = category_psi(reference, current)
        unseen = cur[-1] / max(cur.sum(), 1)
        return Drift(
            f.name,
            "category",
            f"{len(labels) - 1} values",
            f"unseen {unseen:.1%}",
            value,
            ("bars", labels, (ref, cur)),
        )
    if f.type == "text":
        ref_len, ref_unk = _text_stats(proc, _spaced(reference, MAX_TEXTS))
        cur_len, cur_unk = _text_stats(proc, _spaced(current, MAX_TEXTS))
        value, _, _ = number_psi(ref_len, cur_len)
        ref_s = f"len {ref_len.mean():.1f}, unk {ref_unk:.1%}" if ref_len.size else "—"
        cur_s = f"len {cur_len.mean():.1f}, unk {cur_unk:.1%}" if cur_len.size else "—"
        return Drift(f.name + " (tokens)", "text", ref_s, cur_s, value, ("hist", ref_len, cur_len))
    return Drift(f.name, f.type, "not monitored", "not monitored", None)


def output_drift(f: Any, proc: Any, reference: list[Any], rows: list[dict]) -> list[Drift]:
    """Predicted classes (or values) against the training labels, and the confidence of a class output."""
    outs = [r["output"] or {} for r in rows]
    predicted = [o.get(f.name) for o in outs if o.get(f.name) is not None]
    if isinstance(proc, CategoryProcessor):
        value, labels, ref, cur = category_psi(reference, predicted)
        top = labels[int(np.argmax(cur))] if cur.sum() else "—"
        found = [
            Drift(
                f"{f.name} (predicted)",
                "classes",
                f"{len(labels) - 1} classes",
                f"most often {top}",
                value,
                ("bars", labels, (ref, cur)),
            )
        ]
        conf = np.array(
            [o[f"{f.name}_probability"] for o in outs if o.get(f"{f.name}_probability") is not None]
        )
        if conf.size:
            low = (conf < 0.5).mean()
            found.append(
                Drift(
                    f"{f.name} (confidence)",
                    "confidence",
                    "—",
                    f"mean {conf.mean():.3f}, < 0.5: {low:.1%}",
                    None,
                    ("conf", conf, None),
                )
            )
        return found
    ref, cur = _floats(reference), _floats(predicted)
    value, _, _ = number_psi(ref, cur)
    return [
        Drift(
            f"{f.name} (predicted)",
            "number",
            f"mean {np.nanmean(ref):.4g}",
            f"mean {np.nanmean(cur):.4g}" if cur.size else "—",
            value,
            ("hist", ref, cur),
        )
    ]


# -------------------------------------------------------------------------------------------- store


def parse_since(since: str | float | None, now: float | None = None) -> float | None:
    """`7d`, `24h`, `30m`, `90s`, an ISO date or time (UTC unless it says), or a Unix time → Unix time."""
    if since is None or since == "":
        return None
    if isinstance(since, int | float):
        return float(since)
    now = time.time() if now is None else now
    if m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", since):
        seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return now - float(m.group(1)) * seconds
    try:
        return float(since)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(since)
    except ValueError:
        raise ValueError(
            f"--since {since!r}: expected a span like 7d, 24h, 30m, an ISO date/time or a Unix time"
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _rows(registry: Registry, table: sa.Table, name: str, since: float | None, limit: int) -> list[dict]:
    """The newest `limit` rows of a model in `table` (time ≥ since), oldest first."""
    query = sa.select(table).where(table.c.model == name)
    if since is not None:
        query = query.where(table.c.time >= since)
    query = query.order_by(table.c.time.desc()).limit(limit)
    with registry.store.read() as conn:
        return [dict(r._mapping) for r in conn.execute(query)][::-1]


def feedback_accuracy(rows: list[dict]) -> list[dict[str, Any]]:
    """Accuracy of corrected-or-confirmed predictions per day (per hour when the rows span ≤ 2 days)."""
    judged = [r for r in rows if r["prediction_id"] and r["predicted"] is not None]
    if not judged:
        return []
    span = judged[-1]["time"] - judged[0]["time"]
    fmt = "%Y-%m-%d %H:00" if span <= 2 * 86400 else "%Y-%m-%d"
    buckets: dict[str, list[bool]] = {}
    for r in judged:
        key = datetime.fromtimestamp(r["time"], UTC).strftime(fmt)
        buckets.setdefault(key, []).append(str(r["predicted"]) == str(r["label"]))
    return [{"period": k, "rows": len(v), "accuracy": float(np.mean(v))} for k, v in buckets.items()]


def latency(rows: list[dict]) -> dict[str, float] | None:
    """Mean, p50, p95, p99 and max of `latency_ms`, when rows carry it."""
    ms = np.array([r["latency_ms"] for r in rows if r.get("latency_ms") is not None], dtype=float)
    if not ms.size:
        return None
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {
        "rows": int(ms.size),
        "mean": float(ms.mean()),
        "p50": p50,
        "p95": p95,
        "p99": p99,
        "max": float(ms.max()),
        "values": ms,
    }


# ------------------------------------------------------------------------------------------ monitor


@dataclass
class MonitorReport:
    """Everything `largo monitor` measured; `table()` is what it prints."""

    name: str
    version: int
    since: float | None
    rows: int
    versions: dict[int, int]
    inputs: list[Drift] = field(default_factory=list)
    outputs: list[Drift] = field(default_factory=list)
    accuracy: list[dict[str, Any]] = field(default_factory=list)
    latency: dict[str, Any] | None = None
    html: Path | None = None

    def table(self) -> str:
        """The report as aligned text."""
        return format_table(self)


def reference_table(cfg: Config, path: Path) -> pa.Table:
    """The version's training data, read and cleaned as training read it (at most MAX_REFERENCE rows)."""
    try:
        table = read_table(cfg.data.train, format=cfg.data.format, encoding=cfg.data.encoding)
    except FileNotFoundError:
        raise DataError(
            f"{path}: its training data {cfg.data.train} is gone; nothing to compare with"
        ) from None
    table, _ = clean_table(
        table,
        inputs=[f.source for f in cfg.inputs],
        targets=[f.source for f in cfg.outputs],
        config=cfg.data.clean,
    )
    if table.num_rows > MAX_REFERENCE:
        table = table.take(np.linspace(0, table.num_rows - 1, MAX_REFERENCE).astype(np.int64))
    return table


def monitor(
    registry: Registry, ref: str, since: str | float | None = None, out: str | Path | None = None
) -> MonitorReport:
    """Compare NAME's logged traffic with its training data; writes the HTML report (see module docstring)."""
    version = registry.lookup(ref)
    info = read_bundle_info(version.path)
    cfg = info.config
    start = parse_since(since)
    rows = _rows(registry, predictions, version.name, start, MAX_ROWS)
    reference = reference_table(cfg, version.path)
    counts: dict[int, int] = {}
    for r in rows:
        counts[r["version"]] = counts.get(r["version"], 0) + 1
    report = MonitorReport(version.name, version.version, start, len(rows), counts)
    if rows:
        inputs = [r["input"] or {} for r in rows]
        for f in cfg.inputs:
            current = [x.get(f.source, x.get(f.name)) for x in inputs]
            ref_values = reference.column(f.source).to_pylist()
            report.inputs.append(input_drift(f, info.processors[f.name], ref_values, current))
        for f in cfg.outputs:
            ref_values = reference.column(f.source).to_pylist()
            report.outputs += output_drift(f, info.processors[f.name], ref_values, rows)
        report.latency = latency(rows)
    report.accuracy = feedback_accuracy(_rows(registry, feedback, version.name, start, MAX_ROWS))
    html = Path(out) if out else version.path.parent / "monitor.html"
    html.parent.mkdir(parents=True, exist_ok=True)
    html.write_text(render_html(report), encoding="utf-8")
    report.html = html
    return report


# ------------------------------------------------------------------------------------------- output


def _when(t: float | None) -> str:
    return "all time" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")


def format_table(r: MonitorReport) -> str:
    """Inputs and outputs with reference, current, PSI and status; then feedback accuracy and latency."""
    shown = ", ".join(f"v{v}: {n}" for v, n in sorted(r.versions.items(), key=lambda x: x[0] or 0))
    lines = [
        f"{r.name}@{r.version}: {r.rows} predictions since {_when(r.since)}" + (f" ({shown})" * bool(shown))
    ]
    if not r.rows:
        lines.append("no logged predictions to compare")
    for title, items in (("inputs", r.inputs), ("outputs", r.outputs)):
        if items:
            lines.append(f"{title:<28} {'training':>24} {'served':>28} {'PSI':>8}  status")
            for d in sorted(items, key=lambda d: -(d.psi or 0.0)) if title == "inputs" else items:
                value = f"{d.psi:.4f}" if d.psi is not None else "—"
                lines.append(f"  {d.name:<26} {d.reference:>24} {d.current:>28} {value:>8}  {d.status}")
    if r.accuracy:
        lines.append("accuracy on feedback")
        lines += [f"  {a['period']:<26} {a['accuracy']:>8.4f}  ({a['rows']} rows)" for a in r.accuracy]
    if r.latency:
        la = r.latency
        lines.append(
            f"latency ms ({la['rows']} rows): mean {la['mean']:.2f}  p50 {la['p50']:.2f}  "
            f"p95 {la['p95']:.2f}  p99 {la['p99']:.2f}  max {la['max']:.2f}"
        )
    return "\n".join(lines)


def _png(fig: Any) -> str:
    """A figure as a base64 PNG data URL (closed afterwards)."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _plot_psi(items: list[Drift]) -> str:
    shown = sorted((d for d in items if d.psi is not None), key=lambda d: -(d.psi or 0.0))[:30][::-1]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(shown) + 1)))
    colors = [
        "tab:red" if d.psi > DRIFT else "tab:orange" if d.psi > MODERATE else "tab:green" for d in shown
    ]
    ax.barh([d.name for d in shown], [d.psi for d in shown], color=colors)
    for x, style in ((MODERATE, ":"), (DRIFT, "--")):
        ax.axvline(x, color="black", linestyle=style, linewidth=1)
    ax.set_xlabel("PSI (0.1 moderate, 0.25 drift)")
    ax.set_title("Input drift against the training data")
    return _png(fig)


def _plot_drift(d: Drift) -> str:
    kind, a, b = d.plot
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    if kind == "hist":
        ref, cur = a[np.isfinite(a)], b[np.isfinite(b)]
        both = np.concatenate([ref, cur])
        bins = np.histogram_bin_edges(both, bins=30) if both.size else 10
        ax.hist(ref, bins=bins, density=True, alpha=0.55, label="training")
        ax.hist(cur, bins=bins, density=True, alpha=0.55, label="served")
        ax.legend(fontsize=8)
    elif kind == "bars":
        ref, cur = b
        x = np.arange(len(a))
        ax.bar(x - 0.2, ref / max(ref.sum(), 1), 0.4, label="training")
        ax.bar(x + 0.2, cur / max(cur.sum(), 1), 0.4, label="served")
        ax.set_xticks(x, labels=[str(v)[:16] for v in a], rotation=45 if len(a) > 6 else 0)
        ax.set_ylabel("share")
        ax.legend(fontsize=8)
    else:  # confidence
        ax.hist(a, bins=20, range=(0, 1), color="tab:purple", alpha=0.8)
        ax.set_xlabel("probability of the predicted class")
    psi_text = f" — PSI {d.psi:.3f} ({d.status})" if d.psi is not None else ""
    ax.set_title(f"{d.name}{psi_text}")
    ax.grid(True, alpha=0.3)
    return _png(fig)


def _plot_accuracy(accuracy: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot([a["period"] for a in accuracy], [a["accuracy"] for a in accuracy], marker="o")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy of predictions that got feedback")
    ax.tick_params(axis="x", rotation=45)
    ax.grid(True, alpha=0.3)
    return _png(fig)


def _plot_latency(la: dict) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.hist(la["values"], bins=40, color="tab:gray")
    for key, style in (("p50", ":"), ("p95", "--"), ("p99", "-")):
        ax.axvline(la[key], color="black", linestyle=style, linewidth=1, label=f"{key} {la[key]:.1f} ms")
    ax.set_xlabel("latency (ms)")
    ax.set_title("Prediction latency")
    ax.legend(fontsize=8)
    return _png(fig)


def _drift_table(items: list[Drift]) -> str:
    head = (
        '<tr><th class="l">name</th><th class="l">kind</th><th>training</th><th>served</th><th>PSI</th>'
        '<th class="l">status</th></tr>'
    )
    rows = "".join(
        f'<tr><td class="l">{_esc(d.name)}</td><td class="l">{_esc(d.kind)}</td><td>{_esc(d.reference)}</td>'
        f'<td>{_esc(d.current)}</td><td>{_fmt(d.psi)}</td><td class="l">{_esc(d.status)}</td></tr>'
        for d in items
    )
    return f'<div class="scroll"><table>{head}{rows}</table></div>'


def render_html(r: MonitorReport) -> str:
    """The whole monitor page: tables and base64-embedded plots."""
    figures: list[tuple[str, str]] = []
    with _plot_style():
        if r.inputs:
            figures.append((_plot_psi(r.inputs), "PSI per input"))
        drifted = sorted((d for d in r.inputs if d.plot and d.psi is not None), key=lambda d: -(d.psi or 0.0))
        figures += [(_plot_drift(d), f"{d.name}: training vs served") for d in drifted[:HISTOGRAMS]]
        figures += [(_plot_drift(d), d.name) for d in r.outputs if d.plot]
        if r.accuracy:
            figures.append((_plot_accuracy(r.accuracy), "Accuracy on feedback over time"))
        if r.latency:
            figures.append((_plot_latency(r.latency), "Latency"))
    title = f"{r.name}@{r.version} — monitor"
    parts = [
        f"<h1>{_esc(title)}</h1>",
        f'<p class="meta">{r.rows} predictions since {_esc(_when(r.since))} · written '
        f"{_esc(_when(time.time()))}</p>",
    ]
    for heading, items in (
        ("Inputs", sorted(r.inputs, key=lambda d: -(d.psi or 0.0))),
        ("Outputs", r.outputs),
    ):
        if items:
            parts.append(f"<h2>{heading}</h2>" + _drift_table(items))
    if r.accuracy:
        rows = "".join(
            f'<tr><td class="l">{_esc(a["period"])}</td><td>{a["rows"]}</td>'
            f"<td>{_fmt(a['accuracy'])}</td></tr>"
            for a in r.accuracy
        )
        parts.append(
            f'<h2>Accuracy on feedback</h2><table><tr><th class="l">period</th><th>rows</th>'
            f"<th>accuracy</th></tr>{rows}</table>"
        )
    if r.latency:
        cells = "".join(
            f"<tr><td class='l'>{k}</td><td>{_fmt(v)}</td></tr>"
            for k, v in r.latency.items()
            if k != "values"
        )
        parts.append(f"<h2>Latency (ms)</h2><table>{cells}</table>")
    if figures:
        parts.append("<h2>Plots</h2>")
        parts += [
            f'<figure><img src="{src}" alt="{_esc(cap)}"><figcaption>{_esc(cap)}</figcaption></figure>'
            for src, cap in figures
        ]
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
