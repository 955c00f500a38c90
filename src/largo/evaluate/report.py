"""Write a run's evaluation report: PNG plots and one self-contained ``report.html``.

This is the only file of the evaluate stage that touches the disk. It reads the metrics dict that
training produces (history, test/valid metrics per output, split sizes, cleaning counts, config)
and draws loss curves, metric curves, the learning rate, confusion matrices, per-class scores and,
when predictions are given, predicted-vs-true plots for numeric outputs.
"""

from __future__ import annotations

import html
import json
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import font_manager  # noqa: E402

# Fonts that carry CJK glyphs, in order of preference; the first one installed is used.
_CJK_FONTS = (
    "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN",
    "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Microsoft YaHei", "SimHei", "PingFang SC",
    "Heiti SC", "Hiragino Sans GB", "Noto Sans CJK JP", "Droid Sans Fallback", "AR PL UMing CN",
    "Arial Unicode MS",
)  # fmt: skip
_DPI = 110
_MAX_LABEL_CHARS = 24
_MAX_ANNOTATED_CLASSES = 30  # beyond this, counts in cells are too small to read


def write_report(
    out_dir: str | Path,
    metrics: dict,
    *,
    predictions: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> Path:
    """Draw the plots and write ``report.html`` into ``out_dir``.

    Args:
        out_dir: folder to write into; created if missing.
        metrics: the run's metrics dict (``name``, ``version``, ``history``, ``test``, ``valid``,
            ``splits``, ``cleaning``, ``best_epoch``, ``stopped_early``, ``train_time_s``,
            ``config``); every key is optional.
        predictions: optional output name -> (y_true, y_pred) for numeric outputs, drawn as a
            predicted-vs-true scatter and residual histogram (``residuals_<output>.png``).

    Returns:
        The path of ``report.html``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    history = [row for row in metrics.get("history") or [] if isinstance(row, dict)]
    split_name, outputs = evaluated_split(metrics)

    images: list[tuple[str, str]] = []  # (file name, caption)
    with _plot_style():
        images += _history_plots(out, history)
        for name, result in outputs.items():
            if not isinstance(result, dict):
                continue
            kind = output_type(result)
            safe = _safe_filename(name)
            if kind == "category" and result.get("confusion_matrix"):
                file = f"confusion_{safe}.png"
                _plot_confusion(out / file, name, result, split_name)
                images.append((file, f"Confusion matrix — {name} ({split_name})"))
                if result.get("per_class"):
                    file = f"per_class_{safe}.png"
                    _plot_per_class(out / file, name, result["per_class"], split_name)
                    images.append((file, f"Per-class scores — {name} ({split_name})"))
        for name, (y_true, y_pred) in (predictions or {}).items():
            file = f"residuals_{_safe_filename(name)}.png"
            _plot_residuals(out / file, name, np.asarray(y_true), np.asarray(y_pred))
            images.append((file, f"Predicted vs true — {name}"))

    html_path = out / "report.html"
    html_path.write_text(render_html(metrics, images), encoding="utf-8")
    return html_path


def write_metrics_json(out_dir: str | Path, metrics: dict) -> Path:
    """Write ``metrics.json`` (UTF-8, NaN/inf written as null) into ``out_dir`` and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.json"
    text = json.dumps(_json_safe(metrics), indent=2, ensure_ascii=False, default=str)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def evaluated_split(metrics: dict) -> tuple[str, dict]:
    """The split whose per-output results the report shows: ``test`` if present, else ``valid``."""
    for split in ("test", "valid"):
        if isinstance(metrics.get(split), dict) and metrics[split]:
            return split, metrics[split]
    return "test", {}


def output_type(result: dict) -> str:
    """``category``, ``number`` or the declared type of one output's metrics dict."""
    if result.get("type"):
        return str(result["type"])
    if "confusion_matrix" in result:
        return "category"
    return "number" if "mse" in result else "unknown"


def _json_safe(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    return value


def _safe_filename(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", str(name)) or "output"


def _short(label: str) -> str:
    label = str(label)
    return label if len(label) <= _MAX_LABEL_CHARS else label[: _MAX_LABEL_CHARS - 1] + "…"


@contextmanager
def _plot_style() -> Iterator[None]:
    """Use a CJK-capable font when one is installed, without changing global matplotlib state."""
    installed = {f.name for f in font_manager.fontManager.ttflist}
    cjk = [name for name in _CJK_FONTS if name in installed][:1]
    rc = {"font.sans-serif": [*cjk, "DejaVu Sans"], "font.family": "sans-serif", "axes.unicode_minus": False}
    with plt.rc_context(rc), warnings.catch_warnings():
        # With no CJK font installed, labels show boxes; that is the silent fallback, not an error.
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from")
        yield


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _series(history: list[dict], key: str) -> np.ndarray:
    return np.array([float(r[key]) if _is_number(r.get(key)) else np.nan for r in history], dtype=float)


def _history_plots(out: Path, history: list[dict]) -> list[tuple[str, str]]:
    """loss.png, metrics.png, text_scores.png and lr.png from the per-epoch history; files with nothing
    to draw are skipped."""
    if not history:
        return []
    keys: list[str] = []
    for row in history:
        keys += [k for k, v in row.items() if k not in keys and _is_number(v)]
    x_key = "epoch" if "epoch" in keys or "step" not in keys else "step"  # LM runs log by step
    epochs = _series(history, x_key)
    if np.isnan(epochs).any():
        epochs = np.arange(1, len(history) + 1, dtype=float)

    loss_keys = [k for k in keys if k == "loss" or k.endswith(".loss") or k.endswith("_loss")]
    loss_keys.sort(key=lambda k: (not k.startswith("train."), not k.startswith("valid."), k))
    # scores of generated text are on a 0-100 scale: drawn apart from the 0-1 metrics they would flatten
    text_keys = [k for k in keys if k.startswith("valid.") and k.endswith((".bleu", ".chrf"))]
    metric_keys = [k for k in keys if k.startswith("valid.") and k not in loss_keys and k not in text_keys]
    plots = [
        ("loss.png", "Loss", loss_keys, False),
        ("metrics.png", "Validation metrics", metric_keys, False),
        ("text_scores.png", "Generated text: BLEU and chrF (0-100)", text_keys, False),
        ("lr.png", "Learning rate", ["lr"] if "lr" in keys else [], True),
    ]
    written = []
    for file, title, series_keys, log_scale in plots:
        if series_keys:
            series = {k: _series(history, k) for k in series_keys}
            _plot_lines(out / file, title, epochs, series, log_scale, x_key)
            written.append((file, title))
    return written


def _plot_lines(
    path: Path, title: str, x: np.ndarray, series: dict[str, np.ndarray], log_y: bool, x_label: str = "epoch"
) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, y in series.items():
        ax.plot(x, y, marker="o", markersize=3.5, linewidth=1.6, label=label)
    ax.set_xlabel(x_label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if log_y and np.nanmin(np.concatenate(list(series.values())), initial=np.inf) > 0:
        ax.set_yscale("log")
    if len(x) <= 20:
        ax.set_xticks(x)
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)


def _plot_confusion(path: Path, name: str, result: dict, split: str) -> None:
    """Heat map of counts, true classes on rows and predicted classes on columns."""
    cm = np.asarray(result["confusion_matrix"], dtype=float)
    k = cm.shape[0]
    labels = [_short(label) for label in result.get("labels") or range(k)]
    side = min(max(5.5, 0.55 * k + 3.0), 40.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(cm.max(), 1.0))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="count")
    ax.set_xticks(range(k), labels=labels, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
    ax.set_yticks(range(k), labels=labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = result.get("accuracy")
    suffix = f" — accuracy {accuracy:.4f}" if _is_number(accuracy) else ""
    ax.set_title(f"{name} ({split}){suffix}")
    if k <= _MAX_ANNOTATED_CLASSES:
        threshold = cm.max() / 2.0
        size = 10 if k <= 10 else 8
        for i in range(k):
            for j in range(k):
                color = "white" if cm[i, j] > threshold else "black"
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", color=color, fontsize=size)
    _save(fig, path)


def _plot_per_class(path: Path, name: str, per_class: dict, split: str) -> None:
    """Grouped bars of precision, recall and F1 for every class."""
    labels = list(per_class)
    x = np.arange(len(labels))
    width = 0.27
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.6 * len(labels) + 2.5), 40.0), 4.5))
    for offset, score in zip((-width, 0.0, width), ("precision", "recall", "f1"), strict=True):
        values = [float(per_class[c].get(score) or 0.0) for c in labels]
        ax.bar(x + offset, values, width, label=score)
    ax.set_xticks(x, labels=[_short(c) for c in labels], rotation=45 if len(labels) > 4 else 0,
                  ha="right" if len(labels) > 4 else "center")  # fmt: skip
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("score")
    ax.set_title(f"Per-class scores — {name} ({split})")
    ax.grid(True, axis="y", alpha=0.3)
    # Outside the axes on the right, so it never covers bars or rotated class labels.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)


