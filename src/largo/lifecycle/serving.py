"""`largo serve NAME`: serve a registered model, log to the store, follow promotions without a restart.

`NAME` (its production version), `NAME@alias` or `NAME@3` is resolved through the registry and its
bundle checked against the registered file hashes; predictions (with the served version and latency)
and feedback go to the store through `StoreSink`. For a name or an alias, an `AliasWatcher` thread
reads the alias every `poll_s` seconds: when a `largo registry promote` or `rollback` (from any
process) moves it, the new bundle is hash-checked and loaded in the watcher's thread, then swapped
into the running server between two batches (`Service.swap`): no request waits for the load or
fails. A version that cannot be served (changed files, a load error, other inputs) is logged and
the old one stays. `NAME@3` names one version and is never swapped.

Torch-free: with `--runtime onnx` a serving image without torch serves registered models too.

A registered language model (`task: lm`) is served with POST /generate (`generate_service`) the same
way: hash-checked, each generation logged to the store's predictions (prompt and sampling settings in,
text out), and swapped when its alias moves (`GenerateService.swap`: generations already running finish
on the old model).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from largo.deploy.metadata import BundleError, bundle_task
from largo.deploy.predictor import load_predictor
from largo.deploy.server import create_app, predict_options
from largo.lifecycle.registry import PRODUCTION, VERSION_RE, Registry, Version
from largo.lifecycle.sink import StoreSink
from largo.lifecycle.store import Store, default_url

log = logging.getLogger("largo.serving")
Swap = Callable[[Any, int], None]  # (loaded predictor, its version) → serving it


class AliasWatcher:
    """Follows one alias of a model: loads, checks and swaps in the version it points at."""

    def __init__(
        self,
        registry: Registry,
        name: str,
        alias: str,
        current: int,
        swap: Swap,
        load: Callable[[Path], Any],
        poll_s: float = 1.0,
    ):
        self.registry, self.name, self.alias = registry, name, alias
        self.current, self.swap, self.load, self.poll_s = current, swap, load, poll_s
        # a version that could not be served: not tried again until the alias points elsewhere
        self.failed: int | None = None
        self._store_ok = True  # a store that stays away is reported once, not every poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> int | None:
        """One look at the alias; a moved alias gets its version loaded and swapped in (returned)."""
        try:
            target = self.registry.store.aliases(self.name).get(self.alias)
        except Exception as exc:  # noqa: BLE001 - a store that is briefly away must not stop serving
            if self._store_ok:
                log.warning(
                    "cannot read %s@%s (%s); still serving %d", self.name, self.alias, exc, self.current
                )
            self._store_ok = False
            return None
        self._store_ok = True
        if target == self.current:
            self.failed = None
        if target is None or target in (self.current, self.failed):
            return None
        try:
            version = self.registry.get(self.name, target)
            self.registry.verify(version)
            self.swap(self.load(version.path), version.version)
        except Exception as exc:  # noqa: BLE001 - a bad version must not take the good one down
            self.failed = target
            log.error(
                "cannot serve %s@%d (%s); still serving version %d", self.name, target, exc, self.current
            )
            return None
        log.info("%s@%s moved: now serving version %d (was %d)", self.name, self.alias, target, self.current)
        self.current, self.failed = target, None
        return target

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def start(self) -> None:
        """Poll in a daemon thread until `stop()`."""
        self._thread = threading.Thread(target=self._run, name="largo-alias-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (a load in progress finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)


def _watched_alias(ref: str) -> str | None:
    """The alias a ref follows: `name` → production, `name@alias` → alias, `name@3` → None (fixed)."""
    selector = ref.partition("@")[2] or PRODUCTION
    return None if VERSION_RE.fullmatch(selector) else selector


def _lookup(registry: Registry, ref: str) -> Version:
    """The registry's version for `ref`, hash-checked; an unknown name says it is no bundle folder either."""
    names = registry.names()
    if ref.partition("@")[0] not in names:
        known = ", ".join(names) or "none (largo registry add NAME BUNDLE)"
        raise FileNotFoundError(
            f"{ref!r} is neither a bundle folder nor a registered model; registered: {known}"
        )
    version = registry.lookup(ref)
    registry.verify(version)
    return version


def registered_app(
    ref: str,
    *,
    db: str | None = None,
    runtime: str = "auto",
    poll_s: float = 1.0,
    device: str = "auto",
    **app_options: Any,
) -> tuple[FastAPI, AliasWatcher | None]:
    """The server app for a registered model, logging to the store, and its alias watcher (not started).

    Args:
        ref: `NAME`, `NAME@alias` or `NAME@VERSION`.
        db: store URL or SQLite file (default: `LARGO_DB_URL`, else runs/largo.db).
        runtime: as for `load_predictor` (torch, onnx, auto, …); a swapped-in version uses it too.
        device: where a torch runtime runs the model (auto: the GPU when there is one); likewise.
        poll_s: seconds between looks at the alias; 0 or a fixed `NAME@VERSION`: no watcher.
        app_options: passed to `create_app()` (max_batch, max_wait_ms, api_key, …).
    Returns:
        (app, watcher): call `watcher.start()` once the app serves, `watcher.stop()` after.
    """
    registry = Registry(Store(db or default_url()))
    version = _lookup(registry, ref)
    sink = StoreSink(registry.store, version.name, version.version)
    tag = {"sink": sink, "name": version.name, "version": version.version}
    task = bundle_task(version.path)
    if task in ("lm", "seq2seq"):  # POST /generate
        from largo.deploy.generate_service import create_generate_app, generate_app_options, load_generator

        def load(path: Path) -> Any:
            if bundle_task(path) != task:  # the watcher logs it and keeps serving the old model
                raise BundleError(f"{path}: not a {task} bundle like the served {version.ref}; not swapped")
            return load_generator(path, runtime, device)

        app = create_generate_app(load(version.path), **tag, **generate_app_options(app_options))
    else:

        def load(path: Path) -> Any:
            return load_predictor(path, runtime, device=device)

        app = create_app(load(version.path), **tag, **predict_options(app_options))
    alias = _watched_alias(ref)
    if alias is None or poll_s <= 0:
        return app, None
    swap = app.state.service.swap
    return app, AliasWatcher(registry, version.name, alias, version.version, swap, load, poll_s)


def serve_registered(
    ref: str,
    *,
    db: str | None = None,
    runtime: str = "auto",
    poll_s: float = 1.0,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    graceful_timeout_s: float = 30.0,
    device: str = "auto",
    **app_options: Any,
) -> None:
    """Serve a registered model with uvicorn until interrupted, following its alias (see the module doc)."""
    import uvicorn

    _log_to_stderr()
    app, watcher = registered_app(ref, db=db, runtime=runtime, poll_s=poll_s, device=device, **app_options)
    service = app.state.service
    following = f", following {service.name}@{watcher.alias} every {poll_s:g} s" if watcher else ""
    lm = hasattr(service, "generator")
    bundle, route = (service.generator.path, ", POST /generate") if lm else (service.predictor.path, "")
    print(
        f"largo: serving {service.name}@{service.version} ({bundle}{route}) on "
        f"http://{host}:{port}, logging to {service.sink.store!r}{following}"
    )
    if watcher:
        watcher.start()
    try:
        uvicorn.run(
            app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout_s
        )
    finally:
        if watcher:
            watcher.stop()


def _log_to_stderr() -> None:
    """Show largo's own log lines (swaps, errors) next to uvicorn's when serving from the command line."""
    logger = logging.getLogger("largo")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("largo: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
