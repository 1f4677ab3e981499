"""Write the spec reference (every field, its default, its meaning) into the README.

The tables come from the same structural schema as the CRD, so the README can
never document a field the API does not have. `make crd` refreshes both; a
test fails when either is stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .crd import INT_OR_STRING, build_crd

BEGIN = "<!-- BEGIN GENERATED SPEC REFERENCE (make crd) -->"
END = "<!-- END GENERATED SPEC REFERENCE -->"


def _type_of(node: dict[str, Any]) -> str:
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    if node.get(INT_OR_STRING):
        return "quantity (integer or string)"
    kind = node.get("type", "object")
    if kind == "array":
        return f"list of {_type_of(node.get('items', {}))}"
    if kind == "object" and "additionalProperties" in node:
        return f"map of {_type_of(node['additionalProperties'])}"
    if node.get("format") == "date-time":
        return "timestamp"
    return str(kind)


def _default_of(node: dict[str, Any], required: bool) -> str:
    if required:
        return "required"
    if "default" not in node or node["default"] == {}:
        return ""
    return f"`{json.dumps(node['default'])}`"


def _rows(node: dict[str, Any], prefix: str) -> list[str]:
    rows: list[str] = []
    required = set(node.get("required", []))
    for name, child in node.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        item = child.get("items", {}) if child.get("type") == "array" else None
        shown = f"`{path}`"
        description = " ".join(child.get("description", "").split()).replace("|", "\\|")
        rows.append(
            f"| {shown} | {_type_of(child)} | {_default_of(child, name in required)} | {description} |"
        )
        if "properties" in child:
            rows += _rows(child, path)
        elif item and "properties" in item:
            rows += _rows(item, f"{path}[]")
    return rows


def render_reference() -> str:
    version = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    header = "| Field | Type | Default | Meaning |\n|---|---|---|---|"
    spec = "\n".join(_rows(version["properties"]["spec"], "spec"))
    status = "\n".join(_rows(version["properties"]["status"], "status"))
    return (
        f"{BEGIN}\n\n#### spec\n\n{header}\n{spec}\n\n"
        f"#### status (written by the operator and the trainer)\n\n{header}\n{status}\n\n{END}"
    )


def update_readme(path: Path) -> bool:
    """Rewrite the generated section of `path`; True when it changed."""
    text = path.read_text(encoding="utf-8")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    updated = text[:start] + render_reference() + text[end:]
    if updated != text:
        path.write_text(updated, encoding="utf-8")
    return updated != text


if __name__ == "__main__":
    update_readme(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
