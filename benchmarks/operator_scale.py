"""How fast the operator turns N new FineTuneJobs into their Jobs, and what it costs.

Against kmock's emulated API (in this process, on loopback), for N jobs:

- baseline: a plain client loop creating the same children (built by the same
  builders) one after another: the floor the API itself sets;
- ours: the real `finetune-operator` process watching the API; the clock runs
  from the first FineTuneJob created until every one of their Jobs exists.

Then, with all N jobs held, the operator's memory (peak and current resident
set) and its CPU use while it reconciles them every `--reconcile-seconds`.

    .venv/bin/python benchmarks/operator_scale.py --jobs 500 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import kubernetes  # noqa: E402

from finetune.api import FineTuneJob  # noqa: E402
from finetune.trainer.launcher.run import free_port  # noqa: E402
from finetune_operator import builders  # noqa: E402
from tests.emulator import EmulatedCluster, emulated_cluster  # noqa: E402
from tests.support import lora_job  # noqa: E402

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"


def document(index: int, namespace: str) -> dict[str, Any]:
    job = lora_job(resources={"nodes": 2, "gpusPerNode": 8})
    job["metadata"] = {"name": f"job-{index:05d}", "namespace": namespace}
    return job


def clients(url: str) -> tuple[Any, ...]:
    configuration = kubernetes.client.Configuration()
    configuration.host = url
    api = kubernetes.client.ApiClient(configuration)
    return (
        kubernetes.client.CustomObjectsApi(api),
        kubernetes.client.CoreV1Api(api),
        kubernetes.client.RbacAuthorizationV1Api(api),
        kubernetes.client.BatchV1Api(api),
    )


def baseline(url: str, jobs: int) -> float:
    """Create each job and its six children from one client, sequentially."""
    custom, core, rbac, batch = clients(url)
    create = {
        "ConfigMap": core.create_namespaced_config_map,
        "Service": core.create_namespaced_service,
        "ServiceAccount": core.create_namespaced_service_account,
        "Role": rbac.create_namespaced_role,
        "RoleBinding": rbac.create_namespaced_role_binding,
        "Job": batch.create_namespaced_job,
    }
    started = time.perf_counter()
    for index in range(jobs):
        body = document(index, "baseline")
        custom.create_namespaced_custom_object(GROUP, VERSION, "baseline", PLURAL, body)
        for child in builders.children(FineTuneJob.model_validate(body)):
            create[child["kind"]]("baseline", child)
    return time.perf_counter() - started


def proc_status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def cpu_seconds(pid: int) -> float:
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def count_jobs(batch: Any, namespace: str) -> int:
    return len(batch.list_namespaced_job(namespace).items)


def ours(
    cluster: EmulatedCluster, jobs: int, reconcile_seconds: float, hold: float, folder: Path
) -> dict[str, Any]:
    url = cluster.url
    kubeconfig = cluster.write_kubeconfig(folder / "kubeconfig")
    health = free_port()
    command = [
        str(Path(sys.executable).parent / "finetune-operator"),
        f"--reconcile-seconds={reconcile_seconds}",
        f"--metrics-port={free_port()}",
        f"--health-port={health}",
    ]
    log = (folder / "operator.log").open("wb")
    operator = subprocess.Popen(
        command, env=dict(os.environ, KUBECONFIG=str(kubeconfig)), stdout=log, stderr=log
    )
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(1)
        idle = proc_status(operator.pid)
        custom, _, _, batch = clients(url)
        cpu_at_start = cpu_seconds(operator.pid)
        started = time.perf_counter()
        for index in range(jobs):
            custom.create_namespaced_custom_object(
                GROUP, VERSION, "bench", PLURAL, document(index, "bench")
            )
        submitted = time.perf_counter() - started
        while count_jobs(batch, "bench") < jobs:
            time.sleep(0.2)
        elapsed = time.perf_counter() - started
        creating_cpu = cpu_seconds(operator.pid) - cpu_at_start
        cpu_before, held_from = cpu_seconds(operator.pid), time.perf_counter()
        time.sleep(hold)
        cpu_share = (cpu_seconds(operator.pid) - cpu_before) / (time.perf_counter() - held_from)
        memory = proc_status(operator.pid)
        return {
            "seconds_to_all_jobs": elapsed,
            "seconds_to_submit": submitted,
            # Below `seconds_to_all_jobs`: the API (here the emulator) sets the pace.
            "operator_cpu_seconds_while_creating": creating_cpu,
            "rss_idle_bytes": idle["VmRSS"],
            "rss_peak_bytes": memory["VmHWM"],
            "rss_held_bytes": memory["VmRSS"],
            "cpu_share_while_holding": cpu_share,
        }
    finally:
        operator.terminate()
        operator.wait(timeout=60)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--reconcile-seconds", type=float, default=5.0)
    parser.add_argument("--hold", type=float, default=30.0, help="seconds to hold all jobs")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with (
        emulated_cluster() as cluster,
        tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as folder,
    ):
        floor = baseline(cluster.url, args.jobs)
        measured = ours(cluster, args.jobs, args.reconcile_seconds, args.hold, Path(folder))
    result = {
        "jobs": args.jobs,
        "reconcile_seconds": args.reconcile_seconds,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "baseline_seconds": floor,
        **measured,
        "ratio": measured["seconds_to_all_jobs"] / floor,
    }
    path = args.out / f"results-operator-scale-{args.jobs}.json"
    path.write_text(json.dumps(result, indent=2))
    mib = 1024 * 1024
    print(
        f"{args.jobs} jobs: baseline {floor:.1f}s, operator {measured['seconds_to_all_jobs']:.1f}s "
        f"(ratio {result['ratio']:.2f}), operator CPU {measured['operator_cpu_seconds_while_creating']:.1f}s; operator RSS idle {measured['rss_idle_bytes'] / mib:.0f} MiB, "
        f"peak {measured['rss_peak_bytes'] / mib:.0f} MiB, holding {measured['rss_held_bytes'] / mib:.0f} MiB; "
        f"CPU while holding {100 * measured['cpu_share_while_holding']:.1f}% of a core"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
