"""The dataset/tracking/results fields of issue 14 checked at the door: by the CRD schema (jsonschema and the real
kube-apiserver, which names the field) and by the pydantic types the trainer loads."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from kubesloth.api import crd
from kubesloth.api.v1alpha1 import FineTuneJob

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetunejob-tiny.yaml"
PUSH = {"repository": "acme/tuned", "tokenSecretRef": {"name": "hub-write"}}

REJECTS = [
    ("dataset.config", "bad config!", "spec.dataset.config"),
    ("dataset.config", "c" * 129, "spec.dataset.config"),
    ("dataset.dataDir", "../up", "spec.dataset.dataDir"),
    ("dataset.dataDir", "a/../../b", "spec.dataset.dataDir"),
    ("dataset.dataDir", "/abs/path", "spec.dataset.dataDir"),
    ("training.reportTo", ["neptune"], "spec.training.reportTo"),
    ("training.reportTo", ["tensorboard", "wandb", "mlflow", "tensorboard"], "spec.training.reportTo"),
    ("training.reportTo", "tensorboard", "spec.training.reportTo"),
    ("output.pushToHub", {"repository": "no-org", "tokenSecretRef": {"name": "t"}}, "spec.output.pushToHub.repository"),
    ("output.pushToHub", {"repository": "acme/" + "n" * 92, "tokenSecretRef": {"name": "t"}},
     "spec.output.pushToHub.repository"),
    ("output.pushToHub", {"repository": "acme/../x", "tokenSecretRef": {"name": "t"}},
     "spec.output.pushToHub.repository"),
    ("output.pushToHub", {"repository": "acme/tuned"}, "spec.output.pushToHub.tokenSecretRef"),
    ("output.pushToHub", {**PUSH, "private": "maybe"}, "spec.output.pushToHub.private"),
]
ACCEPTS = [
    ("dataset.config", "20231101.en"),
    ("dataset.dataDir", "data/en/"),
    ("training.reportTo", ["tensorboard", "wandb", "mlflow"]),
    ("output.pushToHub", {**PUSH, "private": False}),
    ("dataset.source", "s3://my-bucket/alpaca/train.jsonl.gz"),
]


def _doc(path: str, value) -> dict:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"] = {"name": "fields"}
    node = doc["spec"]
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = copy.deepcopy(value)
    return doc


def _ids(rows):
    return [f"{r[0]}={str(r[1])[:30]!r}" for r in rows]


@pytest.mark.parametrize("path,value,field", REJECTS, ids=_ids(REJECTS))
def test_schema_and_types_reject(path, value, field):
    doc = _doc(path, value)
    errors = list(jsonschema.Draft4Validator(crd.openapi_schema()).iter_errors(doc))
    assert errors, f"schema accepted {path}={value!r}"
    with pytest.raises(ValidationError):
        FineTuneJob.model_validate(doc)


@pytest.mark.parametrize("path,value", ACCEPTS, ids=_ids(ACCEPTS))
def test_schema_and_types_accept(path, value):
    doc = _doc(path, value)
    assert not list(jsonschema.Draft4Validator(crd.openapi_schema()).iter_errors(doc))
    FineTuneJob.model_validate(doc)


def test_duplicate_trackers_are_refused_by_the_types():
    """A v1.20 structural schema cannot say uniqueItems: the trainer and the operator's pydantic check does."""
    with pytest.raises(ValidationError, match="each tracker at most once"):
        FineTuneJob.model_validate(_doc("training.reportTo", ["wandb", "wandb"]))


SERVER_REJECTS = [r for r in REJECTS if r[1] != ["tensorboard", "wandb", "mlflow", "tensorboard"]] + [
    ("training.reportTo", ["tensorboard"] * 4, "spec.training.reportTo")]


@pytest.mark.parametrize("path,value,field", SERVER_REJECTS, ids=_ids(SERVER_REJECTS))
def test_server_rejects(kubectl, namespace, path, value, field):
    proc = kubectl("apply", "--validate=false", "-n", namespace, "-f", "-", input=json.dumps(_doc(path, value)),
                   check=False)
    assert proc.returncode != 0, f"server accepted {path}={value!r}"
    assert "is invalid" in proc.stderr and field in proc.stderr, proc.stderr
    assert kubectl("get", "ftj", "-n", namespace, "-o", "name").stdout.strip() == ""


def test_server_accepts(kubectl, namespace):
    for index, (path, value) in enumerate(ACCEPTS):
        doc = _doc(path, value)
        doc["metadata"]["name"] = f"fields-{index}"
        kubectl("apply", "--validate=false", "-n", namespace, "-f", "-", input=json.dumps(doc))
    stored = json.loads(kubectl("get", "ftj", "fields-3", "-n", namespace, "-o", "json").stdout)
    assert stored["spec"]["output"]["pushToHub"]["private"] is False


def test_the_push_token_reaches_the_pod_from_its_secret_only():
    from kubesloth.api.v1alpha1 import HUB_PUSH_TOKEN_ENV
    from kubesloth.operator.builders import build_configmap, build_job
    from kubesloth.operator.settings import OperatorSettings

    def make_ftj(**spec):  # tests/ is not a package: the FineTuneJob as the API server would hand it over
        return {"apiVersion": "kubesloth.io/v1alpha1", "kind": "FineTuneJob",
                "metadata": {"name": "push", "namespace": "ml", "uid": "0000-uid-9", "generation": 1},
                "spec": {"model": {"source": "pvc://models/base"}, "dataset": {"source": "pvc://data/d.jsonl"},
                         "output": {"destination": "pvc://outputs/x"}, **spec}}

    settings = OperatorSettings(trainer_image="t:1", trainer_command=("python", "-m", "kubesloth.trainer"))
    ftj = make_ftj(output={"destination": "pvc://outputs/x", "pushToHub": {
        "repository": "acme/tuned", "tokenSecretRef": {"name": "hub-write", "key": "write"}}})
    env = {e["name"]: e for e in build_job(ftj, settings)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[HUB_PUSH_TOKEN_ENV] == {"name": HUB_PUSH_TOKEN_ENV, "valueFrom": {"secretKeyRef": {
        "name": "hub-write", "key": "write"}}}
    assert HUB_PUSH_TOKEN_ENV not in json.dumps(build_configmap(ftj, settings))
    assert HUB_PUSH_TOKEN_ENV not in {e["name"] for e in build_job(make_ftj(), settings)["spec"]["template"][
        "spec"]["containers"][0]["env"]}
