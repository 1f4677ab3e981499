"""Finding the cluster: in a pod its service account, elsewhere the kubeconfig.

Before kopf starts, the operator checks that the configuration loads and that the
API server answers `/version`; without a cluster it says in one line which
configuration it tried and exits 1, instead of retrying with tracebacks.
"""

from __future__ import annotations

import os
from pathlib import Path

import kubernetes
import urllib3
from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException

IN_CLUSTER_ENV = "KUBERNETES_SERVICE_HOST"
PROBE_SECONDS = 5.0


class ClusterUnreachable(Exception):  # noqa: N818 - named for what the user sees
    """No Kubernetes API answers; the message names the configuration tried."""


def kubeconfig_source() -> str:
    """The kubeconfig the client reads, and where that choice came from."""
    if "KUBECONFIG" in os.environ:
        return f"kubeconfig {os.environ['KUBECONFIG']} (from $KUBECONFIG)"
    return f"kubeconfig {Path('~/.kube/config').expanduser()}"


def _load() -> str:
    """Load the client configuration; what was loaded, for messages."""
    tried = []
    if IN_CLUSTER_ENV in os.environ:
        try:
            kubernetes.config.load_incluster_config()
            return f"in-cluster config ({IN_CLUSTER_ENV}={os.environ[IN_CLUSTER_ENV]})"
        except kubernetes.config.ConfigException as exc:
            tried.append(f"in-cluster config: {exc}")
    source = kubeconfig_source()
    try:
        kubernetes.config.load_kube_config()
    except Exception as exc:  # ConfigException, a YAML error, an unreadable file...
        tried.append(f"{source}: {_reason(exc)}")
        raise ClusterUnreachable("; ".join(tried)) from exc
    return source


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:199] + "…"


def _root(exc: BaseException) -> BaseException:
    """The socket-level error under the client's wrappers: `[Errno 111] Connection
    refused` rather than urllib3's retry summary or the client's own AttributeError."""
    found: BaseException = exc
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            found = seen
        seen = seen.__cause__ or seen.__context__
    return found


def probe(source: str, seconds: float = PROBE_SECONDS) -> None:
    """One `GET /version` without retries: does the API server answer? Any answer
    but 401 will do (RBAC is checked where it matters, by the calls themselves)."""
    configuration = Configuration.get_default_copy()
    configuration.retries = False
    server = configuration.host
    headers = {}
    token = configuration.get_api_key_with_prefix("authorization")
    if token:
        headers["Authorization"] = token
    # The REST layer directly: the client's own error handling fails on a TLS error.
    with ApiClient(configuration) as client:
        try:
            client.rest_client.GET(
                f"{server}/version",
                headers=headers,
                _preload_content=False,  # the answer is enough; its body is not read
                _request_timeout=seconds,
            )
        except ApiException as exc:
            if exc.status == 401:
                raise ClusterUnreachable(
                    f"{source}: the API server {server} refused the credentials (401)"
                ) from exc
            if not exc.status:  # the client's wrapper of a connection error
                raise ClusterUnreachable(
                    f"{source}: {server} cannot be reached ({_reason(_root(exc))})"
                ) from exc
        except (OSError, urllib3.exceptions.HTTPError) as exc:  # refused, timeout, TLS, DNS
            raise ClusterUnreachable(
                f"{source}: {server} cannot be reached ({_reason(_root(exc))})"
            ) from exc


def connect(probe_seconds: float | None = None) -> ApiClient:
    """A client of the cluster; with `probe_seconds`, one known to answer.
    ClusterUnreachable names the configuration tried."""
    source = _load()
    if probe_seconds is not None:
        probe(source, probe_seconds)
    return ApiClient()
