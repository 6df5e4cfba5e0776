"""Pure builders: FineTuneJob (wire dict) + OperatorSettings -> the Job and ConfigMap dicts the operator creates.

No API calls, no globals, no environment: everything the objects depend on is in the arguments, so the unit tests
check every field without a cluster (tests/operator/test_builders.py).
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import yaml

from kubesloth.api import contract
from kubesloth.api.contract import Env
from kubesloth.api.v1alpha1 import API_VERSION, HUB_PUSH_TOKEN_ENV, KIND, FineTuneJob

from .settings import OperatorSettings, ServerFeatures

# Labels and annotations this operator sets.
LABEL_FTJ = "kubesloth.io/finetunejob"
ANNOTATION_FTJ = "kubesloth.io/finetunejob"  # the full name (a label value is capped at 63 characters)
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
LABEL_GPU_PRODUCT = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"
CONTAINER_NAME = "trainer"
MANAGED_BY = "kubesloth-operator"
MAX_NAME = 63

ANNOTATION_PRIOR_INTERRUPTIONS = "kubesloth.io/prior-interruptions"  # counted on earlier Jobs of the run
ANNOTATION_PRIOR_FAILURES = "kubesloth.io/prior-failures"

CONFIG_VOLUME = "config"
TMP_VOLUME = "tmp"
SHM_VOLUME = "dshm"
CACHE_VOLUME = "cache"
# Where the trainer's libraries write (the root filesystem is read-only): all under contract.CACHE_DIR.
CACHE_ENV = {
    "KUBESLOTH_CACHE_DIR": contract.CACHE_DIR,
    "HF_HOME": f"{contract.CACHE_DIR}/huggingface",
    "UNSLOTH_COMPILE_LOCATION": f"{contract.CACHE_DIR}/unsloth_compiled_cache",
    "TORCHINDUCTOR_CACHE_DIR": f"{contract.CACHE_DIR}/torchinductor",
    "TRITON_CACHE_DIR": f"{contract.CACHE_DIR}/triton",
}

# --- the grace period: long enough to write the interrupt checkpoint ---------------------------------------------
# Measured: an 8B checkpoint (bf16 weights + 8-bit AdamW states, 31 GB) took ~42 s on the H200's local disk
# (0.74 GB/s). Network volumes are slower, so the default assumes a third of that, with margin on top.
CHECKPOINT_WRITE_BYTES_PER_SECOND = 250e6
GRACE_MARGIN = 1.5  # x the estimated write time
GRACE_FIXED_SECONDS = 60  # finishing the current optimizer step, fsync, the final message, exit
MIN_GRACE_SECONDS = 90
MAX_GRACE_SECONDS = 3600
DEFAULT_GRACE_SECONDS = 600  # checkpoint size unknown (a GPU job)
WEIGHT_BYTES_PER_PARAMETER = 2  # bf16
OPTIMIZER_STATE_BYTES_PER_PARAMETER = {  # what a resumable checkpoint holds per parameter, besides the weights
    "paged_adamw_8bit": 2, "adamw_8bit": 2,  # two 8-bit moments
    "paged_adamw_32bit": 8, "adamw_torch": 8, "adamw_torch_fused": 8,  # two fp32 moments
    "adafactor": 1, "sgd": 0,
}
CHECKPOINT_OVERHEAD_BYTES = 64 * 2**20  # RNG states, scheduler, trainer state, tokenizer, config
_PARAMETERS_IN_NAME = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)([BM])(?![A-Za-z])")


def grace_seconds_for_checkpoint(checkpoint_bytes: int | float | None) -> int:
    """terminationGracePeriodSeconds that covers writing a checkpoint of `checkpoint_bytes`: the write at a
    conservative bandwidth, with margin and a fixed allowance, clamped to [MIN, MAX]; unknown size ->
    DEFAULT_GRACE_SECONDS. Pure: the memory planner can feed it its own checkpoint size."""
    if not checkpoint_bytes or checkpoint_bytes <= 0:
        return DEFAULT_GRACE_SECONDS
    seconds = GRACE_FIXED_SECONDS + GRACE_MARGIN * checkpoint_bytes / CHECKPOINT_WRITE_BYTES_PER_SECOND
    return int(min(MAX_GRACE_SECONDS, max(MIN_GRACE_SECONDS, math.ceil(seconds))))


def checkpoint_bytes_for(parameters: int | None, optimizer: str = "paged_adamw_8bit") -> int | None:
    """Size of a resumable checkpoint of a model with `parameters` weights trained with `optimizer`
    (8B with 8-bit AdamW: 2 + 2 bytes per parameter ~ 32 GB)."""
    if not parameters or parameters <= 0:
        return None
    per_parameter = WEIGHT_BYTES_PER_PARAMETER + OPTIMIZER_STATE_BYTES_PER_PARAMETER.get(optimizer, 8)
    return int(parameters * per_parameter + CHECKPOINT_OVERHEAD_BYTES)


def model_parameters(spec: dict[str, Any], status: dict[str, Any] | None = None) -> int | None:
    """The model's parameter count if known: status.estimate.parameters (the planner's), else the size in the
    model's name (hf://meta-llama/Llama-3.1-8B -> 8e9, SmolLM-135M -> 135e6); None when neither says."""
    known = ((status or {}).get("estimate") or {}).get("parameters")
    if isinstance(known, int) and known > 0:
        return known
    name = spec["model"]["source"].rsplit("/", 1)[-1].split("@")[0]
    found = _PARAMETERS_IN_NAME.findall(name)
    if not found:
        return None
    number, unit = found[-1]
    return int(float(number) * (1e9 if unit == "B" else 1e6))


