"""Operator settings: read once (env, CLI) at startup and passed into builders and the reconciler.

Builders never read the environment themselves; a test builds an `OperatorSettings(...)` by hand.
Every setting has an env var `KUBESLOTH_OPERATOR_<NAME>` (the chart sets them on the Deployment).
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from typing import Any, Mapping

from kubesloth.api import contract

ENV_PREFIX = "KUBESLOTH_OPERATOR_"
DEFAULT_GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


class SettingsError(ValueError):
    """A setting has a value the operator cannot use (the message names the env var)."""


@dataclass(frozen=True)
class ServerFeatures:
    """What the API server's version lets a Job use. kube.py reads /version once; builders take this value
    (they never ask the server or read globals). The default is the oldest server supported: v1.20."""

    major: int = 1
    minor: int = 20

    @classmethod
    def from_version(cls, info: Mapping[str, Any]) -> "ServerFeatures":
        """From the /version body: {"major": "1", "minor": "29+", "gitVersion": "v1.29.3-eks-..."}."""
        def digits(text: Any) -> int | None:
            found = "".join(ch for ch in str(text or "").split(".")[0] if ch.isdigit())
            return int(found) if found else None

        major, minor = digits(info.get("major")), digits(info.get("minor"))
        if major is None or minor is None:  # some distributions leave major/minor empty: use gitVersion
            parts = str(info.get("gitVersion") or "").lstrip("v").split(".")
            major = digits(parts[0]) if parts else None
            minor = digits(parts[1]) if len(parts) > 1 else None
        if major is None or minor is None:
            return cls()
        return cls(major, minor)

    @property
    def version(self) -> str:
        return f"{self.major}.{self.minor}"

    def at_least(self, minor: int) -> bool:
        return (self.major, self.minor) >= (1, minor)

    @property
    def job_suspend(self) -> bool:  # Job.spec.suspend: beta, on by default, 1.22 (alpha 1.21)
        return self.at_least(22)

    @property
    def pod_failure_policy(self) -> bool:  # Job.spec.podFailurePolicy + the DisruptionTarget pod condition: beta 1.26
        return self.at_least(26)

    @property
    def pod_replacement_policy(self) -> bool:  # Job.spec.podReplacementPolicy: beta, on by default, 1.29
        return self.at_least(29)


@dataclass(frozen=True)
class OperatorSettings:
    trainer_image: str = "ghcr.io/kubesloth/trainer:0.1.0"
    trainer_command: tuple[str, ...] = ("python", "-m", "kubesloth.trainer")
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()  # Secret names for the trainer pod's registry
    metrics_port: int = contract.METRICS_PORT  # the trainer pod's Prometheus port (0: off)
    # Added to every pod; a FineTuneJob's own tolerations come after these.
    default_tolerations: tuple[dict[str, Any], ...] = (DEFAULT_GPU_TOLERATION,)
    default_node_selector: Mapping[str, str] = field(default_factory=dict)
    # Empty: every namespace.
    namespaces: tuple[str, ...] = ()
    engine: str = "auto"
    run_as_user: int = 1000
    service_account_name: str | None = None
    # Extra env for the trainer container (e.g. HF_HUB_OFFLINE=1 on an air-gapped cluster).
    extra_env: Mapping[str, str] = field(default_factory=dict)
    # Periodic re-derivation of every FineTuneJob's status (pods change without the FineTuneJob changing; TTLs).
    resync_seconds: float = 10.0
    # Image prefixes spec.image may use besides trainer_image ("*": any). A user who may create FineTuneJobs
    # could otherwise run their own image with the token Secret of spec.model.tokenSecretRef in its env.
    allowed_images: tuple[str, ...] = ()
    # spec.training.reportTo trackers whose packages trainer_image has (the chart's trainer.imageTrackers): the
    # default image has tensorboardX only; a FineTuneJob naming another on that image is refused at the door, not
    # by its trainer after a GPU was scheduled. Images named in spec.image are the user's to know.
    image_trackers: tuple[str, ...] = ("tensorboard",)
    # Per-job pod settings (spec.serviceAccountName, Secrets in spec.env/envFrom/volumes), the chart's
    # trainer.jobPodSettings: service accounts a FineTuneJob may run its pod as ("*": any; empty: none), and whether
    # its spec may reference Secrets of its namespace. The operator creates the pod, so without these a user who may
    # create FineTuneJobs but not Pods would get an identity or a Secret Kubernetes never granted them.
    allowed_service_accounts: tuple[str, ...] = ()
    allow_secrets: bool = False
    # The chart's trainer.cacheVolumeClaim: a PVC (in each FineTuneJob's namespace) for the trainer's cache dir when
    # the spec names none (spec.cache.volumeClaimName); unset: an emptyDir, gone with the pod.
    cache_volume_claim: str | None = None
    # Bounded retries of the FineTuneJob handlers, with backoff.
    handler_retries: int = 8
    handler_backoff_seconds: float = 2.0
    # Where the operator can read pvc://CLAIM/path models (VOLUME_ROOT/CLAIM/path) and file:// paths for the
    # memory planner: the local control plane only (one machine); unset on a real cluster.
    volume_root: str | None = None
    # Read config.json of hf:// models through the hub client before scheduling (false: known shapes only).
    hub_configs: bool = True
    # GPU product -> memory GiB (the chart's gpuMemoryGiB): the planner's budget for resources.gpuProduct.
    gpu_memory: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "OperatorSettings":
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}

        def get(name: str) -> str | None:
            value = env.get(ENV_PREFIX + name)
            return value if value not in (None, "") else None

        def number(name: str, kind: type, minimum: float) -> Any:
            raw = get(name)
            try:
                value = kind(raw)
            except ValueError:
                raise SettingsError(f"{ENV_PREFIX}{name}={raw!r}: expected a {kind.__name__} >= {minimum}") from None
            if value < minimum:
                raise SettingsError(f"{ENV_PREFIX}{name}={raw!r}: expected a {kind.__name__} >= {minimum}")
            return value

        def json_value(name: str, kind: type) -> Any:
            raw = get(name)
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as err:
                raise SettingsError(f"{ENV_PREFIX}{name}: not valid JSON ({err})") from None
            if not isinstance(value, kind):
                raise SettingsError(f"{ENV_PREFIX}{name}: expected a JSON {kind.__name__}")
            return value

        def string_list(name: str, what: str) -> tuple[str, ...]:
            """A JSON list of strings or a comma-separated list; blank items dropped."""
            raw = get(name)
            items = json_value(name, list) if raw.lstrip().startswith("[") else raw.split(",")
            if not all(isinstance(item, str) for item in items):
                raise SettingsError(f"{ENV_PREFIX}{name}: expected {what} (a JSON list of strings or "
                                    "comma-separated)")
            return tuple(item.strip() for item in items if item.strip())

        if get("TRAINER_IMAGE"):
            values["trainer_image"] = get("TRAINER_IMAGE")
        if get("TRAINER_COMMAND"):
            values["trainer_command"] = tuple(shlex.split(get("TRAINER_COMMAND")))
        if get("IMAGE_PULL_POLICY"):
            policy = get("IMAGE_PULL_POLICY")
            if policy not in ("Always", "IfNotPresent", "Never"):
                raise SettingsError(f"{ENV_PREFIX}IMAGE_PULL_POLICY={policy!r}: expected Always, IfNotPresent "
                                    "or Never")
            values["image_pull_policy"] = policy
        if get("IMAGE_PULL_SECRETS"):
            names = []
            for item in json_value("IMAGE_PULL_SECRETS", list):
                name = item.get("name") if isinstance(item, dict) else item
                if not isinstance(name, str) or not name:
                    raise SettingsError(f"{ENV_PREFIX}IMAGE_PULL_SECRETS: expected a JSON list of names or "
                                        '{"name": ...} objects')
                names.append(name)
            values["image_pull_secrets"] = tuple(names)
        if get("METRICS_PORT"):
            values["metrics_port"] = number("METRICS_PORT", int, 0)
        if get("DEFAULT_TOLERATIONS"):
            tolerations = json_value("DEFAULT_TOLERATIONS", list)
            if not all(isinstance(item, dict) for item in tolerations):
                raise SettingsError(f"{ENV_PREFIX}DEFAULT_TOLERATIONS: expected a JSON list of objects")
            values["default_tolerations"] = tuple(tolerations)
        if get("DEFAULT_NODE_SELECTOR"):
            values["default_node_selector"] = {str(k): str(v) for k, v in
                                               json_value("DEFAULT_NODE_SELECTOR", dict).items()}
        if get("NAMESPACES"):
            values["namespaces"] = tuple(ns.strip() for ns in get("NAMESPACES").split(",") if ns.strip())
        if get("ENGINE"):
            engine = get("ENGINE")
            if engine not in ("auto", "unsloth", "cpu"):
                raise SettingsError(f"{ENV_PREFIX}ENGINE={engine!r}: expected auto, unsloth or cpu")
            values["engine"] = engine
        if get("RUN_AS_USER"):
            values["run_as_user"] = number("RUN_AS_USER", int, 1)
        if get("SERVICE_ACCOUNT_NAME"):
            values["service_account_name"] = get("SERVICE_ACCOUNT_NAME")
        if get("EXTRA_ENV"):
            values["extra_env"] = {str(k): str(v) for k, v in json_value("EXTRA_ENV", dict).items()}
        if get("ALLOWED_IMAGES"):
            values["allowed_images"] = string_list("ALLOWED_IMAGES", "image prefixes")
        if get("IMAGE_TRACKERS"):  # "[]": the image has none
            values["image_trackers"] = string_list("IMAGE_TRACKERS", "tracker names")
        if get("ALLOWED_SERVICE_ACCOUNTS"):
            values["allowed_service_accounts"] = string_list("ALLOWED_SERVICE_ACCOUNTS", "service account names")
        if get("ALLOW_SECRETS"):
            raw = get("ALLOW_SECRETS").lower()
            if raw not in ("true", "false", "1", "0", "yes", "no"):
                raise SettingsError(f"{ENV_PREFIX}ALLOW_SECRETS={get('ALLOW_SECRETS')!r}: expected true or false")
            values["allow_secrets"] = raw in ("true", "1", "yes")
        if get("CACHE_VOLUME_CLAIM"):
            values["cache_volume_claim"] = get("CACHE_VOLUME_CLAIM")
        if get("RESYNC_SECONDS"):
            values["resync_seconds"] = number("RESYNC_SECONDS", float, 0.5)
        if get("HANDLER_RETRIES"):
            values["handler_retries"] = number("HANDLER_RETRIES", int, 0)
        if get("HANDLER_BACKOFF_SECONDS"):
            values["handler_backoff_seconds"] = number("HANDLER_BACKOFF_SECONDS", float, 0.1)
        if get("VOLUME_ROOT"):
            values["volume_root"] = get("VOLUME_ROOT")
        if get("HUB_CONFIGS"):
            values["hub_configs"] = get("HUB_CONFIGS").lower() not in ("0", "false", "no")
        if get("GPU_MEMORY"):
            table = json_value("GPU_MEMORY", dict)
            try:
                values["gpu_memory"] = {str(k): float(v) for k, v in table.items() if v is not None}
            except (TypeError, ValueError):
                raise SettingsError(f"{ENV_PREFIX}GPU_MEMORY: expected a JSON object of numbers") from None
        return cls(**values)

    def runs_trainer_image(self, image: str | None) -> bool:
        """spec.image unset or naming the install's own trainer image (whose contents the install knows)."""
        return not image or image == self.trainer_image

    def image_allowed(self, image: str | None) -> bool:
        """spec.image may be the trainer image or start with one of allowed_images ("*" allows any)."""
        if self.runs_trainer_image(image):
            return True
        return any(prefix == "*" or image.startswith(prefix) for prefix in self.allowed_images)

    def service_account_allowed(self, name: str | None) -> bool:
        """spec.serviceAccountName may be unset, or one of allowed_service_accounts ("*" allows any)."""
        return not name or "*" in self.allowed_service_accounts or name in self.allowed_service_accounts
