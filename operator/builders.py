"""Pure builders: FineTuneJob (wire dict) + OperatorSettings -> the Job and ConfigMap dicts the operator creates.

No API calls, no globals, no environment: everything the objects depend on is in the arguments, so the unit tests
check every field without a cluster (tests/operator/test_builders.py).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import yaml

from kubesloth.api import contract
from kubesloth.api.contract import Env
from kubesloth.api.v1alpha1 import API_VERSION, KIND, FineTuneJob

from .settings import OperatorSettings

# Labels and annotations this operator sets.
LABEL_FTJ = "kubesloth.io/finetunejob"
ANNOTATION_FTJ = "kubesloth.io/finetunejob"  # the full name (a label value is capped at 63 characters)
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
LABEL_GPU_PRODUCT = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"
CONTAINER_NAME = "trainer"
MANAGED_BY = "kubesloth-operator"
MAX_NAME = 63

CONFIG_VOLUME = "config"
TMP_VOLUME = "tmp"
SHM_VOLUME = "dshm"


def _hash(text: str, length: int = 7) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def bounded_name(base: str, suffix: str, limit: int = MAX_NAME) -> str:
    """`<base>-<suffix>` when it fits in `limit` characters, else `<base cut>-<hash of base>-<suffix>`.

    Deterministic, so a restarted operator finds the objects it created instead of making second ones.
    """
    name = f"{base}-{suffix}" if suffix else base
    if len(name) <= limit:
        return name
    keep = limit - len(suffix) - 9 if suffix else limit - 8
    cut = re.sub(r"[-.]+$", "", base[:keep])
    return f"{cut}-{_hash(base)}-{suffix}" if suffix else f"{cut}-{_hash(base)}"


def job_name(ftj_name: str) -> str:
    return bounded_name(ftj_name, "trainer")


def configmap_name(ftj_name: str) -> str:
    return bounded_name(ftj_name, "config")


def label_value(ftj_name: str) -> str:
    """The FineTuneJob's name as a label value (<= 63 characters; the annotation keeps the full name)."""
    return bounded_name(ftj_name, "")


def labels_for(ftj_name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubesloth-trainer",
        "app.kubernetes.io/instance": label_value(ftj_name),
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/part-of": "kubesloth",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_FTJ: label_value(ftj_name),
    }


def owner_reference(ftj: dict[str, Any]) -> dict[str, Any]:
    meta = ftj["metadata"]
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def parse_pvc(source: str) -> tuple[str, str] | None:
    """pvc://CLAIM/path -> (CLAIM, path); None for other schemes."""
    if not source.startswith("pvc://"):
        return None
    claim, _, path = source[len("pvc://"):].partition("/")
    return claim, path


def pvc_claims(spec: dict[str, Any]) -> dict[str, bool]:
    """Claims the pod mounts -> read-only? (only the output claim is written; a claim used twice is mounted once)."""
    claims: dict[str, bool] = {}
    for source in (spec["model"]["source"], spec["dataset"]["source"]):
        parsed = parse_pvc(source)
        if parsed:
            claims.setdefault(parsed[0], True)
    parsed = parse_pvc(spec["output"]["destination"])
    if parsed:
        claims[parsed[0]] = False
    return claims


def pvc_volume_name(claim: str) -> str:
    name = f"pvc-{claim}"
    return name if len(name) <= MAX_NAME else f"pvc-{claim[:48].rstrip('-')}-{_hash(claim)}"


def normalized(ftj: dict[str, Any]) -> dict[str, Any]:
    """The FineTuneJob validated by the API types, with defaults filled in (wire form, camelCase)."""
    body = {key: ftj[key] for key in ("apiVersion", "kind", "metadata", "spec") if key in ftj}
    return FineTuneJob.model_validate(body).to_wire()


def trainer_config(ftj: dict[str, Any]) -> dict[str, Any]:
    """What the trainer reads from the ConfigMap: apiVersion/kind/metadata{name,namespace,uid,generation}/spec.

    The spec holds at most the Secret's name and key (tokenSecretRef), never the token: that reaches the pod
    only as an env var from the Secret.
    """
    wire = normalized(ftj)
    meta = ftj["metadata"]
    keep = {key: meta[key] for key in ("name", "namespace", "uid", "generation") if key in meta}
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": keep, "spec": wire["spec"]}


