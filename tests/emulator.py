"""A Kubernetes API for tests: kmock's emulator over HTTP, in a background thread.

kmock's `KubernetesEmulator` stores objects and streams watch events, but assigns
nothing a real API server assigns. `StampingEmulator` adds the few fields kopf
and the operator depend on: a uid, the namespace from the URL, a name from
`generateName` (kopf's events use it), a creation time, a resourceVersion, and
a generation bumped when the spec changes. It also forgets old requests: kmock
keeps every request for assertions (none here use them) and matches each new one
against that whole log, which grows quadratic over a benchmark's thousands of
requests. And it serves the namespace list itself, which kmock 0.8 cannot parse
(`/api/v1/namespaces` fails in its path parser); kopf lists and watches
namespaces when an operator watches a given set. A test may also make a watch
lag behind the writes (`lag`), as a loaded API server's does, or refuse the next
requests of a kind with an error (`refuse`), as a real one does a write its
validation or admission rejects, or a conflict. That is all;
patches stay plain recursive merges and nothing is garbage-collected, so tests
assert ownerReferences rather than cascading deletion (and a deleted object's
children stay, as in the moments before a cluster's garbage collector comes).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
import yaml

from finetune.api.job import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from tests.support import merge

NAMESPACES = "/api/v1/namespaces"


class StampingEmulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    _versions = itertools.count(1)
    REQUESTS_KEPT = 64  # more than the requests ever in flight at once

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # Requests per namespace, for tests that count what an operator costs the API.
        self.requests_in: collections.Counter[str] = collections.Counter()
        # Seconds by which watch events of (plural, namespace) arrive late.
        self.lags: dict[tuple[str, str], float] = {}
        # Errors to answer the next requests of (action, plural, subresource, namespace)
        # with: [code, reason, message, how many times more].
        self.refusals: dict[tuple[str, str, str | None, str], list[Any]] = {}

    def lag(self, plural: str, namespace: str, seconds: float) -> None:
        """Deliver each watch event of `plural` objects in `namespace` `seconds` after
        the write (0: on time); later events of the same watch wait behind it."""
        self.lags[(plural, namespace)] = seconds

    def refuse(
        self,
        action: kmock.action,
        plural: str,
        namespace: str,
        code: int,
        message: str,
        reason: str = "Invalid",
        subresource: str | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next `times` `action` requests on `plural` (its `subresource`) in
        `namespace` with the API's error `code`, as a Status carrying `message`."""
        key = (action.value, plural, subresource, namespace)
        self.refusals[key] = [code, reason, message, times]

    def _refusal(self, request: kmock.Request) -> aiohttp.web.StreamResponse | None:
        plural = getattr(request.resource, "plural", None) or ""
        action = request.action.value if request.action is not None else ""
        key = (action, plural, request.subresource, request.namespace or "")
        refusal = self.refusals.get(key)
        if refusal is None or refusal[3] <= 0:
            return None
        refusal[3] -= 1
        code, reason, message, _ = refusal
        status = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }
        return aiohttp.web.json_response(status, status=code)

    def _forget_old_requests(self) -> None:
        if len(self._requests) > 2 * self.REQUESTS_KEPT:
            del self._requests[: -self.REQUESTS_KEPT]
            for payload in self._payloads:
                del payload._requests[: -self.REQUESTS_KEPT]

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw.path == NAMESPACES:
            return await self._namespaces(raw)
        return await super().__call__(raw)

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        source = super()._serve_watch(request)
        plural = getattr(request.resource, "plural", None) or ""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()
        done = object()

        async def pump() -> None:
            try:
                async for item in source:
                    namespace = (
                        item.get("object", {}).get("metadata", {}).get("namespace", "")
                        if isinstance(item, dict)
                        else ""
                    )
                    lag = self.lags.get((plural, namespace), 0.0)
                    queue.put_nowait((loop.time() + lag, item))
            finally:
                queue.put_nowait((loop.time(), done))

        task = asyncio.create_task(pump())
        try:
            while True:
                due, item = await queue.get()
                if item is done:
                    return
                await asyncio.sleep(max(0.0, due - loop.time()))
                yield item
        finally:
            task.cancel()

    async def _namespaces(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Every namespace an object lives in; a watch that never reports a change."""
        if raw.query.get("watch") in ("true", "1"):
            response = aiohttp.web.StreamResponse()
            response.content_type = "application/json"
            await response.prepare(raw)
            await asyncio.sleep(float(raw.query.get("timeoutSeconds", 300)))
            return response
        names = sorted({namespace for (_, namespace, _) in self.objects if namespace})
        items = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}} for name in names
        ]
        return aiohttp.web.json_response(
            {"apiVersion": "v1", "kind": "NamespaceList", "metadata": {}, "items": items}
        )

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        self._forget_old_requests()
        if request.namespace:
            self.requests_in[request.namespace] += 1
        if (refused := self._refusal(request)) is not None:
            return refused
        body = request.data if isinstance(request.data, dict) else None
        if request.resource is not None and body is not None:
            meta = body.setdefault("metadata", {})
            if request.action == kmock.action.CREATE:
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", _now())
                meta.setdefault("generation", 1)
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                if request.namespace and not meta.get("namespace"):
                    meta["namespace"] = request.namespace
            elif request.action == kmock.action.UPDATE and request.subresource is None:
                current = self._current(request)
                if current is not None and "spec" in body:
                    merged = merge(current.get("spec", {}), body["spec"])
                    if merged != current.get("spec", {}):
                        meta["generation"] = current["metadata"].get("generation", 1) + 1
            meta["resourceVersion"] = str(next(self._versions))
        return await super()._handle(request)

    def _current(self, request: kmock.Request) -> dict[str, Any] | None:
        for (resource, namespace, name), obj in self.objects.items():
            if (resource, namespace, name) == (request.resource, request.namespace, request.name):
                return None if obj.deleted else dict(obj.raw)
        return None


def _now() -> str:
    return datetime.now(tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class EmulatedCluster:
    """The emulator served on a loopback port from its own event-loop thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.handler = StampingEmulator()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: kmock.Server | None = None
        self.url = ""

    def start(self) -> None:
        self._thread.start()
        self.url = self.call(self._start())

    async def _start(self) -> str:
        await self.handler.__aenter__()
        self.handler.resources.load_bundled()
        info = self.handler.resources[f"{GROUP}/{VERSION}/{PLURAL}"]
        info.kind, info.singular, info.namespaced = KIND, SINGULAR, True
        info.shortnames = set(SHORT_NAMES)
        info.subresources = {"status"}
        info.verbs = {"create", "delete", "get", "list", "patch", "update", "watch"}
        self._server = kmock.Server(self.handler)
        await self._server.__aenter__()
        return str(self._server.url).rstrip("/")

    def stop(self) -> None:
        async def _stop() -> None:
            if self._server is not None:
                await self._server.__aexit__(None, None, None)
            await self.handler.__aexit__(None, None, None)

        self.call(_stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    def call(self, coroutine: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout=30)

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test-token"}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "tester", "namespace": namespace},
                }
            ],
            "current-context": "emulator",
        }
        path.write_text(yaml.safe_dump(config))
        return path


@contextmanager
def emulated_cluster() -> Iterator[EmulatedCluster]:
    cluster = EmulatedCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
