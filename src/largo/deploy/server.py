"""Serve a bundle over HTTP: `create_app()` (FastAPI, dynamic batching, auth) and `serve_bundle()` (uvicorn).

Endpoints: POST /predict (one record or a list, JSON or multipart), POST /feedback, GET /health,
GET /metrics (Prometheus text), GET / (a page to try the model), /openapi.json (with a request model
built from the bundle's input features). A language-model bundle gets POST /generate instead, with the
same limits, auth and metrics (deploy/generate_service.py; `serve_bundle()` picks the app).

This module never imports torch: the predictor is any object with `predict(records)`, `config`,
`labels` and `path` (the eager torch `Predictor` or the ONNX Runtime one), and `serve_bundle()` loads
it through `largo.deploy.predictor.load_predictor` only when called. Nothing here imports lifecycle/:
predictions and feedback go to a sink (`deploy.sink.JsonlSink` by default).

Hot swap: `app.state.service.swap(predictor, version)` serves another model with the same inputs and
outputs from the next batch on, without a restart (lifecycle/serving.py calls it on promote/rollback).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import threading
import time
import urllib.request
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from largo.data.readers import DataError
from largo.deploy.batcher import Batcher, QueueFullError
from largo.deploy.metrics import ServerMetrics
from largo.deploy.middleware import BodyLimit, NumpyJSONResponse, RequestMetrics
from largo.deploy.page import render_page
from largo.deploy.schema import InputError, RecordParser, loggable
from largo.deploy.sink import JsonlSink, Sink

log = logging.getLogger("largo.server")
MiB = 1 << 20
RECENT_IDS = 100_000  # prediction ids remembered for /feedback validation


class Feedback(BaseModel):
    """The right answer for a served prediction."""

    prediction_id: uuid.UUID = Field(..., description="The `id` of a prediction from POST /predict.")
    label: str | int | float = Field(..., description="The right class label (a value for a number output).")
    output: str | None = Field(None, description="Which output; default: the first category output.")


class ModelError(RuntimeError):
    """A forward pass failed; answered 500 with the error id that the server log also shows."""

    def __init__(self, message: str, error_id: str):
        super().__init__(message)
        self.error_id = error_id


# ------------------------------------------------------------------------------------------ app


def _output_info(predictor: Any) -> list[dict[str, Any]]:
    labels = predictor.labels
    return [
        {"name": f.name, "type": f.type, **({"labels": list(labels[f.name])} if f.name in labels else {})}
        for f in predictor.config.outputs
    ]


def _prediction_schema(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    props: dict[str, Any] = {"id": {"type": "string", "format": "uuid", "description": "For POST /feedback."}}
    for o in outputs:
        if "labels" in o:
            props[o["name"]] = {"type": "string", "enum": o["labels"]}
            props[f"{o['name']}_probability"] = {"type": "number"}
            props[f"{o['name']}_probabilities"] = {
                "type": "object",
                "additionalProperties": {"type": "number"},
            }
        else:
            props[o["name"]] = {"type": "number"}
    props["warnings"] = {"type": "array", "items": {"type": "string"}}
    return {"title": "Prediction", "type": "object", "properties": props, "required": list(props)[:2]}


def _openapi(app: FastAPI, parser: RecordParser, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """FastAPI's schema plus the bundle's Record and Prediction models on POST /predict."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    comps["Record"] = parser.model.model_json_schema()
    comps["Prediction"] = _prediction_schema(outputs)
    record, pred = {"$ref": "#/components/schemas/Record"}, {"$ref": "#/components/schemas/Prediction"}
    form = json.loads(json.dumps(comps["Record"]))
    for f in parser.inputs:
        if f.type == "image":
            form["properties"][f.source] = {"type": "string", "format": "binary"}
    op = schema["paths"]["/predict"]["post"]
    op["requestBody"] = {
        "required": True,
        "content": {
            "application/json": {"schema": {"anyOf": [record, {"type": "array", "items": record}]}},
            "multipart/form-data": {"schema": form},
        },
    }
    op["responses"]["200"]["content"] = {
        "application/json": {"schema": {"anyOf": [pred, {"type": "array", "items": pred}]}}
    }
    app.openapi_schema = schema
    return schema


