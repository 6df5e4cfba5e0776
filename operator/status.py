"""Status from what is: the FineTuneJob's phase and conditions derived from its Job and Pods as they are now.

Pure functions of (FineTuneJob, Job, Pods, now): no API calls, no memory of earlier events. The only thing taken
from the previous status is what cannot be re-observed (a condition's lastTransitionTime when its status did not
change, the first start time, and a finished phase once the Job is gone). Unit-tested with hand-written dicts.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Iterable

from kubesloth.api.contract import EXIT_REASONS, ExitCode
from kubesloth.api.v1alpha1 import FINISHED_PHASES, Phase

# Spec fields a user may change after the run started (everything else is locked: SpecLocked).
#   suspend: the lifecycle switch itself; ttlSecondsAfterFinished: only read once the run finished.
MUTABLE_SPEC_FIELDS = frozenset({"suspend", "ttlSecondsAfterFinished"})

# Conditions this module owns; others (e.g. Fits, set by the estimator) are carried over untouched.
PHASE_CONDITIONS = ("Running", "Succeeded", "Failed", "Suspended")
SPEC_LOCKED = "SpecLocked"
OWNED_CONDITIONS = frozenset(PHASE_CONDITIONS + (SPEC_LOCKED,))

OOM_EXIT_CODE = 137
IMAGE_PULL_REASONS = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"})
CONFIG_ERROR_REASONS = frozenset({"CreateContainerConfigError", "CreateContainerError", "RunContainerError"})
MAX_MESSAGE = 1024


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _short(text: str | None) -> str:
    text = (text or "").strip()
    return text if len(text) <= MAX_MESSAGE else "…" + text[-MAX_MESSAGE:]


# --- reading a Job and its Pods ---------------------------------------------------------------------------------
def job_condition(job: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for cond in ((job or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def job_finished(job: dict[str, Any] | None) -> bool:
    return bool(job_condition(job, "Complete") or job_condition(job, "Failed"))


def _container_status(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return statuses[0] if statuses else {}


def _pod_condition(pod: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None


def _created(obj: dict[str, Any]) -> str:
    return obj.get("metadata", {}).get("creationTimestamp") or ""


def pod_failure(pod: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, message) for a failed trainer pod: OOMKilled -> OutOfMemory, trainer exit codes via EXIT_REASONS."""
    status = pod.get("status") or {}
    terminated = (_container_status(pod).get("state") or {}).get("terminated")
    if not terminated:
        if status.get("phase") == "Failed":
            return status.get("reason") or "PodFailed", _short(status.get("message") or "the pod failed")
        return None
    code = terminated.get("exitCode")
    if code == 0:
        return None
    said = _short(terminated.get("message"))
    if terminated.get("reason") == "OOMKilled" or (code == OOM_EXIT_CODE and terminated.get("reason") != "Error"):
        return "OutOfMemory", ("the trainer was killed for exceeding its memory limit (OOMKilled, exit 137); "
                               "raise spec.resources.memory or use a leaner profile") + (f": {said}" if said else "")
    try:
        reason = EXIT_REASONS[ExitCode(code)]
    except ValueError:
        reason = "TrainerError"
    if said.startswith(f"{reason}: "):  # the trainer may lead with its own reason: do not say it twice
        said = said[len(reason) + 2:]
    return reason, f"trainer exited {code} ({reason})" + (f": {said}" if said else "")


def pod_waiting(pod: dict[str, Any]) -> tuple[str, str] | None:
    """Why a pod is not running yet: (reason, message), or None when it simply has not got there yet."""
    scheduled = _pod_condition(pod, "PodScheduled")
    if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        return "Unschedulable", _short(scheduled.get("message") or "no node fits the pod")
    waiting = (_container_status(pod).get("state") or {}).get("waiting") or {}
    reason = waiting.get("reason")
    if reason in IMAGE_PULL_REASONS:
        return "ImagePullBackOff", _short(f"{reason}: {waiting.get('message') or 'cannot pull the trainer image'}")
    if reason in CONFIG_ERROR_REASONS:
        return reason, _short(waiting.get("message") or reason)
    return None


