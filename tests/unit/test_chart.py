"""The Helm chart, rendered and linted by Helm's own engine (helm-python-sdk), every
object checked against the Kubernetes schemas, bad values refused by its schema."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from finetune.api import FineTuneJob
from finetune_operator import builders
from finetune_operator.config import OperatorConfig, pushgateway_problem
from tests.support import ROOT, lora_job

CHART = ROOT / "charts" / "finetune-operator"
KUBERNETES_VERSION = "1.31.0"
MONITORING = "monitoring.coreos.com/v1"
MONITORS_ON = {
    "metrics": {
        "serviceMonitor": {"enabled": True, "skipApiCheck": True, "labels": {"release": "prom"}},
        "podMonitor": {"enabled": True, "skipApiCheck": True},
    }
}
VALUE_SETS = {
    "default": {},
    "namespaced": {"watchNamespaces": ["ml", "research"]},
    "monitoring-on": MONITORS_ON,
    "monitoring-without-the-api": {
        "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}
    },
    "monitoring-off": {"metrics": {"service": {"enabled": False}}},
}


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any]) -> list[dict[str, Any]]:
    chart.validate_schema(values)
    rendered = chart.render(values=values, name="ft", namespace="finetune-system")
    return [
        document
        for path, text in sorted(rendered.items())
        if path.endswith(".yaml")
        for document in yaml.safe_load_all(text)
        if document
    ]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_rendered_object_validates(chart: Any, values: dict[str, Any]) -> None:
    objects = render(chart, values)
    assert of_kind(objects, "Deployment")
    for manifest in objects:
        if manifest["apiVersion"] != MONITORING:  # not an upstream schema
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_helm_lint_is_clean() -> None:
    report = helm_python.lint(CHART, strict=True, kube_version=f"v{KUBERNETES_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_monitors_need_their_value_and_the_api(chart: Any) -> None:
    kinds = {o["kind"] for o in render(chart, MONITORS_ON)}
    assert {"ServiceMonitor", "PodMonitor"} <= kinds
    without_api = {o["kind"] for o in render(chart, VALUE_SETS["monitoring-without-the-api"])}
    assert not {"ServiceMonitor", "PodMonitor"} & without_api
    assert not {"ServiceMonitor", "PodMonitor"} & {o["kind"] for o in render(chart, {})}


def test_monitors_select_what_the_operator_and_its_pods_serve(chart: Any) -> None:
    objects = render(chart, MONITORS_ON)
    (monitor,) = of_kind(objects, "ServiceMonitor")
    (service,) = of_kind(objects, "Service")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    (pods,) = of_kind(objects, "PodMonitor")
    trainer_pod = builders.batch_job(FineTuneJob.model_validate(lora_job()), 0)["spec"]["template"]
    assert (
        pods["spec"]["selector"]["matchLabels"].items() <= trainer_pod["metadata"]["labels"].items()
    )
    ports = {p["name"] for p in trainer_pod["spec"]["containers"][0]["ports"]}
    assert pods["spec"]["podMetricsEndpoints"][0]["port"] in ports


def test_namespaced_install_grants_nothing_cluster_wide_but_reading(chart: Any) -> None:
    objects = render(chart, VALUE_SETS["namespaced"])
    assert sorted(r["metadata"]["namespace"] for r in of_kind(objects, "Role")) == [
        "ml",
        "research",
    ]
    (observer,) = of_kind(objects, "ClusterRole")
    verbs = {verb for rule in observer["rules"] for verb in rule["verbs"]}
    assert verbs <= {"get", "list", "watch"}
    (deployment,) = of_kind(objects, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["--namespace=ml", "--namespace=research"]


def _allows(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(
        group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
        for rule in rules
    )


def test_the_operator_holds_every_permission_it_grants_trainers(chart: Any) -> None:
    """Kubernetes refuses to let the operator create a Role granting more than it has."""
    objects = render(chart, {})
    operator_rules = [r for role in of_kind(objects, "ClusterRole") for r in role["rules"]]
    for rule in builders.role(FineTuneJob.model_validate(lora_job()))["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert _allows(operator_rules, group, resource, verb), (resource, verb)


# What the operator watches (its timer, handlers and indexes, `handlers.py`): the only
# resources it may watch in the namespaces it serves; it also lists the events of a Job
# whose pods are missing (`Cluster.creation_refused`).
WATCHED = {("finetune.dev", "finetunejobs"), ("batch", "jobs"), ("", "pods")}
LISTED = WATCHED | {("", "events")}


@pytest.mark.parametrize("values", ["default", "namespaced"])
def test_the_operator_holds_no_permission_it_never_uses(chart: Any, values: str) -> None:
    """It patches (never updates), watches only what it watches, lists only that and the
    events of a Job, and posts core v1 events."""
    objects = render(chart, VALUE_SETS[values])
    roles = of_kind(objects, "Role") + [
        r for r in of_kind(objects, "ClusterRole") if not r["metadata"]["name"].endswith("observer")
    ]
    assert roles
    for role in roles:
        for rule in role["rules"]:
            assert "update" not in rule["verbs"], rule
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
            assert "events.k8s.io" not in rule["apiGroups"], rule
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    if "watch" in rule["verbs"]:
                        assert (group, resource) in WATCHED, (group, resource, rule["verbs"])
                    if "list" in rule["verbs"]:
                        assert (group, resource) in LISTED, (group, resource, rule["verbs"])
    rules = [r for role in roles for r in role["rules"]]
    assert _allows(rules, "", "events", "create")
    assert _allows(rules, "", "events", "list")
    assert _allows(rules, "finetune.dev", "finetunejobs/status", "patch")


def test_the_deployment_configures_the_operator(chart: Any) -> None:
    values = {
        "trainer": {
            "image": {"repository": "registry.local/trainer", "tag": "2"},
            "imagePullSecrets": ["pull"],
            "pushgatewayUrl": "http://gateway:9091",
        },
        "operator": {"reconcileSeconds": 2},
    }
    (deployment,) = of_kind(render(chart, values), "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    config = OperatorConfig.from_env({e["name"]: e["value"] for e in container["env"]})
    assert config.trainer_image == "registry.local/trainer:2"
    assert config.trainer_pull_secrets == ("pull",)
    assert config.reconcile_seconds == 2
    assert config.pushgateway_url == "http://gateway:9091"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (ports["metrics"], ports["health"]) == (config.metrics_port, config.health_port)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"watchNamespaces": "ml"}, "watchNamespaces"),
        ({"watchNamespaces": ["Not_A_Namespace"]}, "watchNamespaces"),
        ({"operator": {"reconcileSeconds": 0}}, "reconcileSeconds"),
        ({"operator": {"logFormat": "xml"}}, "logFormat"),
        ({"metrics": {"port": 70000}}, "port"),
        ({"image": {"repository": "x", "pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"metrics": {"podMonitor": {"interval": "often"}}}, "interval"),
        ({"replicas": 2}, "replicas"),
        ({"trainer": {"pushgatewayUrl": "gateway:9091"}}, "pushgatewayUrl"),
    ],
)
def test_bad_values_are_refused_naming_the_key(
    chart: Any, values: dict[str, Any], named: str
) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=named):
        chart.validate_schema(values)


@pytest.mark.parametrize(
    "url",
    [
        "http://gateway:9091",
        "https://pushgateway.monitoring.svc.cluster.local:9091/",
        "http://[::1]:9091/prefix",
        "http://10.0.0.5",
        "http://gw:notaport",
        "http://[bad",
        "http://gw:70000",
        "http://gw:0",
        "gw:9091",
        "http://:9091",
        "http://gw:9091?x=1",
        "http://gw:9091/a b",
        "http://user:secret@gw:9091",
    ],
)
def test_the_schema_takes_the_pushgateway_urls_the_operator_takes(chart: Any, url: str) -> None:
    """Refused at `helm install`, not by an operator that then never starts."""
    values = {"trainer": {"pushgatewayUrl": url}}
    if pushgateway_problem(url) is None:
        chart.validate_schema(values)
    else:
        with pytest.raises(helm_python.HelmValuesError, match="pushgatewayUrl"):
            chart.validate_schema(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"metrics": {"port": 8080}}, "metrics.port and health.port are both 8080"),
        (
            {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}},
            "metrics.serviceMonitor.enabled needs metrics.service.enabled",
        ),
        ({"serviceAccount": {"create": False}}, "serviceAccount.name: with serviceAccount.create"),
    ],
)
def test_values_that_cannot_work_together_fail_the_render(
    chart: Any, values: dict[str, Any], message: str
) -> None:
    chart.validate_schema(values)  # each value is fine alone
    with pytest.raises(helm_python.HelmError, match=message):
        chart.render(values=values, name="ft", namespace="finetune-system")


def test_an_existing_service_account_is_bound_by_its_name(chart: Any) -> None:
    objects = render(chart, {"serviceAccount": {"create": False, "name": "operator"}})
    assert not of_kind(objects, "ServiceAccount")
    (deployment,) = of_kind(objects, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "operator"
    bindings = of_kind(objects, "ClusterRoleBinding")
    assert bindings
    assert {s["name"] for b in bindings for s in b["subjects"]} == {"operator"}


@pytest.mark.parametrize("label", ["app.kubernetes.io/name", "app.kubernetes.io/instance"])
def test_pod_labels_may_not_replace_the_selectors(chart: Any, label: str) -> None:
    """The Deployment's selector must match its pods: the API refuses it otherwise."""
    values = {"podLabels": {label: "other"}}
    chart.validate_schema(values)
    with pytest.raises(helm_python.HelmError, match=f"podLabels: {label} is the label"):
        chart.render(values=values, name="ft", namespace="finetune-system")