class Service:
    """What the routes do: parse, queue, answer, remember ids, log; owns the batcher and the metrics."""

    def __init__(
        self,
        predictor: Any,
        sink: Sink,
        *,
        max_batch: int,
        max_wait_ms: float,
        queue_size: int,
        max_records: int,
        group_by_length: bool | None,
        name: str | None = None,
        version: int | None = None,
    ):
        self.predictor, self.version, self.sink = predictor, version, sink
        self.inputs, self.outputs = list(predictor.config.inputs), _output_info(predictor)
        self.name = name or getattr(predictor.config, "name", None) or Path(predictor.path).name
        self._swap_lock = threading.Lock()
        self.parser = RecordParser(self.inputs, max_records)
        self.texts = any(f.type == "text" for f in self.inputs)
        self.recent: OrderedDict[str, dict[str, Any]] = OrderedDict()  # prediction id → its outputs
        self.metrics = ServerMetrics(lambda: self.batcher.depth)
        self.batcher = Batcher(
            partial(self.run_batch, predictor=predictor, version=version),
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            queue_size=queue_size,
            group_by_length=self.texts if group_by_length is None else group_by_length,
            on_batch=self.metrics.observe_batch,
        )

    def run_batch(
        self, records: list[dict[str, Any]], waited: list[float], *, predictor: Any, version: int | None
    ) -> list[dict[str, Any]]:
        """In the worker thread: one forward pass, a prediction id per record, the batch's log rows.

        A row's `latency_ms` is the record's time in the queue plus the forward pass; `version` (when
        serving a registered version) is the version that answered.
        """
        t = time.perf_counter()
        results = [{"id": str(uuid.uuid4()), **r} for r in predictor.predict(records)]
        now, forward = time.time(), time.perf_counter() - t
        tag = {} if version is None else {"version": version}
        rows = [
            {
                "id": r["id"],
                "time": now,
                **tag,
                "inputs": loggable(x),
                "outputs": {k: v for k, v in r.items() if k != "id"},
                "latency_ms": round((w + forward) * 1000, 3),
            }
            for x, r, w in zip(records, results, waited, strict=True)
        ]
        try:
            self.sink.log_predictions(rows)
        except Exception:  # noqa: BLE001 - a full disk must not stop predictions
            log.exception("the sink failed to log %d predictions", len(rows))
        return results

    def swap(self, predictor: Any, version: int | None = None) -> None:
        """Serve `predictor` (already loaded) from the next batch on, without dropping a request.

        The batch in the forward pass now finishes on the old model; every later batch runs on the
        new one. Safe to call from any thread. The new model must have the same inputs and outputs
        (names, types, classes): the request schema, the page and the feedback checks stay as they are.
        """
        inputs = [(f.name, f.source, f.type) for f in predictor.config.inputs]
        if (
            inputs != [(f.name, f.source, f.type) for f in self.inputs]
            or _output_info(predictor) != self.outputs
        ):
            raise ValueError(
                f"cannot swap in {predictor.path}: its inputs or outputs (or classes) differ from the served "
                f"model's ({self.predictor.path}); restart the server to serve it"
            )
        with self._swap_lock:
            self.batcher.swap(partial(self.run_batch, predictor=predictor, version=version))
            self.predictor, self.version = predictor, version
        log.info("now serving %s version %s from %s", self.name, version, predictor.path)

    async def predict(self, request: Request) -> Any:
        """Predict; the body is a record, a list of records, or a multipart form (one record, image files)."""
        records, single = await _parse(request, self.parser)
        lengths = [self.parser.length(r) for r in records] if self.texts else None
        try:
            futures = self.batcher.submit(records, lengths)
        except QueueFullError as exc:
            raise HTTPException(503, f"{exc}; retry shortly", headers={"Retry-After": "1"}) from None
        answers = await asyncio.gather(*futures, return_exceptions=True)
        results = [_answer(a, i, single) for i, a in enumerate(answers)]
        for r in results:
            self.recent[r["id"]] = {o["name"]: r.get(o["name"]) for o in self.outputs}
        while len(self.recent) > RECENT_IDS:
            self.recent.popitem(last=False)
        return results[0] if single else results

    async def feedback(self, body: Feedback) -> dict[str, Any]:
        """Store the right label for a served prediction (appended through the sink)."""
        out = _feedback_output(body, self.outputs)
        label = _feedback_label(body.label, out)
        pid = str(body.prediction_id)
        served = await find_served(pid, self.recent.get(pid), self.sink)
        predicted = served.get(out["name"])
        row = {
            "prediction_id": pid,
            "output": out["name"],
            "label": label,
            "predicted": predicted,
            "time": time.time(),
        }
        await asyncio.to_thread(self.sink.log_feedback, row)
        return {"status": "stored", **row}

    async def health(self) -> dict[str, Any]:
        """Liveness, the served model (name, registered version, bundle), queue depth (no API key needed)."""
        return {
            "status": "ok",
            "model": self.name,
            "version": self.version,
            "bundle": str(self.predictor.path),
            "queue_depth": self.batcher.depth,
        }

    async def prometheus(self) -> PlainTextResponse:
        """Requests, errors by code, latency and batch-size histograms, queue depth (Prometheus text)."""
        text = self.metrics.render()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def find_served(pid: str, remembered: Any, sink: Any, noun: str = "prediction") -> dict[str, Any]:
    """The outputs of the served `noun` that feedback names: `remembered` (what this server kept of it),
    else what a store-backed sink (one with `find_prediction`) logged for this model, from any version
    or replica; 404 when neither has it."""
    find = getattr(sink, "find_prediction", None)
    if remembered is None and find is not None:
        remembered = await asyncio.to_thread(find, pid)
    if remembered is None:
        where = "by this model" if find is not None else "by this server recently"
        raise HTTPException(404, f"unknown {noun} id {pid} (not served {where})")
    return remembered


