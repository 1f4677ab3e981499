"""The generated CRD: fresh, structural, valid for Kubernetes, and agreeing with the models."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from finetune.api import FineTuneJob
from finetune.api.crd import SPEC_RULES, build_crd, render_crd_yaml
from finetune.api.loading import load_text
from finetune.api.reference import render_reference
from finetune.api.status import Artifact, CheckpointRef, Condition, FineTuneJobStatus, Progress
from tests.support import CHART_CRD_PATH, CRD_PATH, EXAMPLES, README, lcm_job, lora_job

# The oldest Kubernetes release we support; CEL rules with messages need >= 1.28.
KUBERNETES_VERSION = "1.31.0"

CRD = build_crd()
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]


def test_committed_crd_is_up_to_date() -> None:
    assert CRD_PATH.read_text() == render_crd_yaml(), "the CRD is stale: run `make crd`"


def test_chart_carries_the_same_crd() -> None:
    assert CHART_CRD_PATH.read_text() == CRD_PATH.read_text(), "run `make crd`"


def test_readme_spec_reference_is_up_to_date() -> None:
    assert render_reference() in README.read_text(), (
        "the README's spec reference is stale: run `make crd`"
    )


def test_crd_is_a_valid_apiextensions_v1_object() -> None:
    committed = yaml.safe_load(CRD_PATH.read_text())
    kubernetes_validate.validate(committed, KUBERNETES_VERSION, strict=True)
    assert committed["apiVersion"] == "apiextensions.k8s.io/v1"
    assert committed["metadata"]["name"] == "finetunejobs.finetune.dev"
    names = committed["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "FineTuneJob",
        "finetunejobs",
        ["ftj"],
    )
    assert names["categories"] == ["finetune"]
    assert VERSION["subresources"] == {"status": {}}


_FORBIDDEN = {
    "$ref",
    "$defs",
    "anyOf",
    "oneOf",
    "allOf",
    "not",
    "nullable",
    "title",
    "const",
    "discriminator",
}


def _int_or_string(node: dict[str, Any], key: str) -> bool:
    """The one anyOf Kubernetes allows, and only beside x-kubernetes-int-or-string."""
    either = [{"type": "integer"}, {"type": "string"}]
    return key == "anyOf" and node.get("x-kubernetes-int-or-string") and node[key] == either


def _walk(node: dict[str, Any], path: str) -> list[str]:
    """Violations of the structural-schema rules Kubernetes enforces."""
    errors = [
        f"{path}: {key}" for key in node if key in _FORBIDDEN and not _int_or_string(node, key)
    ]
    extensible = node.get("x-kubernetes-preserve-unknown-fields") or node.get(
        "x-kubernetes-int-or-string"
    )
    if "type" not in node and not extensible:
        errors.append(f"{path}: no type")
    if "properties" in node and node.get("type") != "object":
        errors.append(f"{path}: properties on a non-object")
    if node.get("type") == "array" and "items" not in node:
        errors.append(f"{path}: array without items")
    for name, child in node.get("properties", {}).items():
        errors += _walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        errors += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        errors += _walk(node["additionalProperties"], f"{path}{{}}")
    return errors


def test_schema_is_structural() -> None:
    assert _walk(SCHEMA, "") == []
    assert SCHEMA["properties"]["metadata"] == {"type": "object"}


def prune(value: Any, schema: dict[str, Any]) -> Any:
    """What the API server keeps of `value`: unknown fields are dropped."""
    if isinstance(value, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return value
        if "additionalProperties" in schema:
            return {k: prune(v, schema["additionalProperties"]) for k, v in value.items()}
        props = schema.get("properties", {})
        # metadata is ObjectMeta, which the API server validates on its own.
        return {
            k: v if k == "metadata" else prune(v, props[k]) for k, v in value.items() if k in props
        }
    if isinstance(value, list) and "items" in schema:
        return [prune(v, schema["items"]) for v in value]
    return value


def full_status() -> dict[str, Any]:
    """A status with every field the operator and the trainer write."""
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    status = FineTuneJobStatus(
        phase="Running",
        conditions=[
            Condition(
                type="Running",
                status="True",
                observed_generation=2,
                last_transition_time=now,
                reason="PodsRunning",
                message="2/2 pods",
            )
        ],
        observed_generation=2,
        progress=Progress(
            step=10,
            total_steps=100,
            percent=10,
            loss=0.12,
            images_per_second=3.5,
            eta_seconds=750,
            last_heartbeat=now,
        ),
        last_checkpoint=CheckpointRef(uri="s3://b/ckpt/step-10", step=10),
        artifacts=[
            Artifact(uri="s3://b/out/w.safetensors", sha256="a" * 64, bytes=42, kind="lora")
        ],
        restarts=1,
        start_time=now,
        completion_time=now,
        failure_reason="OOMKilled",
        failure_message="rank 3 ran out of memory",
    )
    dumped = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped["progress"]["eta"] == "12m30s"
    return dumped


def test_no_status_field_is_pruned() -> None:
    status = full_status()
    assert prune(status, SCHEMA["properties"]["status"]) == status


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_survive_the_api_server_unchanged(example: Any) -> None:
    manifest = FineTuneJob.model_validate(yaml.safe_load(example.read_text())).to_manifest()
    manifest["status"] = full_status()
    assert prune(manifest, SCHEMA) == manifest
    jsonschema.Draft4Validator(SCHEMA).validate(manifest)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "method"), "textualInversion"),
        (("spec", "deepspeed", "zeroStage"), 4),
        (("spec", "training", "learningRate"), 0),
        (("spec", "resources", "nodes"), 0),
        (("spec", "output", "formats"), ["safetensors"]),
    ],
)
def test_schema_refuses_what_the_models_refuse(path: tuple[str, ...], value: Any) -> None:
    manifest = FineTuneJob.model_validate(lora_job()).to_manifest()
    node = manifest
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(SCHEMA).validate(manifest)
    with pytest.raises(ValueError, match=path[-1]):
        FineTuneJob.model_validate(manifest)


# (path, the value as written in YAML, the same value as JSON, does the API server take it)
TYPED_VALUES = [
    (("training", "maxSteps"), '"200"', "200", False),
    (("training", "maxSteps"), "true", True, False),
    (("training", "learningRate"), "1e-4", 1e-4, True),
    (("training", "learningRate"), '"1e-4"', "1e-4", False),
    (("data", "randomFlip"), "yes", True, True),
    (("data", "randomFlip"), '"true"', "true", False),
    (("resources", "cpu"), "8", 8, True),
    (("resources", "cpu"), '"500m"', "500m", True),
    (("resources", "cpu"), "-1", -1, False),
    (("resources", "memory"), "8.5", 8.5, False),
]


@pytest.mark.parametrize(("path", "written", "value", "taken"), TYPED_VALUES)
def test_job_files_and_the_api_server_agree_on_types(
    path: tuple[str, ...], written: str, value: Any, taken: bool
) -> None:
    """`finetune run` takes exactly what `kubectl apply` would for a value's type."""
    manifest = FineTuneJob.model_validate(lora_job()).to_manifest()
    node = manifest["spec"]
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = "PLACEHOLDER"
    text = yaml.safe_dump(manifest).replace("PLACEHOLDER", written)
    node[path[-1]] = value

    server = jsonschema.Draft4Validator(SCHEMA).is_valid(manifest)
    loaded = load_text(text, "job.yaml")
    assert (server, loaded.ok) == (taken, taken), [str(p) for p in loaded.problems]
    if not taken:
        assert [p.path for p in loaded.problems] == [".".join(("spec", *path))]