# --- the phase ---------------------------------------------------------------------------------------------------
def _phase(ftj: dict[str, Any], job: dict[str, Any] | None, pods: list[dict[str, Any]]
           ) -> tuple[str, str, str]:
    spec = ftj.get("spec") or {}
    old = ftj.get("status") or {}
    failed_pods = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    last_failure = pod_failure(failed_pods[-1]) if failed_pods else None

    if job_condition(job, "Complete"):
        return Phase.Succeeded.value, "Completed", "the trainer finished and the model was saved"
    failed = job_condition(job, "Failed")
    if failed:
        job_reason = failed.get("reason") or "Failed"
        if job_reason == "DeadlineExceeded":
            deadline = (job.get("spec") or {}).get("activeDeadlineSeconds")
            return Phase.Failed.value, "DeadlineExceeded", (
                f"the run was active longer than activeDeadlineSeconds ({deadline}s) and was stopped")
        if last_failure:
            reason, message = last_failure
            if job_reason == "BackoffLimitExceeded":
                limit = (job.get("spec") or {}).get("backoffLimit")
                message = f"{message} (backoffLimit {limit} reached after {len(failed_pods)} attempts)"
            return Phase.Failed.value, reason, message
        return Phase.Failed.value, job_reason, _short(failed.get("message") or job_reason)
    if old.get("phase") in FINISHED_PHASES:
        # The Job is gone (TTL, or deleted by hand): the outcome stands; nothing is recreated for a finished run.
        return old["phase"], _cond_reason(old, old["phase"]) or old["phase"], old.get("message") or ""
    if spec.get("suspend"):
        alive = [p["metadata"]["name"] for p in pods
                 if (p.get("status") or {}).get("phase") in (None, "Pending", "Running")]
        if alive:
            return Phase.Suspended.value, "Suspending", f"stopping trainer pod {', '.join(alive)}"
        return Phase.Suspended.value, "Suspended", "suspended; set spec.suspend=false to resume from the newest checkpoint"
    if job is None:
        return Phase.Pending.value, "Creating", "creating the trainer Job"
    if (job.get("spec") or {}).get("suspend"):
        queue = (job.get("metadata", {}).get("labels") or {}).get("kueue.x-k8s.io/queue-name")
        return Phase.Queued.value, "Queued", f"waiting for Kueue to admit the Job (queue {queue})"

    current = pods[-1] if pods else None
    if current is None:
        return Phase.Pending.value, "PodCreating", "waiting for the Job to create the trainer pod"
    pod_phase = (current.get("status") or {}).get("phase")
    if pod_phase == "Running" and (_container_status(current).get("state") or {}).get("running") is not None:
        attempt = len(failed_pods) + 1
        note = f" (attempt {attempt})" if failed_pods else ""
        return Phase.Running.value, "TrainerRunning", f"trainer pod {current['metadata']['name']} is running{note}"
    if pod_phase == "Succeeded":
        return Phase.Running.value, "TrainerFinished", "the trainer exited 0; waiting for the Job to complete"
    if pod_phase == "Failed":
        reason, message = last_failure or ("PodFailed", "the trainer pod failed")
        return Phase.Pending.value, reason, f"retrying after a failed attempt: {message}"
    waiting = pod_waiting(current)
    if waiting:
        return Phase.Pending.value, waiting[0], waiting[1]
    if last_failure:
        return Phase.Pending.value, "Retrying", f"retrying after a failed attempt: {last_failure[1]}"
    return Phase.Pending.value, "PodStarting", f"trainer pod {current['metadata']['name']} is starting"


def _cond_reason(status: dict[str, Any], kind: str) -> str | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == kind:
            return cond.get("reason")
    return None