def termination_grace_seconds(spec: dict[str, Any], status: dict[str, Any] | None = None) -> int:
    """spec.terminationGracePeriodSeconds, else what covers the model's checkpoint write."""
    if spec.get("terminationGracePeriodSeconds"):
        return int(spec["terminationGracePeriodSeconds"])
    planned = ((status or {}).get("estimate") or {}).get("checkpointBytes")
    if isinstance(planned, int) and planned > 0:  # the memory planner's size of this run's checkpoint
        return grace_seconds_for_checkpoint(planned)
    optimizer = (spec.get("training") or {}).get("optimizer") or "paged_adamw_8bit"
    return grace_seconds_for_checkpoint(checkpoint_bytes_for(model_parameters(spec, status), optimizer))


def image_refusal(spec: dict[str, Any], settings: OperatorSettings) -> str | None:
    """Why spec.image may not be used, or None. The pod gets the token Secret (spec.model.tokenSecretRef) in
    its env, so only images the operator's admin allows run: settings.trainer_image and allowed_images."""
    image = spec.get("image")
    if settings.image_allowed(image):
        return None
    allowed = ", ".join([settings.trainer_image] + [f"{p}*" for p in settings.allowed_images])
    return (f"spec.image: {image!r} is not an allowed trainer image (allowed: {allowed}; the operator's "
            "KUBESLOTH_OPERATOR_ALLOWED_IMAGES, chart value trainer.allowedImages); remove spec.image or ask "
            "the cluster admin to allow it")


def secret_uses(spec: dict[str, Any]) -> list[str]:
    """The per-job pod settings that reference a Secret (spec.env valueFrom.secretKeyRef, spec.envFrom secretRef,
    spec.volumes secret), as field paths."""
    found = [f"spec.env[{i}].valueFrom.secretKeyRef" for i, item in enumerate(spec.get("env") or [])
             if (item.get("valueFrom") or {}).get("secretKeyRef")]
    found += [f"spec.envFrom[{i}].secretRef" for i, item in enumerate(spec.get("envFrom") or [])
              if item.get("secretRef")]
    found += [f"spec.volumes[{i}].secret" for i, item in enumerate(spec.get("volumes") or []) if item.get("secret")]
    return found


