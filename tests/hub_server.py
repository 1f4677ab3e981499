"""A stand-in for the Hugging Face hub's HTTP API at `HF_ENDPOINT`: as much of it as
huggingface_hub's `snapshot_download` uses to fetch a repository (its revision, its
file tree, each file), with every repository gated behind a token of its own. A
request without that token is refused as the hub refuses a gated repository (403,
`X-Error-Code: GatedRepo`). It records which token reached which repository."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class StandInHub:
    def __init__(self, repos: dict[str, tuple[Path, str]]) -> None:
        """`repos`: each repository id (`org/name`) with its folder and its token."""
        self.repos = repos
        self.tokens: defaultdict[str, set[str]] = defaultdict(set)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> StandInHub:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _files(self, repo: str) -> dict[str, Path]:
        folder = self.repos[repo][0]
        return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}

    def _route(self, path: str) -> tuple[str, str, str] | None:
        """(kind, repository, rest) of a request path, or None."""
        parts = unquote(urlsplit(path).path).strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            return parts[4], "/".join(parts[2:4]), "/".join(parts[5:])  # revision or tree
        if len(parts) >= 5 and parts[2] == "resolve":
            return "resolve", "/".join(parts[:2]), "/".join(parts[4:])
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def _send(self, code: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(code)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _answer(self) -> None:
                route = hub._route(self.path)
                if route is None or route[1] not in hub.repos:
                    self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"})
                    return
                kind, repo, rest = route
                sent = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                with hub._lock:
                    hub.tokens[repo].add(sent)
                if sent != hub.repos[repo][1]:
                    message = f"Access to model {repo} is restricted."
                    headers = {"X-Error-Code": "GatedRepo", "X-Error-Message": message}
                    self._send(403, json.dumps({"error": message}).encode(), headers)
                    return
                files = hub._files(repo)
                if kind == "revision":
                    siblings = [{"rfilename": name} for name in sorted(files)]
                    info = {"id": repo, "sha": COMMIT, "siblings": siblings}
                    self._send(200, json.dumps(info).encode(), {})
                elif kind == "tree":
                    tree = [
                        {
                            "type": "file",
                            "path": name,
                            "size": path.stat().st_size,
                            "oid": _oid(path),
                        }
                        for name, path in sorted(files.items())
                    ]
                    self._send(200, json.dumps(tree).encode(), {})
                elif rest in files:
                    path = files[rest]
                    headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_oid(path)}"'}
                    self._send(200, path.read_bytes(), headers)
                else:
                    self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"})

            def do_GET(self) -> None:
                self._answer()

            def do_HEAD(self) -> None:
                self._answer()

        return Handler


def _oid(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()
