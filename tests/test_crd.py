"""The generated CRD: no drift from the types, accepted by the real kube-apiserver, and bad FineTuneJobs rejected
by the server with a message that names the field (and nothing created)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
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
        assert not {"anyOf", "oneOf", "$ref"} & node.keys(), f"{where} is not structural"
        for junctor in node.get("allOf", []):  # value validations only, on fields the node declares
            text = json.dumps(junctor)
            assert not {'"type"', '"description"', '"default"', '"nullable"'} & {w for w in
                    ('"type"', '"description"', '"default"', '"nullable"') if w in text}, f"{where}: {junctor}"
            for name in re.findall(r'"required": \[([^\]]*)\]', text) + re.findall(r'"(\w+)": \{"(?:min|max|enum)', text):
                for field in re.findall(r'"?(\w+)"?', name):
                    assert field in node.get("properties", {}) or node.get("type") == "string", (where, field)
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
] + [
    # issue 12: specs the Job API rejected after the ConfigMap was made, the trainer refused, or that overflowed
    ("tolerations", [{"key": "bad key!", "operator": "Exists"}], "spec.tolerations.key"),
    ("tolerations", [{"key": "a" * 254 + "/name", "operator": "Exists"}], "spec.tolerations.key"),
    ("tolerations", [{"key": "example.com/" + "n" * 64, "operator": "Exists"}], "spec.tolerations.key"),
    ("tolerations", [{"key": "dedicated", "value": "bad value"}], "spec.tolerations.value"),
    ("tolerations", [{"key": "dedicated", "value": "v" * 64}], "spec.tolerations.value"),
    ("tolerations", [{"key": "dedicated", "operator": "Exists", "value": "gpu"}], "spec.tolerations"),
    ("tolerations", [{"operator": "Equal", "value": "gpu"}], "spec.tolerations"),
    ("tolerations", [{"key": "k", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 30}],
     "spec.tolerations"),
    ("tolerations", [{"key": "k", "operator": "Exists", "tolerationSeconds": 30}], "spec.tolerations"),
    ("tolerations", [{"key": "k", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 2**63 - 1}],
     "spec.tolerations.tolerationSeconds"),
    ("tolerations", [{"key": f"k{i}", "operator": "Exists"} for i in range(65)], "spec.tolerations"),
    ("nodeSelector", {"pool": "bad value"}, "spec.nodeSelector"),
    ("nodeSelector", {"pool": "v" * 64}, "spec.nodeSelector"),
    ("nodeSelector", {f"k{i}": "v" for i in range(65)}, "spec.nodeSelector"),
    ("model.tokenSecretRef", {"name": "hf-token", "key": "my token"}, "spec.model.tokenSecretRef.key"),
    ("model.tokenSecretRef", {"name": "hf-token", "key": "..token"}, "spec.model.tokenSecretRef.key"),
    ("model.tokenSecretRef", {"name": "hf-token", "key": "k" * 254}, "spec.model.tokenSecretRef.key"),
    ("priorityClassName", "p" * 10000, "spec.priorityClassName"),
    ("queueName", "q" * 10000, "spec.queueName"),
    ("queueName", "q" * 64, "spec.queueName"),
    ("output.destination", "s3://bucket/model-out", "spec.output.destination"),
    ("output.destination", "pvc://outputs/../../escape-out", "spec.output.destination"),
    ("output.destination", "pvc://outputs/..", "spec.output.destination"),
    ("model.source", "pvc://models/../other/model", "spec.model.source"),
    ("dataset.source", "file:///data/../etc/passwd", "spec.dataset.source"),
    ("model.source", "hf://org/..", "spec.model.source"),
    ("training.seed", 2**63 - 1, "spec.training.seed"),
    ("training.seed", 2**32, "spec.training.seed"),
    ("training.maxSteps", 2**63 - 1, "spec.training.maxSteps"),
    ("training.loggingSteps", 2**31, "spec.training.loggingSteps"),
    ("output.checkpointEverySteps", 2**31, "spec.output.checkpointEverySteps"),
    ("dataset.maxSamples", 2**31, "spec.dataset.maxSamples"),
    ("ttlSecondsAfterFinished", 2**63 - 1, "spec.ttlSecondsAfterFinished"),
    ("activeDeadlineSeconds", 2**63 - 1, "spec.activeDeadlineSeconds"),
] + [
    # issue 14, item 3: per-job pod settings (env, envFrom, serviceAccountName, volumes, volumeMounts)
    ("env", [{"name": "1ST", "value": "x"}], "spec.env.name"),
    ("env", [{"name": "MY-VAR", "value": "x"}], "spec.env.name"),
    ("env", [{"name": "my.var", "value": "x"}], "spec.env.name"),
    ("env", [{"name": "", "value": "x"}], "spec.env.name"),
    ("env", [{"name": "A" * 129, "value": "x"}], "spec.env.name"),
    ("env", [{"value": "x"}], "spec.env.name"),
    ("env", [{"name": "KUBESLOTH_ENGINE", "value": "cpu"}], "spec.env.name"),
    ("env", [{"name": "KUBESLOTH_ANYTHING", "value": "x"}], "spec.env.name"),
    ("env", [{"name": "HF_TOKEN", "value": "hf_x"}], "spec.env.name"),
    ("env", [{"name": "HF_HOME", "value": "/mnt/hf"}], "spec.env.name"),
    ("env", [{"name": "HF_ENDPOINT", "value": "https://evil.example"}], "spec.env.name"),
    ("env", [{"name": "LD_PRELOAD", "value": "/mnt/x/evil.so"}], "spec.env.name"),
    ("env", [{"name": "PYTHONPATH", "value": "/mnt/x"}], "spec.env.name"),
    ("env", [{"name": "PATH", "value": "/mnt/x:/usr/bin"}], "spec.env.name"),
    ("env", [{"name": "HOME", "value": "/mnt/x"}], "spec.env.name"),
    ("env", [{"name": "TRITON_CACHE_DIR", "value": "/mnt/x"}], "spec.env.name"),
    ("env", [{"name": "A", "value": "v" * 32769}], "spec.env.value"),
    ("env", [{"name": "A", "value": "$(HF_TOKEN)"}], "spec.env.value"),
    ("env", [{"name": "MLFLOW_TRACKING_URI", "value": "http://me.example/$(KUBESLOTH_HUB_PUSH_TOKEN)"}],
     "spec.env.value"),
    ("env", [{"name": "A", "value": "x", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}}], "spec.env"),
    ("env", [{"name": "A", "valueFrom": {}}], "spec.env.valueFrom"),
    ("env", [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"},
                                         "configMapKeyRef": {"name": "cm", "key": "k"}}}], "spec.env.valueFrom"),
    ("env", [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "Bad_Name", "key": "k"}}}],
     "spec.env.valueFrom.secretKeyRef.name"),
    ("env", [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s" * 254, "key": "k"}}}],
     "spec.env.valueFrom.secretKeyRef.name"),
    ("env", [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "my key"}}}],
     "spec.env.valueFrom.secretKeyRef.key"),
    ("env", [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s"}}}], "spec.env.valueFrom.secretKeyRef.key"),
    ("env", [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "..k"}}}],
     "spec.env.valueFrom.configMapKeyRef.key"),
    ("env", [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}], "spec.env.valueFrom"),
    ("env", [{"name": f"V{i}", "value": "x"} for i in range(65)], "spec.env"),
    ("envFrom", [{}], "spec.envFrom"),
    ("envFrom", [{"secretRef": {"name": "s"}, "configMapRef": {"name": "cm"}}], "spec.envFrom"),
    ("envFrom", [{"secretRef": {"name": "Bad_Name"}}], "spec.envFrom.secretRef.name"),
    ("envFrom", [{"configMapRef": {}}], "spec.envFrom.configMapRef.name"),
    ("envFrom", [{"prefix": "1X_", "configMapRef": {"name": "cm"}}], "spec.envFrom.prefix"),
    ("envFrom", [{"prefix": "P" * 65, "configMapRef": {"name": "cm"}}], "spec.envFrom.prefix"),
    ("envFrom", [{"configMapRef": {"name": f"cm{i}"}} for i in range(17)], "spec.envFrom"),
    ("cache", {"volumeClaimName": "Bad_Claim"}, "spec.cache.volumeClaimName"),
    ("cache", {"volumeClaimName": "c" * 254}, "spec.cache.volumeClaimName"),
    ("serviceAccountName", "Bad_SA", "spec.serviceAccountName"),
    ("serviceAccountName", "s" * 254, "spec.serviceAccountName"),
    ("serviceAccountName", "", "spec.serviceAccountName"),
    ("volumes", [{"name": "Bad_Name", "emptyDir": {}}], "spec.volumes.name"),
    ("volumes", [{"name": "v" * 64, "emptyDir": {}}], "spec.volumes.name"),
    ("volumes", [{"name": "a.b", "emptyDir": {}}], "spec.volumes.name"),
    ("volumes", [{"name": "config", "emptyDir": {}}], "spec.volumes.name"),
    ("volumes", [{"name": "cache", "emptyDir": {}}], "spec.volumes.name"),
    ("volumes", [{"name": "pvc-models", "persistentVolumeClaim": {"claimName": "models"}}], "spec.volumes.name"),
    ("volumes", [{"name": "nothing"}], "spec.volumes"),
    ("volumes", [{"name": "root", "hostPath": {"path": "/"}}], "spec.volumes"),  # not in the subset: no source
    ("volumes", [{"name": "two", "emptyDir": {}, "configMap": {"name": "cm"}}], "spec.volumes"),
    ("volumes", [{"name": "c", "persistentVolumeClaim": {"claimName": "Bad_Claim"}}],
     "spec.volumes.persistentVolumeClaim.claimName"),
    ("volumes", [{"name": "c", "persistentVolumeClaim": {}}], "spec.volumes.persistentVolumeClaim.claimName"),
    ("volumes", [{"name": "c", "configMap": {"name": "c" * 254}}], "spec.volumes.configMap.name"),
    ("volumes", [{"name": "s", "secret": {"secretName": "Bad"}}], "spec.volumes.secret.secretName"),
    ("volumes", [{"name": "e", "emptyDir": {"medium": "HugePages"}}], "spec.volumes.emptyDir.medium"),
    ("volumes", [{"name": "e", "emptyDir": {"sizeLimit": "lots"}}], "spec.volumes.emptyDir.sizeLimit"),
    ("volumes", [{"name": f"e{i}", "emptyDir": {}} for i in range(17)], "spec.volumes"),
    ("volumeMounts", [{"name": "e", "mountPath": "/etc/kubesloth"}], "spec.volumeMounts.mountPath"),
    ("volumeMounts", [{"name": "e", "mountPath": "/var/cache/kubesloth"}], "spec.volumeMounts.mountPath"),
    ("volumeMounts", [{"name": "e", "mountPath": "/tmp"}], "spec.volumeMounts.mountPath"),
    ("volumeMounts", [{"name": "e", "mountPath": "/dev/shm"}], "spec.volumeMounts.mountPath"),
    ("volumeMounts", [{"name": "e", "mountPath": "/opt/kubesloth/lib"}], "spec.volumeMounts.mountPath"),
    ("volumeMounts", [{"name": "e", "mountPath": "/mnt/pvc"}], "spec.volumeMounts.mountPath"),
    ("volumeMounts", [{"name": "e", "mountPath": "/mnt/pvc/models"}], "spec.volumeMounts.mountPath"),
    ("volumeMounts", [{"name": "e", "mountPath": "/mnt"}], "spec.volumeMounts.mountPath"),
    ("volumeMounts", [{"name": "e", "mountPath": "/mnt/../etc"}], "spec.volumeMounts.mountPath"),
    ("volumeMounts", [{"name": "e", "mountPath": "/mnt/./pvc"}], "spec.volumeMounts.mountPath"),
    ("volumeMounts", [{"name": "e", "mountPath": "/mnt//pvc"}], "spec.volumeMounts.mountPath"),
    ("volumeMounts", [{"name": "e", "mountPath": "/mnt/data/"}], "spec.volumeMounts.mountPath"),
    ("volumeMounts", [{"name": "e", "mountPath": "mnt/data"}], "spec.volumeMounts.mountPath"),
    ("volumeMounts", [{"name": "e", "mountPath": "/mnt/" + "d" * 512}], "spec.volumeMounts.mountPath"),
    ("volumeMounts", [{"name": "Bad_Name", "mountPath": "/mnt/data"}], "spec.volumeMounts.name"),
    ("volumeMounts", [{"name": "e"}], "spec.volumeMounts.mountPath"),
]

# Duplicates in a list-map (x-kubernetes-list-type: map, as a Pod's env, volumes and volumeMounts): the API server
# refuses them ("Duplicate value"); JSON Schema has no such keyword, so only the server test runs these.
SERVER_ONLY_REJECTS = [
    ("env", [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}], "spec.env"),
    ("volumes", [{"name": "e", "emptyDir": {}}, {"name": "e", "emptyDir": {}}], "spec.volumes"),
    ("volumeMounts", [{"name": "e", "mountPath": "/mnt/a"}, {"name": "f", "mountPath": "/mnt/a"}],
     "spec.volumeMounts"),
]

# The same rows fixed: accepted (and what only the operator can refuse is accepted at the door).
SCHEMA_ACCEPTS = [
    ("tolerations", [{"key": "example.com/" + "n" * 63, "operator": "Exists", "effect": "NoExecute",
                      "tolerationSeconds": 2**31 - 1}]),
    ("tolerations", [{"operator": "Exists"}]),  # every taint
    ("tolerations", [{"key": "dedicated", "operator": "Exists", "value": ""}]),
    ("tolerations", [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]),
    ("nodeSelector", {"pool": "gpu-a", "example.com/tier": "t1"}),
    ("nodeSelector", {"bad key": "v"}),  # keys: the operator's check (no propertyNames in a v1.20 schema)
    ("model.tokenSecretRef", {"name": "hf-token", "key": ".hf_token-1"}),
    ("priorityClassName", "p" * 253),
    ("queueName", "q" * 63),
    ("output.destination", "pvc://outputs/a/.../b/.hidden"),
    ("output.destination", "file:///tmp/model-out"),  # the operator's check (the trainer may run outside a pod)
    ("training.seed", 2**32 - 1),
    ("ttlSecondsAfterFinished", 2**31 - 1),
    ("activeDeadlineSeconds", 2**31 - 1),
    ("env", [{"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}}},
             {"name": "_x1", "value": ""}, {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"},
             {"name": "AWS_REGION", "valueFrom": {"configMapKeyRef": {"name": "aws", "key": "region",
                                                                      "optional": True}}},
             {"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "PYTHONUNBUFFERED", "value": "1"},
             {"name": "RUN", "value": "$(KUBESLOTH_FINETUNEJOB) $(HF_TOKEN_X) $HF_TOKEN"},
             {"name": "A" * 128}]),
    ("envFrom", [{"secretRef": {"name": "s3-credentials"}}, {"prefix": "MY_", "configMapRef": {"name": "cm",
                                                                                             "optional": True}}]),
    ("serviceAccountName", "trainer-irsa"),
    ("cache", {"volumeClaimName": "trainer-cache.team-a"}),
    ("cache", {}),
    ("volumes", [{"name": "data", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}},
                 {"name": "conf", "configMap": {"name": "cm"}}, {"name": "creds", "secret": {"secretName": "gcp"}},
                 {"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
                 {"name": "e", "emptyDir": {}}, {"name": "pvc", "emptyDir": {}}]),
    ("volumeMounts", [{"name": "e", "mountPath": "/mnt/data"}, {"name": "e", "mountPath": "/mnt/pvcs/a.b_c-d",
                                                                 "readOnly": True}, {"name": "e", "mountPath": "/mnt/pvcx"}]),
]


def _schema_validator():
    return jsonschema.Draft4Validator(crd.openapi_schema())


@pytest.mark.parametrize("path,value,field", SERVER_REJECTS, ids=[f"{p}={str(v)[:40]!r}" for p, v, _ in SERVER_REJECTS])
def test_schema_rejects_invalid_finetunejob(path, value, field):
    doc = _tiny("bad")
    _set(doc, path, value)
    errors = list(_schema_validator().iter_errors(doc))
    assert errors, f"schema accepted {path}={str(value)[:80]!r}"
    where = {"spec." + ".".join(str(p) for p in e.absolute_path if not isinstance(p, int))[len("spec."):]
             for e in errors}
    assert any(w.startswith(field) or field.startswith(w) for w in where), where


@pytest.mark.parametrize("path,value", SCHEMA_ACCEPTS, ids=[f"{p}={str(v)[:40]!r}" for p, v in SCHEMA_ACCEPTS])
def test_schema_accepts_the_corrected_finetunejob(path, value):
    doc = _tiny("good")
    _set(doc, path, value)
    assert not list(_schema_validator().iter_errors(doc))


# The first rows, and the per-job pod settings (the last five: every kind of env source, volume and mount).
SERVER_ACCEPTS = SCHEMA_ACCEPTS[:5] + SCHEMA_ACCEPTS[-5:]


@pytest.mark.parametrize("path,value", SERVER_ACCEPTS, ids=[f"{p}={str(v)[:40]!r}" for p, v in SERVER_ACCEPTS])
def test_server_accepts_the_corrected_finetunejob(kubectl, namespace, path, value):
    doc = _tiny("good")
    _set(doc, path, value)
    kubectl("apply", "--validate=false", "-n", namespace, "-f", "-", input=json.dumps(doc))


@pytest.mark.parametrize("path,value,field", SERVER_REJECTS + SERVER_ONLY_REJECTS,
                         ids=[f"{p}={str(v)[:40]!r}" for p, v, _ in SERVER_REJECTS + SERVER_ONLY_REJECTS])
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
