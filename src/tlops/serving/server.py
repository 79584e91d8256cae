"""``tlops serve NAME@ALIAS``: the registered model behind KServe's ``ModelServer``.

KServe's Python model server provides the HTTP stack and the Open Inference Protocol (V2:
``/v2/health/live|ready``, ``/v2/models/{name}``, ``/v2/models/{name}/infer``, JSON and the
binary tensor extension) and ``/metrics``. tlops adds, as a ``kserve.Model`` and a few routes on
the server's FastAPI app:

- the model's input contract (:mod:`tlops.serving.contract`) for every request, so a payload the
  model cannot answer correctly gets a 400 that says what was expected;
- MLflow's ``/invocations`` formats (``dataframe_split``, ``dataframe_records``, ``instances``,
  ``inputs``, CSV), parsed by MLflow's own scoring-server functions;
- alias following: the registry is polled every ``poll_s`` seconds; when the alias moves
  (``tlops promote`` / ``tlops rollback``) the new version is loaded in the background and
  swapped in with one reference assignment. A request takes the model it will run on when it
  arrives, so requests in flight finish on the old version, and every response names the version
  that produced it (``model_version`` in the body and the ``x-tlops-model-version`` header);
- dynamic batching: concurrent requests share forward passes (``max_batch_size`` inputs, waiting
  at most ``max_wait_ms`` and only while more requests are being decoded). KServe batches only in
  its agent sidecar inside a cluster, so the batcher is a small asyncio queue here;
- limits: a request body over ``max_request_bytes`` or holding more than ``max_request_items``
  inputs gets a 413;
- Prometheus metrics next to KServe's own: requests by endpoint and status, latency, inputs and
  requests per forward, the version being served and the number of swaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import sys
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import orjson
from fastapi import Request, Response

from tlops.errors import TlopsError
from tlops.monitoring.window import WindowOptions
from tlops.serving.contract import Contract, ContractError
from tlops.serving.registry import ModelRef

log = logging.getLogger(__name__)

VERSION_HEADER = "x-tlops-model-version"
ALIAS_HEADER = "x-tlops-model-alias"
INFER_ENDPOINTS = {"invocations": "/invocations", "v2_infer": "/infer"}


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    poll_s: float = 5.0
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_request_bytes: int = 16 * 2**20
    max_request_items: int = 256
    access_log: bool = False
    monitor: WindowOptions = WindowOptions()  # size 0: no rolling-window shift monitor


class RequestTooLarge(TlopsError):
    """A request over the server's limits (HTTP 413)."""


@dataclass(frozen=True, eq=False)
class Loaded:
    """One loaded version: the classifier, its contract and who it is."""

    ref: ModelRef
    clf: Any
    contract: Contract

    @property
    def version(self) -> str:
        return self.ref.version

    def records(self, probs: np.ndarray) -> list[dict[str, Any]]:
        """The contract's output rows (as :meth:`Contract.frame`) without building a DataFrame."""
        classes = self.contract.classes
        ident = {k: (None if v is None else str(v)) for k, v in self.ref.identity.items()}
        top = probs.argmax(1)
        rows = []
        for p, t in zip(probs.tolist(), top.tolist(), strict=True):
            row: dict[str, Any] = {"label": classes[t], "score": p[t]}
            row.update({f"prob_{c}": v for c, v in zip(classes, p, strict=True)})
            row.update(ident)
            rows.append(row)
        return rows


def load_version(ref: ModelRef) -> Loaded:
    """Load ``ref`` from the registry: the files ``mlflow models serve`` would load, verified against the
    manifest recorded at registration and loaded by the tlops package (no code from the store runs)."""
    from tlops.serving.registry import load

    impl = load(ref)  # verified against the registration's manifest; runs no code from the store
    return Loaded(ref, impl.clf, impl.contract)


# -- metrics ------------------------------------------------------------------------------------
class Metrics:
    """tlops' Prometheus series, in prometheus_client's default registry (KServe's ``/metrics``)."""

    _made: "Metrics | None" = None

    def __new__(cls) -> "Metrics":
        if cls._made is None:  # one set per process: prometheus_client refuses duplicate names
            from prometheus_client import Counter, Gauge, Histogram

            m = super().__new__(cls)
            m.requests = Counter("tlops_requests", "inference requests", ["model", "endpoint", "code"])
            m.latency = Histogram(
                "tlops_request_seconds",
                "inference request latency (body received to response sent)",
                ["model", "endpoint"],
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            )
            m.batch_inputs = Histogram(
                "tlops_batch_inputs", "inputs per forward pass", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
            )
            m.batch_requests = Histogram(
                "tlops_batch_requests", "requests sharing a forward pass", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64)
            )
            m.version = Gauge("tlops_model_version_info", "the version being served (1)", ["model", "version", "alias"])
            m.swaps = Counter("tlops_model_swaps", "alias moves followed (new version swapped in)", ["model"])
            cls._made = m
        return cls._made


