"""A real S3 API server (moto's ThreadedMotoServer) on 127.0.0.1 for tests, with fixed test credentials."""

from __future__ import annotations

import socket
import urllib.request

import moto.server as moto_server

KEY_ID = "testing-key"
SECRET = "testing-secret-value"
BUCKET = "tlops-test"


class Server:
    """A moto S3 server on 127.0.0.1 that can be stopped and restarted on the same port."""

    def __init__(self) -> None:
        self.port = 0
        self._srv = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, reset: bool = True) -> None:
        self._srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._srv.start()
        self.port = self._srv.get_host_and_port()[1]
        if not reset:
            return
        # moto's backends live in this process: reset them so each server starts empty
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).read()

    def stop(self) -> None:
        if self._srv is not None:
            self._srv.stop()
            self._srv._server.server_close()  # release the port: connections are refused now
            self._srv = None

    def refused(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) != 0
