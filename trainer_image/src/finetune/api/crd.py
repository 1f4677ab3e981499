"""Generate the FineTuneJob CustomResourceDefinition from the pydantic models.

Kubernetes wants a *structural* OpenAPI v3 schema: every node typed, no
`$ref`, no `anyOf` of different types, free-form objects marked with
`x-kubernetes-preserve-unknown-fields`. Pydantic's JSON Schema is close; this
module inlines and rewrites it, then adds what only Kubernetes understands:
printer columns, the status subresource, and CEL rules the API server enforces.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from .cluster import MUTABLE_RUN_POLICY
from .job import (
    CATEGORIES,
    GROUP,
    KIND,
    MAX_NAME_LENGTH,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    FineTuneJobSpec,
)
from .status import FineTuneJobStatus

Schema = dict[str, Any]

# JSON Schema keywords a structural schema accepts, and nothing else.
_KEPT_KEYWORDS = {
    "type",
    "format",
    "description",
    "default",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "uniqueItems",
    "required",
    "properties",
    "items",
    "additionalProperties",
}


INT_OR_STRING = "x-kubernetes-int-or-string"


class StructuralSchemaError(ValueError):
    pass


def structural_schema(model: type[BaseModel], mode: str = "validation") -> Schema:
    """The model's JSON Schema (camelCase) rewritten into a structural schema."""
    raw = model.model_json_schema(by_alias=True, mode=mode)  # type: ignore[arg-type]
    return _convert(raw, raw.get("$defs", {}), path=model.__name__)


def _convert(node: Schema, defs: dict[str, Schema], path: str) -> Schema:
    node = _inline(node, defs)
    out: Schema = {}

    if node.get(INT_OR_STRING):
        # The one union Kubernetes allows: exactly this anyOf, and no type.
        kept = {
            k: v
            for k, v in node.items()
            if k in _KEPT_KEYWORDS and k != "type" and not (k == "default" and v is None)
        }
        either = [{"type": "integer"}, {"type": "string"}]
        return _ordered({**kept, "anyOf": either, INT_OR_STRING: True})

    variants = node.get("anyOf") or node.get("oneOf")
    if variants:
        non_null = [v for v in variants if v.get("type") != "null"]
        if len(non_null) != 1:
            raise StructuralSchemaError(f"{path}: a union of several types has no structural form")
        merged = {k: v for k, v in node.items() if k not in ("anyOf", "oneOf")}
        return _convert({**_inline(non_null[0], defs), **merged}, defs, path)

    if "const" in node:
        out["enum"] = [node["const"]]
        out["type"] = _json_type(node["const"])

    for key, value in node.items():
        if key not in _KEPT_KEYWORDS:
            continue
        if key == "properties":
            out["properties"] = {
                name: _convert(child, defs, f"{path}.{name}") for name, child in value.items()
            }
        elif key == "items":
            out["items"] = _convert(value, defs, f"{path}[]")
        elif key == "additionalProperties":
            if isinstance(value, dict) and value:
                out["additionalProperties"] = _convert(value, defs, f"{path}{{}}")
            elif value is True or value == {}:
                out["x-kubernetes-preserve-unknown-fields"] = True
        elif key == "default":
            if value is not None:
                out["default"] = value
        elif key == "exclusiveMinimum" or key == "exclusiveMaximum":
            # JSON Schema 2020-12 gives the bound; OpenAPI v3.0 a flag beside it.
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        else:
            out[key] = value

    if "type" not in out:
        if "properties" in out:
            out["type"] = "object"
        else:
            raise StructuralSchemaError(f"{path}: no type")
    if out["type"] == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "required" in out and not out["required"]:
        del out["required"]
    return _ordered(out)


_LEADING_KEYS = ("type", "format", "description")


def _ordered(node: Schema) -> Schema:
    """type, format and description first, so the YAML reads like hand-written CRDs."""
    first = {k: node[k] for k in _LEADING_KEYS if k in node}
    return {**first, **{k: v for k, v in node.items() if k not in first}}


