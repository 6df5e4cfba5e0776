"""The executor of the plan against the real v1.20 kube-apiserver and controller-manager (no operator process, no
node agent: pods stay Pending): the activeDeadlineSeconds budget survives a suspend/resume (delete and recreate),
and the Job patch of servers with Job.spec.suspend reaches the API server (v1.20 drops spec.suspend, keeps the
rest)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest
from kubernetes import config as kube_config

from kubesloth.operator import plan as plan_mod
from kubesloth.operator.builders import configmap_name, job_name
from kubesloth.operator.kube import KubeApi
from kubesloth.operator.reconcile import Reconciler
from kubesloth.operator.settings import OperatorSettings, ServerFeatures

pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")


def ftj(name: str, **spec) -> dict:
    return {"apiVersion": "kubesloth.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
            "spec": {"model": {"source": "pvc://models/tiny-llama"},
                     "dataset": {"source": "pvc://data/alpaca-tiny.jsonl"},
                     "training": {"maxSteps": 1}, "output": {"destination": f"pvc://outputs/{name}"}, **spec}}


def get(kubectl, namespace, kind, name):
    done = kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(done.stdout) if done.returncode == 0 else None


def wait_for(what, check, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_deadline_budget_survives_suspend_and_resume_on_v1_20(cluster, kubectl, namespace):
    api = KubeApi(kube_config.new_client_from_config(config_file=str(cluster.kubeconfig)))
    assert not api.server_features().job_suspend  # the local control plane is v1.20
    later = [datetime.now(timezone.utc)]
    reconciler = Reconciler(api, OperatorSettings(), clock=lambda: later[0])
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(ftj("dl", activeDeadlineSeconds=7200)))
    assert reconciler.reconcile(namespace, "dl").actions == ["created ConfigMap", "created Job"]
    first = wait_for("the Job's startTime", lambda: (get(kubectl, namespace, "job", job_name("dl")) or {})
                     .get("status", {}).get("startTime") and get(kubectl, namespace, "job", job_name("dl")))
    assert first["spec"]["activeDeadlineSeconds"] == 7200
    started = datetime.fromisoformat(first["status"]["startTime"].replace("Z", "+00:00"))

    # Suspended 1000 s (by the reconciler's clock) after the Job started.
    later[0] = started + timedelta(seconds=1000)
    kubectl("patch", "ftj", "dl", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    assert reconciler.reconcile(namespace, "dl").actions == ["recorded active seconds", "deleted Job (suspend)"]
    configmap = get(kubectl, namespace, "configmap", configmap_name("dl"))
    assert configmap["metadata"]["annotations"][plan_mod.ANNOTATION_ACTIVE_SECONDS] == "1000"
    wait_for("the Job to go", lambda: get(kubectl, namespace, "job", job_name("dl")) is None)

    kubectl("patch", "ftj", "dl", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    later[0] = started + timedelta(seconds=5000)  # suspended time is not counted
    # No pod ran here (no node agent): the run never started, so its ConfigMap is rewritten for the live spec;
    # the count stays on it.
    assert reconciler.reconcile(namespace, "dl").actions == ["replaced ConfigMap", "created Job"]
    configmap = get(kubectl, namespace, "configmap", configmap_name("dl"))
    assert configmap["metadata"]["annotations"][plan_mod.ANNOTATION_ACTIVE_SECONDS] == "1000"
    second = get(kubectl, namespace, "job", job_name("dl"))
    assert second["spec"]["activeDeadlineSeconds"] == 6200
    assert second["metadata"]["annotations"][plan_mod.ANNOTATION_ACTIVE_SECONDS] == "1000"


def test_the_suspend_patch_reaches_the_api_server(cluster, kubectl, namespace):
    """Planned for a 1.29 server, executed against v1.20: the patch call, its uid precondition and annotations
    work (v1.20 drops spec.suspend itself: this is not a test of suspending, which v1.20 cannot do)."""
    api = KubeApi(kube_config.new_client_from_config(config_file=str(cluster.kubeconfig)))
    api._features = ServerFeatures(1, 29)
    reconciler = Reconciler(api, OperatorSettings())
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(ftj("sp", activeDeadlineSeconds=7200)))
    reconciler.reconcile(namespace, "sp")
    wait_for("the Job's startTime", lambda: (get(kubectl, namespace, "job", job_name("sp")) or {})
             .get("status", {}).get("startTime"))
    kubectl("patch", "ftj", "sp", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    assert reconciler.reconcile(namespace, "sp").actions == ["suspended Job"]
    job = get(kubectl, namespace, "job", job_name("sp"))
    generation = get(kubectl, namespace, "ftj", "sp")["metadata"]["generation"]
    assert job["metadata"]["annotations"][plan_mod.ANNOTATION_SUSPENDED_GENERATION] == str(generation)
    assert int(job["metadata"]["annotations"][plan_mod.ANNOTATION_ACTIVE_SECONDS]) >= 0
    assert "suspend" not in job["spec"]  # v1.20 has no such field
