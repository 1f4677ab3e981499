"""A stand-in for the Kubernetes API server that records the trainer's status patches."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeApi:
    """Records every request and the code it answered; answers the codes in `codes`
    first, one each, then `code` (with the request's Authorization header echoed in the
    body of an error, to prove it never reaches the logs)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.codes: list[int] = []
        self.code = 200
        self.changed = threading.Condition()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with api.changed:
                    code = api.codes.pop(0) if api.codes else api.code
                    api.requests.append(
                        {
                            "path": self.path,
                            "headers": dict(self.headers),
                            "body": body,
                            "code": code,
                        }
                    )
                    api.changed.notify_all()
                reply = b"{}" if code < 400 else f"no: {self.headers['Authorization']}".encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.requests) >= count, timeout)
            return list(self.requests)

    def statuses(self) -> list[dict[str, Any]]:
        return [r["body"]["status"] for r in self.requests]

    def accepted(self) -> dict[str, Any]:
        """The status as the requests it accepted left it (each a merge patch of the
        trainer's top-level fields)."""
        merged: dict[str, Any] = {}
        for request in self.requests:
            if request["code"] < 400:
                merged.update(request["body"]["status"])
        return merged

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
