"""A fake Kubeflow Pipelines API server (v2beta1 REST) for tests: a real HTTP server on 127.0.0.1.

It implements what ``kfp.Client`` calls for ``tlops submit / schedule / runs`` (paths taken from
``kfp_server_api/api/*_service_api.py``):

    GET  /apis/v2beta1/healthz                      -> {"multi_user": false, ...}
    GET  /apis/v2beta1/experiments?filter=&namespace= -> {"experiments": [...], "total_size": n}
    POST /apis/v2beta1/experiments                  -> the experiment, with experiment_id
    POST /apis/v2beta1/runs                         -> the run, with run_id and state PENDING
    GET  /apis/v2beta1/runs?experiment_id=&page_size=&sort_by=&namespace=
    GET  /apis/v2beta1/runs/{run_id}                -> the run, or 404
    POST /apis/v2beta1/recurringruns                -> the recurring run, with recurring_run_id

Every request is recorded (method, path, query, headers with lower-case names, JSON body).
``fail_all(401)`` makes every request answer 401, as a KFP behind an auth proxy does.

Also here: ``compile_tiny_pipeline(cfg, out)``, a stand-in for ``tlops.kfp.pipeline.compile_pipeline``
that compiles a real one-step KFP pipeline (name ``tiny-pipeline``, parameters ``greeting: str``
and ``n: int``), so that tests can run without the real pipeline module.
"""

# no `from __future__ import annotations`: kfp reads the component annotations as real types
import itertools
import json
import threading
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

API = "/apis/v2beta1"
TINY_PIPELINE_NAME = "tiny-pipeline"


