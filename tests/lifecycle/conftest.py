"""Store fixtures: every store test runs on a SQLite file and on a real PostgreSQL server.

The PostgreSQL server is started once per session from Debian's binaries (`make postgres` installs
them): `initdb` into a temporary folder and `pg_ctl start` on a free loopback port, run as the
`postgres` user when the tests run as root (PostgreSQL refuses to run as root). Each test gets a
fresh database. Only where the binaries are absent is the postgresql case skipped.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from largo.deploy.server import free_port
from largo.lifecycle.store import Store

PG_ROOT = Path("/usr/lib/postgresql")


def _pg_bindir() -> Path | None:
    """The newest installed PostgreSQL's bin folder, if any."""
    found = [p.parent for p in PG_ROOT.glob("*/bin/pg_ctl")]
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0) if found else None


def _as_user(root: Path) -> list[str]:
    """The command prefix that runs the server's binaries as a non-root user when we are root."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
    shutil.chown(root, "postgres")
    return ["runuser", "-u", "postgres", "--"]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """Base URL (no database) of a throw-away PostgreSQL server on 127.0.0.1."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip(f"no PostgreSQL binaries under {PG_ROOT} (install them: make postgres)")
    root = Path(tempfile.mkdtemp(prefix="largo-pg-"))
    prefix, data, port = _as_user(root), root / "data", free_port()

    def run(*args: str) -> None:
        done = subprocess.run([*prefix, *args], cwd=root, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout}\n{done.stderr}"

    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options, "-w", "start")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        stop = [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]
        subprocess.run([*prefix, *stop], cwd=root, capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _admin(base: str, sql: str) -> None:
    import psycopg

    url = base.replace("postgresql+psycopg", "postgresql") + "/postgres"
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(sql)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database: a SQLite file, or a fresh database on the test PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'largo.db'}"
        return
    base = request.getfixturevalue("postgres_url")
    name = f"t_{uuid.uuid4().hex[:12]}"
    _admin(base, f"CREATE DATABASE {name}")
    yield f"{base}/{name}"
    _admin(base, f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """An open Store on `db_url` (both backends)."""
    s = Store(db_url)
    yield s
    s.close()


@pytest.fixture(scope="session")
def iris_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small trained bundle (iris: 4 numbers → species), trained once per session."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    from sklearn.datasets import load_iris

    import largo

    d = load_iris()
    root = tmp_path_factory.mktemp("iris")
    cols = {f"x{i}": d.data[:, i] for i in range(4)} | {"species": [d.target_names[t] for t in d.target]}
    pacsv.write_csv(pa.table(cols), root / "iris.csv")
    train = {"epochs": 2, "batch_size": 32, "progress": False}
    return largo.train(
        {
            "name": "iris",
            "runs_dir": str(root / "runs"),
            "data": {"train": str(root / "iris.csv"), "valid": 0.15, "test": 0.15},
            "inputs": [{"name": f"x{i}", "type": "number"} for i in range(4)],
            "outputs": [{"name": "species", "type": "category"}],
            "model": {"hidden": [8]},
            "train": train,
        }
    ).path


@pytest.fixture
def bundle(iris_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the iris bundle (tests edit it)."""
    return Path(shutil.copytree(iris_bundle, tmp_path / "bundle"))