def test_pod_labels_are_added_to_the_selectors(chart: Any) -> None:
    (deployment,) = of_kind(render(chart, {"podLabels": {"team": "ml"}}), "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["team"] == "ml"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_pull_secrets_are_named_like_secrets(chart: Any) -> None:
    """Secret names are DNS subdomains: dots are fine."""
    values = {"imagePullSecrets": ["regcred.docker"], "trainer": {"imagePullSecrets": ["a.b"]}}
    (deployment,) = of_kind(render(chart, values), "Deployment")
    assert deployment["spec"]["template"]["spec"]["imagePullSecrets"] == [
        {"name": "regcred.docker"}
    ]
    for bad in ("Regcred", "-regcred", "regcred.", "a" * 254):
        with pytest.raises(helm_python.HelmValuesError, match="imagePullSecrets"):
            chart.validate_schema({"imagePullSecrets": [bad]})


DASHBOARD = CHART / "dashboards" / "finetune-jobs.json"


def test_the_dashboard_ships_as_a_configmap_for_the_grafana_sidecar(chart: Any) -> None:
    (config_map,) = [
        o
        for o in of_kind(render(chart, {}), "ConfigMap")
        if o["metadata"]["name"].endswith("-dashboard")
    ]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["finetune-jobs.json"]) == json.loads(DASHBOARD.read_text())
    off = render(chart, {"dashboards": {"enabled": False}})
    assert not [
        o for o in of_kind(off, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")
    ]


def test_the_dashboard_has_a_stable_uid_and_its_variables() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "finetune-jobs"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert {"namespace", "job"} <= set(variables)
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert targets
    assert {t["datasource"]["uid"] for t in targets} == {"${datasource}"}


def unit_of(panel: dict[str, Any], ref_id: str) -> str | None:
    """The unit Grafana draws a query's series in: its own override, else the panel's."""
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
    for override in panel.get("fieldConfig", {}).get("overrides", []):
        if override["matcher"] == {"id": "byFrameRefID", "options": ref_id}:
            for prop in override["properties"]:
                if prop["id"] == "unit":
                    unit = prop["value"]
    return str(unit) if unit is not None else None


def test_dashboard_bytes_are_drawn_as_bytes_and_counters_as_increases() -> None:
    """A byte count on a seconds axis reads as hours; a raw counter summed over the
    ranks drops at every resume (each process counts from 0)."""
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            where = f"{panel['title']} / {target['legendFormat']}"
            expression = target["expr"]
            if re.search(r"finetune_\w*_bytes(_total)?\b", expression):
                assert unit_of(panel, target["refId"]) == "bytes", where
            for counter in re.finditer(r"\bfinetune_\w+_total\b", expression):
                before = expression[: counter.start()]
                assert before.endswith(("increase(", "rate(")), where
