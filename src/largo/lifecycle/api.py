"""The Python API of the registry and feedback: what `largo registry …` and `largo feedback import` call.

Torch-free. Every function takes `db`: a SQLAlchemy URL or a SQLite file path; None means
`LARGO_DB_URL`, else `runs/largo.db`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from largo.lifecycle.feedback import ExportResult, ImportResult, export_lm_feedback, import_feedback
from largo.lifecycle.registry import Registry, Version
from largo.lifecycle.store import Store, default_url

if TYPE_CHECKING:
    from largo.lifecycle.monitor import MonitorReport
    from largo.lifecycle.update import UpdateConfig, UpdateResult


def open_registry(db: str | None = None) -> Registry:
    """The registry on the store at `db` (default: `LARGO_DB_URL`, else runs/largo.db)."""
    return Registry(Store(db or default_url()))


def _row(v: Version, aliases: dict[str, int]) -> dict[str, Any]:
    return {
        "version": v.version,
        "aliases": sorted(a for a, n in aliases.items() if n == v.version),
        "path": str(v.path),
        "files_hash": v.files_hash,
        "created": v.created,
        "metrics": v.metrics,
        "lineage": v.lineage,
    }


def registry_list(db: str | None = None) -> list[dict[str, Any]]:
    """Every model: name, number of versions, latest version, aliases."""
    registry = open_registry(db)
    out = []
    for name in registry.names():
        versions = registry.versions(name)
        out.append(
            {
                "name": name,
                "versions": len(versions),
                "latest": versions[-1].version,
                "aliases": registry.aliases(name),
            }
        )
    return out


def registry_show(name: str, db: str | None = None) -> dict[str, Any]:
    """A model's versions (path, hash, metrics, lineage, aliases) and its alias history."""
    registry = open_registry(db)
    aliases = registry.aliases(name)
    return {
        "name": name,
        "aliases": aliases,
        "versions": [_row(v, aliases) for v in registry.versions(name)],
        "history": registry.history(name),
    }


def registry_add(
    name: str, bundle: str | Path, db: str | None = None, *, parent: int | None = None
) -> Version:
    """Register a bundle folder as the next version of `name`."""
    return open_registry(db).register(name, bundle, parent=parent)


def promote(name: str, version: int, db: str | None = None) -> Version:
    """Point `production` at `version` (the previous production is kept for rollback)."""
    return open_registry(db).promote(name, version)


def rollback(name: str, db: str | None = None, alias: str = "production") -> Version:
    """Return `alias` (default production) to the version it had before its latest change."""
    return open_registry(db).rollback(name, alias)


def set_alias(name: str, alias: str, version: int, db: str | None = None) -> Version:
    """Point any alias of `name` at `version`."""
    return open_registry(db).set_alias(name, alias, version)


def resolve(ref: str, db: str | None = None) -> Path:
    """`name`, `name@3` or `name@alias` → its bundle folder, checked against the registered file hashes."""
    return open_registry(db).resolve(ref)


def feedback_import(ref: str, path: str | Path, db: str | None = None) -> ImportResult:
    """Import corrections (prediction_id,label) or new labelled rows (inputs + label) for a model."""
    return import_feedback(open_registry(db), ref, path)


def feedback_export(name: str, path: str | Path, db: str | None = None) -> ExportResult:
    """Write a language model's feedback (corrections, generations rated good) as a JSONL corpus."""
    return export_lm_feedback(open_registry(db), name, path)


def update(
    name: str,
    config: str | Path | dict | UpdateConfig | None = None,
    overrides: list[str] | None = None,
    db: str | None = None,
) -> UpdateResult:
    """Fine-tune or retrain NAME's production version on its data plus feedback; promote it if it is better.

    Args:
        name: `NAME` (its production version is updated), or `NAME@VERSION` / `NAME@ALIAS`.
        config: an update YAML file (`update: {mode, epochs, lr, feedback_weight, holdout, gate}`),
            the same as a dict, or None for the defaults.
        overrides: `--set` items such as `update.mode=retrain`.
        db: the store (default: `LARGO_DB_URL`, else runs/largo.db).
    Returns:
        UpdateResult: the new version, old-vs-new scores, the gate's verdict; `table()` prints them.
    """
    from largo.lifecycle.update import load_update_config
    from largo.lifecycle.update import update as run_update  # imports torch

    return run_update(open_registry(db), name, load_update_config(config, overrides))


def monitor(
    name: str, since: str | float | None = None, out: str | Path | None = None, db: str | None = None
) -> MonitorReport:
    """Drift of served inputs and predictions against the training data, as a report (HTML written to out).

    Args:
        name: `NAME` (its production version), `NAME@VERSION` or `NAME@ALIAS`: its training data is
            the reference.
        since: only predictions and feedback from then: `7d`, `24h`, `30m`, an ISO date/time, a Unix time.
        out: the HTML file (default: `<runs>/<run name>/monitor.html`, beside the bundles).
        db: the store.
    """
    from largo.lifecycle.monitor import monitor as run_monitor

    return run_monitor(open_registry(db), name, since, out)
