"""The generated CRD: no drift from the types, accepted by the real kube-apiserver, and bad FineTuneJobs rejected
by the server with a message that names the field (and nothing created)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from kubesloth.api import crd

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("path", crd.CRD_PATHS, ids=lambda p: str(p.relative_to(crd.REPO_ROOT)))
def test_committed_crd_matches_the_types(path):
    assert path.read_text() == crd.render(), f"{path} drifted: run `kubesloth crd --write`"


def test_schema_is_structural_and_documented():
    schema = crd.openapi_schema()

    def walk(node, where):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{where} has no type"
        assert not {"anyOf", "oneOf", "allOf", "$ref"} & node.keys(), f"{where} is not structural"
        for name, sub in node.get("properties", {}).items():
            if where.startswith(".spec"):
                assert sub.get("description"), f"{where}.{name} has no description"
            walk(sub, f"{where}.{name}")
        if "items" in node:
            walk(node["items"], f"{where}[]")

    walk(schema["properties"]["spec"], ".spec")
    walk(schema["properties"]["status"], ".status")
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["model", "dataset", "output"]
    lr = spec["properties"]["training"]["properties"]["learningRate"]
    assert lr["minimum"] == 0 and lr["exclusiveMinimum"] is True
    assert "paged_adamw_8bit" in spec["properties"]["training"]["properties"]["optimizer"]["enum"]


def _tiny(name: str) -> dict:
    doc = yaml.safe_load((EXAMPLES / "finetunejob-tiny.yaml").read_text())
    doc["metadata"] = {"name": name}
    return doc


def test_examples_are_accepted_and_defaults_applied(kubectl, namespace):
    for example in sorted(EXAMPLES.glob("finetunejob-*.yaml")):
        doc = yaml.safe_load(example.read_text())
        doc["metadata"]["namespace"] = namespace
        kubectl("apply", "-f", "-", input=json.dumps(doc))
    stored = json.loads(kubectl("get", "ftj", "tiny-alpaca", "-n", namespace, "-o", "json").stdout)
    # Server-side defaults from the schema: fields the example leaves out.
    assert stored["spec"]["training"]["weightDecay"] == 0
    assert stored["spec"]["model"].get("maxSeqLength") == 128
    assert stored["spec"]["dataset"]["split"] == "train"
    assert stored["spec"]["suspend"] is False


def test_get_ftj_prints_the_printer_columns(kubectl, namespace):
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_tiny("columns")))
    status = {"phase": "Running", "progress": {"display": "12/30", "tokensPerSecond": 1234.5,
                                                "peakGpuMemory": "33.4Gi", "loss": 1.25}}
    kubectl("patch", "ftj", "columns", "-n", namespace, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": status}))
    out = kubectl("get", "ftj", "-n", namespace).stdout
    header = out.splitlines()[0].split()
    for column in ("NAME", "PHASE", "PROGRESS", "TOKENS/S", "PEAK", "AGE"):
        assert column in header, out
    row = out.splitlines()[1]
    assert "Running" in row and "12/30" in row and "1234.5" in row and "33.4Gi" in row
    # kubectl's resource short name and category work.
    assert "columns" in kubectl("get", "kubesloth", "-n", namespace).stdout


def _set(doc: dict, path: str, value):
    node = doc["spec"]
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value


DELETE = object()

# (spec path, bad value, what the server's message must name)
SERVER_REJECTS = [
    ("model", DELETE, "spec.model"),
    ("model.source", DELETE, "spec.model.source"),
    ("model.source", "gs://bucket/model", "spec.model.source"),
    ("dataset.source", "ftp://host/data.jsonl", "spec.dataset.source"),
    ("training.learningRate", 0, "spec.training.learningRate"),
    ("training.learningRate", -0.001, "spec.training.learningRate"),
    ("training.optimizer", "adam_magic", "spec.training.optimizer"),
    ("training.epochs", 0, "spec.training.epochs"),
    ("training.perDeviceBatchSize", "eight", "spec.training.perDeviceBatchSize"),
    ("training.gradientCheckpointing", True, "spec.training.gradientCheckpointing"),
    ("training.warmupRatio", 2, "spec.training.warmupRatio"),
    ("dataset.format", "csv", "spec.dataset.format"),
    ("output.destination", "hf://org/model", "spec.output.destination"),
    ("output.checkpointEverySteps", 0, "spec.output.checkpointEverySteps"),
    ("resources.memory", "lots", "spec.resources.memory"),
    ("backoffLimit", -1, "spec.backoffLimit"),
    ("model.maxSeqLength", 4, "spec.model.maxSeqLength"),
    ("tolerations", [{"operator": "Sometimes"}], "spec.tolerations.operator"),  # v1.20 drops the index
]


@pytest.mark.parametrize("path,value,field", SERVER_REJECTS, ids=[f"{p}={v!r}" for p, v, _ in SERVER_REJECTS])
def test_server_rejects_invalid_finetunejob(kubectl, namespace, path, value, field):
    doc = _tiny("bad")
    _set(doc, path, value)
    # --validate=false: kubectl's own client-side check would otherwise answer first; this proves the server.
    proc = kubectl("apply", "--validate=false", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False)
    assert proc.returncode != 0, f"server accepted {path}={value!r}"
    assert "FineTuneJob" in proc.stderr and "is invalid" in proc.stderr, proc.stderr
    assert field in proc.stderr, proc.stderr
    # Nothing half-created.
    assert kubectl("get", "ftj", "-n", namespace, "-o", "name").stdout.strip() == ""


def test_api_reference_matches_the_types():
    assert crd.DOCS_PATH.read_text() == crd.render_docs(), "docs/api.md drifted: run `kubesloth crd --write`"
    assert "`spec.training.learningRate` | number | `2e-05` | > 0; < 1" in crd.render_docs()