# -- dynamic batching ---------------------------------------------------------------------------
@dataclass(eq=False)
class _Job:
    loaded: Loaded
    items: list
    future: asyncio.Future


class Arrival:
    """A request on its way to the batcher; the batcher waits for these (bounded by max_wait)."""

    def __init__(self, batcher: "Batcher"):
        self.batcher = batcher
        self.pending = True

    def done(self) -> None:
        if self.pending:
            self.pending = False
            self.batcher._arriving -= 1


class Batcher:
    """Requests share forward passes: up to ``max_batch_size`` inputs, all on the same version.

    A batch closes when it is full, when ``max_wait_s`` has passed since its first request, or as
    soon as no other request is being decoded: a lone client pays no waiting time. Forwards run
    one at a time on one thread (torch uses the cores inside it)."""

    def __init__(self, model_name: str, max_batch_size: int, max_wait_s: float, metrics: Metrics):
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self.model_name = model_name
        self._queue: asyncio.Queue[_Job] | None = None
        self._arriving = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tlops-forward")

    @property
    def queue(self) -> asyncio.Queue:
        if self._queue is None:
            self._queue = asyncio.Queue()
        return self._queue

    @contextlib.contextmanager
    def arriving(self) -> Iterator[Arrival]:
        self._arriving += 1
        a = Arrival(self)
        try:
            yield a
        finally:
            a.done()

    async def submit(self, arrival: Arrival, loaded: Loaded, items: list) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Job(loaded, items, fut))
        arrival.done()
        return await fut

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        held: _Job | None = None
        while True:
            first = held or await self.queue.get()
            held = None
            batch, n = [first], len(first.items)
            deadline = loop.time() + self.max_wait_s
            while n < self.max_batch_size:
                if self.queue.empty():
                    left = deadline - loop.time()
                    if self._arriving <= 0 or left <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self.queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                else:
                    job = self.queue.get_nowait()
                if job.loaded is not first.loaded or n + len(job.items) > self.max_batch_size:
                    held = job  # next batch: another version, or it would overflow this one
                    break
                batch.append(job)
                n += len(job.items)
            live = [j for j in batch if not j.future.cancelled()]
            if not live:
                continue
            items = [x for j in live for x in j.items]
            try:
                probs = await loop.run_in_executor(self._executor, _forward, first.loaded, items)
            except Exception as e:  # every request of the batch gets the error
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            self.metrics.batch_inputs.labels(self.model_name).observe(len(items))
            self.metrics.batch_requests.labels(self.model_name).observe(len(live))
            k = 0
            for j in live:
                if not j.future.done():
                    j.future.set_result(probs[k : k + len(j.items)])
                k += len(j.items)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _forward(loaded: Loaded, items: list) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return loaded.contract.predict_proba(loaded.clf, items)


# -- the served model ---------------------------------------------------------------------------
@dataclass(eq=False)
class ServingState:
    """What every request reads: the current version (swapped atomically) and the batcher."""

    name: str
    alias: str | None
    current: Loaded
    options: ServeOptions
    metrics: Metrics = field(default_factory=Metrics)
    batcher: Batcher = field(init=False)
    window: Any = field(init=False, default=None)  # tlops.monitoring.window.Window, with --monitor-window
    last_monitor: dict[str, Any] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.batcher = Batcher(self.name, self.options.max_batch_size, self.options.max_wait_ms / 1000, self.metrics)
        self._show_version(self.current)
        if self.options.monitor.size:
            from tlops.monitoring.window import Window

            self.window = Window(self.options.monitor.size)

    def swap(self, new: Loaded) -> Loaded:
        old, self.current = self.current, new
        with contextlib.suppress(KeyError):
            self.metrics.version.remove(self.name, old.version, old.ref.alias or "")
        self._show_version(new)
        self.metrics.swaps.labels(self.name).inc()
        return old

    def _show_version(self, loaded: Loaded) -> None:
        self.metrics.version.labels(self.name, loaded.version, loaded.ref.alias or "").set(1)

    def parse(self, loaded: Loaded, payload: Any) -> list:
        items = loaded.contract.parse(payload)
        limit = self.options.max_request_items
        if len(items) > limit:
            raise RequestTooLarge(
                f"the request holds {len(items)} inputs; the limit is {limit} per request (--max-request-items)"
            )
        if self.window is not None:
            self.window.add(items)
        return items

    def headers(self, loaded: Loaded) -> dict[str, str]:
        return {VERSION_HEADER: loaded.version, ALIAS_HEADER: loaded.ref.alias or ""}


