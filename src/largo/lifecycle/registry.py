"""The model registry: named, numbered, immutable bundle versions with aliases.

`register()` records a bundle folder as the next version of a name, with a sha256 of each of its
files; `resolve()` turns `name`, `name@3` or `name@alias` into the bundle folder and re-hashes it, so
a bundle whose files changed since it was registered is an error naming the files. Aliases are any
name (`production` and `candidate` are conventions); `promote()` moves `production`, and
`rollback()` returns an alias to the version it pointed at before its latest change.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml

from largo.deploy.metadata import ADAPTER_RECORD, bundle_task
from largo.lifecycle.store import Store, alias_history

PRODUCTION = "production"
# written next to the weights by later stages, or big and not needed to serve: not part of the hash
UNHASHED_DIRS = ("serving", "evaluations", "checkpoints")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
ALIAS_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
VERSION_RE = re.compile(r"v?(\d+)")
CHUNK = 1 << 20
TASK_KINDS = {"lm": "language model", "seq2seq": "seq2seq model", None: "model of input/output features"}


class RegistryError(ValueError):
    """An unknown name, version or alias, or a request the registry cannot honour."""


class BundleChangedError(RegistryError):
    """A registered bundle whose files differ from the ones hashed when it was registered."""


@dataclass
class Version:
    """One registered version: where its bundle is and what it was registered with."""

    name: str
    version: int
    path: Path
    files_hash: str
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    created: float

    @property
    def ref(self) -> str:
        """`name@version`."""
        return f"{self.name}@{self.version}"


# ------------------------------------------------------------------------------------------ hashing


def sha256_file(path: Path) -> str:
    """sha256 of one file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def hash_files(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative posix path: sha256} of every file below `folder`, minus the top-level `skip` folders."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if rel.parts[0] not in skip:
            files[rel.as_posix()] = sha256_file(path)
    return files


def combined_hash(files: dict[str, str]) -> str:
    """One sha256 over the sorted (path, file hash) pairs: the content hash of a bundle or data folder."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]}\n".encode())
    return digest.hexdigest()


def data_lineage(bundle: Path) -> list[dict[str, Any]]:
    """The data files the bundle's config names (train, and valid/test when paths; a language model's
    corpus paths), with their sha256."""
    config = yaml.safe_load((bundle / "config.yaml").read_text(encoding="utf-8")) or {}
    data = config.get("data") or {}
    named = [(split, data.get(split)) for split in ("train", "valid", "test")]
    if config.get("task") == "lm":
        named = [("corpus", p) for p in data.get("paths") or []]
    return [
        {"split": split, "path": str(Path(value).resolve()), "sha256": path_sha256(value)}
        for split, value in named
        if isinstance(value, str)
    ]


def path_sha256(path: str | Path) -> str | None:
    """A data file's sha256, a folder's combined hash of its files, or None when it is gone."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        return combined_hash(hash_files(path))
    return None  # moved or deleted since training: recorded as unknown


def _changes(registered: dict[str, str], now: dict[str, str]) -> list[str]:
    changed = [f"{n} changed" for n in registered if n in now and now[n] != registered[n]]
    missing = [f"{n} missing" for n in registered if n not in now]
    added = [f"{n} added" for n in now if n not in registered]
    return changed + missing + added


# ----------------------------------------------------------------------------------------- registry


def _check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise RegistryError(f"bad model name {name!r}: letters, digits, '_', '.', '-' (no '@')")
    return name


def _check_alias(alias: str) -> str:
    if not ALIAS_RE.fullmatch(alias) or VERSION_RE.fullmatch(alias):
        raise RegistryError(
            f"bad alias {alias!r}: it starts with a letter or '_' and is not a version number like 3 or v3"
        )
    return alias


def _as_version(row: dict[str, Any]) -> Version:
    return Version(
        row["model"], row["version"], Path(row["path"]), row["files_hash"], row["metrics"], row["lineage"],
        row["created"],
    )  # fmt: skip


def _summary_metrics(bundle: Path) -> dict[str, Any]:
    """The headline parts of metrics.json (test/valid scores, split sizes), not the per-epoch history."""
    path = bundle / "metrics.json"
    if not path.exists():
        return {}
    metrics = json.loads(path.read_text(encoding="utf-8"))
    return {k: metrics[k] for k in ("test", "valid", "splits", "versions") if k in metrics}


