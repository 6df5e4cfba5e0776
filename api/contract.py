"""The contract between the operator's pod and the trainer inside it: paths, env vars, exit codes, metric names.

Both sides import these names; neither hard-codes them. Stdlib only.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Optional

# The FineTuneJob (wire form: apiVersion/kind/metadata{name,namespace,uid}/spec) is mounted from a ConfigMap.
CONFIG_DIR = "/etc/kubesloth"
CONFIG_FILE_NAME = "finetunejob.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE_NAME}"

# pvc://CLAIM/path resolves to PVC_ROOT/CLAIM/path inside the pod (the operator mounts each claim there).
PVC_ROOT = "/mnt/pvc"
# Unsloth / inductor / Triton compile caches and the Hugging Face cache (the image's HF_HOME etc. point here):
# a writable emptyDir in the pod, whose root filesystem is read-only.
CACHE_DIR = "/var/cache/kubesloth"
TERMINATION_LOG = "/dev/termination-log"
METRICS_PORT = 9400


class Env(str, enum.Enum):
    """Environment variables the pod sets and the trainer reads (the node agent rewrites path values)."""

    CONFIG = "KUBESLOTH_CONFIG"  # path of the FineTuneJob YAML (default CONFIG_PATH)
    PVC_ROOT = "KUBESLOTH_PVC_ROOT"  # where pvc:// claims are mounted (default PVC_ROOT)
    METRICS_PORT = "KUBESLOTH_METRICS_PORT"  # Prometheus port (default METRICS_PORT; 0 = off)
    METRICS_ADDR = "KUBESLOTH_METRICS_ADDR"  # bind address (the pod IP, from the downward API)
    TERMINATION_LOG = "KUBESLOTH_TERMINATION_LOG"  # where the last message goes (default TERMINATION_LOG)
    ENGINE = "KUBESLOTH_ENGINE"  # auto | unsloth | cpu
    JOB_NAME = "KUBESLOTH_FINETUNEJOB"  # the FineTuneJob's name (metric label)
    NAMESPACE = "KUBESLOTH_NAMESPACE"  # its namespace (metric label)
    HF_TOKEN = "HF_TOKEN"  # from spec.model.tokenSecretRef; never logged
    # The GPU budget in bytes the operator planned with, when it came from its GPU table (resources.gpuProduct).
    GPU_BUDGET_BYTES = "KUBESLOTH_GPU_BUDGET_BYTES"
    # The pod's terminationGracePeriodSeconds: how long the trainer has from SIGTERM to SIGKILL.
    TERMINATION_GRACE_SECONDS = "KUBESLOTH_TERMINATION_GRACE_SECONDS"


# --- per-job pod settings (spec.env, envFrom, volumes, volumeMounts): what a FineTuneJob may not touch --------------
# The trainer pod holds the model and push tokens, and only images the cluster admin allows run in it. So a
# FineTuneJob may not set (the CRD refuses them at the door, naming the field):
#   - the contract's and the operator's own names (KUBESLOTH_*, HF_TOKEN: use spec.model.tokenSecretRef; the cache
#     dirs the operator points at its emptyDir), which would silently undo what the operator configured;
#   - names that make the trusted image load other code or send its tokens elsewhere (the dynamic loader's LD_*,
#     Python's module paths and start-up files, PATH, HOME (the user site-packages under it), HF_ENDPOINT).
RESERVED_ENV_PREFIXES = ("KUBESLOTH_", "LD_")
RESERVED_ENV_NAMES = (
    "HF_TOKEN", "HF_HOME", "HF_ENDPOINT", "UNSLOTH_COMPILE_LOCATION", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
    "PATH", "HOME", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONPLATLIBDIR",
    "PYTHONNOUSERSITE", "PYTHONEXECUTABLE", "BASH_ENV", "ENV",
)
# spec.envFrom imports every key of a ConfigMap or Secret, which the operator cannot see (it may not read Secrets).
# Kubernetes lets `env` win over `envFrom`: in a pod with envFrom the operator sets these (unless its own extra env
# does), so an imported key cannot turn code loading on or point the hub client elsewhere.
PINNED_WITH_ENV_FROM = {
    "LD_PRELOAD": "", "LD_LIBRARY_PATH": "", "LD_AUDIT": "", "PYTHONPATH": "", "PYTHONHOME": "",
    "PYTHONSTARTUP": "", "PYTHONUSERBASE": "", "PYTHONNOUSERSITE": "1", "HF_ENDPOINT": "https://huggingface.co",
}
# Extra volumes are mounted under MOUNT_ROOT only (never over the image's code, /etc, /usr...), and not under
# PVC_ROOT (the operator's pvc:// claims); CONFIG_DIR, CACHE_DIR, /tmp and /dev/shm are outside it.
MOUNT_ROOT = "/mnt"
# The trainer pod's own volume names (operator/builders.py); pvc:// claims are volumes named pvc-<claim>.
RESERVED_VOLUME_NAMES = ("config", "tmp", "dshm", "cache")
RESERVED_VOLUME_PREFIX = "pvc-"


def reserved_env_name(name: str) -> bool:
    """Whether spec.env may not set `name` (RESERVED_ENV_NAMES, RESERVED_ENV_PREFIXES)."""
    return name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES)


class ExitCode(enum.IntEnum):
    """Trainer exit codes the operator classifies into conditions (reason in parentheses)."""

    OK = 0
    ERROR = 1  # anything unforeseen (TrainerError)
    BAD_CONFIG = 2  # the config cannot be used (InvalidConfig)
    SOURCE_NOT_FOUND = 3  # model or dataset missing or unreadable (SourceNotFound)
    OUTPUT_UNWRITABLE = 4  # destination unwritable or disk full (OutputUnwritable)
    OUT_OF_MEMORY = 5  # CUDA/host out of memory inside the trainer (OutOfMemory)
    INTERRUPTED = 6  # SIGTERM/SIGINT after a checkpoint was written (or skipped: no time): resumable (Interrupted)
    OUTPUT_IN_USE = 7  # the output holds another run's checkpoints/model, or another trainer holds it (OutputInUse)


# Exit codes that mean the same input fails again: no retry (podFailurePolicy FailJob; the operator on v1.20).
DETERMINISTIC_EXIT_CODES = frozenset({ExitCode.BAD_CONFIG, ExitCode.SOURCE_NOT_FOUND, ExitCode.OUTPUT_UNWRITABLE,
                                      ExitCode.OUTPUT_IN_USE})

EXIT_REASONS = {
    ExitCode.ERROR: "TrainerError",
    ExitCode.BAD_CONFIG: "InvalidConfig",
    ExitCode.SOURCE_NOT_FOUND: "SourceNotFound",
    ExitCode.OUTPUT_UNWRITABLE: "OutputUnwritable",
    ExitCode.OUT_OF_MEMORY: "OutOfMemory",
    ExitCode.INTERRUPTED: "Interrupted",
    ExitCode.OUTPUT_IN_USE: "OutputInUse",
}

# Output layout under the destination.
CHECKPOINTS_DIR = "checkpoints"  # checkpoints/step-00000010/ ; complete ones hold COMPLETE_MARKER
CHECKPOINT_PREFIX = "step-"
COMPLETE_MARKER = "COMPLETE"
FINAL_MODEL_DIR = "model"  # safetensors + tokenizer + config, verified by reloading
SUMMARY_FILE = "summary.json"  # steps, tokens, wall time, tokens/s, peak memory, final loss
LOCK_FILE = ".kubesloth-lock"  # the writer's lease: holder, pid, host, heartbeat (one trainer writes an output)
SUPERSEDED_DIR = "superseded"  # onExisting: restart moves another run's checkpoints/model/summary here

# Trainer metrics (labels: namespace, finetunejob).
METRIC_STEP = "kubesloth_train_step"
METRIC_STEPS_PLANNED = "kubesloth_train_steps_total_planned"
METRIC_EPOCH = "kubesloth_train_epoch"
METRIC_LOSS = "kubesloth_train_loss"
METRIC_LR = "kubesloth_train_learning_rate"
METRIC_TOKENS = "kubesloth_train_tokens_total"
METRIC_TOKENS_PER_SECOND = "kubesloth_train_tokens_per_second"
METRIC_GPU_ALLOCATED = "kubesloth_gpu_memory_allocated_bytes"
METRIC_GPU_RESERVED = "kubesloth_gpu_memory_reserved_bytes"
METRIC_GPU_PEAK = "kubesloth_gpu_memory_peak_bytes"
METRIC_GPU_DEVICE_USED = "kubesloth_gpu_device_memory_used_bytes"
METRIC_GPU_DEVICE_PEAK = "kubesloth_gpu_device_memory_peak_bytes"
METRIC_GPU_UTILIZATION = "kubesloth_gpu_utilization_ratio"
METRIC_ETA = "kubesloth_train_eta_seconds"


# The trainer's termination message on success. The operator reads it back for the final status.progress when the
# run ended between two scrapes of the metrics endpoint (a short run can finish before the first one).
_SUCCESS = re.compile(r"^trained (?P<step>\d+)/(?P<total>\d+) steps \((?P<tokens>\d+) tokens"
                      r"(?:, (?P<rate>[0-9.]+) tokens/s)?\), final loss (?P<loss>[-+0-9.eEnaif]+);")


def success_message(step: int, total: int, tokens: int, tokens_per_second: Optional[float], loss: float,
                    saved_to: str) -> str:
    rate = f", {tokens_per_second:.0f} tokens/s" if tokens_per_second else ""
    return (f"trained {step}/{total} steps ({tokens} tokens{rate}), final loss {loss:.4f}; "
            f"model saved and verified in {saved_to}")


def parse_success_message(message: str) -> Optional[dict]:
    """The figures of success_message(), or None when `message` is not one."""
    match = _SUCCESS.match(message or "")
    if not match:
        return None
    rate = match["rate"]
    return {"step": int(match["step"]), "total_steps": int(match["total"]), "tokens": int(match["tokens"]),
            "tokens_per_second": float(rate) if rate else None, "loss": float(match["loss"])}


# Facts the operator writes into status.checkpoint / status.output, appended to the termination message (every
# exit, success or not) as compact JSON after STATE_MARKER: {"checkpoint": {"step", "path", "time", "bytes"},
# "interrupt": "written"|"skipped", "lostSteps", "output": {"path", "files", "bytes", "verified"}}. Paths are
# relative to spec.output.destination. The whole message stays under MAX_TERMINATION_MESSAGE_BYTES (the kubelet
# keeps 4 KiB; the trainer keeps it under 1 KiB).
STATE_MARKER = " kubesloth-state="
MAX_TERMINATION_MESSAGE_BYTES = 1000


def with_state(message: str, state: Optional[dict]) -> str:
    """`message` (cut to fit) + STATE_MARKER + the state as compact JSON, under MAX_TERMINATION_MESSAGE_BYTES."""
    tail = STATE_MARKER + json.dumps(state, separators=(",", ":"), sort_keys=True) if state else ""
    room = MAX_TERMINATION_MESSAGE_BYTES - len(tail.encode())
    if room < 80:  # the state never crowds out the message: drop it instead
        tail, room = "", MAX_TERMINATION_MESSAGE_BYTES
    encoded = message.encode()
    if len(encoded) > room:
        message = encoded[:room - 3].decode(errors="ignore") + "..."
    return message + tail


def parse_state(message: Optional[str]) -> Optional[dict]:
    """The state with_state() appended, or None (no state, or a message cut or garbled by someone else)."""
    at = (message or "").rfind(STATE_MARKER)
    if at < 0:
        return None
    try:
        state = json.loads(message[at + len(STATE_MARKER):].strip())
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


def strip_state(message: Optional[str]) -> str:
    """The human part of a termination message."""
    message = message or ""
    at = message.rfind(STATE_MARKER)
    return message[:at].rstrip() if at >= 0 else message
