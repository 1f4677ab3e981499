"""A stand-in for a Pushgateway that keeps what the trainer pushes."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakePushgateway:
    """Keeps the text of every metrics push (what Prometheus would scrape from it)."""

    def __init__(self) -> None:
        self.pushes: list[str] = []
        pushes = self.pushes

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                pushes.append(self.rfile.read(int(self.headers["Content-Length"])).decode())
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