class Registry:
    """Named versions of bundles in a `Store`; see the module docstring."""

    def __init__(self, store: Store):
        self.store = store

    def register(
        self,
        name: str,
        bundle: str | Path,
        *,
        parent: int | None = None,
        feedback_ids: list[str] | None = None,
    ) -> Version:
        """Register a bundle folder as the next version of `name` (created on first use).

        Args:
            name: the model name.
            bundle: a finished bundle folder (config.yaml and model.safetensors at least).
            parent: the version this one was trained or fine-tuned from (lineage).
            feedback_ids: the feedback rows its training data included (lineage).
        Returns:
            The new Version.
        """
        _check_name(name)
        path = Path(bundle).resolve()
        lm = bundle_task(path) in ("lm", "seq2seq")  # a tokenizer instead of preprocessors
        needed = ("config.yaml", "tokenizer.json") if lm else ("config.yaml", "preprocessors.json")
        missing = [f for f in needed if not (path / f).is_file()]
        if not path.is_dir() or missing:
            raise RegistryError(
                f"{bundle}: not a bundle folder" + (f" (no {', '.join(missing)})" * bool(missing))
            )
        if lm and (path / ADAPTER_RECORD).is_file():
            raise RegistryError(
                f"{bundle}: an adapter-only LoRA bundle needs its base folder, which the registry does not "
                "hash; register a merged one (train.lora.save: merged)"
            )
        if not any((path / f).is_file() for f in ("model.safetensors", "model.onnx")):
            raise RegistryError(f"{bundle}: no model.safetensors (an unfinished run?)")
        if parent is not None:
            self.get(name, parent)
        self._check_task(name, path)
        files = hash_files(path, UNHASHED_DIRS)
        lineage = {"data": data_lineage(path), "parent": parent, "feedback_ids": list(feedback_ids or [])}
        number = self.store.add_version(
            name, str(path), files, combined_hash(files), _summary_metrics(path), lineage
        )
        return self.get(name, number)

    def _check_task(self, name: str, path: Path) -> None:
        """A name holds models of one task: a language model, a seq2seq model or a model of features
        (its server, its feedback and its updates all depend on which)."""
        if not self.store.versions(name):
            return
        latest = self.versions(name)[-1]
        new, old = bundle_task(path), bundle_task(latest.path) if latest.path.is_dir() else None
        if latest.path.is_dir() and new != old:
            raise RegistryError(
                f"{path}: a {TASK_KINDS[new]}, but {latest.ref} is a {TASK_KINDS[old]}; register it under "
                "another name"
            )

    def names(self) -> list[str]:
        """Every registered model name."""
        return self.store.model_names()

    def versions(self, name: str) -> list[Version]:
        """A model's versions, oldest first; an unknown name is an error naming the known ones."""
        rows = self.store.versions(name)
        if not rows:
            known = ", ".join(self.names()) or "none yet (largo registry add NAME BUNDLE)"
            raise RegistryError(f"unknown model {name!r}; registered models: {known}")
        return [_as_version(r) for r in rows]

    def get(self, name: str, version: int) -> Version:
        """One version; an unknown one is an error naming the model's versions."""
        row = self.store.version(name, version)
        if row is None:
            known = ", ".join(str(v.version) for v in self.versions(name))
            raise RegistryError(f"{name} has no version {version}; versions: {known}")
        return _as_version(row)

    def aliases(self, name: str) -> dict[str, int]:
        """alias → version of a model."""
        self.versions(name)  # an unknown name fails here with the known ones
        return self.store.aliases(name)

    def set_alias(self, name: str, alias: str, version: int) -> Version:
        """Point `alias` of `name` at `version` (any alias name; the change is kept for rollback)."""
        _check_alias(alias)
        target = self.get(name, version)
        with self.store.write() as conn:
            self.store.lock_model(conn, name)
            self.store.set_alias(conn, name, alias, version)
        return target

    def promote(self, name: str, version: int) -> Version:
        """Make `version` the production version; `rollback()` returns to the one before."""
        return self.set_alias(name, PRODUCTION, version)

    def rollback(self, name: str, alias: str = PRODUCTION) -> Version:
        """Point `alias` back at the version it had before its latest change; returns that version.

        Changes form a stack: each set pushes, each rollback pops, so rolling back twice after
        promoting v1, v2, v3 returns to v1.
        """
        self.versions(name)
        with self.store.write() as conn:
            self.store.lock_model(conn, name)
            stack: list[int] = []
            for action, version in self.store.alias_history(conn, name, alias):
                if action == "rollback":
                    stack.pop()
                else:
                    stack.append(version)
            if len(stack) < 2:
                now = f"it points at version {stack[-1]}" if stack else "it was never set"
                raise RegistryError(f"nothing to roll back to: {name}@{alias} has no earlier version ({now})")
            self.store.set_alias(conn, name, alias, stack[-2], action="rollback")
        return self.get(name, stack[-2])

    def lookup(self, ref: str) -> Version:
        """`name` (its production version), `name@3` / `name@v3`, or `name@alias` → the Version."""
        name, _, selector = ref.partition("@")
        selector = selector or PRODUCTION
        if m := VERSION_RE.fullmatch(selector):
            return self.get(name, int(m.group(1)))
        known = self.aliases(name)
        if selector not in known:
            shown = ", ".join(f"{a} → {v}" for a, v in known.items()) or "none"
            versions = ", ".join(str(v.version) for v in self.versions(name))
            hint = f" (largo registry promote {name} VERSION)" if selector == PRODUCTION else ""
            raise RegistryError(
                f"{name} has no alias {selector!r}{hint}; aliases: {shown}; versions: {versions}"
            )
        return self.get(name, known[selector])

    def verify(self, version: Version) -> None:
        """Raise BundleChangedError naming each file changed, missing or added since registration."""
        if not version.path.is_dir():
            raise BundleChangedError(f"{version.ref}: its bundle folder {version.path} no longer exists")
        row = self.store.version(version.name, version.version) or {}
        changes = _changes(row.get("files", {}), hash_files(version.path, UNHASHED_DIRS))
        if changes:
            raise BundleChangedError(
                f"{version.ref}: the bundle {version.path} changed since it was registered: "
                f"{'; '.join(changes)}. Registered bundles are immutable: restore the files, or write "
                "the changed bundle to a new folder and register that as a new version"
            )

    def resolve(self, ref: str, *, verify: bool = True) -> Path:
        """`name`, `name@version` or `name@alias` → the bundle folder, checked against its file hashes."""
        version = self.lookup(ref)
        if verify:
            self.verify(version)
        return version.path

    def history(self, name: str) -> list[dict[str, Any]]:
        """Every alias change of a model, oldest first: {alias, version, action, time}."""
        t = alias_history
        query = sa.select(t.c.alias, t.c.version, t.c.action, t.c.time).where(t.c.model == name)
        with self.store.read() as conn:
            return [dict(r._mapping) for r in conn.execute(query.order_by(t.c.id))]
