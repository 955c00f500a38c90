"""`largo feedback import`: corrections from a file into the store, all rows or none; `largo feedback
export`: a language model's feedback out of the store, as a corpus to fine-tune on.

The file (csv, tsv, jsonl or parquet; encodings as `largo train` reads them) has a `label` column
(or the output's own column, e.g. `progression`) and, per row, either
- a `prediction_id` of a prediction the store logged for this model: the row corrects that
  prediction (like POST /feedback), or
- no prediction id (no such column, or an empty cell) and the model's raw input columns: the row
  is a new labelled example for the update step (relative image paths are made absolute against
  the file's folder).
An optional `output` column names the output a row is about (default: the first category output).
Labels are checked against the model's classes; any bad row stops the import before anything is
written, with its line number. Importing the same file twice stores its rows twice.

Export (language models only; a classifier's feedback trains through `largo update`): the feedback
that POST /feedback stored on generations (`{rating, completion}`), joined with the logged generation
(its prompt and text), becomes one JSONL line per generation, `{"text": prompt + completion, "prompt",
"completion", "kind", "prediction_id", "version"}`: a correction's completion (kind "correction"), or
the generated text of one rated good (kind "rated good"); a generation only rated bad is counted and
left out. Ratings and corrections come as separate requests, so each is kept on its own: a generation's
latest completion makes it a correction whatever it was rated after; else its latest rating counts.
The file is what `largo pretrain FILE --config lm.yaml` reads (its `text` field), with `train.init_from`
the served bundle. A seq2seq model's feedback (its POST /generate prompts are sources) is written as
pairs under the bundle's own column names, `{<source>: prompt, <target>: completion, "kind",
"prediction_id", "version"}`, a JSONL file `largo train` reads as data (`largo update` uses them
directly).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from largo.data.features import CategoryProcessor
from largo.data.readers import DataError, read_table
from largo.deploy.metadata import BundleInfo, bundle_task, read_bundle_info
from largo.lifecycle.registry import Registry, Version

SHOWN = 5  # bad rows named in one error


@dataclass
class ImportResult:
    """What an import stored: corrections of logged predictions and new labelled rows."""

    corrections: int
    new_rows: int
    version: int


def _labels(info: BundleInfo) -> dict[str, list[str] | None]:
    """output name → its class labels (None for a number output)."""
    out: dict[str, list[str] | None] = {}
    for f in info.config.outputs:
        proc = info.processors[f.name]
        out[f.name] = list(proc.vocab) if isinstance(proc, CategoryProcessor) else None
    return out


def _default_output(labels: dict[str, list[str] | None]) -> str:
    return next((n for n, v in labels.items() if v is not None), next(iter(labels)))


def _label(value: Any, output: str, classes: list[str] | None) -> str | float:
    """A class name for a category output, a number for a number output; ValueError otherwise."""
    if value is None or value == "":
        raise ValueError("no label")
    if classes is None:
        return float(value)
    text = str(value)
    if text.endswith(".0") and text[:-2] in classes and text not in classes:  # 3.0 read from a float column
        text = text[:-2]
    if text not in classes:
        raise ValueError(f"label {text!r} is not a class of {output!r}: {classes[:20]}")
    return text


def _raw_input(row: dict[str, Any], info: BundleInfo, base: Path) -> dict[str, Any]:
    """The model's input columns of a row; image paths made absolute against the file's folder."""
    record = {}
    for f in info.config.inputs:
        value = row.get(f.source)
        if f.type == "image" and isinstance(value, str) and value and not Path(value).is_absolute():
            value = str((base / value).resolve())
        record[f.source] = value
    return record


def _version_for(registry: Registry, ref: str) -> Version:
    """The version whose classes and inputs check the file: `ref`, or the latest when nothing is promoted."""
    if "@" not in ref and "production" not in registry.aliases(ref):
        return registry.versions(ref)[-1]
    return registry.lookup(ref)


def build_rows(registry: Registry, ref: str, path: str | Path) -> tuple[list[dict[str, Any]], Version]:
    """Read and check a corrections file; returns the feedback rows to store and the version used."""
    version = _version_for(registry, ref)
    task = bundle_task(version.path)
    if task in ("lm", "seq2seq"):
        raise ValueError(
            f"{ref}: a {'language' if task == 'lm' else 'seq2seq'} model takes feedback on its generations: "
            'POST /feedback {"prediction_id": ..., "completion": "the right text"} (or "rating") on its '
            "server; `largo feedback export` then writes it out"
        )
    info = read_bundle_info(version.path)
    labels = _labels(info)
    table = read_table(path)
    columns = set(table.column_names)
    default = _default_output(labels)
    rows, errors = [], []
    pending: list[tuple[int, str, dict[str, Any]]] = []  # (line, prediction id, row) to check in the store
    missing = [f.source for f in info.config.inputs if f.source not in columns]
    for i, row in enumerate(table.to_pylist()):
        line = i + 2  # the header is line 1
        output = row.get("output") or default
        if output not in labels:
            errors.append(f"line {line}: unknown output {output!r}; outputs: {list(labels)}")
            continue
        source = next((f.source for f in info.config.outputs if f.name == output), output)
        raw = row.get("label") if "label" in columns else row.get(source)
        try:
            label = _label(raw, output, labels[output])
        except ValueError as exc:
            errors.append(f"line {line}: {exc}")
            continue
        item = {
            "model": version.name,
            "output": output,
            "label": label,
            "time": time.time(),
            "source": "import",
        }
        pid = row.get("prediction_id")
        if pid:
            pending.append((line, str(pid), {**item, "prediction_id": str(pid)}))
        elif missing:
            errors.append(f"line {line}: no prediction_id, and the input columns {missing} are missing")
        else:
            rows.append({**item, "prediction_id": None, "input": _raw_input(row, info, Path(path).parent)})
    found = registry.store.predictions_by_id([pid for _, pid, _ in pending])
    for line, pid, item in pending:
        logged = found.get(pid)
        if logged is None or logged["model"] != version.name:
            errors.append(f"line {line}: no prediction {pid} of model {version.name!r} in the store")
        else:
            rows.append({**item, "predicted": (logged["output"] or {}).get(item["output"]), "input": None})
    if errors:
        more = f" (and {len(errors) - SHOWN} more)" if len(errors) > SHOWN else ""
        raise DataError(f"{path}: nothing imported; {'; '.join(errors[:SHOWN])}{more}")
    return rows, version


def import_feedback(registry: Registry, ref: str, path: str | Path) -> ImportResult:
    """Check a corrections file and store its rows in one transaction (source 'import')."""
    rows, version = build_rows(registry, ref, path)
    registry.store.add_feedback(rows)
    corrections = sum(r["prediction_id"] is not None for r in rows)
    return ImportResult(corrections, len(rows) - corrections, version.version)


@dataclass
class ExportResult:
    """What an export wrote: texts from corrections and from good ratings, and what it left out."""

    corrections: int
    rated_good: int
    rated_bad: int  # only rated bad: no text to learn from
    path: Path
    task: str = "lm"  # the model's: lm, or seq2seq (pairs written)


def lm_feedback_texts(registry: Registry, name: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """A registered language model's feedback as texts to learn from, one per generation (see the
    module doc): `{"text", "prompt", "completion", "kind", "prediction_id", "version", "feedback_ids"}`
    (the feedback rows behind it) in the order the generations were first given feedback, and the
    counts of corrections, rated good and rated bad."""
    versions = registry.versions(name)  # an unknown name raises, naming the registered ones
    if not versions[-1].path.is_dir():
        raise FileNotFoundError(f"{versions[-1].ref}: its bundle folder {versions[-1].path} is missing")
    if bundle_task(versions[-1].path) not in ("lm", "seq2seq"):
        raise ValueError(
            f"{name!r} is not a language or seq2seq model: its feedback trains through `largo update {name}`"
        )
    latest: dict[str, dict[str, Any]] = {}  # generation id → its latest completion and latest rating
    for row in registry.store.feedback_rows(name):  # oldest first
        if row["prediction_id"] and row["output"] == "text" and isinstance(row["label"], dict):
            kept = latest.setdefault(row["prediction_id"], {"completion": None, "rating": None, "ids": []})
            kept |= {k: v for k, v in row["label"].items() if k in ("completion", "rating") and v is not None}
            kept["ids"].append(row["id"])
    logged = registry.store.predictions_by_id(list(latest))
    texts, counts = [], {"correction": 0, "rated good": 0, "rated bad": 0}
    for pid, label in latest.items():
        generation = logged.get(pid)
        if generation is None:  # feedback always names a logged generation; a pruned store may not
            continue
        prompt = (generation["input"] or {}).get("prompt", "")
        completion, rating = label["completion"], label["rating"]
        kind = "correction" if completion else "rated good" if rating == "good" else "rated bad"
        counts[kind] += 1
        if kind == "rated bad":
            continue
        if kind == "rated good":
            completion = (generation["output"] or {}).get("text", "")
        text = {"text": prompt + completion, "prompt": prompt, "completion": completion, "kind": kind}
        texts.append(
            {**text, "prediction_id": pid, "version": generation["version"], "feedback_ids": label["ids"]}
        )
    return texts, counts


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Rows as a UTF-8 JSONL file, written whole or not at all."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows), encoding="utf-8")
    os.replace(tmp, out)
    return out


def export_lm_feedback(registry: Registry, name: str, path: str | Path) -> ExportResult:
    """Write a registered language model's feedback as a JSONL fine-tuning corpus (see the module doc)."""
    texts, counts = lm_feedback_texts(registry, name)
    rows = [{k: v for k, v in t.items() if k != "feedback_ids"} for t in texts]
    bundle = registry.versions(name)[-1].path
    if bundle_task(bundle) == "seq2seq":  # pairs under the bundle's column names
        data = yaml.safe_load((bundle / "config.yaml").read_text(encoding="utf-8"))["data"]
        source, target = data.get("source", "source"), data.get("target", "target")
        kept = ("kind", "prediction_id", "version")
        rows = [{source: r["prompt"], target: r["completion"], **{k: r[k] for k in kept}} for r in rows]
    out = write_jsonl(path, rows)
    task = bundle_task(bundle) or "lm"
    return ExportResult(counts["correction"], counts["rated good"], counts["rated bad"], out, task)