def _plot_residuals(path: Path, name: str, y_true: np.ndarray, y_pred: np.ndarray) -> None:
    """Predicted-vs-true scatter with the y = x line, next to a histogram of residuals."""
    y_true = y_true.reshape(-1).astype(float)
    y_pred = y_pred.reshape(-1).astype(float)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    left.scatter(y_true, y_pred, s=10, alpha=0.6)
    both = np.concatenate([y_true, y_pred])
    lo, hi = (float(np.nanmin(both)), float(np.nanmax(both))) if both.size else (0.0, 1.0)
    left.plot([lo, hi], [lo, hi], color="black", linewidth=1, linestyle="--", label="y = x")
    left.set_xlabel("true")
    left.set_ylabel("predicted")
    left.set_title(f"{name}: predicted vs true")
    left.legend(fontsize=8)
    left.grid(True, alpha=0.3)
    right.hist(y_pred - y_true, bins=min(40, max(5, y_true.size // 5)), color="tab:orange", alpha=0.8)
    right.set_xlabel("predicted − true")
    right.set_title("residuals")
    right.grid(True, alpha=0.3)
    _save(fig, path)


def write_tune_plot(path: str | Path, trials: list[dict], metric: str, minimize: bool) -> Path:
    """A search's history: each finished trial's value (pruned ones at the value they were stopped at,
    hollow) and the best so far, by trial number."""
    path = Path(path)
    with _plot_style():
        fig, ax = plt.subplots(figsize=(8, 4.5))
        done = [t for t in trials if t["state"] == "complete" and t["value"] is not None]
        pruned = [t for t in trials if t["state"] == "pruned" and t.get("last") is not None]
        ax.scatter([t["number"] for t in done], [t["value"] for t in done], s=24, label="trial")
        if pruned:
            xy = [t["number"] for t in pruned], [t["last"] for t in pruned]
            ax.scatter(
                *xy, s=24, facecolors="none", edgecolors="tab:gray", label="pruned (value when stopped)"
            )
        best, line = None, []
        for t in sorted(done, key=lambda t: t["number"]):
            if best is None or (t["value"] < best if minimize else t["value"] > best):
                best = t["value"]
            line.append((t["number"], best))
        if line:
            ax.step(*zip(*line, strict=True), where="post", color="tab:red", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(metric)
        ax.set_title(f"search: {metric} ({'lower' if minimize else 'higher'} is better)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        _save(fig, path)
    return path


def _save(fig: plt.Figure, path: Path) -> None:
    try:
        fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    finally:
        plt.close(fig)


# ---------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC","Microsoft YaHei",sans-serif;
  margin:0 auto;max-width:1100px;padding:1.5rem;color:#1f2328;background:#fff;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #d0d7de;padding-bottom:.3rem;margin-top:2rem}
.meta{color:#57606a}table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:right}
th{background:#f6f8fa}td.l,th.l{text-align:left}tr:nth-child(even) td{background:#fbfcfd}
.scroll{overflow-x:auto}figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eaeef2}
figcaption{color:#57606a;font-size:.85rem}pre{background:#f6f8fa;padding:1rem;overflow-x:auto;font-size:.85rem}
"""
_CATEGORY_KEYS = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "f1_weighted", "f1_micro",
                  "log_loss", "top2_accuracy", "support")  # fmt: skip
_NUMBER_KEYS = ("mse", "rmse", "mae", "r2", "support")


def render_html(metrics: dict, images: list[tuple[str, str]]) -> str:
    """The whole report page as a string; ``images`` are (relative file name, caption) pairs."""
    name = str(metrics.get("name") or "run")
    version = metrics.get("version")
    title = f"{name} {version}" if version else name
    split_name, outputs = evaluated_split(metrics)
    parts = [f"<h1>{_esc(title)}</h1>", _run_line(metrics)]

    parts.append("<h2>Summary</h2>")
    for split in ("test", "valid"):
        if isinstance(metrics.get(split), dict) and metrics[split]:
            parts.append(f"<h3>{split}</h3>" + _summary_table(metrics[split]))
    if not outputs:
        parts.append("<p>No evaluation results.</p>")
    if isinstance(metrics.get("splits"), dict) and metrics["splits"]:
        parts.append("<h2>Split sizes</h2>" + _key_value_table(metrics["splits"], "split", "rows"))
    if isinstance(metrics.get("cleaning"), dict) and metrics["cleaning"]:
        parts.append("<h2>Cleaning</h2>" + _key_value_table(_flatten(metrics["cleaning"]), "rule", "rows"))

    if isinstance(metrics.get("examples"), list) and metrics["examples"]:
        parts.append(f"<h2>Sample outputs ({split_name})</h2>" + _examples_table(metrics["examples"]))
    for out_name, result in outputs.items():
        if isinstance(result, dict) and isinstance(result.get("per_class"), dict):
            parts.append(f"<h2>Per-class scores — {_esc(out_name)} ({split_name})</h2>")
            parts.append(_per_class_table(result["per_class"]))
    if images:
        parts.append("<h2>Plots</h2>")
        for file, caption in images:
            parts.append(
                f'<figure><img src="{_esc(file)}" alt="{_esc(caption)}">'
                f"<figcaption>{_esc(caption)}</figcaption></figure>"
            )
    history = [row for row in metrics.get("history") or [] if isinstance(row, dict)]
    if history:
        parts.append("<h2>History</h2>" + _history_table(history))
    if metrics.get("config"):
        config = json.dumps(_json_safe(metrics["config"]), indent=2, ensure_ascii=False, default=str)
        parts.append(f"<h2>Config</h2><pre>{_esc(config)}</pre>")

    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)} — largo report</title><style>{_CSS}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: object) -> str:
    """Numbers to 4 decimals (scientific when tiny, e.g. learning rates); None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not _is_number(value):
        return _esc(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    v = float(value)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3e}" if v != 0 and abs(v) < 1e-3 else f"{v:.4f}"


def _run_line(metrics: dict) -> str:
    facts = []
    for key, label in (("best_epoch", "best epoch"), ("stopped_early", "stopped early"),
                       ("train_time_s", "training time (s)")):  # fmt: skip
        if metrics.get(key) is not None:
            facts.append(f"{label}: <b>{_fmt(metrics[key])}</b>")
    return f'<p class="meta">{" · ".join(facts)}</p>' if facts else ""


def _summary_table(outputs: dict) -> str:
    """One row per output, one column per key metric found in any of them."""
    rows = {n: r for n, r in outputs.items() if isinstance(r, dict)}
    columns: list[str] = []
    for result in rows.values():
        kind = output_type(result)
        wanted = _CATEGORY_KEYS if kind == "category" else _NUMBER_KEYS if kind == "number" else None
        keys = (
            [k for k in wanted if k in result] if wanted else [k for k, v in result.items() if _is_number(v)]
        )
        columns += [k for k in keys if k not in columns]
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    lines = [f'<div class="scroll"><table><tr><th class="l">output</th><th class="l">type</th>{head}</tr>']
    for out_name, result in rows.items():
        cells = "".join(f"<td>{_fmt(result[c]) if c in result else ''}</td>" for c in columns)
        kind = _esc(output_type(result))
        lines.append(f'<tr><td class="l">{_esc(out_name)}</td><td class="l">{kind}</td>{cells}</tr>')
    return "\n".join(lines) + "</table></div>"


def _flatten(data: dict, prefix: str = "") -> dict:
    flat: dict = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _key_value_table(data: dict, key_header: str, value_header: str) -> str:
    rows = "".join(f'<tr><td class="l">{_esc(k)}</td><td>{_fmt(v)}</td></tr>' for k, v in data.items())
    return f'<table><tr><th class="l">{key_header}</th><th>{value_header}</th></tr>{rows}</table>'


def _examples_table(examples: list) -> str:
    """Rows of generated text beside its source and reference (a seq2seq run's first test rows)."""
    rows = [e for e in examples if isinstance(e, dict)]
    columns = [c for c in ("source", "reference", "output") if any(c in e for e in rows)]
    head = "".join(f'<th class="l">{c}</th>' for c in columns)
    lines = [f'<div class="scroll"><table><tr>{head}</tr>']
    for e in rows:
        mark = "" if e.get("output") == e.get("reference") else ' style="color:#b00"'
        cells = "".join(
            f'<td class="l"{mark if c == "output" else ""}>{_esc(e.get(c, ""))}</td>' for c in columns
        )
        lines.append(f"<tr>{cells}</tr>")
    return "\n".join(lines) + "</table></div>"


def _per_class_table(per_class: dict) -> str:
    lines = ['<div class="scroll"><table><tr><th class="l">class</th><th>precision</th><th>recall</th>'
             "<th>f1</th><th>support</th></tr>"]  # fmt: skip
    for label, scores in per_class.items():
        scores = scores if isinstance(scores, dict) else {}
        cells = "".join(f"<td>{_fmt(scores.get(k))}</td>" for k in ("precision", "recall", "f1", "support"))
        lines.append(f'<tr><td class="l">{_esc(label)}</td>{cells}</tr>')
    return "\n".join(lines) + "</table></div>"


def _history_table(history: list[dict]) -> str:
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    lines = [f'<div class="scroll"><table><tr>{head}</tr>']
    for row in history:
        lines.append("<tr>" + "".join(f"<td>{_fmt(row.get(c))}</td>" for c in columns) + "</tr>")
    return "\n".join(lines) + "</table></div>"
