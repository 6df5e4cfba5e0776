"""Generate the FineTuneJob CustomResourceDefinition from the pydantic types.

`python -m kubesloth.api.crd --write` rewrites crds/ (and the chart's copy); tests/test_crd.py fails when the
committed files drift from what the types generate.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from . import v1alpha1 as api

# JSON-Schema keywords a Kubernetes structural schema understands, with the same meaning.
_KEPT = {
    "type", "description", "enum", "minimum", "maximum", "pattern", "minLength", "maxLength",
    "minItems", "maxItems", "default", "format", "required", "properties", "items", "additionalProperties",
    "minProperties", "maxProperties",
}
# Value validations across fields or a second pattern: an `allOf` of junctors (anyOf/not/required/properties with
# value checks only), which structural schemas allow (no CEL on v1.20). The types put them in json_schema_extra.
_JUNCTOR_KEYS = {"allOf", "anyOf", "oneOf", "not", "required", "properties", "enum", "minLength", "maxLength", "pattern",
                 "minimum", "maximum"}


def _check_junctor(node: Any) -> Any:
    """A junctor may hold value validations only (no type, description, default: the structural rules)."""
    if isinstance(node, list):
        return [_check_junctor(item) for item in node]
    if isinstance(node, dict):
        bad = set(node) - _JUNCTOR_KEYS
        if bad:
            raise ValueError(f"a junctor may hold only value validations, not {sorted(bad)}: {node}")
        return {key: (_check_junctor(value) if key in ("allOf", "anyOf", "oneOf", "not") else
                      {name: _check_junctor(sub) for name, sub in value.items()} if key == "properties" else value)
                for key, value in node.items()}
    raise ValueError(f"not a schema: {node!r}")


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        target = copy.deepcopy(defs[schema["$ref"].split("/")[-1]])
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return _resolve(merged, defs)
    return schema


def to_structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Turn one pydantic JSON-Schema node into an OpenAPI v3 structural node (refs inlined, null as nullable)."""
    schema = _resolve(schema, defs)
    out: dict[str, Any] = {}
    any_of = schema.get("anyOf")
    if any_of:
        non_null = [s for s in any_of if s.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"cannot express a union of {len(non_null)} types structurally: {schema}")
        inner = to_structural(non_null[0], defs)
        out.update(inner)
        if len(non_null) != len(any_of):
            out["nullable"] = True
        for key in ("description", "default"):
            if key in schema:
                out[key] = schema[key]
        if "allOf" in schema:
            out["allOf"] = _check_junctor(schema["allOf"])
        if out.get("default", 0) is None:
            del out["default"]
        return out

    if "const" in schema:
        out["enum"] = [schema["const"]]
    for key, value in schema.items():
        if key in _KEPT and key not in ("properties", "items", "additionalProperties", "required"):
            out[key] = value
    # JSON Schema 2020 writes exclusive bounds as numbers; OpenAPI v3 (Kubernetes) as booleans.
    if "exclusiveMinimum" in schema:
        out["minimum"], out["exclusiveMinimum"] = schema["exclusiveMinimum"], True
    if "exclusiveMaximum" in schema:
        out["maximum"], out["exclusiveMaximum"] = schema["exclusiveMaximum"], True
    if out.get("type") == "object" or "properties" in schema:
        out["type"] = "object"
        props = schema.get("properties")
        if props:
            out["properties"] = {name: to_structural(sub, defs) for name, sub in props.items()}
            if schema.get("required"):
                out["required"] = list(schema["required"])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = to_structural(extra, defs)
    if "allOf" in schema:
        out["allOf"] = _check_junctor(schema["allOf"])
    if out.get("type") == "array" and "items" in schema:
        out["items"] = to_structural(schema["items"], defs)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def _schema_of(model: type) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return to_structural(raw, defs)


def openapi_schema() -> dict[str, Any]:
    spec = _schema_of(api.FineTuneJobSpec)
    status = _schema_of(api.FineTuneJobStatus)
    # Objects whose children have defaults need a default themselves, else the server never descends into them.
    for name in ("training", "resources"):
        spec["properties"][name]["default"] = {}
    status["x-kubernetes-preserve-unknown-fields"] = True
    for name, prop in status["properties"].items():
        if prop.get("type") == "object":
            prop["x-kubernetes-preserve-unknown-fields"] = True
    # Conditions are a map keyed by type (metav1.Condition's convention: one condition per type; server-side
    # apply merges them by type). v1.20 accepts list-type map (apiextensions v1, since 1.16).
    status["properties"]["conditions"].update({"x-kubernetes-list-type": "map",
                                               "x-kubernetes-list-map-keys": ["type"]})
    # Per-job pod settings: one entry per env name, volume name and mount path, as in a Pod (the server refuses a
    # duplicate naming the field: "Duplicate value").
    for name, key in (("env", "name"), ("volumes", "name"), ("volumeMounts", "mountPath")):
        spec["properties"][name].update({"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [key]})
    spec.setdefault("description", "What to fine-tune, on what data, where the result goes and what the pod "
                                   "asks for.")
    status.setdefault("description", "What the operator observed: phase, conditions, progress, estimate, "
                                     "checkpoint and output (written by the operator only).")
    return {
        "type": "object",
        "description": api.FineTuneJob.__doc__,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": (
                "APIVersion defines the versioned schema of this representation of an object: "
                f"{api.API_VERSION}.")},
            "kind": {"type": "string", "description": f"Kind is the REST resource this object represents: "
                                                      f"{api.KIND}."},
            # Nothing but the type: the API server refuses anything else on metadata (it documents ObjectMeta).
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "kubesloth", "app.kubernetes.io/part-of": "kubesloth"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": api.CATEGORIES,
            },
            "versions": [{
                "name": api.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": api.PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": openapi_schema()},
            }],
        },
    }