def test_printer_columns_point_at_declared_fields() -> None:
    names = [c["name"] for c in VERSION["additionalPrinterColumns"] if not c.get("priority")]
    assert names == ["Phase", "Method", "Progress", "Loss", "Score", "ETA", "Age"]
    for column in VERSION["additionalPrinterColumns"]:
        if column["jsonPath"] == ".metadata.creationTimestamp":
            continue
        node = SCHEMA
        for part in column["jsonPath"].strip(".").split("."):
            node = node["properties"][part]
        assert node["type"] == column["type"] or (node["type"], column["type"]) == (
            "number",
            "number",
        )


# --- CEL rules, evaluated with a CEL interpreter --------------------------------


def cel(rule: str, self_: Any, old: Any = None) -> bool:
    env = celpy.Environment()
    program = env.program(env.compile(rule))
    activation = {"self": celpy.json_to_cel(self_)}
    if old is not None:
        activation["oldSelf"] = celpy.json_to_cel(old)
    return bool(program.evaluate(activation))


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting as the API server does it: a missing field with a default
    gets it, then defaulting goes on inside it."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for name, child in schema["properties"].items():
            if name not in out and "default" in child:
                out[name] = copy.deepcopy(child["default"])
            if name in out:
                out[name] = apply_defaults(out[name], child)
        return out
    if isinstance(value, list) and "items" in schema:
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