def build_configmap(ftj: dict[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    meta = ftj["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": labels_for(meta["name"]),
            "annotations": {ANNOTATION_FTJ: meta["name"]},
            "ownerReferences": [owner_reference(ftj)],
        },
        "data": {contract.CONFIG_FILE_NAME: yaml.safe_dump(trainer_config(ftj), sort_keys=False)},
    }


def _env(ftj: dict[str, Any], spec: dict[str, Any], settings: OperatorSettings) -> list[dict[str, Any]]:
    meta = ftj["metadata"]
    env: list[dict[str, Any]] = [
        {"name": Env.CONFIG.value, "value": contract.CONFIG_PATH},
        {"name": Env.PVC_ROOT.value, "value": contract.PVC_ROOT},
        {"name": Env.METRICS_PORT.value, "value": str(settings.metrics_port)},
        # Bind the metrics server to the pod IP (the downward API), not 0.0.0.0.
        {"name": Env.METRICS_ADDR.value, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": Env.TERMINATION_LOG.value, "value": contract.TERMINATION_LOG},
        {"name": Env.ENGINE.value, "value": settings.engine},
        {"name": Env.JOB_NAME.value, "value": meta["name"]},
        {"name": Env.NAMESPACE.value, "value": meta["namespace"]},
    ]
    token = spec["model"].get("tokenSecretRef")
    if token:
        env.append({"name": Env.HF_TOKEN.value,
                    "valueFrom": {"secretKeyRef": {"name": token["name"], "key": token.get("key", "token")}}})
    taken = {item["name"] for item in env}
    env.extend({"name": key, "value": value} for key, value in sorted(settings.extra_env.items())
               if key not in taken)
    return env


def _resources(spec: dict[str, Any]) -> dict[str, Any]:
    wanted = spec.get("resources") or {}
    requests: dict[str, str] = {GPU_RESOURCE: "1"}
    limits: dict[str, str] = {GPU_RESOURCE: "1"}
    if wanted.get("memory"):
        # Memory request = limit: a training run's peak is its steady state, and overcommit only means OOM later.
        requests["memory"] = limits["memory"] = wanted["memory"]
    if wanted.get("cpu"):
        # CPU is a request only: a CPU limit throttles the data loader and buys nothing on a dedicated GPU node.
        requests["cpu"] = wanted["cpu"]
    return {"requests": requests, "limits": limits}


def build_job(ftj: dict[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    """The batch/v1 Job: one pod, one GPU, the FineTuneJob mounted from its ConfigMap."""
    meta = ftj["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    spec = normalized(ftj)["spec"]
    labels = labels_for(name)
    annotations = {ANNOTATION_FTJ: name}

    volumes: list[dict[str, Any]] = [
        {"name": CONFIG_VOLUME, "configMap": {"name": configmap_name(name)}},
        {"name": TMP_VOLUME, "emptyDir": {}},
        # Data-loader workers share tensors through /dev/shm; a container's default is 64 MiB.
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": CONFIG_VOLUME, "mountPath": contract.CONFIG_DIR, "readOnly": True},
        {"name": TMP_VOLUME, "mountPath": "/tmp"},
        {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
    ]
    for claim, read_only in pvc_claims(spec).items():
        volume = pvc_volume_name(claim)
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}})
        mounts.append({"name": volume, "mountPath": f"{contract.PVC_ROOT}/{claim}", "readOnly": read_only})

    node_selector = {**settings.default_node_selector, **spec.get("nodeSelector", {})}
    gpu_product = (spec.get("resources") or {}).get("gpuProduct")
    if gpu_product:
        node_selector[LABEL_GPU_PRODUCT] = gpu_product
    tolerations = [dict(t) for t in settings.default_tolerations]
    tolerations += [t for t in spec.get("tolerations", []) if t not in tolerations]

    container = {
        "name": CONTAINER_NAME,
        "image": spec.get("image") or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(settings.trainer_command),
        "env": _env(ftj, spec, settings),
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "terminationMessagePath": contract.TERMINATION_LOG,
        # The trainer writes its last words to the termination log; if it died before it could, the log tail.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
        },
    }
    if settings.metrics_port:
        container["ports"] = [{"name": "metrics", "containerPort": settings.metrics_port, "protocol": "TCP"}]

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "fsGroup": settings.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if spec.get("priorityClassName"):
        pod_spec["priorityClassName"] = spec["priorityClassName"]
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in settings.image_pull_secrets]
    if settings.service_account_name:
        pod_spec["serviceAccountName"] = settings.service_account_name

    job_labels = dict(labels)
    job_spec: dict[str, Any] = {
        "completions": 1,
        "parallelism": 1,
        "backoffLimit": spec["backoffLimit"],
        "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec},
    }
    if spec.get("activeDeadlineSeconds"):
        job_spec["activeDeadlineSeconds"] = spec["activeDeadlineSeconds"]
    if spec.get("queueName"):
        # Kueue's contract: the queue label, and the Job created suspended until Kueue admits it.
        job_labels[LABEL_QUEUE] = spec["queueName"]
        job_spec["suspend"] = True
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name),
            "namespace": namespace,
            "labels": job_labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(ftj)],
        },
        "spec": job_spec,
    }