HEADER = "# Generated by `python -m kubesloth.api.crd --write` from api/v1alpha1.py. Do not edit.\n"
REPO_ROOT = Path(__file__).resolve().parent.parent
CRD_PATHS = (
    REPO_ROOT / "crds" / f"{api.GROUP}_{api.PLURAL}.yaml",
    REPO_ROOT / "charts" / "kubesloth" / "crds" / f"{api.GROUP}_{api.PLURAL}.yaml",
)


def render() -> str:
    import yaml  # only the generator needs it; the types stay stdlib + pydantic

    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=120)


DOCS_PATH = REPO_ROOT / "docs" / "api.md"


def render_docs() -> str:
    """docs/api.md: every spec field with its type, default, limits and description, from the same schema."""
    lines = [
        "# FineTuneJob API reference (kubesloth.io/v1alpha1)",
        "",
        "Generated by `kubesloth crd --write` from `api/v1alpha1.py`, like the CRD itself; do not edit.",
        "`kubectl explain ftj.spec --recursive` shows the same descriptions from a live cluster.",
        "",
        "What the API server checks (Kubernetes v1.20+): types, enums, minimums/maximums, patterns, required "
        "fields, cross-field toleration rules (allOf/anyOf junctors); unknown fields are dropped by the server "
        "(v1.20 has no strict field validation: the operator reports them, condition UnknownFields). What no v1.20 "
        "schema can check (nodeSelector keys, file:// destinations in a pod, what the API server would refuse in "
        "the Job) the operator refuses before creating anything (docs/operator.md, Refusals). The trainer "
        "validates the same types again at start-up and exits with code 2 naming the field.",
        "",
        "Per-job pod settings (`spec.env`, `envFrom`, `serviceAccountName`, `volumes`, `volumeMounts`): the schema "
        "refuses reserved env names (the trainer contract's, the operator's own, code-loading ones), volume types "
        "outside persistentVolumeClaim/configMap/secret/emptyDir and mount paths outside /mnt or under /mnt/pvc; "
        "a service account only where the install lists it and Secrets only where it allows them (the chart's "
        "`trainer.jobPodSettings`, conditions ServiceAccountNotAllowed / SecretsNotAllowed): docs/install.md, "
        "Per-job pod settings.",
        "",
        "| field | type | default | allowed | description |",
        "|---|---|---|---|---|",
    ]

    def limits(node: dict[str, Any]) -> str:
        parts = []
        if "enum" in node:
            parts.append(" \\| ".join(str(v) for v in node["enum"]))
        if "minimum" in node:
            parts.append(("> " if node.get("exclusiveMinimum") else ">= ") + str(node["minimum"]))
        if "maximum" in node:
            parts.append(("< " if node.get("exclusiveMaximum") else "<= ") + str(node["maximum"]))
        if "pattern" in node:
            schemes = [s for s in ("hf://", "pvc://", "s3://", "file://") if s in node["pattern"]]
            parts.append(" ".join(schemes) if schemes else f"`{node['pattern']}`")
        return "; ".join(parts)

    def walk(node: dict[str, Any], path: str, required: set[str]) -> None:
        for name, sub in node.get("properties", {}).items():
            here = f"{path}.{name}"
            typ = sub.get("type", "object")
            if typ == "array":
                typ = f"[]{sub.get('items', {}).get('type', 'object')}"
            default = "required" if name in required else (
                "" if "default" not in sub else f"`{json.dumps(sub['default'])}`")
            desc = sub.get("description", "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{here}` | {typ} | {default} | {limits(sub)} | {desc} |")
            if sub.get("type") == "object":
                walk(sub, here, set(sub.get("required", [])))
            if sub.get("type") == "array" and sub.get("items", {}).get("type") == "object":
                walk(sub["items"], here + "[]", set(sub["items"].get("required", [])))

    spec = openapi_schema()["properties"]["spec"]
    walk(spec, "spec", set(spec.get("required", [])))
    lines += ["", "## status", "", "| field | type | description |", "|---|---|---|"]
    status = openapi_schema()["properties"]["status"]

    def walk_status(node: dict[str, Any], path: str) -> None:
        for name, sub in node.get("properties", {}).items():
            here = f"{path}.{name}"
            typ = sub.get("type", "object")
            if typ == "array":
                typ = f"[]{sub.get('items', {}).get('type', 'object')}"
            lines.append(f"| `{here}` | {typ} | {sub.get('description', '')} |")
            if sub.get("type") == "object":
                walk_status(sub, here)
            if sub.get("type") == "array" and sub.get("items", {}).get("type") == "object":
                walk_status(sub["items"], here + "[]")

    walk_status(status, "status")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the CRD files instead of printing")
    args = parser.parse_args(argv)
    text = render()
    if not args.write:
        sys.stdout.write(text)
        return 0
    for path, content in [*((p, text) for p in CRD_PATHS), (DOCS_PATH, render_docs())]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