def make_model(state: ServingState) -> Any:
    """The ``kserve.Model`` that answers V2 inference requests through the contract and the batcher."""
    from kserve import InferOutput, InferResponse, Model

    class TlopsModel(Model):
        def __init__(self) -> None:
            super().__init__(state.name, return_response_headers=True)
            self.ready = True

        def load(self) -> bool:
            self.ready = True
            return True

        def get_input_types(self) -> list[dict[str, Any]]:
            c = state.current.contract
            if c.modality == "text":
                return [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
            # BYTES: PNG/JPEG (raw or base64); numeric tensors (N,H,W[,C]) are accepted too
            return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]

        def get_output_types(self) -> list[dict[str, Any]]:
            n = len(state.current.contract.classes)
            return [
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "score", "datatype": "FP32", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, n]},
            ]

        async def predict(self, payload: Any, headers: Any = None, response_headers: Any = None) -> Any:
            with state.batcher.arriving() as arrival:
                loaded = state.current
                items = state.parse(loaded, _v2_payload(payload, loaded.contract))
                probs = await state.batcher.submit(arrival, loaded, items)
            if response_headers is not None:
                response_headers.update(state.headers(loaded))
            c = loaded.contract
            top = probs.argmax(1)
            outputs = [
                InferOutput("label", [len(top)], "BYTES", np.array([c.classes[i] for i in top], dtype=object)),
                InferOutput("score", [len(top)], "FP32", probs.max(1).astype(np.float32)),
                InferOutput("probabilities", list(probs.shape), "FP32", probs.astype(np.float32)),
            ]
            params = {"classes": json.dumps(c.classes), "model_alias": loaded.ref.alias or ""}
            return InferResponse(
                response_id=payload.id or str(uuid.uuid4()),
                model_name=state.name,
                model_version=loaded.version,
                infer_outputs=outputs,
                parameters=params,
                use_binary_outputs=payload.use_binary_outputs,
                requested_outputs=payload.request_outputs,
            )

    return TlopsModel()


def _v2_payload(request: Any, contract: Contract) -> Any:
    """The contract's payload from a V2 request: the one input, or the one named like the contract's column."""
    inputs = list(request.inputs)
    want = "text" if contract.modality == "text" else "image"
    if len(inputs) != 1:
        named = [i for i in inputs if i.name == want]
        if len(named) != 1:
            raise ContractError(
                f"expected one input tensor (or one named '{want}'); got {[i.name for i in inputs] or 'none'}"
            )
        inputs = named
    arr = inputs[0].as_numpy()
    if inputs[0].datatype == "BYTES":
        flat = arr.reshape(-1).tolist()
        if contract.modality == "text":
            return [v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else v for v in flat]
        return flat
    return arr


# -- HTTP: /invocations, limits, metrics --------------------------------------------------------
def _mlflow_parse(body: bytes, content_type: str) -> Any:
    """The data ``mlflow models serve`` would hand the model, parsed by MLflow's own functions."""
    from mlflow.pyfunc import scoring_server as ss

    mime = content_type.split(";")[0].strip() or "application/json"
    if mime == "text/csv":
        return ss.parse_csv_input(io.StringIO(body.decode("utf-8")))
    if mime != "application/json":
        raise _Unsupported(f"content type '{content_type}': send application/json or text/csv")
    data, _ = ss._split_data_and_params(body)
    return ss.infer_and_parse_data(data)


class _Unsupported(Exception):
    pass


