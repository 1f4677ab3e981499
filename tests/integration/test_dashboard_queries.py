"""Every query of the Grafana dashboard, run against a real Prometheus that scraped a
real training run, the operator and a Pushgateway.

Debian's `prometheus` and `prometheus-pushgateway` (installed by `make setup`) run
here on loopback. The operator runs against the emulated API and takes one job
through a restart to success, for the fleet panels; a tiny LoRA run serves its
metrics while it trains and pushes its final values when it ends, for the per-job
panels. Each panel's PromQL then goes to Prometheus's HTTP API with the dashboard's
variables filled in, and must return samples.

Before the LoRA run, a tiny `lcmLora` run of the same job scores its student against
its teacher, for the distillation panel. The LoRA run's final push replaces that job's
group on the Pushgateway, and Prometheus marks the vanished series stale: the panel
must still show the figures, as it must for a user looking back at a finished job.

A job's groups on the Pushgateway go when the job is deleted, and a group a previous
job of the same name left goes when the new one is created: neither stays in the
dashboard's job list, nor mixes into a new run's panels.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune.assets import write_captioned_images
from finetune.trainer.launcher.run import free_port
from finetune.trainer.telemetry.prometheus import Identity, TrainerMetrics
from tests.emulator import emulated_cluster
from tests.operator.conftest import GROUP, PLURAL, VERSION, Kube, OperatorProcess, wait_for
from tests.support import ROOT, lora_job
from tests.trainer.jobs import PROMPT, finetune_run, job_file

pytestmark = pytest.mark.slow

DASHBOARD = ROOT / "charts" / "finetune-operator" / "dashboards" / "finetune-jobs.json"
NAMESPACE, JOB = "ml", "tiny"
DISTILLATION_PANEL = "Student vs teacher (LCM)"


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make setup` installs Debian's package")
    return path


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


class Server:
    """A Prometheus-family server on a free loopback port, for one test."""

    def __init__(self, command: list[str], port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: ready(f"{self.url}/-/ready"), timeout=60, what=command[0])
        except BaseException:  # never ready: no test will stop it
            self.stop()
            raise

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    server = Server(
        [
            binary("prometheus-pushgateway"),
            f"--web.listen-address=127.0.0.1:{port}",
            # In memory: Debian's default file would carry groups from one run to the next.
            "--persistence.file=",
        ],
        port,
        tmp_path / "pushgateway.log",
    )
    yield server
    server.stop()


def prometheus(folder: Path, targets: dict[str, str]) -> Server:
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            # The trainer's job and namespace labels name the FineTuneJob: keep them.
            {"job_name": name, "honor_labels": True, "static_configs": [{"targets": [target]}]}
            for name, target in targets.items()
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    command = [
        binary("prometheus"),
        f"--config.file={folder / 'prometheus.yml'}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    return Server(command, port, folder / "prometheus.log")


def query(server: Server, expression: str) -> list[dict[str, Any]]:
    url = f"{server.url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {
        "$namespace": NAMESPACE,
        "$job": JOB,
        "$__range": "10m",
        "$__rate_interval": "5m",
    }
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expression = target["expr"]
            for name, value in variables.items():
                expression = expression.replace(name, value)
            found.append((f"{panel['title']} / {target['legendFormat']}", expression))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(metric{...}, label): the metric must exist
            metric = variable["query"]["query"].split("(", 1)[1].rsplit(",", 1)[0]
            found.append((f"variable {variable['name']}", metric.replace("$namespace", NAMESPACE)))
    return found


def drive_a_job_through_a_restart(kube: Kube) -> None:
    """Fleet data: one job created, failed once, restarted, run and finished."""
    document = lora_job(resources={"nodes": 2, "gpusPerNode": 0})
    kube.create_job(document, NAMESPACE)
    name = document["metadata"]["name"]
    kube.wait_batch_job(f"{name}-a0", NAMESPACE)
    kube.gang_running(name, 0, NAMESPACE, nodes=2)
    kube.wait_phase(name, NAMESPACE, "Running")
    kube.failed_pod(name, 0, 0, NAMESPACE, exit_code=1)
    kube.job_condition(f"{name}-a0", NAMESPACE, "Failed", "BackoffLimitExceeded")
    kube.wait_batch_job(f"{name}-a1", NAMESPACE)
    kube.gang_running(name, 1, NAMESPACE, nodes=2)
    kube.wait_phase(name, NAMESPACE, "Running")
    kube.job_condition(f"{name}-a1", NAMESPACE, "Complete")
    kube.wait_phase(name, NAMESPACE, "Succeeded")


def distill_briefly(folder: Path, model: Path, clip: Path, env: dict[str, str]) -> None:
    """One lcmLora step, validated once (at the end) at 1 and 2 student steps: the
    distillation gauges, served while it runs and pushed when it ends."""
    data = write_captioned_images(folder / "captioned", ("red", "blue"), 1)
    job = job_file(
        folder,
        model,
        data,
        name=JOB,
        method="lcmLora",
        data={"concepts": None, "dataset": {"uri": str(data)}},
        lcm={"teacherModel": {"uri": str(model)}, "numDdimTimesteps": 2},
        lora={"rank": 4},
        training={"maxSteps": 1},
        checkpointing={"everyNSteps": 1},
        validation={
            "prompts": [PROMPT],
            "everyNSteps": 1,  # the last step's comes with the results
            "imagesPerPrompt": 1,
            "inferenceSteps": 2,
            "metrics": ["clipText", "clipImage"],
            "distillation": {"steps": [1, 2], "teacherInferenceSteps": 2},
            "evaluator": {"clipModel": str(clip)},
        },
    )
    finetune_run(job, nproc=1, env=env)


def test_every_dashboard_query_returns_data(
    tmp_path: Path,
    tiny_model: Path,
    disc_images: Path,
    tiny_evaluators: tuple[Path, Path],
    pushgateway: Server,
) -> None:
    clip, dino = tiny_evaluators
    trainer_port = free_port()
    with emulated_cluster() as cluster:
        operator = OperatorProcess(cluster, tmp_path)
        operator.start()
        try:
            server = prometheus(
                tmp_path,
                {
                    "operator": f"127.0.0.1:{operator.metrics_port}",
                    "trainer": f"127.0.0.1:{trainer_port}",
                    "pushgateway": pushgateway.url.removeprefix("http://"),
                },
            )
        except BaseException:
            operator.stop()
            raise
        try:
            drive_a_job_through_a_restart(Kube(cluster.url))
            env = {
                "FINETUNE_NAMESPACE": NAMESPACE,
                "FINETUNE_TRAINER_METRICS_PORT": str(trainer_port),
                "FINETUNE_PUSHGATEWAY_URL": pushgateway.url,
            }
            lcm = tmp_path / "lcm"
            lcm.mkdir()
            distill_briefly(lcm, tiny_model, clip, env)
            distilled = f'finetune_distillation_score{{job="{JOB}", namespace="{NAMESPACE}"}}'
            wait_for(lambda: query(server, distilled), what="the pushed distillation scores")
            job = job_file(
                tmp_path,
                tiny_model,
                disc_images,
                name=JOB,
                training={"maxSteps": 20},
                checkpointing={"everyNSteps": 10},
                # Scored validations, for the Validation scores panel.
                validation={
                    "prompts": [PROMPT],
                    "everyNSteps": 10,
                    "imagesPerPrompt": 1,
                    "inferenceSteps": 2,
                    "metrics": ["clipText"],
                    "evaluator": {"clipModel": str(clip), "dinoModel": str(dino)},
                },
            )
            result = finetune_run(job, nproc=1, env=env)
            assert result.returncode == 0, result.stderr[-3000:]
            # The run is over: what Prometheus has now is what a user's would.
            wait_for(
                lambda: query(
                    server, f'finetune_step{{job="{JOB}", namespace="{NAMESPACE}"}} == 20'
                ),
                what="the final step, scraped from the Pushgateway",
            )
            empty = [
                title for title, expression in dashboard_queries() if not query(server, expression)
            ]
            assert empty == []
            # The LoRA run's push replaced the LCM run's group, so its series are stale;
            # the panel still shows both metrics at both step counts.
            assert not query(server, distilled), "the LCM run's series are still live"
            (expression,) = [
                e for title, e in dashboard_queries() if title.startswith(DISTILLATION_PANEL)
            ]
            shown = {
                (s["metric"]["metric"], s["metric"]["steps"]) for s in query(server, expression)
            }
            assert shown == {(m, s) for m in ("clipText", "clipImage") for s in ("1", "2")}
        finally:
            server.stop()
            operator.stop()


def groups(gateway: Server) -> set[tuple[str, str, str]]:
    """(job, namespace, rank) of each group on the Pushgateway."""
    with urllib.request.urlopen(f"{gateway.url}/api/v1/metrics", timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return {
        (g["labels"]["job"], g["labels"].get("namespace", ""), g["labels"].get("rank", ""))
        for g in answer["data"]
    }


def push_final_values(gateway: Server, name: str) -> None:
    """What a job's trainer (rank 0) pushes when its run ends."""
    metrics = TrainerMetrics(Identity(name, NAMESPACE, "lora", 0))
    metrics.record_step(20, 20, 0.05, 1e-4, 9.0, 0.5, 0)
    metrics.push({"FINETUNE_PUSHGATEWAY_URL": gateway.url})
    assert (name, NAMESPACE, "0") in groups(gateway)


def test_a_jobs_pushed_metrics_go_with_it(tmp_path: Path, pushgateway: Server) -> None:
    document = lora_job()
    name = document["metadata"]["name"]
    push_final_values(pushgateway, name)  # a previous job of this name's, left behind
    push_final_values(pushgateway, "other")
    with emulated_cluster() as cluster:
        operator = OperatorProcess(cluster, tmp_path, pushgateway_url=pushgateway.url)
        operator.start()
        try:
            kube = Kube(cluster.url)
            kube.create_job(document, NAMESPACE)
            wait_for(
                lambda: groups(pushgateway) == {("other", NAMESPACE, "0")},
                what="the previous job's group deleted when a job of its name is created",
            )
            kube.wait_batch_job(f"{name}-a0", NAMESPACE)
            push_final_values(pushgateway, name)  # this job's run ends
            kube.custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
            wait_for(lambda: kube.job(name, NAMESPACE) is None, what="the deleted job gone")
            # Deleted before kopf lifted its finalizer; another job's group stays.
            assert groups(pushgateway) == {("other", NAMESPACE, "0")}
        finally:
            operator.stop()
