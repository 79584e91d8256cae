"""A Kubernetes API server on loopback with the few endpoints ``tlops.kfp.trainjob`` calls.

Real HTTP (``http.server``), driven by the real ``kubernetes`` client: namespaced custom objects
(create, get, delete), pods list by label selector and a pod's log (``follow``). A job's status
moves through ``statuses`` (one per GET of the job; the last one stays), so a test scripts
Running -> Complete, or -> Failed with a reason. Every request is recorded in ``requests``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

CUSTOM = re.compile(
    r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)(/(?P<name>[^/]+))?$"
)
PODS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods$")
LOG = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<pod>[^/]+)/log$")


class FakeApi:
    def __init__(self, statuses: list[dict[str, Any]], log_lines: list[str], pod_labels: dict[str, str] | None = None):
        self.statuses = statuses
        self.log_lines = log_lines
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (plural, ns, name) -> object
        self.requests: list[tuple[str, str]] = []  # (method, path with query)
        self.deleted: list[tuple[str, str, str]] = []
        self.gets = 0
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> Any:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"{}")

            def do_POST(self):
                api.requests.append(("POST", self.path))
                m = CUSTOM.match(urlparse(self.path).path)
                if not m or m["name"]:
                    return self._send(404, {"kind": "Status", "code": 404})
                obj = self._body()
                key = (m["plural"], m["ns"], obj["metadata"]["name"])
                with api.lock:
                    if key in api.objects:
                        return self._send(409, {"kind": "Status", "code": 409, "reason": "AlreadyExists"})
                    api.objects[key] = obj
                self._send(201, obj)

            def do_GET(self):
                api.requests.append(("GET", self.path))
                url = urlparse(self.path)
                q = parse_qs(url.query)
                if m := CUSTOM.match(url.path):
                    obj = api.objects.get((m["plural"], m["ns"], m["name"]))
                    if obj is None:
                        return self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                    with api.lock:
                        status = api.statuses[min(api.gets, len(api.statuses) - 1)]
                        api.gets += 1
                    return self._send(200, {**obj, "status": status})
                if m := PODS.match(url.path):
                    selector = q.get("labelSelector", [""])[0]
                    job = [o for (_, ns, _), o in api.objects.items() if ns == m["ns"]]
                    items = []
                    if job and job[0]["metadata"]["name"] in selector:
                        name = f"{job[0]['metadata']['name']}-node-0-0-abcde"
                        items = [{"metadata": {"name": name, "namespace": m["ns"]}, "status": {"phase": "Running"}}]
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                if LOG.match(url.path):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.end_headers()
                    data = "".join(line + "\n" for line in api.log_lines).encode()
                    for i in range(0, len(data), 7):  # streamed in chunks that split lines, as `follow` may
                        self.wfile.write(data[i : i + 7])
                        self.wfile.flush()
                        time.sleep(0.005)
                    return None
                return self._send(404, {"kind": "Status", "code": 404})

            def do_DELETE(self):
                api.requests.append(("DELETE", self.path))
                m = CUSTOM.match(urlparse(self.path).path)
                key = (m["plural"], m["ns"], m["name"]) if m else None
                with api.lock:
                    obj = api.objects.pop(key, None) if key else None
                if obj is None:
                    return self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                api.deleted.append(key)
                self._send(200, {"kind": "Status", "status": "Success"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def client(self):
        """A real ``kubernetes.client.ApiClient`` pointed at this server."""
        from kubernetes import client

        conf = client.Configuration(host=self.url)
        return client.ApiClient(conf)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