def install_routes(app: Any, state: ServingState) -> None:
    """``/invocations``, ``/ping``, ``/health``, the body-size guard, request metrics, 400/413 handlers."""
    from fastapi.responses import JSONResponse
    from mlflow.exceptions import MlflowException

    async def invocations(request: Request) -> Response:
        body = await request.body()
        with state.batcher.arriving() as arrival:
            loaded = state.current
            try:
                data = _mlflow_parse(body, request.headers.get("content-type", "application/json"))
                items = state.parse(loaded, data)
            except _Unsupported as e:
                return JSONResponse({"error_code": "BAD_REQUEST", "message": str(e)}, status_code=415)
            except MlflowException as e:
                return JSONResponse({"error_code": e.error_code, "message": e.message}, status_code=400)
            except ContractError as e:
                return JSONResponse({"error_code": "INVALID_PARAMETER_VALUE", "message": str(e)}, status_code=400)
            probs = await state.batcher.submit(arrival, loaded, items)
        body = orjson.dumps({"predictions": loaded.records(probs)})
        return Response(body, media_type="application/json", headers=state.headers(loaded))

    async def ping() -> Response:
        return Response("\n", status_code=200, media_type="application/json")

    async def monitor() -> Response:
        opts = state.options.monitor
        if state.window is None:
            return JSONResponse({"error": "the shift monitor is off (tlops serve --monitor-window N)"}, status_code=404)
        if state.last_monitor is None:
            held = len(state.window.snapshot()[0])
            return JSONResponse(
                {"error": f"not checked yet: the window holds {held} inputs; the first check needs {opts.min_inputs}"},
                status_code=503,
            )
        return JSONResponse(state.last_monitor)

    async def contract_error(_: Request, exc: Exception) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=400)

    async def too_large(_: Request, exc: Exception) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=413)

    app.add_api_route("/invocations", invocations, methods=["POST"])
    app.add_api_route("/ping", ping, methods=["GET"])
    app.add_api_route("/health", ping, methods=["GET"])
    app.add_api_route("/monitor", monitor, methods=["GET"])
    app.add_exception_handler(ContractError, contract_error)
    app.add_exception_handler(RequestTooLarge, too_large)
    app.add_middleware(GuardMiddleware, state=state)