def _inline(node: Schema, defs: dict[str, Schema]) -> Schema:
    """Replace `$ref` (and a lone `allOf: [$ref]`) by the definition, keeping siblings."""
    ref_holder = node
    if "allOf" in node and len(node["allOf"]) == 1:
        ref_holder = node["allOf"][0]
    ref = ref_holder.get("$ref")
    if ref is None:
        return node
    target = defs[ref.rsplit("/", 1)[-1]]
    siblings = {k: v for k, v in node.items() if k not in ("$ref", "allOf")}
    return _inline({**target, **siblings}, defs)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"


def _default_nested_objects(schema: Schema, model: type[BaseModel]) -> None:
    """Default to `{}` every object field the model builds with a default factory.

    The API server applies defaults only inside objects that exist; defaulting
    such a parent to `{}` lets `kubectl get -o yaml` show the resolved spec.
    Sections whose default is null (`lora`, `lcm`, ...) must stay absent: their
    presence means something to the rules.
    """
    props = schema.get("properties", {})
    for name, field in model.model_fields.items():
        child = props.get(field.alias or name)
        nested = _model_of(field.annotation)
        if child is None or nested is None:
            continue
        if child.get("type") == "object":
            _default_nested_objects(child, nested)
            if field.default_factory is not None and "default" not in child:
                child["default"] = {}
        elif child.get("type") == "array":
            _default_nested_objects(child["items"], nested)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside `Model`, `Model | None` or `list[Model]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()):
        found = _model_of(argument)
        if found is not None:
            return found
    return None


# --- CEL rules ---------------------------------------------------------------

# Rules on `spec` the API server enforces, so that `kubectl apply` refuses a bad
# job at once. `finetune validate` checks the same rules (and more) in Python;
# tests run both against the same cases to keep them in agreement.
SPEC_RULES: list[dict[str, str]] = [
    {
        "rule": "self.method != 'customDiffusion' || "
        "(has(self.customDiffusion) && size(self.customDiffusion.modifierTokens) > 0)",
        "message": "customDiffusion.modifierTokens: at least one token is needed for customDiffusion",
        "fieldPath": ".customDiffusion",
        "reason": "FieldValueRequired",
    },
    {
        "rule": "!(self.method in ['lcm', 'lcmLora']) || (has(self.lcm) && has(self.lcm.teacherModel))",
        "message": "lcm.teacherModel: a teacher model is needed for lcm and lcmLora",
        "fieldPath": ".lcm",
        "reason": "FieldValueRequired",
    },
    {
        "rule": "!(self.method in ['lcm', 'lcmLora']) || has(self.data.dataset)",
        "message": "data.dataset: an image-caption dataset is needed for lcm and lcmLora",
        "fieldPath": ".data",
        "reason": "FieldValueRequired",
    },
    {
        "rule": "self.method in ['lcm', 'lcmLora'] || "
        "(has(self.data.concepts) && size(self.data.concepts) > 0)",
        "message": "data.concepts: at least one concept is needed for dreambooth, lora and customDiffusion",
        "fieldPath": ".data",
        "reason": "FieldValueRequired",
    },
    {
        "rule": "!has(self.training) || !has(self.training.priorPreservation) || "
        "!self.training.priorPreservation || !has(self.data.concepts) || "
        "self.data.concepts.all(c, has(c.classPrompt))",
        "message": "data.concepts[].classPrompt: every concept needs one when training.priorPreservation is on",
        "fieldPath": ".data.concepts",
        "reason": "FieldValueRequired",
    },
    {
        "rule": "!has(self.checkpointing) || !has(self.checkpointing.everyNSteps) || "
        "!has(self.training) || !has(self.training.maxSteps) || "
        "self.checkpointing.everyNSteps <= self.training.maxSteps",
        "message": "checkpointing.everyNSteps: must not be larger than training.maxSteps",
        "fieldPath": ".checkpointing.everyNSteps",
        "reason": "FieldValueInvalid",
    },
]

_SPEC_IMMUTABLE_MESSAGE = (
    "spec is immutable once the job has started (status.startTime is set); "
    f"only spec.runPolicy's {', '.join(MUTABLE_RUN_POLICY)} may change"
)


def _unchanged(path: str) -> str:
    """CEL: the field at `path` (under self/oldSelf) is equal, or absent in both."""
    new, old = f"self.{path}", f"oldSelf.{path}"
    parent, _, name = path.rpartition(".")
    return (
        f"(has(self.{parent}.{name}) == has(oldSelf.{parent}.{name}) && "
        f"(!has(self.{parent}.{name}) || {new} == {old}))"
    )


def immutability_rule(spec: Schema) -> dict[str, str]:
    """A root rule: once started, every spec field but the run policy's knobs stays."""
    clauses = [_unchanged(f"spec.{name}") for name in spec["properties"] if name != "runPolicy"]
    run_policy = spec["properties"]["runPolicy"]["properties"]
    clauses += [
        f"(!has(self.spec.runPolicy) || !has(oldSelf.spec.runPolicy) || "
        f"{_unchanged(f'spec.runPolicy.{name}')})"
        for name in run_policy
        if name not in MUTABLE_RUN_POLICY
    ]
    started = "has(oldSelf.status) && has(oldSelf.status.startTime)"
    return {
        "rule": f"!({started}) || ({' && '.join(clauses)})",
        "message": _SPEC_IMMUTABLE_MESSAGE,
        "reason": "FieldValueForbidden",
    }


NAME_RULE = {
    "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
    "message": f"metadata.name: at most {MAX_NAME_LENGTH} characters, to leave room for child names",
}


def printer_columns() -> list[dict[str, Any]]:
    def col(
        name: str, type_: str, path: str, description: str, priority: int = 0
    ) -> dict[str, Any]:
        column: dict[str, Any] = {
            "name": name,
            "type": type_,
            "jsonPath": path,
            "description": description,
        }
        if priority:
            column["priority"] = priority
        return column

    return [
        col(
            "Phase",
            "string",
            ".status.phase",
            "Pending, Running, Restarting, Suspended, Succeeded or Failed.",
        ),
        col("Method", "string", ".spec.method", "Training method."),
        col("Progress", "integer", ".status.progress.percent", "Steps done, in percent."),
        col("Loss", "number", ".status.progress.loss", "Smoothed training loss."),
        col(
            "Score",
            "string",
            ".status.progress.metrics.summary",
            "The first of validation.metrics at the latest validation.",
        ),
        col("ETA", "string", ".status.progress.eta", "Estimated time to finish."),
        col("Age", "date", ".metadata.creationTimestamp", "Time since the job was created."),
        col("Step", "integer", ".status.progress.step", "Optimizer steps done.", 1),
        col("Img/s", "number", ".status.progress.imagesPerSecond", "Training throughput.", 1),
        col("Nodes", "integer", ".spec.resources.nodes", "Training pods.", 1),
        col("GPUs", "integer", ".spec.resources.gpusPerNode", "GPUs per pod.", 1),
        col("Restarts", "integer", ".status.restarts", "Gang restarts.", 1),
        col("Reason", "string", ".status.failureReason", "Why the job failed.", 1),
        col("Base", "string", ".spec.baseModel.uri", "Base model.", 1),
    ]


def build_crd() -> dict[str, Any]:
    spec = structural_schema(FineTuneJobSpec)
    spec["description"] = "Desired state of a FineTuneJob: the training run and its pods."
    _default_nested_objects(spec, FineTuneJobSpec)
    spec["x-kubernetes-validations"] = SPEC_RULES
    status = structural_schema(FineTuneJobStatus, mode="serialization")
    status["description"] = "Observed state, written by the operator and the trainer."
    # Conditions are keyed by type, like Kubernetes' own conditions.
    status["properties"]["conditions"]["x-kubernetes-list-type"] = "map"
    status["properties"]["conditions"]["x-kubernetes-list-map-keys"] = ["type"]

    root: Schema = {
        "type": "object",
        "description": "A fine-tuning run of a Stable Diffusion model.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [NAME_RULE, immutability_rule(spec)],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "finetune-operator"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": printer_columns(),
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    import yaml

    header = (
        "# Generated by `finetune crd` from the models in trainer_image/src/finetune/api.\n"
        "# Do not edit: change the models and run `make crd`.\n"
    )
    body = yaml.safe_dump(build_crd(), sort_keys=False, width=100, allow_unicode=True)
    return header + body
