"""The Job controller and the kubelet, played on this machine for end-to-end tests.

For a Job the operator created, run each pod's container command as a local
process: the pod's environment (field and Secret references resolved from the
emulated API), its ConfigMap volume written to a folder, JOB_COMPLETION_INDEX
set per pod. What cannot be the same off a cluster is mapped: the rendezvous
address becomes loopback, the API the trainer reports to becomes the
emulator's, and the image's paths become folders of this machine. Pods and Job
status are written back as a cluster would: Running while the processes run,
then Succeeded or Failed with each container's exit code.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from finetune.api.pod import CACHE_DIR, CONFIG_DIR
from finetune.trainer.engine.comm_op import extensions_dir
from finetune.trainer.launcher.run import free_port
from tests.operator.conftest import Kube, now


class Kubelet:
    def __init__(self, kube: Kube, api_url: str, namespace: str, folder: Path) -> None:
        self.kube, self.api_url, self.namespace, self.folder = kube, api_url, namespace, folder

    def _env(self, container: dict[str, Any], index: int, node: Path, port: int) -> dict[str, str]:
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
        for source in container.get("envFrom") or []:
            env.update(self._secret(source["secretRef"]["name"]))
        for entry in container.get("env") or []:
            env[entry["name"]] = self._value(entry)
        env.update(
            JOB_COMPLETION_INDEX=str(index),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            FINETUNE_CACHE_DIR=str(node / "cache"),
            HOME=str(node / "home"),
            FINETUNE_STATUS_API=self.api_url,
            FINETUNE_STATUS_INTERVAL="0.5",
            FINETUNE_TERMINATION_LOG=str(node / "termination-log"),
            OMP_NUM_THREADS="1",
            # A pod's HOME is its own, but the image's DeepSpeed op is built once, as the
            # trainer image would carry it: share this machine's build.
            TORCH_EXTENSIONS_DIR=str(extensions_dir()),
        )
        return env

    def _value(self, entry: dict[str, Any]) -> str:
        if "value" in entry:
            return str(entry["value"])
        source = entry["valueFrom"]
        if "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.namespace"
            return self.namespace
        ref = source["secretKeyRef"]
        return self._secret(ref["name"])[ref["key"]]

    def _secret(self, name: str) -> dict[str, str]:
        secret = self.kube.core.read_namespaced_secret(name, self.namespace)
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def _config(self, pod: dict[str, Any], folder: Path) -> None:
        """The ConfigMap volume, as the kubelet mounts it."""
        (volume,) = [v for v in pod["volumes"] if "configMap" in v]
        config_map = self.kube.core.read_namespaced_config_map(
            volume["configMap"]["name"], self.namespace
        )
        folder.mkdir(parents=True, exist_ok=True)
        for key, text in (config_map.data or {}).items():
            (folder / key).write_text(text)

    def run(self, job_name: str, timeout: float = 600) -> list[int]:
        """Run every pod of the Job to the end; return their exit codes."""
        job = self.kube.wait_batch_job(job_name, self.namespace)
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        labels = job["spec"]["template"]["metadata"]["labels"]
        base = self.folder / job_name
        self._config(pod, base / "config")
        command = [
            part.replace(CONFIG_DIR, str(base / "config")).replace(CACHE_DIR, str(base))
            for part in container["command"]
        ]
        command[0] = str(Path(sys.executable).parent / command[0])
        port = free_port()
        processes, pods = [], []
        for index in range(job["spec"]["completions"]):
            node = base / f"node-{index}"
            node.mkdir(parents=True, exist_ok=True)
            with (node / "log").open("w") as log:
                processes.append(
                    subprocess.Popen(
                        command,
                        env=self._env(container, index, node, port),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
            pods.append(self._pod(job_name, labels, index))
        self.kube.set_job_status(
            job_name, self.namespace, {"active": len(processes), "startTime": now()}
        )
        codes = [p.wait(timeout=timeout) for p in processes]
        for index, (name, code) in enumerate(zip(pods, codes, strict=True)):
            message = base / f"node-{index}" / "termination-log"
            self._finish_pod(name, code, message.read_text() if message.exists() else "")
        if all(code == 0 for code in codes):
            condition = {"type": "Complete", "status": "True"}
            final = {"active": 0, "succeeded": len(codes), "conditions": [condition]}
        else:
            condition = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}
            final = {"active": 0, "failed": sum(c != 0 for c in codes), "conditions": [condition]}
        self.kube.set_job_status(job_name, self.namespace, final)
        return codes

    def log(self, job_name: str, index: int) -> str:
        return (self.folder / job_name / f"node-{index}" / "log").read_text()

    def _pod(self, job_name: str, labels: dict[str, str], index: int) -> str:
        name = f"{job_name}-{index}-local"
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "labels": labels,
                "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
                "ownerReferences": [self.kube.pod_owner(job_name, self.namespace)],
            },
            "spec": {"containers": [{"name": "trainer", "image": "local"}]},
            "status": {"phase": "Running"},
        }
        self.kube.core.create_namespaced_pod(self.namespace, body)
        return name

    def _finish_pod(self, name: str, code: int, message: str) -> None:
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}
        if message:
            terminated["message"] = message
        status = {
            "phase": "Succeeded" if code == 0 else "Failed",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {"terminated": terminated},
                    "ready": False,
                    "restartCount": 0,
                    "image": "local",
                    "imageID": "",
                }
            ],
        }
        self.kube.core.patch_namespaced_pod_status(name, self.namespace, {"status": status})