def pod_settings_refusal(spec: dict[str, Any], settings: OperatorSettings) -> tuple[str, str] | None:
    """(reason, message) when the per-job pod settings go beyond what this install allows (the chart's
    trainer.jobPodSettings) or clash with the operator's own env; None when the pod may be built. The schema
    refuses every invalid value at the door; this is what only the operator knows."""
    account = spec.get("serviceAccountName")
    if not settings.service_account_allowed(account):
        allowed = ", ".join(settings.allowed_service_accounts) or "none"
        return "ServiceAccountNotAllowed", (
            f"spec.serviceAccountName: {account!r} is not a service account FineTuneJobs may run as (allowed: "
            f"{allowed}; the operator's KUBESLOTH_OPERATOR_ALLOWED_SERVICE_ACCOUNTS, chart value "
            "trainer.jobPodSettings.serviceAccountNames); remove it or ask the cluster admin to allow it")
    uses = secret_uses(spec)
    if uses and not settings.allow_secrets:
        return "SecretsNotAllowed", (
            f"{', '.join(uses)}: this install does not let FineTuneJobs reference Secrets in env, envFrom or volumes "
            "(the operator's KUBESLOTH_OPERATOR_ALLOW_SECRETS=false, chart value trainer.jobPodSettings.secrets); "
            "use a ConfigMap for what is not secret, or ask the cluster admin")
    trackers = [str(t) for t in (spec.get("training") or {}).get("reportTo") or []]
    missing = [t for t in trackers if t not in settings.image_trackers]
    if missing and settings.runs_trainer_image(spec.get("image")):
        has = ", ".join(settings.image_trackers) or "none"
        return "TrackerNotInImage", (
            f"spec.training.reportTo: {', '.join(missing)} is not installed in the trainer image "
            f"{settings.trainer_image} (it has: {has}; chart value trainer.imageTrackers), so its trainer would refuse "
            "it at start; drop it from reportTo, or set spec.image to an allowed image with kubesloth[tracking]")
    for index, item in enumerate(spec.get("env") or []):
        if item["name"] in settings.extra_env:
            return "InvalidSpec", (
                f"spec.env[{index}].name: {item['name']!r} is set for every trainer pod by the operator "
                "(KUBESLOTH_OPERATOR_EXTRA_ENV); remove it from the FineTuneJob or ask the cluster admin")
    return None