def api_server_view(document: dict[str, Any]) -> dict[str, Any]:
    """The spec as CEL sees it: the user's fields, with the CRD's defaults applied."""
    spec: dict[str, Any] = apply_defaults(document["spec"], SCHEMA["properties"]["spec"])
    return spec


def failing_rules(document: dict[str, Any]) -> list[str]:
    spec = api_server_view(document)
    return [rule["message"] for rule in SPEC_RULES if not cel(rule["rule"], spec)]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_jobs_stored_with_the_crds_defaults_still_validate(example: Any) -> None:
    """What the operator and trainer read back from the API server must pass the models."""
    stored = apply_defaults(yaml.safe_load(example.read_text()), SCHEMA)
    assert stored != yaml.safe_load(example.read_text())  # defaults were applied
    FineTuneJob.model_validate(stored)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_cel_rules_accept_the_examples(example: Any) -> None:
    assert failing_rules(yaml.safe_load(example.read_text())) == []


@pytest.mark.parametrize(
    "document",
    [
        lora_job(method="customDiffusion", lora=None),
        lora_job(method="customDiffusion", lora=None, customDiffusion={"modifierTokens": []}),
        lcm_job(lcm={"teacherModel": None}),
        lcm_job(method="lcm", lcm=None),
        lcm_job(data={"dataset": None}),
        lora_job(data={"concepts": []}),
        lora_job(training={"priorPreservation": True}),
        lora_job(training={"maxSteps": 100}, checkpointing={"everyNSteps": 200}),
        lora_job(checkpointing={"everyNSteps": 501}),  # larger than the default maxSteps
    ],
)
def test_cel_rules_and_models_refuse_the_same_jobs(document: dict[str, Any]) -> None:
    failed = failing_rules(document)
    assert len(failed) == 1
    field = failed[0].split(":")[0].replace("[]", "[0]")
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        FineTuneJob.model_validate(document)


def _immutability_rule() -> str:
    rules = [
        r for r in SCHEMA["x-kubernetes-validations"] if r.get("reason") == "FieldValueForbidden"
    ]
    assert len(rules) == 1
    return str(rules[0]["rule"])


def _stored(document: dict[str, Any], started: bool) -> dict[str, Any]:
    stored = FineTuneJob.model_validate(document).to_manifest()
    if started:
        stored["status"] = {"phase": "Running", "startTime": "2026-01-01T00:00:00Z"}
    return stored


def test_spec_is_immutable_once_started() -> None:
    rule = _immutability_rule()
    old = _stored(lora_job(), started=True)
    changed = _stored(lora_job(training={"learningRate": 5e-4}), started=True)
    assert not cel(rule, changed, old)
    added = _stored(lora_job(validation={"prompts": ["a dog"]}), started=True)
    assert not cel(rule, added, old)
    queue = _stored(lora_job(runPolicy={"queueName": "other"}), started=True)
    assert not cel(rule, queue, old)


@pytest.mark.parametrize(
    "knob",
    [
        {"suspend": True},
        {"backoffLimit": 0},
        {"activeDeadlineSeconds": 60},
        {"ttlSecondsAfterFinished": 600},
        {"heartbeatTimeoutSeconds": 120},
    ],
)
def test_run_policy_knobs_may_change_after_start(knob: dict[str, Any]) -> None:
    rule = _immutability_rule()
    old = _stored(lora_job(), started=True)
    assert cel(rule, _stored(lora_job(runPolicy=knob), started=True), old)
    assert cel(rule, old, old)


def test_spec_may_change_before_start() -> None:
    rule = _immutability_rule()
    old = _stored(lora_job(), started=False)
    assert cel(rule, _stored(lora_job(training={"learningRate": 5e-4}), started=False), old)


def test_name_length_rule() -> None:
    rule = next(
        r["rule"] for r in SCHEMA["x-kubernetes-validations"] if "metadata.name" in r["rule"]
    )
    assert cel(rule, {"metadata": {"name": "a" * 40}})
    assert not cel(rule, {"metadata": {"name": "a" * 41}})
