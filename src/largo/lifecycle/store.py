"""The store: registered versions, aliases, served predictions and feedback, in one SQL database.

SQLAlchemy Core on a SQLite file by default (`<runs_dir>/largo.db`), or any URL in `LARGO_DB_URL`
(e.g. `postgresql://user@host/db` when one machine is not enough). Every write is one transaction.

Concurrency: SQLite runs in WAL mode with a busy timeout, and write transactions start with
`BEGIN IMMEDIATE`, so writers queue for the lock instead of failing on a lock upgrade; PostgreSQL
serializes what must be serialized (a model's version numbers and alias history) with a row lock on
the model. Plain inserts (predictions, feedback) need no more than their transaction on either.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

ENV_URL = "LARGO_DB_URL"
DB_FILE = "largo.db"
BUSY_TIMEOUT_MS = 30_000

metadata = sa.MetaData()

models = sa.Table(
    "models",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("created", sa.Double, nullable=False),
)

versions = sa.Table(
    "versions",
    metadata,
    sa.Column("model", sa.String(200), sa.ForeignKey("models.name"), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("files_hash", sa.String(64), nullable=False),  # sha256 over the files' hashes
    sa.Column("files", sa.JSON, nullable=False),  # {relative path: sha256}: names what changed
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("lineage", sa.JSON, nullable=False),  # data files + sha256, parent version, feedback ids
    sa.Column("created", sa.Double, nullable=False),
)

aliases = sa.Table(
    "aliases",
    metadata,
    sa.Column("model", sa.String(200), sa.ForeignKey("models.name"), primary_key=True),
    sa.Column("alias", sa.String(200), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated", sa.Double, nullable=False),
)

# every alias change, oldest first: what rollback replays to find the version before the current one
alias_history = sa.Table(
    "alias_history",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model", sa.String(200), nullable=False, index=True),
    sa.Column("alias", sa.String(200), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("action", sa.String(20), nullable=False),  # set | rollback
    sa.Column("time", sa.Double, nullable=False),
)

predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),  # the uuid the server answered with
    sa.Column("model", sa.String(200), nullable=False, index=True),
    sa.Column("version", sa.Integer, nullable=True),  # None: a bundle served without the registry
    sa.Column("time", sa.Double, nullable=False, index=True),
    sa.Column("input", sa.JSON, nullable=False),
    sa.Column("output", sa.JSON, nullable=False),
    sa.Column("latency_ms", sa.Double, nullable=True),
)

feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("prediction_id", sa.String(36), nullable=True, index=True),  # None: a new labelled row
    sa.Column("model", sa.String(200), nullable=False, index=True),
    sa.Column("output", sa.String(200), nullable=False),
    sa.Column("label", sa.JSON, nullable=False),  # a class name, or a number for a number output
    sa.Column("predicted", sa.JSON, nullable=True),
    sa.Column("input", sa.JSON, nullable=True),  # the raw input of a row without a prediction id
    sa.Column("time", sa.Double, nullable=False),
    sa.Column("source", sa.String(10), nullable=False),  # api | import
)


class StoreError(ValueError):
    """The store cannot be opened or a write would break it; the message says which and why."""


def default_url(runs_dir: str | Path = "runs") -> str:
    """`LARGO_DB_URL` when set, else a SQLite file `<runs_dir>/largo.db`."""
    return os.environ.get(ENV_URL) or f"sqlite:///{Path(runs_dir) / DB_FILE}"


def normalize_url(url: str) -> str:
    """A plain path → a SQLite URL; `postgresql://` → the psycopg 3 driver (`largo[postgres]`)."""
    if "://" not in url:
        return f"sqlite:///{url}"
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays as Python numbers and lists; anything else as its string."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=_jsonable)


def _sqlite_pragmas(engine: Engine) -> None:
    """WAL (readers never block the writer), a busy timeout, and BEGIN IMMEDIATE for write transactions.

    pysqlite's own transaction handling is switched off so that SQLAlchemy's `begin` event decides
    what BEGIN says (the recipe in SQLAlchemy's SQLite dialect docs).
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")  # first: WAL may need to wait
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("largo_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _complete(table: sa.Table, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row with every column (None where absent): executemany takes the first row's columns."""
    return [{c.name: r.get(c.name) for c in table.columns} for r in rows]


class Store:
    """One database: open it with `Store(url)` (default: `default_url()`); the schema is created on open."""

    def __init__(self, url: str | None = None):
        self.url = normalize_url(url or default_url())
        kwargs: dict[str, Any] = {"json_serializer": _dumps}
        if self.url.startswith("sqlite"):
            database = sa.engine.make_url(self.url).database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine = sa.create_engine(self.url, **kwargs)
        self.dialect = self.engine.dialect.name
        if self.dialect == "sqlite":
            _sqlite_pragmas(self.engine)
        try:
            self._create_schema()
        except SQLAlchemyError as exc:
            shown = self.engine.url.render_as_string(hide_password=True)
            raise StoreError(
                f"cannot open the store at {shown}: {exc.__class__.__name__}: {exc.orig or exc}"
            ) from exc

    def __repr__(self) -> str:
        return f"Store({self.engine.url.render_as_string(hide_password=True)!r})"

    def _create_schema(self) -> None:
        """Create missing tables; several processes opening a new database at once take turns."""
        with self.write() as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(4242001)"))
            metadata.create_all(conn)

    def close(self) -> None:
        """Close the pooled connections."""
        self.engine.dispose()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: committed when the block ends, rolled back on an exception."""
        with self.engine.connect() as conn:
            conn.execution_options(largo_write=True)
            with conn.begin():
                yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only connection (one consistent snapshot on SQLite)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    # ------------------------------------------------------------------------------ models, versions

    def lock_model(self, conn: Connection, name: str) -> None:
        """Create the model row if needed and lock it until the transaction ends (per-model writes)."""
        if conn.execute(sa.select(models.c.name).where(models.c.name == name)).first() is None:
            try:
                with conn.begin_nested():
                    conn.execute(models.insert().values(name=name, created=time.time()))
            except IntegrityError:
                pass  # another writer created it first
        conn.execute(sa.select(models.c.name).where(models.c.name == name).with_for_update()).first()

    def add_version(
        self, name: str, path: str, files: dict[str, str], files_hash: str, metrics: dict, lineage: dict
    ) -> int:
        """Insert the model's next version number; returns it."""
        with self.write() as conn:
            self.lock_model(conn, name)
            last = conn.execute(sa.select(sa.func.max(versions.c.version)).where(versions.c.model == name))
            number = (last.scalar() or 0) + 1
            conn.execute(
                versions.insert().values(
                    model=name,
                    version=number,
                    path=path,
                    files=files,
                    files_hash=files_hash,
                    metrics=metrics,
                    lineage=lineage,
                    created=time.time(),
                )
            )
        return number

    def model_names(self) -> list[str]:
        """Every registered model name, sorted."""
        with self.read() as conn:
            return list(conn.execute(sa.select(models.c.name).order_by(models.c.name)).scalars())

    def versions(self, name: str) -> list[dict[str, Any]]:
        """The model's versions, oldest first, as dicts of the `versions` columns."""
        query = sa.select(versions).where(versions.c.model == name).order_by(versions.c.version)
        with self.read() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def version(self, name: str, number: int) -> dict[str, Any] | None:
        """One version's row, or None."""
        query = sa.select(versions).where(versions.c.model == name, versions.c.version == number)
        with self.read() as conn:
            row = conn.execute(query).first()
        return dict(row._mapping) if row else None

    # ------------------------------------------------------------------------------------- aliases

    def aliases(self, name: str) -> dict[str, int]:
        """alias → version for one model."""
        query = sa.select(aliases.c.alias, aliases.c.version).where(aliases.c.model == name)
        with self.read() as conn:
            return {a: v for a, v in conn.execute(query.order_by(aliases.c.alias))}

    def set_alias(self, conn: Connection, name: str, alias: str, version: int, action: str = "set") -> None:
        """Point `alias` at `version` and append the change to the history (inside a write transaction)."""
        now = time.time()
        where = (aliases.c.model == name) & (aliases.c.alias == alias)
        if conn.execute(sa.select(aliases.c.version).where(where)).first() is None:
            conn.execute(aliases.insert().values(model=name, alias=alias, version=version, updated=now))
        else:
            conn.execute(aliases.update().where(where).values(version=version, updated=now))
        conn.execute(
            alias_history.insert().values(model=name, alias=alias, version=version, action=action, time=now)
        )

    def alias_history(self, conn: Connection, name: str, alias: str) -> list[tuple[str, int]]:
        """(action, version) of every change of one alias, oldest first."""
        query = (
            sa.select(alias_history.c.action, alias_history.c.version)
            .where(alias_history.c.model == name, alias_history.c.alias == alias)
            .order_by(alias_history.c.id)
        )
        return [(a, v) for a, v in conn.execute(query)]

    # -------------------------------------------------------------------------- predictions, feedback

    def add_predictions(self, rows: list[dict[str, Any]]) -> None:
        """Insert prediction rows (id, model, version, time, input, output, latency_ms) in one transaction."""
        if rows:
            with self.write() as conn:
                conn.execute(predictions.insert(), _complete(predictions, rows))

    def add_feedback(self, rows: list[dict[str, Any]]) -> list[str]:
        """Insert feedback rows in one transaction (an id is made for rows without one); returns the ids."""
        rows = [{"id": str(uuid.uuid4()), **r} for r in rows]
        if rows:
            with self.write() as conn:
                conn.execute(feedback.insert(), _complete(feedback, rows))
        return [r["id"] for r in rows]

    def predictions_by_id(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Prediction rows for these ids (the unknown ones are absent)."""
        found: dict[str, dict[str, Any]] = {}
        with self.read() as conn:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                query = sa.select(predictions).where(predictions.c.id.in_(chunk))
                found |= {r.id: dict(r._mapping) for r in conn.execute(query)}
        return found

    def count(self, table: sa.Table, model: str | None = None) -> int:
        """Rows in `table` (predictions, feedback, versions …), optionally of one model."""
        query = sa.select(sa.func.count()).select_from(table)
        if model is not None:
            query = query.where(table.c.model == model)
        with self.read() as conn:
            return int(conn.execute(query).scalar() or 0)

    def feedback_rows(self, model: str) -> list[dict[str, Any]]:
        """A model's feedback, oldest first."""
        query = sa.select(feedback).where(feedback.c.model == model).order_by(feedback.c.time, feedback.c.id)
        with self.read() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]
