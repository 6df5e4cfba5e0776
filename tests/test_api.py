"""The FineTuneJob types without a cluster: defaults, wire names, and validation messages that name the field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kubesloth.api import FineTuneJob, FineTuneJobSpec

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MINIMAL = {
    "model": {"source": "hf://meta-llama/Llama-3.1-8B"},
    "dataset": {"source": "file:///data/train.jsonl"},
    "output": {"destination": "pvc://outputs/run1"},
}


def test_minimal_spec_gets_the_contract_defaults():
    spec = FineTuneJobSpec.model_validate(MINIMAL)
    assert spec.model.max_seq_length == 2048
    assert spec.training.profile == "auto"
    # Left to the planner (auto/lean/fast) or the custom defaults: unset, so a set value is always the user's.
    assert spec.training.optimizer is None and spec.training.gradient_checkpointing is None
    assert spec.training.per_device_batch_size is None and spec.training.gradient_accumulation_steps is None
    assert spec.training.learning_rate == 2.0e-5
    assert spec.training.seed == 3407
    assert spec.output.checkpoint_every_steps == 200
    assert spec.backoff_limit == 2
    assert spec.suspend is False
    assert spec.dataset.format == "alpaca"


def test_wire_form_uses_contract_names():
    wire = FineTuneJobSpec.model_validate(MINIMAL).to_wire()
    assert wire["model"]["maxSeqLength"] == 2048
    assert "perDeviceBatchSize" not in wire["training"] and "gradientCheckpointing" not in wire["training"]
    assert wire["training"]["learningRate"] == 2.0e-5
    assert "tokenSecretRef" not in wire["model"]  # unset optionals stay out
    assert FineTuneJobSpec.model_validate(wire) == FineTuneJobSpec.model_validate(MINIMAL)


def test_gpu_memory_gib_alias():
    spec = FineTuneJobSpec.model_validate({**MINIMAL, "resources": {"gpuMemoryGiB": 48}})
    assert spec.resources.gpu_memory_gi_b == 48
    assert spec.to_wire()["resources"]["gpuMemoryGiB"] == 48


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("finetunejob-*.yaml")), ids=lambda p: p.name)
def test_examples_validate(path):
    FineTuneJob.model_validate(yaml.safe_load(path.read_text()))


def _with(path: str, value):
    spec = copy.deepcopy(MINIMAL)
    *parents, leaf = path.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {})
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return spec


_DELETE = object()

INVALID = [
    ("model", _DELETE, "model"),
    ("model.source", "gs://bucket/model", "model.source"),
    ("training.learningRate", 0, "training.learningRate"),
    ("training.learningRate", -1e-5, "training.learningRate"),
    ("training.optimizer", "adam_magic", "training.optimizer"),
    ("training.epochs", 0, "training.epochs"),
    ("training.perDeviceBatchSize", "eight", "training.perDeviceBatchSize"),
    ("training.gradientCheckpointing", "sometimes", "training.gradientCheckpointing"),
    ("training.warmupRatio", 1.5, "training.warmupRatio"),
    ("dataset.format", "csv", "dataset.format"),
    ("output.destination", "hf://org/model", "output.destination"),
    ("output.checkpointEverySteps", 0, "output.checkpointEverySteps"),
    ("resources.memory", "lots", "resources.memory"),
    ("backoffLimit", -1, "backoffLimit"),
    ("training.unknownKnob", 1, "training.unknownKnob"),
    # per-job pod settings: the trainer and the operator refuse what the CRD refuses, naming the field
    ("env", [{"name": "KUBESLOTH_ENGINE", "value": "cpu"}], "env.0.name"),
    ("env", [{"name": "LD_PRELOAD", "value": "/mnt/x.so"}], "env.0.name"),
    ("env", [{"name": "MY-VAR", "value": "x"}], "env.0.name"),
    ("env", [{"name": "URL", "value": "http://me.example/?t=$(HF_TOKEN)"}], "env.0.value"),
    ("env", [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}], "env"),
    ("env", [{"name": "A", "value": "x", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}], "env.0"),
    ("env", [{"name": "A", "valueFrom": {}}], "env.0.valueFrom"),
    ("env", [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}], "env.0.valueFrom"),
    ("envFrom", [{"secretRef": {"name": "s"}, "configMapRef": {"name": "c"}}], "envFrom.0"),
    ("serviceAccountName", "Bad_SA", "serviceAccountName"),
    ("volumes", [{"name": "root", "hostPath": {"path": "/"}}], "volumes.0"),
    ("volumes", [{"name": "tmp", "emptyDir": {}}], "volumes.0.name"),
    ("volumes", [{"name": "e", "emptyDir": {}}, {"name": "e", "emptyDir": {}}], "volumes"),
    ("volumeMounts", [{"name": "e", "mountPath": "/mnt/pvc/models"}], "volumeMounts.0.mountPath"),
    ("volumeMounts", [{"name": "e", "mountPath": "/usr/lib/python3"}], "volumeMounts.0.mountPath"),
    ("volumeMounts", [{"name": "e", "mountPath": "/mnt/a"}], "volumeMounts"),  # names no volume
]


@pytest.mark.parametrize("path,value,field", INVALID, ids=[f"{p}={v!r}" for p, v, _ in INVALID])
def test_invalid_spec_names_the_field(path, value, field):
    with pytest.raises(ValidationError) as err:
        FineTuneJobSpec.model_validate(_with(path, value))
    locations = [".".join(str(part) for part in e["loc"]) for e in err.value.errors()]
    assert any(loc == field or loc.startswith(field + ".") for loc in locations), locations