def compile_tiny_pipeline(cfg: Any, out: Path) -> Path:
    """Compile a real, minimal KFP v2 pipeline to ``out`` (``cfg`` is ignored)."""
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11-slim")
    def echo(msg: str, times: int) -> str:
        return msg * times

    @dsl.pipeline(name=TINY_PIPELINE_NAME, description="tlops test pipeline")
    def tiny(greeting: str = "hello", n: int = 1):
        echo(msg=greeting, times=n)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=tiny, package_path=str(out))
    return out


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeKfpServer:
    """``start()`` / ``stop()`` (or use as a context manager); ``url`` is ``http://127.0.0.1:<port>``."""

    def __init__(self, multi_user: bool = False) -> None:
        self.multi_user = multi_user
        self.requests: list[dict] = []
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        self._fail: Optional[tuple[int, str, dict]] = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> "FakeKfpServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server._handle(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                server._handle(self, "POST")

            def do_DELETE(self) -> None:  # noqa: N802
                server._handle(self, "DELETE")

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-kfp", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "FakeKfpServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- test controls ---------------------------------------------------------------------

    def fail_all(self, status: Optional[int], message: str = "", headers: Optional[dict] = None) -> None:
        """Answer every request with ``status`` (e.g. 401) and extra ``headers``; ``None`` turns it off."""
        default = {401: "Unauthenticated", 403: "Forbidden"}.get(status or 0, "failed")
        self._fail = None if status is None else (status, message or default, dict(headers or {}))

    def add_experiment(self, name: str, namespace: str = "") -> dict:
        exp = {
            "experiment_id": str(uuid.uuid4()),
            "display_name": name,
            "description": "",
            "namespace": namespace,
            "storage_state": "AVAILABLE",
            "created_at": _now(),
        }
        with self._lock:
            self.experiments[exp["experiment_id"]] = exp
        return exp

    def add_run(
        self,
        name: str,
        state: str = "SUCCEEDED",
        experiment_id: str = "",
        created_at: Optional[str] = None,
        finished_at: Optional[str] = None,
        error: Optional[str] = None,
        parameters: Optional[dict] = None,
        run_id: Optional[str] = None,
    ) -> dict:
        run = {
            "run_id": run_id or str(uuid.uuid4()),
            "display_name": name,
            "experiment_id": experiment_id,
            "state": state,
            "storage_state": "AVAILABLE",
            "created_at": created_at or _now(),
            "scheduled_at": created_at or _now(),
            "finished_at": finished_at or "1970-01-01T00:00:00Z",
            "runtime_config": {"parameters": parameters or {}},
        }
        if error:
            run["error"] = {"code": 2, "message": error}
        with self._lock:
            self.runs[run["run_id"]] = run
        return run

    def requests_to(self, method: str, path: str) -> list[dict]:
        """Recorded requests with this method and exact path (no query)."""
        with self._lock:
            return [r for r in self.requests if r["method"] == method and r["path"] == path]

    # ---- request handling ------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        record = {
            "method": method,
            "path": parts.path,
            "query": {k: v[0] if len(v) == 1 else v for k, v in parse_qs(parts.query, keep_blank_values=True).items()},
            "headers": {k.lower(): v for k, v in h.headers.items()},
            "body": body,
        }
        with self._lock:
            self.requests.append(record)
        if self._fail is not None:
            status, message, headers = self._fail
            payload = {"code": 16 if status == 401 else 2, "message": message, "details": []}
            return self._send(h, status, payload, headers)
        try:
            status, payload = self._route(method, parts.path, record["query"], body)
        except Exception as e:  # a bug in the fake: make it visible to the test
            status, payload = 500, {"code": 13, "message": f"fake server error: {type(e).__name__}: {e}"}
        self._send(h, status, payload)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: Any, headers: Optional[dict] = None) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def _not_found(what: str) -> tuple[int, dict]:
        return 404, {"code": 5, "message": f"{what} not found", "details": []}

    def _route(self, method: str, path: str, query: dict, body: Any) -> tuple[int, Any]:
        if method == "GET" and path == f"{API}/healthz":
            return 200, {"multi_user": self.multi_user, "pipeline_store": "database"}

        if path == f"{API}/experiments":
            if method == "POST":
                return 200, self._create_experiment(body or {})
            if method == "GET":
                with self._lock:
                    exps = list(self.experiments.values())
                name = _display_name_filter(query.get("filter"))
                if name is not None:
                    exps = [e for e in exps if e["display_name"] == name]
                ns = query.get("namespace")
                if ns:
                    exps = [e for e in exps if e["namespace"] == ns]
                return 200, ({"experiments": exps, "total_size": len(exps)} if exps else {})

        if path == f"{API}/runs":
            if method == "POST":
                return 200, self._create_run(body or {})
            if method == "GET":
                with self._lock:
                    runs = list(self.runs.values())
                if query.get("experiment_id"):
                    runs = [r for r in runs if r["experiment_id"] == query["experiment_id"]]
                if str(query.get("sort_by", "")).strip() == "created_at desc":
                    runs.sort(key=lambda r: r["created_at"], reverse=True)
                size = int(query.get("page_size") or 0)
                total = len(runs)
                if size > 0:
                    runs = runs[:size]
                return 200, ({"runs": runs, "total_size": total} if runs else {})

        if method == "GET" and path.startswith(f"{API}/runs/"):
            run_id = path[len(f"{API}/runs/") :]
            with self._lock:
                run = self.runs.get(run_id)
            return (200, run) if run else self._not_found(f"Run {run_id}")

        if method == "POST" and path == f"{API}/recurringruns":
            return 200, self._create_recurring_run(body or {})

        return self._not_found(f"{method} {path}")

    def _create_experiment(self, body: dict) -> dict:
        return self.add_experiment(body.get("display_name", ""), namespace=body.get("namespace") or "")

    def _create_run(self, body: dict) -> dict:
        run = dict(body)
        run.update(
            run_id=str(uuid.uuid4()),
            state="PENDING",
            storage_state="AVAILABLE",
            created_at=_now(),
            scheduled_at=_now(),
            finished_at="1970-01-01T00:00:00Z",
        )
        with self._lock:
            self.runs[run["run_id"]] = run
        return run

    def _create_recurring_run(self, body: dict) -> dict:
        rr = dict(body)
        if "max_concurrency" in rr:  # int64: the real server answers it as a JSON string
            rr["max_concurrency"] = str(rr["max_concurrency"])
        rr.update(recurring_run_id=str(uuid.uuid4()), status="ENABLED", created_at=_now(), updated_at=_now())
        with self._lock:
            self.recurring_runs[rr["recurring_run_id"]] = rr
        return rr


def _display_name_filter(raw: Optional[str]) -> Optional[str]:
    """The value of an ``EQUALS display_name`` predicate in a KFP filter (JSON), if any."""
    if not raw:
        return None
    try:
        flt = json.loads(raw)
    except ValueError:
        return None
    for p in flt.get("predicates", []):
        if p.get("key") == "display_name" and p.get("operation") in (1, "EQUALS"):
            return p.get("stringValue", p.get("string_value"))
    return None