class GuardMiddleware:
    """Refuses bodies over the limit with 413 before the app reads them; counts and times inference requests."""

    def __init__(self, app: Any, state: ServingState):
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = next((k for k, suffix in INFER_ENDPOINTS.items() if path.endswith(suffix)), None)
        start = time.perf_counter()
        status = [500]

        async def send_status(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            if scope["method"] in ("POST", "PUT"):
                receive = await self._limited(scope, receive, send_status)
                if receive is None:
                    return
            await self.app(scope, receive, send_status)
        finally:
            if endpoint:
                m, name = self.state.metrics, self.state.name
                m.requests.labels(name, endpoint, str(status[0])).inc()
                m.latency.labels(name, endpoint).observe(time.perf_counter() - start)

    async def _limited(self, scope: dict, receive: Callable, send: Callable) -> Callable | None:
        limit = self.state.options.max_request_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if int(length) > limit:
                msg = f"request body is {int(length)} bytes; the limit is {limit} (--max-request-bytes)"
                await _reply_413(send, msg)
                return None
            return receive
        chunks, size, more = [], 0, True  # chunked upload: read it here, up to the limit
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > limit:
                await _reply_413(send, f"request body exceeds {limit} bytes (--max-request-bytes)")
                return None
        body, sent = b"".join(chunks), [False]

        async def replay() -> dict:
            if sent[0]:
                return await receive()
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay


async def _reply_413(send: Callable, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- alias following ----------------------------------------------------------------------------
async def follow_alias(state: ServingState, loader: Callable[[ModelRef], Loaded] = load_version) -> None:
    """Poll the registry; when the alias points elsewhere, load that version off the event loop and swap."""
    from tlops.tracking import registry

    name, alias = state.name, state.alias
    if alias is None:
        return
    while True:
        await asyncio.sleep(state.options.poll_s)
        try:
            mv = await asyncio.to_thread(registry.get_alias, name, alias)
            if mv is None:
                log.warning("%s@%s: no version holds the alias; still serving v%s", name, alias, state.current.version)
                continue
            version = str(mv.version)
            if version == state.current.version:
                continue
            t0 = time.perf_counter()
            new = await asyncio.to_thread(loader, ModelRef(name, alias, version))
            old = state.swap(new)
            log.warning(
                "%s@%s moved: now serving v%s (was v%s; loaded in %.1f s)",
                name,
                alias,
                version,
                old.version,
                time.perf_counter() - t0,
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the registry being away must not stop serving
            log.warning("%s@%s: cannot follow the alias (%s); still serving v%s", name, alias, e, state.current.version)


async def watch_window(state: ServingState) -> None:
    """Check the window of served inputs against the served version's reference, every
    ``monitor.every_s`` seconds once it holds ``min_inputs``; publish the result."""
    from tlops.monitoring.window import Gauges, check, load_reference
    from tlops.tracking import registry

    opts, gauges = state.options.monitor, Gauges()
    refs: dict[str, tuple[dict, dict]] = {}
    checked_at_seen = -1
    while True:
        await asyncio.sleep(opts.every_s)
        items, seen = state.window.snapshot()
        if len(items) < opts.min_inputs or seen == checked_at_seen:
            continue  # too few yet, or nothing new since the last check
        loaded = state.current
        try:
            if loaded.version not in refs:
                mv = await asyncio.to_thread(registry.client().get_model_version, state.name, loaded.version)
                refs[loaded.version] = await asyncio.to_thread(load_reference, mv.run_id)
            ref, meta = refs[loaded.version]
            res = await asyncio.to_thread(check, loaded.clf, loaded.contract.modality, items, ref, meta, opts)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a check that fails must not stop serving
            log.warning("monitor: cannot check the window against v%s (%s)", loaded.version, e)
            continue
        checked_at_seen = seen
        before = (state.last_monitor or {}).get("verdict")
        state.last_monitor = {
            "model_name": state.name,
            "model_version": loaded.version,
            "window": opts.size,
            "inputs_seen": seen,  # served inputs counted since start when the window was taken
            **res,
        }
        gauges.publish(state.name, loaded.version, res)
        if res["verdict"] != before:
            log.warning(
                "monitor: %s v%s on the last %d served inputs: %s (estimated accuracy %.3f; held-out %.3f)",
                state.name,
                loaded.version,
                res["n"],
                res["verdict"],
                res["accuracy"]["estimate"],
                res["accuracy"]["held_out_accuracy"],
            )


# -- the server ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _argv_for_kserve() -> Iterator[None]:
    """``kserve.model_server`` parses ``sys.argv`` when imported; keep tlops' options away from it."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def serve(model: str, options: ServeOptions, *, on_ready: Callable[[str, str], None] | None = None) -> None:
    """Serve ``model`` (``NAME@ALIAS`` or ``NAME/VERSION``) until SIGINT/SIGTERM."""
    from tlops.serving.registry import resolve

    # KServe's app declares ORJSONResponse, which this FastAPI deprecates (a warning per request)
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")
    ref = resolve(model)
    state = ServingState(ref.name, ref.alias, load_version(ref), options)
    with _argv_for_kserve():
        import uvicorn
        from kserve import model_server
        from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
        from kserve.protocol.rest.server import RESTServer

    server = model_server.ModelServer(
        http_port=options.port, enable_grpc=False, workers=1, enable_latency_logging=False, grace_period=10
    )
    server.register_model(make_model(state))
    install_routes(model_server.app, state)
    rest = RESTServer(
        FASTAPI_APP_IMPORT_STRING,
        server.dataplane,
        server.model_repository_extension,
        options.port,
        workers=1,
        grace_period=10,
    )
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((options.host, options.port))
    sock.listen(2048)  # connections made before uvicorn starts wait instead of being refused
    port = sock.getsockname()[1]
    rest.config.host, rest.config.port, rest.config.access_log = options.host, port, options.access_log
    rest.create_application()
    if not options.access_log:  # a log line per request (uvicorn's and KServe's timing) costs throughput
        access = logging.getLogger("uvicorn.access")
        access.handlers, access.propagate = [], False
        logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    host = f"[{options.host}]" if family == socket.AF_INET6 else options.host
    url = f"http://{host}:{port}"

    async def main() -> None:
        server.setup_event_loop()
        tasks = [asyncio.create_task(state.batcher.run()), asyncio.create_task(follow_alias(state))]
        if state.window is not None:
            tasks.append(asyncio.create_task(watch_window(state)))
        if on_ready:
            on_ready(url, state.current.version)
        try:
            await uvicorn.Server(rest.config).serve(sockets=[sock])
        finally:
            for t in tasks:
                t.cancel()
            state.batcher.close()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover - uvloop comes with kserve on Linux/macOS
        asyncio.run(main())