def key_check(api_key: str | None) -> Any:
    """A FastAPI dependency: 401 unless `Authorization: Bearer <api_key>` (constant-time compare)."""

    def require_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})

    return Depends(require_key)


def add_error_handlers(app: FastAPI) -> None:
    """422/413 for bad input, 500 with an error id for a model error or anything unexpected."""

    @app.exception_handler(InputError)
    async def _invalid(request: Request, exc: InputError) -> JSONResponse:
        return NumpyJSONResponse({"detail": exc.errors}, status_code=exc.status_code)

    @app.exception_handler(ModelError)
    async def _model_failed(request: Request, exc: ModelError) -> JSONResponse:
        return NumpyJSONResponse({"detail": str(exc), "error_id": exc.error_id}, status_code=500)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        error_id = str(uuid.uuid4())
        log.error("error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
        return NumpyJSONResponse({"detail": "internal error", "error_id": error_id}, status_code=500)


def create_app(
    predictor: Any,
    *,
    sink: Sink | None = None,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    queue_size: int = 1024,
    max_body_bytes: int = 16 * MiB,
    max_records: int | None = None,
    api_key: str | None = None,
    group_by_length: bool | None = None,
    name: str | None = None,
    version: int | None = None,
) -> FastAPI:
    """A FastAPI app serving one predictor with dynamic batching.

    Args:
        predictor: has `predict(list_of_records) -> list[dict]`, `config` (inputs, outputs), `labels`, `path`.
        sink: gets `log_predictions(rows)` and `log_feedback(row)`; default `JsonlSink(<bundle>/serving)`.
        max_batch: most records per forward pass.
        max_wait_ms: longest the oldest waiting record waits for a batch to fill.
        queue_size: most records waiting; more are answered 503 with Retry-After.
        max_body_bytes: larger request bodies are answered 413.
        max_records: most records in one request (default: queue_size); more are answered 413.
        api_key: when set, /predict, /feedback and /metrics need `Authorization: Bearer <key>`.
        group_by_length: batch texts of similar length together (default: on when an input is a text).
        name: the served name in /health and the page (default: the config's name).
        version: the registered version served, in /health and in every logged prediction row.
    """
    sink = sink if sink is not None else JsonlSink(Path(predictor.path) / "serving")
    service = Service(
        predictor,
        sink,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        queue_size=queue_size,
        max_records=max_records or queue_size,
        group_by_length=group_by_length,
        name=name,
        version=version,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        await service.batcher.start()
        log.info("serving %s (max_batch=%d, max_wait_ms=%g)", predictor.path, max_batch, max_wait_ms)
        yield
        await service.batcher.stop()  # uvicorn stopped accepting and let in-flight requests finish first

    app = FastAPI(
        title=f"largo: {service.name}",
        version="1",
        lifespan=lifespan,
        default_response_class=NumpyJSONResponse,
    )
    app.state.service = service
    endpoints = {"/", "/predict", "/feedback", "/health", "/metrics", "/openapi.json"}
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=service.metrics, endpoints=endpoints)
    add_error_handlers(app)
    key = [key_check(api_key)]
    app.post("/predict", dependencies=key, summary="Predict one record or a list")(service.predict)
    app.post("/feedback", dependencies=key, summary="The right label for a prediction")(service.feedback)
    app.get("/health", summary="Liveness and queue depth")(service.health)
    app.get("/metrics", dependencies=key, response_class=PlainTextResponse)(service.prometheus)
    inputs = [{"name": f.name, "source": f.source, "type": f.type} for f in service.inputs]
    page = render_page(service.name, inputs, service.outputs, auth=api_key is not None)
    app.get("/", response_class=HTMLResponse, include_in_schema=False)(lambda: HTMLResponse(page))
    app.openapi = lambda: _openapi(app, service.parser, service.outputs)  # type: ignore[method-assign]
    return app


async def _parse(request: Request, parser: RecordParser) -> tuple[list[dict[str, Any]], bool]:
    """The request body → validated records; multipart/urlencoded forms carry one record."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        async with request.form() as form:
            return parser.from_form(form)
    return parser.from_json(await request.body())


def _answer(answer: Any, index: int, single: bool) -> dict[str, Any]:
    """A record's result, or the HTTP error its exception maps to (422 bad input, 500 model error)."""
    if not isinstance(answer, BaseException):
        return answer
    where = "" if single else f"record {index}: "
    if isinstance(answer, DataError):
        loc = ["body"] + ([] if single else [index])
        raise InputError([{"loc": loc, "msg": f"{where}{answer}", "type": "data_error"}])
    error_id = str(uuid.uuid4())
    log.error("model error %s (%s)", error_id, where.rstrip(": ") or "one record", exc_info=answer)
    raise ModelError(
        f"{where}the model failed on this input; the server log has error id {error_id}", error_id
    )


def _feedback_output(body: Feedback, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """The output a feedback row is about: the named one, or the first category output."""
    if body.output is None:
        return next((o for o in outputs if "labels" in o), outputs[0])
    for o in outputs:
        if o["name"] == body.output:
            return o
    raise HTTPException(422, f"unknown output {body.output!r}; outputs: {[o['name'] for o in outputs]}")


def _feedback_label(label: str | int | float, out: dict[str, Any]) -> str | float:
    """A known class label for a category output, a number for a number output; else 422."""
    if "labels" in out:
        if str(label) not in out["labels"]:
            raise HTTPException(
                422, f"label {str(label)!r} is not a class of {out['name']!r}: {out['labels']}"
            )
        return str(label)
    try:
        return float(label)
    except ValueError:
        raise HTTPException(422, f"output {out['name']!r} is a number; got {label!r}") from None


# ------------------------------------------------------------------------------------ running it


GENERATION_ONLY = ("prefill_chunk",)  # serve options that only POST /generate takes


def predict_options(options: dict[str, Any]) -> dict[str, Any]:
    """The serve options `create_app` takes (a classifier's server): all but the generation ones."""
    return {k: v for k, v in options.items() if k not in GENERATION_ONLY}


def serve_bundle(
    path: str | Path,
    *,
    runtime: str = "auto",
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    graceful_timeout_s: float = 30.0,
    http: str = "auto",
    loop: str = "auto",
    device: str = "auto",
    **app_options: Any,
) -> None:
    """Load a bundle's predictor and serve it with uvicorn until interrupted (Ctrl-C / SIGTERM).

    `device` is where a torch runtime runs the model ('auto': the GPU when there is one; see
    `predictor.serving_device`). `http` and `loop` are uvicorn's: "auto" takes httptools and uvloop
    (in `largo[serve]`), which cost a fraction of the CPU per request of the pure-Python h11 parser
    and asyncio loop ("h11", "asyncio").

    On shutdown uvicorn stops accepting connections, lets in-flight requests finish (at most
    `graceful_timeout_s`), then the lifespan drains the batcher. `app_options` go to `create_app()`.
    A language-model bundle (`task: lm`) or a seq2seq one (`task: seq2seq`: the prompt is the source) is
    served by `generate_service.create_generate_app()` instead (POST /generate), which takes
    `app_options` but the batching ones.
    """
    import uvicorn

    from largo.deploy.metadata import bundle_task

    if bundle_task(path) in ("lm", "seq2seq"):  # POST /generate
        from largo.deploy.generate_service import create_generate_app, generate_app_options, load_generator

        served: Any = load_generator(path, runtime, device)
        app = create_generate_app(served, **generate_app_options(app_options))
        from largo.deploy.generate_service import runtime_of

        what = f"{type(served).__name__} on {served.device}"
        runtime = runtime_of(served) if runtime == "auto" else runtime
    else:
        from largo.deploy.predictor import load_predictor  # here, not at import: torch stays optional

        served = load_predictor(path, runtime, device=device)
        app = create_app(served, **predict_options(app_options))
        what = type(served).__name__
    print(f"largo: serving {path} with {what} (runtime {runtime}) on http://{host}:{port}")
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=graceful_timeout_s,
        http=http,
        loop=loop,
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (for tests, benchmarks and scripts that start servers)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until_serving(
    url: str,
    proc: Any = None,
    timeout: float = 60.0,
    output: Callable[[], str] | None = None,
) -> None:
    """Poll `url`/health until it answers 200. Raises RuntimeError when `proc` (a Popen) exits first
    or `timeout` seconds pass; `output()` (e.g. the server's log) is added to the message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server at {url} exited {proc.returncode}:\n{output() if output else ''}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:  # refused, reset, timed out (URLError is an OSError)
            time.sleep(0.1)
    raise RuntimeError(f"the server at {url} did not answer /health in {timeout:.0f} s")


@contextlib.contextmanager
def serve_in_thread(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
) -> Iterator[str]:
    """Run `app` under uvicorn in a background thread on a free port; yields its base URL.

    For tests, benchmarks and notebooks; stops the server (gracefully) on exit.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