# --- conditions --------------------------------------------------------------------------------------------------
def merge_conditions(old: Iterable[dict[str, Any]], new: Iterable[dict[str, Any]], now: datetime
                     ) -> list[dict[str, Any]]:
    """New conditions, keeping lastTransitionTime where a condition's status did not change; conditions of
    types this module does not own are kept as they were."""
    previous = {c.get("type"): c for c in old or []}
    merged: list[dict[str, Any]] = []
    new = list(new)
    for cond in new:
        before = previous.get(cond["type"])
        kept = before.get("lastTransitionTime") if before and before.get("status") == cond["status"] else None
        merged.append({**cond, "lastTransitionTime": kept or rfc3339(now)})
    mine = {c["type"] for c in new}
    merged += [c for c in old or [] if c.get("type") not in mine and c.get("type") not in OWNED_CONDITIONS]
    return merged


def spec_changes(started_spec: dict[str, Any] | None, live_spec: dict[str, Any]) -> list[str]:
    """Dotted paths of spec fields that differ from the spec the run started with (mutable fields ignored)."""
    if started_spec is None:
        return []
    changed: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if not path and key in MUTABLE_SPEC_FIELDS:
                    continue
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        elif a != b:
            changed.append(f"spec.{path}")

    walk(started_spec, live_spec, "")
    return changed


def derive_status(ftj: dict[str, Any], job: dict[str, Any] | None, pods: list[dict[str, Any]], now: datetime,
                  changed_fields: list[str] | None = None) -> dict[str, Any]:
    """The FineTuneJob's status (wire form) from its Job and Pods as they are.

    `pods`: the trainer pods of the current Job (any order); `changed_fields`: spec fields changed after the
    run started (from `spec_changes`), reported as the SpecLocked condition.
    """
    old = ftj.get("status") or {}
    pods = sorted(pods, key=_created)
    phase, reason, message = _phase(ftj, job, pods)
    finished = phase in FINISHED_PHASES

    conditions: list[dict[str, Any]] = []
    for kind in PHASE_CONDITIONS:
        if kind == phase:
            conditions.append({"type": kind, "status": "True", "reason": reason, "message": message})
        elif kind == "Running":
            # Running=False carries the reason the trainer is not running (Unschedulable, Suspended, ...).
            conditions.append({"type": kind, "status": "False", "reason": reason, "message": message})
        else:
            conditions.append({"type": kind, "status": "False", "reason": phase})
    if changed_fields:
        conditions.append({"type": SPEC_LOCKED, "status": "True", "reason": "SpecChangeRefused",
                           "message": _short("the run already started; these changes are ignored: "
                                             + ", ".join(changed_fields)
                                             + " (only spec.suspend and spec.ttlSecondsAfterFinished may change; "
                                             "to change the rest, delete and recreate the FineTuneJob)")})
    elif any(c.get("type") == SPEC_LOCKED for c in old.get("conditions") or []):
        conditions.append({"type": SPEC_LOCKED, "status": "False", "reason": "SpecMatches",
                           "message": "the spec matches the one the run started with"})

    status: dict[str, Any] = {
        "phase": phase,
        "message": message,
        "conditions": merge_conditions(old.get("conditions") or [], conditions, now),
        "observedGeneration": (ftj.get("metadata") or {}).get("generation"),
    }
    if job is not None:
        status["jobName"] = job["metadata"]["name"]
        status["restarts"] = int((job.get("status") or {}).get("failed") or 0)
    else:
        status["jobName"] = old.get("jobName")
        status["restarts"] = old.get("restarts", 0)
    status["podName"] = pods[-1]["metadata"]["name"] if pods else (old.get("podName") if finished else None)

    start = old.get("startTime")
    if not start:
        for pod in pods:
            state = _container_status(pod).get("state") or {}
            seen = (state.get("running") or state.get("terminated") or {}).get("startedAt")
            if seen:
                start = seen
                break
    status["startTime"] = start
    completion = old.get("completionTime")
    if finished and not completion:
        done = (job_condition(job, "Complete") or job_condition(job, "Failed") or {})
        completion = (((job or {}).get("status") or {}).get("completionTime")
                      or done.get("lastTransitionTime") or rfc3339(now))
    status["completionTime"] = completion if finished else None
    return status