def pod_failure_policy() -> dict[str, Any]:
    """Job.spec.podFailurePolicy (>= 1.26): disruptions and the trainer's resumable exit are not failures;
    exit codes that fail the same way again end the Job at once. (`onPodConditions: []` on the exit-code rules:
    the 1.26-1.28 OpenAPI schema marks it required; the API server takes an empty list as absent.)"""
    return {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onPodConditions": [],
         "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In",
                         "values": sorted(int(c) for c in contract.DETERMINISTIC_EXIT_CODES)}},
        {"action": "Ignore", "onPodConditions": [],
         "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In",
                         "values": [int(contract.ExitCode.INTERRUPTED)]}},
    ]}


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
    estimate = (ftj.get("status") or {}).get("estimate") or {}
    if estimate.get("budgetSource") == "spec.resources.gpuProduct" and estimate.get("budgetBytes"):
        # The budget the operator planned with came from its GPU table: the trainer plans with the same one.
        env.append({"name": Env.GPU_BUDGET_BYTES.value, "value": str(int(estimate["budgetBytes"]))})
    token = spec["model"].get("tokenSecretRef")
    if token:
        env.append({"name": Env.HF_TOKEN.value,
                    "valueFrom": {"secretKeyRef": {"name": token["name"], "key": token.get("key", "token")}}})
    push = (spec.get("output") or {}).get("pushToHub") or {}
    if push.get("tokenSecretRef"):  # the trainer's hub upload (trainer/save.py push_to_hub)
        ref = push["tokenSecretRef"]
        env.append({"name": HUB_PUSH_TOKEN_ENV,
                    "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref.get("key", "token")}}})
    taken = {item["name"] for item in env}
    env.extend({"name": key, "value": value} for key, value in sorted(settings.extra_env.items())
               if key not in taken)
    taken = {item["name"] for item in env}  # extra_env may point a cache elsewhere
    env.extend({"name": key, "value": value} for key, value in CACHE_ENV.items() if key not in taken)
    # The FineTuneJob's own variables after the operator's ($(NAME) may refer to them). The schema refuses the
    # reserved names; one the operator's extra env sets is refused by pod_settings_refusal (kept out here too).
    taken = {item["name"] for item in env}
    env.extend(dict(item) for item in spec.get("env") or [] if item["name"] not in taken)
    if spec.get("envFrom"):
        # envFrom's keys are unseen by the operator: `env` wins over `envFrom`, so pin what loads code or moves
        # the hub endpoint (unless the operator's extra env or the spec set it: theirs stands).
        taken = {item["name"] for item in env}
        env.extend({"name": key, "value": value} for key, value in contract.PINNED_WITH_ENV_FROM.items()
                   if key not in taken)
    return env


def cache_claim(spec: dict[str, Any], settings: OperatorSettings) -> str | None:
    """The PVC at contract.CACHE_DIR: the spec's, else the install's default; None: an emptyDir."""
    return (spec.get("cache") or {}).get("volumeClaimName") or settings.cache_volume_claim


def cache_volume(spec: dict[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    claim = cache_claim(spec, settings)
    if claim:
        return {"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": claim}}
    return {"name": CACHE_VOLUME, "emptyDir": {}}


# What the trainer writes into an emptyDir cache besides a hub download: the compile caches (9 MiB for lean 8B on
# the H200, 2026-12-01, bench/results/h200-2026-12-01/run5) and what libraries put in /tmp, with room to spare.
CACHE_SCRATCH_BYTES = 1 << 30


def ephemeral_storage_bytes(ftj: dict[str, Any], spec: dict[str, Any], settings: OperatorSettings) -> int | None:
    """The pod's ephemeral-storage request with an emptyDir cache: an hf:// model is downloaded there (its weights,
    from the planner's estimate), plus the compile caches. None with a cache PVC or an unknown model size: the
    kubelet then evicts only when the node runs out, as without a request."""
    if cache_claim(spec, settings):
        return None
    source = str((spec.get("model") or {}).get("source") or "")
    weights = (((ftj.get("status") or {}).get("estimate") or {}).get("breakdown") or {}).get("weightsBytes")
    if not source.startswith("hf://") or not weights:
        return None
    return int(weights) + CACHE_SCRATCH_BYTES


def _gibibytes(value: int) -> str:
    return f"{-(-value // 2**30)}Gi"


def _resources(spec: dict[str, Any], ephemeral_bytes: int | None = None) -> dict[str, Any]:
    wanted = spec.get("resources") or {}
    requests: dict[str, str] = {GPU_RESOURCE: "1"}
    limits: dict[str, str] = {GPU_RESOURCE: "1"}
    if wanted.get("memory"):
        # Memory request = limit: a training run's peak is its steady state, and overcommit only means OOM later.
        requests["memory"] = limits["memory"] = wanted["memory"]
    if wanted.get("cpu"):
        # CPU is a request only: a CPU limit throttles the data loader and buys nothing on a dedicated GPU node.
        requests["cpu"] = wanted["cpu"]
    if ephemeral_bytes:
        # A request only: scheduled where the download fits; a limit would evict a run whose caches grow.
        requests["ephemeral-storage"] = _gibibytes(ephemeral_bytes)
    return {"requests": requests, "limits": limits}


def build_job(ftj: dict[str, Any], settings: OperatorSettings, features: ServerFeatures = ServerFeatures(),
              prior_interruptions: int = 0, prior_failures: int = 0) -> dict[str, Any]:
    """The batch/v1 Job: one pod, one GPU, the FineTuneJob mounted from its ConfigMap.

    `features`: what the API server supports (podFailurePolicy, podReplacementPolicy); `prior_*`: what earlier
    Jobs of this run counted (a Job recreated on resume), so the new Job's backoffLimit is what is left.
    """
    meta = ftj["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    spec = normalized(ftj)["spec"]
    labels = labels_for(name)
    annotations = {ANNOTATION_FTJ: name}
    grace = termination_grace_seconds(spec, ftj.get("status"))

    volumes: list[dict[str, Any]] = [
        {"name": CONFIG_VOLUME, "configMap": {"name": configmap_name(name)}},
        {"name": TMP_VOLUME, "emptyDir": {}},
        # Data-loader workers share tensors through /dev/shm; a container's default is 64 MiB.
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}},
        cache_volume(spec, settings),
    ]
    mounts: list[dict[str, Any]] = [
        {"name": CONFIG_VOLUME, "mountPath": contract.CONFIG_DIR, "readOnly": True},
        {"name": TMP_VOLUME, "mountPath": "/tmp"},
        {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
        {"name": CACHE_VOLUME, "mountPath": contract.CACHE_DIR},
    ]
    for claim, read_only in pvc_claims(spec).items():
        volume = pvc_volume_name(claim)
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}})
        mounts.append({"name": volume, "mountPath": f"{contract.PVC_ROOT}/{claim}", "readOnly": read_only})
    # The FineTuneJob's extra volumes (the schema's subset: persistentVolumeClaim, configMap, secret, emptyDir;
    # names that are not the pod's own) and its mounts (under contract.MOUNT_ROOT, never over the trainer's paths).
    volumes.extend(dict(volume) for volume in spec.get("volumes") or [])
    mounts.extend(dict(mount) for mount in spec.get("volumeMounts") or [])

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
        "env": _env(ftj, spec, settings) + [{"name": Env.TERMINATION_GRACE_SECONDS.value, "value": str(grace)}],
        **({"envFrom": [dict(item) for item in spec["envFrom"]]} if spec.get("envFrom") else {}),
        "resources": _resources(spec, ephemeral_storage_bytes(ftj, spec, settings)),
        "volumeMounts": mounts,
        "terminationMessagePath": contract.TERMINATION_LOG,
        # The trainer writes its last words to the termination log; if it died before it could, the log tail.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            # Writes go to the emptyDirs (/tmp, /dev/shm, the cache dir) and the output volume only.
            "readOnlyRootFilesystem": True,
        },
    }
    if settings.metrics_port:
        container["ports"] = [{"name": "metrics", "containerPort": settings.metrics_port, "protocol": "TCP"}]

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": grace,
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
    # The FineTuneJob's service account (allowed by pod_settings_refusal) for its cloud identity, else the
    # operator's; automountServiceAccountToken stays false: no Kubernetes API token either way.
    if spec.get("serviceAccountName") or settings.service_account_name:
        pod_spec["serviceAccountName"] = spec.get("serviceAccountName") or settings.service_account_name

    job_labels = dict(labels)
    failures_left = max(0, spec["backoffLimit"] - prior_failures)
    interruptions_left = max(0, spec["maxInterruptions"] - prior_interruptions)
    job_spec: dict[str, Any] = {
        "completions": 1,
        "parallelism": 1,
        "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec},
    }
    if features.pod_failure_policy:
        # Interruptions are ignored by the policy, deterministic failures end the Job: backoffLimit counts failures.
        job_spec["backoffLimit"] = failures_left
        job_spec["podFailurePolicy"] = pod_failure_policy()
    else:
        # v1.20..1.25: the Job counts every failed pod. Room for both budgets, so the Job never gives up before the
        # operator, which counts failures and interruptions apart (status.py) and stops the Job itself.
        job_spec["backoffLimit"] = failures_left + interruptions_left
    if features.pod_replacement_policy:
        # A replacement pod only once the old one is gone: never two trainers writing the same checkpoints.
        job_spec["podReplacementPolicy"] = "Failed"
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
            "annotations": {**annotations, ANNOTATION_PRIOR_INTERRUPTIONS: str(prior_interruptions),
                            ANNOTATION_PRIOR_FAILURES: str(prior_failures)},
            "ownerReferences": [owner_reference(ftj)],
        },
        "spec": job_spec,
    }
