"""Issue 14, item 3 end to end: per-job pod settings within what the install allows reach the trainer's Job; beyond
it (a service account not listed, a Secret where the install forbids them) and a mount of no volume are refused with
a condition naming the field, and nothing is created. The real operator, the real API server, the local node agent
(the pod runs the sleeper)."""

from __future__ import annotations

import json

import pytest

from .conftest import SLEEPER, make_stack
from .stack import finetunejob, wait_for

# This install: one service account allowed, no Secrets in env/envFrom/volumes.
OPERATOR_ENV = {"KUBESLOTH_OPERATOR_TRAINER_COMMAND": SLEEPER,
                "KUBESLOTH_OPERATOR_ALLOWED_SERVICE_ACCOUNTS": "trainer-irsa",
                "KUBESLOTH_OPERATOR_ALLOW_SECRETS": "false"}


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory, tiny_model):
    stack = make_stack(cluster, tmp_path_factory, tiny_model, OPERATOR_ENV)
    yield stack
    stack.stop()


def _nothing_created(k8s, name):
    return k8s.get("configmap", f"{name}-config") is None and k8s.get("job", f"{name}-trainer") is None


def _refused(k8s, name, reason):
    cond = wait_for(reason, lambda: (k8s.condition(name, "Running") or {}).get("reason") == reason
                    and k8s.condition(name, "Running"), timeout=30)
    assert cond["status"] == "False" and k8s.phase(name) == "Pending"
    assert _nothing_created(k8s, name)
    assert [e["type"] for e in k8s.events(name) if e["reason"] == reason] == ["Warning"]
    return cond


ALLOWED = {
    "serviceAccountName": "trainer-irsa",
    "env": [{"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"},
            {"name": "TEAM", "valueFrom": {"configMapKeyRef": {"name": "team", "key": "name"}}}],
    "envFrom": [{"prefix": "TEAM_", "configMapRef": {"name": "team"}}],
    "volumes": [{"name": "conf", "configMap": {"name": "team"}}, {"name": "scratch", "emptyDir": {}}],
    "volumeMounts": [{"name": "conf", "mountPath": "/mnt/conf", "readOnly": True},
                     {"name": "scratch", "mountPath": "/mnt/scratch"}],
}


def test_allowed_pod_settings_reach_the_trainer_job(stack, k8s):
    name = "settings"
    k8s.kubectl("create", "serviceaccount", "trainer-irsa", "-n", k8s.namespace)
    k8s.kubectl("create", "configmap", "team", "-n", k8s.namespace, "--from-literal=name=ml")
    k8s.apply(finetunejob(name, training={"maxSteps": 3600}, **ALLOWED))
    wait_for("Running", lambda: k8s.phase(name) == "Running", timeout=60)
    pod = k8s.get("job", f"{name}-trainer")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["serviceAccountName"] == "trainer-irsa" and pod["automountServiceAccountToken"] is False
    for item in ALLOWED["env"]:
        assert item in container["env"]
    assert container["envFrom"] == ALLOWED["envFrom"]
    env = {e["name"]: e.get("value", "") for e in container["env"]}  # the server omits an empty value
    assert env["LD_PRELOAD"] == "" and env["PYTHONNOUSERSITE"] == "1"  # pinned: envFrom's keys are unseen
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["conf"]["configMap"]["name"] == "team" and "emptyDir" in volumes["scratch"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/mnt/conf"] == "conf" and mounts["/mnt/scratch"] == "scratch"
    assert mounts["/etc/kubesloth"] == "config"  # the trainer's own stay
    k8s.kubectl("delete", "ftj", name, "-n", k8s.namespace)


@pytest.mark.parametrize("spec,reason,fields", [
    ({"serviceAccountName": "cluster-admin-ish"}, "ServiceAccountNotAllowed", ["spec.serviceAccountName"]),
    ({"env": [{"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key"}}}],
      "envFrom": [{"secretRef": {"name": "s3-credentials"}}],
      "volumes": [{"name": "creds", "secret": {"secretName": "gcp"}}]},
     "SecretsNotAllowed", ["spec.env[0].valueFrom.secretKeyRef", "spec.envFrom[0].secretRef", "spec.volumes[0].secret"]),
    ({"volumes": [{"name": "a", "emptyDir": {}}], "volumeMounts": [{"name": "b", "mountPath": "/mnt/b"}]},
     "InvalidSpec", ["spec.volumeMounts", "'b' is not in spec.volumes"]),
    ({"training": {"maxSteps": 3600, "reportTo": ["tensorboard", "wandb"]}}, "TrackerNotInImage",
     ["spec.training.reportTo: wandb is not installed in the trainer image"]),
], ids=["service-account", "secrets", "mount-of-no-volume", "tracker-not-in-image"])
def test_beyond_the_install_is_refused_naming_the_field_and_a_fix_proceeds(stack, k8s, spec, reason, fields):
    name = "beyond"
    k8s.apply(finetunejob(name, **{"training": {"maxSteps": 3600}, **spec}))
    cond = _refused(k8s, name, reason)
    for field in fields:
        assert field in cond["message"], cond["message"]
    fixed = finetunejob(name, training={"maxSteps": 3600})
    k8s.kubectl("replace", "-n", k8s.namespace, "-f", "-", input=json.dumps(
        {**fixed, "metadata": {**fixed["metadata"], "namespace": k8s.namespace,
                               "resourceVersion": k8s.get("ftj", name)["metadata"]["resourceVersion"]}}))
    wait_for("Running once fixed", lambda: k8s.phase(name) == "Running", timeout=60)
    k8s.kubectl("delete", "ftj", name, "-n", k8s.namespace)
