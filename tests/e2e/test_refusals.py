"""Issue 12 end to end: what only the operator can refuse gets a condition naming the field and nothing is
created; what the API server refuses for a child (checked with dryRun first) likewise, with the server's message;
a corrected spec proceeds; fields the server dropped are reported. The real operator, the real API server."""

from __future__ import annotations

import json

import pytest

from .conftest import SLEEPER, make_stack
from .stack import finetunejob, wait_for


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory, tiny_model):
    stack = make_stack(cluster, tmp_path_factory, tiny_model, {"KUBESLOTH_OPERATOR_TRAINER_COMMAND": SLEEPER})
    yield stack
    stack.stop()


def _running_reason(k8s, name):
    return (k8s.condition(name, "Running") or {}).get("reason")


def _nothing_created(k8s, name):
    return k8s.get("configmap", f"{name}-config") is None and k8s.get("job", f"{name}-trainer") is None


@pytest.mark.parametrize("spec,field", [
    ({"nodeSelector": {"bad key": "gpu"}}, "spec.nodeSelector"),
    ({"output": {"destination": "file:///tmp/model-out"}}, "spec.output.destination"),
], ids=["nodeSelector-key", "file-destination"])
def test_what_only_the_operator_refuses_creates_nothing_and_a_fix_proceeds(stack, k8s, spec, field):
    name = "refused"
    k8s.apply(finetunejob(name, training={"maxSteps": 3600}, **spec))
    cond = wait_for("InvalidSpec", lambda: _running_reason(k8s, name) == "InvalidSpec"
                    and k8s.condition(name, "Running"), timeout=30)
    assert field in cond["message"] and k8s.phase(name) == "Pending"
    assert _nothing_created(k8s, name)
    assert [e["type"] for e in k8s.events(name) if e["reason"] == "InvalidSpec"] == ["Warning"]
    fixed = finetunejob(name, training={"maxSteps": 3600})
    k8s.kubectl("replace", "-n", k8s.namespace, "-f", "-", input=json.dumps(
        {**fixed, "metadata": {**fixed["metadata"], "namespace": k8s.namespace,
                               "resourceVersion": k8s.get("ftj", name)["metadata"]["resourceVersion"]}}))
    wait_for("Running once fixed", lambda: k8s.phase(name) == "Running", timeout=60)
    assert "bad key" not in k8s.get("configmap", f"{name}-config")["data"]["finetunejob.yaml"]
    k8s.kubectl("delete", "ftj", name, "-n", k8s.namespace)


def test_a_child_the_api_server_refuses_is_reported_nothing_created_then_created(stack, k8s):
    name = "quota"
    k8s.kubectl("create", "quota", "no-jobs", "-n", k8s.namespace, "--hard=count/jobs.batch=0")
    wait_for("the quota counted", lambda: (k8s.get("resourcequota", "no-jobs").get("status") or {}).get("used"))
    k8s.apply(finetunejob(name, training={"maxSteps": 3600}))
    cond = wait_for("JobRefused", lambda: _running_reason(k8s, name) == "JobRefused"
                    and k8s.condition(name, "Running"), timeout=30)
    assert "exceeded quota" in cond["message"] and "nothing was created" in cond["message"]
    assert _nothing_created(k8s, name)
    assert [e["type"] for e in k8s.events(name) if e["reason"] == "JobRefused"] == ["Warning"]
    k8s.kubectl("delete", "quota", "no-jobs", "-n", k8s.namespace)
    k8s.patch_spec(name, {"training": {"maxSteps": 3000}})  # a change retries at once (no backoff wait)
    wait_for("Running once allowed", lambda: k8s.phase(name) == "Running", timeout=60)
    assert "maxSteps: 3000" in k8s.get("configmap", f"{name}-config")["data"]["finetunejob.yaml"]
    k8s.kubectl("delete", "ftj", name, "-n", k8s.namespace)


def test_fields_the_server_dropped_are_reported(stack, k8s):
    name = "typos"
    body = finetunejob(name, training={"maxSteps": 1, "learning_rate": 0.1}, suspended=True)
    # kubectl's client-side check would name them; with --validate=false (or any other client) only the server
    # sees the object, and v1.20 drops them silently.
    k8s.kubectl("apply", "--validate=false", "-n", k8s.namespace, "-f", "-", input=json.dumps(body))
    cond = wait_for("UnknownFields", lambda: k8s.condition(name, "UnknownFields"), timeout=30)
    assert cond["status"] == "True"
    assert "spec.training.learning_rate" in cond["message"] and "spec.suspended" in cond["message"]
    wait_for("one Warning event", lambda: [e for e in k8s.events(name) if e["reason"] == "UnknownFields"])
    wait_for("Succeeded", lambda: k8s.phase(name) == "Succeeded", timeout=60)
    assert k8s.condition(name, "UnknownFields")["status"] == "True"  # kept by the status derivation
    assert len([e for e in k8s.events(name) if e["reason"] == "UnknownFields"]) == 1
