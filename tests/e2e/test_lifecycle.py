"""Lifecycle end to end: deadline, suspend/resume, spec lock, TTL, unschedulable, operator restart.

What trains does not matter here, so the operator's trainer command is tests/e2e/sleeper.py (a settings-level
command, KUBESLOTH_OPERATOR_TRAINER_COMMAND): it reads the mounted FineTuneJob, records each start in
<output>/starts.txt, runs spec.training.maxSteps seconds and exits 0, or 6 on SIGTERM. The real operator (kopf
subprocess), the real node agent, the real kube-controller-manager Job controller and garbage collector.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from .conftest import SLEEPER, make_stack
from .stack import finetunejob, wait_for


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory, tiny_model):
    stack = make_stack(cluster, tmp_path_factory, tiny_model, {"KUBESLOTH_OPERATOR_TRAINER_COMMAND": SLEEPER})
    yield stack
    stack.stop()


def starts(stack, name: str) -> list[str]:
    path = stack.volumes / "outputs" / name / "starts.txt"
    return path.read_text().splitlines() if path.exists() else []


def test_deadline_exceeded(stack, k8s):
    name = "deadline"
    k8s.apply(finetunejob(name, training={"maxSteps": 3600}, activeDeadlineSeconds=4))
    wait_for("the trainer started", lambda: starts(stack, name), timeout=30)
    wait_for("Failed", lambda: k8s.phase(name) == "Failed", timeout=60)
    failed = k8s.condition(name, "Failed")
    assert failed["reason"] == "DeadlineExceeded" and "activeDeadlineSeconds (4s)" in failed["message"]
    # The Job controller deleted the running pod; the node agent stopped the process and removed the pod.
    wait_for("the pod gone", lambda: not k8s.pods(name), timeout=60)
    assert len(starts(stack, name)) == 1


def test_suspend_stops_the_pod_and_resume_runs_again_spec_changes_are_refused(stack, k8s):
    name = "suspend"
    k8s.apply(finetunejob(name, training={"maxSteps": 3600}))
    wait_for("Running", lambda: k8s.phase(name) == "Running", timeout=30)
    first_pod = k8s.status(name)["podName"]

    k8s.patch_spec(name, {"suspend": True})
    wait_for("Suspended with the pod gone", lambda: k8s.phase(name) == "Suspended" and not k8s.pods(name)
             and not k8s.get("job", f"{name}-trainer"), timeout=60)
    suspended = k8s.condition(name, "Suspended")
    assert suspended["status"] == "True" and suspended["reason"] == "Suspended"
    assert k8s.condition(name, "Running")["status"] == "False"
    assert k8s.get("configmap", f"{name}-config")  # kept: the resumed run uses the spec it started with

    # A locked field changed while suspended: refused, reported, not applied.
    k8s.patch_spec(name, {"training": {"learningRate": 0.5}})
    locked = wait_for("SpecLocked", lambda: k8s.condition(name, "SpecLocked"), timeout=30)
    assert locked["status"] == "True" and locked["reason"] == "SpecChangeRefused"
    assert "spec.training.learningRate" in locked["message"]
    assert any(e["reason"] == "SpecChangeRefused" and e["type"] == "Warning" for e in k8s.events(name))

    k8s.patch_spec(name, {"suspend": False})
    wait_for("Running again", lambda: k8s.phase(name) == "Running", timeout=60)
    assert k8s.status(name)["podName"] != first_pod
    wait_for("a second start", lambda: len(starts(stack, name)) == 2, timeout=30)
    job = k8s.get("job", f"{name}-trainer")
    configmap = k8s.get("configmap", f"{name}-config")
    assert "learningRate: 0.003" in configmap["data"]["finetunejob.yaml"]  # the started spec, not 0.5
    assert job["metadata"]["ownerReferences"][0]["name"] == name
    reasons = [e["reason"] for e in k8s.events(name)]
    assert reasons.count("Suspended") == 1 and reasons.count("Running") == 2, reasons


def test_ttl_deletes_the_finished_job_once_and_nothing_is_recreated(stack, k8s):
    name = "ttl"
    k8s.apply(finetunejob(name, training={"maxSteps": 1}, ttlSecondsAfterFinished=2))
    wait_for("Succeeded", lambda: k8s.phase(name) == "Succeeded", timeout=60)
    wait_for("the FineTuneJob deleted", lambda: k8s.get("ftj", name) is None, timeout=30)
    wait_for("its Job and ConfigMap collected", lambda: not k8s.get("job", f"{name}-trainer")
             and not k8s.get("configmap", f"{name}-config"), timeout=60)
    time.sleep(5)  # more than two resync rounds of the operator
    assert k8s.get("ftj", name) is None and k8s.get("job", f"{name}-trainer") is None
    assert not k8s.pods(name)
    assert len(starts(stack, name)) == 1


def test_a_pod_that_fits_no_node_is_unschedulable(stack, k8s):
    name = "nofit"
    k8s.apply(finetunejob(name, resources={"gpuProduct": "NVIDIA-H100-80GB-HBM3"}))
    wait_for("Unschedulable", lambda: (k8s.condition(name, "Running") or {}).get("reason") == "Unschedulable",
             timeout=30)
    assert k8s.phase(name) == "Pending"
    # kube-scheduler's own words (v1.20 reports a nodeSelector miss as node affinity)
    assert "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity" in k8s.condition(name, "Running")[
        "message"]
    warnings = wait_for("a Warning event", lambda: [e for e in k8s.events(name) if e["reason"] == "Unschedulable"])
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning"
    k8s.kubectl("delete", "ftj", name, "-n", k8s.namespace)


def test_token_secret_reaches_only_the_pod_env(stack, k8s):
    """A missing token Secret holds the pod (CreateContainerConfigError, in status); once it exists the run
    starts, and the token appears nowhere the operator writes: ConfigMap, status, events, operator log."""
    name = "gated"
    token = "hf_e2e_secret_value_123"
    k8s.apply(finetunejob(name, model={"tokenSecretRef": {"name": "hf-token", "key": "token"}},
                          training={"maxSteps": 3600}))
    waiting = wait_for("the missing Secret reported", lambda: (k8s.condition(name, "Running") or {}).get("reason")
                       == "CreateContainerConfigError" and k8s.condition(name, "Running"), timeout=30)
    assert 'secret "hf-token" not found' in waiting["message"] and k8s.phase(name) == "Pending"
    k8s.kubectl("create", "secret", "generic", "hf-token", "-n", k8s.namespace, f"--from-literal=token={token}")
    wait_for("Running once the Secret exists", lambda: k8s.phase(name) == "Running", timeout=30)
    written = [k8s.get("configmap", f"{name}-config"), k8s.get("ftj", name), k8s.events(name),
               k8s.get("job", f"{name}-trainer")]
    assert token not in json.dumps(written)
    assert token not in stack.operator.log_path.read_text(errors="replace")
    assert wait_for("the trainer started", lambda: starts(stack, name), timeout=30)[0].endswith("token:set")
    k8s.kubectl("delete", "ftj", name, "-n", k8s.namespace)


def test_a_child_name_taken_by_a_foreign_object_is_reported_then_resolved(stack, k8s):
    name = "conflict"
    k8s.kubectl("create", "configmap", f"{name}-config", "-n", k8s.namespace, "--from-literal=mine=yes")
    k8s.apply(finetunejob(name, training={"maxSteps": 3600}))
    blocked = wait_for("NameConflict", lambda: (k8s.condition(name, "Running") or {}).get("reason")
                       == "NameConflict" and k8s.condition(name, "Running"), timeout=30)
    assert f"ConfigMap {name}-config already exists" in blocked["message"] and k8s.phase(name) == "Pending"
    assert k8s.get("job", f"{name}-trainer") is None
    assert k8s.get("configmap", f"{name}-config")["data"] == {"mine": "yes"}  # untouched
    assert [e["type"] for e in k8s.events(name) if e["reason"] == "NameConflict"] == ["Warning"]
    k8s.kubectl("delete", "configmap", f"{name}-config", "-n", k8s.namespace)
    wait_for("Running once the name is free", lambda: k8s.phase(name) == "Running", timeout=30)
    k8s.kubectl("delete", "ftj", name, "-n", k8s.namespace)


def test_operator_killed_mid_run_and_restarted_makes_no_second_job(stack, k8s):
    name = "restart"
    k8s.apply(finetunejob(name, training={"maxSteps": 10}))
    wait_for("Running", lambda: k8s.phase(name) == "Running", timeout=30)
    job_uid = k8s.get("job", f"{name}-trainer")["metadata"]["uid"]

    stack.operator.stop(signal.SIGKILL)
    # While the operator is down the trainer finishes; nobody updates the status.
    wait_for("the Job complete", lambda: any(c["type"] == "Complete" and c["status"] == "True" for c in
             (k8s.get("job", f"{name}-trainer")["status"].get("conditions") or [])), timeout=60)
    assert k8s.phase(name) == "Running"

    stack.start_operator()
    wait_for("Succeeded after the restart", lambda: k8s.phase(name) == "Succeeded", timeout=60)
    jobs = k8s.list("jobs", f"kubesloth.io/finetunejob={name}")
    assert [j["metadata"]["uid"] for j in jobs] == [job_uid]
    assert len(starts(stack, name)) == 1
    reasons = [e["reason"] for e in k8s.events(name)]
    assert reasons.count("Running") == 1 and reasons.count("Succeeded") == 1, reasons
