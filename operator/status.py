"""Status from what is: the FineTuneJob's phase and conditions derived from its Job and Pods as they are now.

Pure functions of (FineTuneJob, Job, Pods, now): no API calls, no memory of earlier events. The only thing taken
from the previous status is what cannot be re-observed (a condition's lastTransitionTime when its status did not
change, the first start time, a finished phase once the Job is gone, and the record of attempts whose pods may be
gone: status.attempts, see record_attempts). Unit-tested with hand-written dicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

import re

from kubesloth.api.contract import DETERMINISTIC_EXIT_CODES, EXIT_REASONS, ExitCode, parse_state, strip_state
from kubesloth.api.v1alpha1 import FINISHED_PHASES, FineTuneJobSpec, Phase

from .builders import ANNOTATION_PRIOR_FAILURES, ANNOTATION_PRIOR_INTERRUPTIONS

# Spec fields a user may change after the run started (everything else is locked: SpecLocked).
#   suspend: the lifecycle switch itself; ttlSecondsAfterFinished: only read once the run finished.
MUTABLE_SPEC_FIELDS = frozenset({"suspend", "ttlSecondsAfterFinished"})

# Conditions this module owns; others (e.g. Fits, set by the estimator) are carried over untouched.
PHASE_CONDITIONS = ("Running", "Succeeded", "Failed", "Suspended")
SPEC_LOCKED = "SpecLocked"
OWNED_CONDITIONS = frozenset(PHASE_CONDITIONS + (SPEC_LOCKED,))

OOM_EXIT_CODE = 137
RESUMING = "Resuming"  # the Job gave up, the run's budgets are not spent: the reconcile recreates the Job
DEFAULT_BACKOFF_LIMIT = FineTuneJobSpec.model_fields["backoff_limit"].default
DEFAULT_MAX_INTERRUPTIONS = FineTuneJobSpec.model_fields["max_interruptions"].default
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


# How an attempt ended. INTERRUPTION: not the run's fault (resumes from its checkpoint; spec.maxInterruptions);
# FAILURE: retried up to spec.backoffLimit; FATAL: fails the same way again (no retry).
INTERRUPTION, FAILURE, FATAL = "interruption", "failure", "fatal"

# The DisruptionTarget pod condition (>= 1.26: scheduler, eviction API, taint manager, pod GC, kubelet).
DISRUPTION_REASONS = {
    "PreemptionByScheduler": "Preempted", "PreemptionByKubeScheduler": "Preempted",  # 1.26 spelled it so
    "EvictionByEvictionAPI": "Evicted", "DeletionByTaintManager": "NodeTainted",
    "DeletionByPodGC": "NodeLost", "TerminationByKubelet": "TerminatedByKubelet",
}
# status.reason of a failed pod as kubelets and controllers write it (every version), when not the trainer's doing.
POD_INTERRUPTION_REASONS = {
    "Evicted": "Evicted",  # node pressure (memory, disk)
    "Preempting": "Preempted",  # the kubelet made room for a critical pod
    "NodeLost": "NodeLost", "Terminated": "NodeShutdown", "Shutdown": "NodeShutdown",  # graceful node shutdown
    "NodeAffinity": "Rejected", "UnexpectedAdmissionError": "Rejected", "OutOfnvidia.com/gpu": "Rejected",
}
SIGKILL_EXIT_CODE, SIGTERM_EXIT_CODE = 137, 143


@dataclass(frozen=True)
class Attempt:
    """How one trainer pod ended (not for pods still pending, running or succeeded)."""

    kind: str  # INTERRUPTION, FAILURE or FATAL
    reason: str
    message: str


def classify_pod(pod: dict[str, Any]) -> Attempt | None:
    """Every way a trainer pod can end, as its own reason; None while it has not ended in failure."""
    status = pod.get("status") or {}
    terminated = (_container_status(pod).get("state") or {}).get("terminated")
    code = terminated.get("exitCode") if terminated else None
    if status.get("phase") != "Failed" and not (terminated and code not in (0, None)):
        return None
    if status.get("phase") == "Succeeded" or code == 0:
        return None
    said = _short(strip_state((terminated or {}).get("message")))  # the facts after it go to status.checkpoint
    pod_said = _short(status.get("message"))
    if code is not None:
        try:
            exit_reason = EXIT_REASONS[ExitCode(code)]
        except ValueError:
            exit_reason = "TrainerError"
        if said.startswith(f"{exit_reason}: "):  # the trainer may lead with its own reason: do not say it twice
            said = said[len(exit_reason) + 2:]
    if code in DETERMINISTIC_EXIT_CODES:
        return Attempt(FATAL, exit_reason, f"trainer exited {code} ({exit_reason})" + (f": {said}" if said else "")
                       + "; not retried: the same input fails the same way again")

    killed = ""
    if code == SIGKILL_EXIT_CODE and (terminated or {}).get("reason") != "OOMKilled":
        killed = ("; the trainer was killed (exit 137) before it finished: if it was writing its interrupt "
                  "checkpoint, raise spec.terminationGracePeriodSeconds (pod: "
                  f"{(pod.get('spec') or {}).get('terminationGracePeriodSeconds', '?')}s)")
    disruption = _pod_condition(pod, "DisruptionTarget")
    if disruption and disruption.get("status") == "True":
        reason = DISRUPTION_REASONS.get(disruption.get("reason") or "", "Disrupted")
        if reason == "TerminatedByKubelet" and status.get("reason") in POD_INTERRUPTION_REASONS:
            reason = POD_INTERRUPTION_REASONS[status["reason"]]
        detail = _short(disruption.get("message") or pod_said or disruption.get("reason") or "disrupted")
        return Attempt(INTERRUPTION, reason, f"{reason}: {detail}{killed}")
    if status.get("reason") in POD_INTERRUPTION_REASONS:
        reason = POD_INTERRUPTION_REASONS[status["reason"]]
        return Attempt(INTERRUPTION, reason, f"{reason}: {pod_said or status['reason']}{killed}")
    if code == ExitCode.INTERRUPTED:
        return Attempt(INTERRUPTION, "Interrupted", f"trainer exited {code} (Interrupted)"
                       + (f": {said}" if said else ""))
    if (code == SIGKILL_EXIT_CODE and (terminated or {}).get("reason") != "OOMKilled"
            and (parse_state((terminated or {}).get("message")) or {}).get("interrupt") == "lost"):
        # SIGKILLed while writing its interrupt checkpoint (its last words say so): it had been told to stop, so
        # the grace period ran out -- an interruption, whether or not the pod object was deleted (a node
        # shutdown's kill, a kubelet that killed after the grace period).
        grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds", "?")
        detail = said.removeprefix(f"{EXIT_REASONS[ExitCode.INTERRUPTED]}: ")
        return Attempt(INTERRUPTION, "GracePeriodExceeded", f"the trainer was killed (exit 137) while writing its "
                       f"interrupt checkpoint (pod terminationGracePeriodSeconds: {grace}s)"
                       + (f": {detail}" if detail else ""))
    if ((pod.get("metadata") or {}).get("deletionTimestamp") and code in (SIGKILL_EXIT_CODE, SIGTERM_EXIT_CODE)
            and terminated.get("reason") != "OOMKilled"):
        # Deleted (by hand, a controller, a node going away) and stopped by the signal, not by an error of its own.
        if code == SIGKILL_EXIT_CODE:
            return Attempt(INTERRUPTION, "GracePeriodExceeded", "the pod was deleted and the trainer did not exit "
                           "within its grace period" + killed)
        return Attempt(INTERRUPTION, "PodDeleted", "the pod was deleted and the trainer stopped on SIGTERM "
                       "(exit 143) before it could checkpoint")
    if terminated is None:
        return Attempt(FAILURE, status.get("reason") or "PodFailed", pod_said or "the pod failed")
    if terminated.get("reason") == "OOMKilled" or (code == OOM_EXIT_CODE and terminated.get("reason") != "Error"):
        return Attempt(FAILURE, "OutOfMemory", (
            "the trainer was killed for exceeding its memory limit (OOMKilled, exit 137); "
            "raise spec.resources.memory or use a leaner profile") + (f": {said}" if said else ""))
    return Attempt(FAILURE, exit_reason, f"trainer exited {code} ({exit_reason})" + (f": {said}" if said else ""))


def pod_failure(pod: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, message) for a trainer pod that ended without success (see classify_pod)."""
    attempt = classify_pod(pod)
    return (attempt.reason, attempt.message) if attempt else None


@dataclass(frozen=True)
class Counts:
    """Attempts of the whole run: those counted on earlier Jobs (the Job's prior-* annotations) + this Job's pods."""

    interruptions: int = 0
    failures: int = 0


def _annotation_int(job: dict[str, Any] | None, key: str) -> int:
    try:
        return max(0, int(((job or {}).get("metadata", {}).get("annotations") or {}).get(key) or 0))
    except ValueError:
        return 0


# --- the record of attempts (status.attempts) -------------------------------------------------------------------
# A pod's attempt is counted once, when its ending is final, and the decision is kept in status: the pod may be gone
# at the next reconcile (the kubelet removes a deleted pod once its trainer exits; pod GC; `kubectl delete pod` of an
# ended one), and what it said is then gone with it. The decision is made in the context of that moment: a pod the
# operator's own action stopped (`stopped_by_operator`) is not an attempt of the run.
COUNTED_INTERRUPTION, COUNTED_FAILURE, NOT_COUNTED = "Interruption", "Failure", "NotCounted"
ENDED_VALUES = (COUNTED_INTERRUPTION, COUNTED_FAILURE, NOT_COUNTED)


def _deleting(obj: dict[str, Any] | None) -> bool:
    return bool(((obj or {}).get("metadata") or {}).get("deletionTimestamp"))


def pod_ending_final(pod: dict[str, Any]) -> bool:
    """The pod's ending can no longer change: a terminal phase, or its trainer exited on a pod being deleted (the pod
    object goes next; on v1.20 its phase may never turn terminal). A container that terminated on a pod whose phase
    is still Running is not final yet (the kubelet may still say Evicted, Preempted, ...)."""
    if (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded"):
        return True
    return _deleting(pod) and bool((_container_status(pod).get("state") or {}).get("terminated"))


def _ran(pod: dict[str, Any]) -> bool:
    state = _container_status(pod).get("state") or {}
    return (pod.get("status") or {}).get("phase") == "Running" or "running" in state or bool(
        (state.get("terminated") or {}).get("startedAt"))


def stopped_by_operator(ftj: dict[str, Any], job: dict[str, Any] | None) -> str | None:
    """Why a pod deleted now was stopped by the operator's own action (or Kubernetes acting on the operator's
    settings), not interrupted: None when nothing of the run is stopping it."""
    spec, old = ftj.get("spec") or {}, ftj.get("status") or {}
    if old.get("phase") in FINISHED_PHASES:
        return f"the run had {old['phase'].lower()}"
    if spec.get("suspend"):
        return "spec.suspend"
    if job is None or _deleting(job):
        return "the Job is deleted"
    if (job.get("spec") or {}).get("suspend"):
        return "the Job is suspended"
    if (job.get("spec") or {}).get("parallelism") == 0:
        return "the Job is stopped"
    done = job_condition(job, "Failed") or job_condition(job, "Complete")
    if done:
        return f"the Job is {done.get('type', '').lower()} ({done.get('reason') or done.get('type')})"
    return None


def _entry_of(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("uid") or raw.get("name"), str):
        return None
    entry = {k: raw[k] for k in ("name", "uid", "created", "reason") if isinstance(raw.get(k), str)}
    if raw.get("ran") is True:
        entry["ran"] = True
    if raw.get("ended") in ENDED_VALUES:
        entry["ended"] = raw["ended"]
    return entry


def record_attempts(record: Any, job: dict[str, Any] | None, pods: list[dict[str, Any]], stopping: str | None
                    ) -> tuple[dict[str, Any] | None, Counts]:
    """The record (status.attempts) after seeing the Job's `pods` as they are now, and this Job's counts from it.

    Pure. `record`: the previous status.attempts (another Job's, or unreadable: a new record); `stopping`: what of
    the run stops its pods now (stopped_by_operator), None when nothing does. Each pod of the Job gets an entry;
    the entry's `ended` is decided once, when the pod's ending is final (pod_ending_final), or when the pod is gone
    before that was seen: a pod seen running and gone while nothing of the run stopped it was deleted (by hand, by
    a controller) and the Job replaces it: an interruption (PodDeleted). A pod the operator stopped (deleted while
    `stopping`) is NotCounted. An ending seen but not final yet counts (provisionally) without being recorded.
    Bounded: decided entries older than every undecided one are folded into `earlierInterruptions`/
    `earlierFailures` up to the time `before`, and pods created before it are not looked at again."""
    uid = ((job or {}).get("metadata") or {}).get("uid")
    if uid is None:
        return None, Counts()
    old = record if isinstance(record, dict) and record.get("jobUid") == uid else {}
    before = old.get("before") if isinstance(old.get("before"), str) else ""
    earlier_i = _count(old.get("earlierInterruptions")) or 0
    earlier_f = _count(old.get("earlierFailures")) or 0
    last_reason = old.get("lastReason") if isinstance(old.get("lastReason"), str) else None
    entries: dict[str, dict[str, Any]] = {}
    for raw in old.get("pods") if isinstance(old.get("pods"), list) else []:
        entry = _entry_of(raw)
        if entry is not None:
            entries[entry.get("uid") or entry["name"]] = entry
    provisional: list[Attempt] = []
    present: set[str] = set()
    for pod in sorted(pods, key=_created):
        meta = pod.get("metadata") or {}
        created = _created(pod)
        if before and created < before:
            continue  # counted in earlier*, or created before the record began
        key = meta.get("uid") or meta.get("name") or ""
        present.add(key)
        entry = entries.setdefault(key, {k: v for k, v in (("name", meta.get("name")), ("uid", meta.get("uid")),
                                                          ("created", created)) if v})
        if "ended" in entry:
            continue  # decided before: a transient view now changes nothing
        if _ran(pod):
            entry["ran"] = True
        attempt = classify_pod(pod)
        if pod_ending_final(pod):
            if _deleting(pod) and stopping:
                entry.update(ended=NOT_COUNTED, reason="Stopped")
            elif attempt is None:
                entry.update(ended=NOT_COUNTED, reason="Succeeded")
            else:
                entry.update(ended=COUNTED_INTERRUPTION if attempt.kind == INTERRUPTION else COUNTED_FAILURE,
                             reason=attempt.reason)
        elif attempt is not None and not _deleting(pod):
            provisional.append(attempt)
    for key, entry in entries.items():
        if key in present or "ended" in entry:
            continue
        # Gone before its ending was seen.
        if stopping:
            entry.update(ended=NOT_COUNTED, reason="Stopped")
        elif entry.get("ran"):
            entry.update(ended=COUNTED_INTERRUPTION, reason="PodDeleted")
        else:
            entry.update(ended=NOT_COUNTED, reason="NeverRan")
    # Fold: every entry created before the oldest undecided one (or, all decided, before the newest) is decided.
    ordered = sorted(entries.values(), key=lambda e: e.get("created") or "")
    undecided = [e.get("created") or "" for e in ordered if "ended" not in e]
    cut = min(undecided) if undecided else (ordered[-1].get("created") or "" if ordered else before)
    kept = []
    for entry in ordered:
        if (entry.get("created") or "") < cut:
            earlier_i += entry["ended"] == COUNTED_INTERRUPTION
            earlier_f += entry["ended"] == COUNTED_FAILURE
        else:
            kept.append(entry)
    before = max(before, cut)
    counted = [e for e in ordered if e.get("ended") in (COUNTED_INTERRUPTION, COUNTED_FAILURE) and e.get("reason")]
    if counted:
        last_reason = counted[-1]["reason"]  # newest created: what the running message names once its pod is gone
    listed = [e.get("ended") for e in kept]
    counts = Counts(interruptions=earlier_i + listed.count(COUNTED_INTERRUPTION)
                    + sum(a.kind == INTERRUPTION for a in provisional),
                    failures=earlier_f + listed.count(COUNTED_FAILURE)
                    + sum(a.kind != INTERRUPTION for a in provisional))
    new = {"jobUid": uid, "earlierInterruptions": earlier_i, "earlierFailures": earlier_f, "pods": kept}
    if before:
        new["before"] = before
    if last_reason:
        new["lastReason"] = last_reason[:128]
    return new, counts


def with_prior(job: dict[str, Any] | None, counts: Counts) -> Counts:
    """This Job's counts plus what earlier Jobs of the run counted (the Job's prior-* annotations)."""
    return Counts(_annotation_int(job, ANNOTATION_PRIOR_INTERRUPTIONS) + counts.interruptions,
                  _annotation_int(job, ANNOTATION_PRIOR_FAILURES) + counts.failures)


def limits(spec: dict[str, Any]) -> tuple[int, int]:
    """(backoffLimit, maxInterruptions) of the spec, with the API's defaults."""
    return (int(spec.get("backoffLimit", DEFAULT_BACKOFF_LIMIT)),
            int(spec.get("maxInterruptions", DEFAULT_MAX_INTERRUPTIONS)))


def _tally(counts: Counts, spec: dict[str, Any]) -> str:
    backoff, max_interruptions = limits(spec)
    return (f"{counts.failures} of backoffLimit {backoff} failures, "
            f"{counts.interruptions} of maxInterruptions {max_interruptions} interruptions")


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
def _phase(ftj: dict[str, Any], job: dict[str, Any] | None, pods: list[dict[str, Any]], counts: Counts,
           record: dict[str, Any] | None = None) -> tuple[str, str, str]:
    spec = ftj.get("spec") or {}
    old = ftj.get("status") or {}
    backoff, max_interruptions = limits(spec)
    attempts = [(p, a) for p in pods for a in [classify_pod(p)] if a]
    last = attempts[-1][1] if attempts else None

    if job_condition(job, "Complete"):
        return Phase.Succeeded.value, "Completed", "the trainer finished and the model was saved"
    failed = job_condition(job, "Failed")
    if failed and failed.get("reason") == "DeadlineExceeded":
        deadline = (job.get("spec") or {}).get("activeDeadlineSeconds")
        return Phase.Failed.value, "DeadlineExceeded", (
            f"the run was active longer than activeDeadlineSeconds ({deadline}s) and was stopped")
    fatal = next((a for _, a in reversed(attempts) if a.kind == FATAL), None)
    if fatal:
        return Phase.Failed.value, fatal.reason, fatal.message
    if counts.failures > backoff:
        newest = next(a for _, a in reversed(attempts) if a.kind == FAILURE) if any(
            a.kind == FAILURE for _, a in attempts) else last
        reason, message = (newest.reason, newest.message) if newest else ("BackoffLimitExceeded", "failed")
        return Phase.Failed.value, reason, (f"{message} (backoffLimit {backoff} reached after {counts.failures} "
                                            f"failures; {counts.interruptions} interruptions not counted)")
    if counts.interruptions > max_interruptions:
        return Phase.Failed.value, "TooManyInterruptions", (
            f"interrupted {counts.interruptions} times, more than maxInterruptions {max_interruptions}; "
            f"the last: {last.message if last else '?'}")
    if failed:
        if attempts or (job["metadata"].get("deletionTimestamp") and _cond_reason(old, "Running") == RESUMING):
            # The Job gave up while the run's own budgets are not spent (interruptions counted as failures by a
            # Job without podFailurePolicy, or made by an older operator): recreated, it resumes from its checkpoint.
            return Phase.Pending.value, RESUMING, (f"the Job stopped retrying after {last.reason if last else 'interruptions'} "
                                                   f"({_tally(counts, spec)}); recreating it to resume from the "
                                                   "newest checkpoint")
        job_reason = failed.get("reason") or "Failed"
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

    def after() -> str:
        if not last:
            return ""
        what = "an interruption" if last.kind == INTERRUPTION else "a failed attempt"
        return f"after {what} ({_tally(counts, spec)}): {last.message}"

    current = pods[-1] if pods else None
    if current is None:
        if last:
            return Phase.Pending.value, "Retrying", f"retrying {after()}"
        return Phase.Pending.value, "PodCreating", "waiting for the Job to create the trainer pod"
    pod_phase = (current.get("status") or {}).get("phase")
    if pod_phase == "Running" and (_container_status(current).get("state") or {}).get("running") is not None:
        earlier = counts.interruptions + counts.failures
        # The last attempt's own reason (Evicted, Preempted, Interrupted, OutOfMemory, ...): the pod that said it
        # is gone soon, the running message keeps it; once it is gone, the record of attempts still has it.
        last_reason = last.reason if last else (record or {}).get("lastReason")
        note = (f" (attempt {earlier + 1}: {counts.interruptions} interruptions, {counts.failures} failures "
                f"before" + (f"; the last: {last_reason})" if last_reason else ")")) if earlier else ""
        return Phase.Running.value, "TrainerRunning", f"trainer pod {current['metadata']['name']} is running{note}"
    if pod_phase == "Succeeded":
        return Phase.Running.value, "TrainerFinished", "the trainer exited 0; waiting for the Job to complete"
    current_attempt = classify_pod(current)
    if current_attempt:
        verb = "resuming" if current_attempt.kind == INTERRUPTION else "retrying"
        return Phase.Pending.value, current_attempt.reason, f"{verb} {after()}"
    waiting = pod_waiting(current)
    if waiting:
        return Phase.Pending.value, waiting[0], waiting[1]
    if last:
        return Phase.Pending.value, "Retrying", f"retrying {after()}"
    return Phase.Pending.value, "PodStarting", f"trainer pod {current['metadata']['name']} is starting"


def _cond_reason(status: dict[str, Any], kind: str) -> str | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == kind:
            return cond.get("reason")
    return None


# --- status.checkpoint / status.output from the trainer's termination messages ---------------------------------
INT64_MAX = 2**63 - 1
_RELATIVE_PATH = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
_RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def _count(value: Any) -> int | None:
    """A count the API server takes (int64, not negative, not a bool), else None: the trainer runs user code."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= INT64_MAX else None


def _under(destination: str, rel: Any) -> str | None:
    if not isinstance(rel, str) or not _RELATIVE_PATH.match(rel) or ".." in rel.split("/"):
        return None
    return f"{destination.rstrip('/')}/{rel}"


def trainer_states(pods: list[dict[str, Any]]) -> list[tuple[dict[str, Any], int | None, str]]:
    """(state, exit code, message) of every ended trainer pod that left a state (api.contract.with_state), oldest
    first."""
    found = []
    for pod in sorted(pods, key=_created):
        terminated = (_container_status(pod).get("state") or {}).get("terminated") or {}
        state = parse_state(terminated.get("message"))
        if state:
            found.append((state, terminated.get("exitCode"), strip_state(terminated.get("message"))))
    return found


def checkpoint_and_output(spec: dict[str, Any], old: dict[str, Any], pods: list[dict[str, Any]]
                          ) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None]:
    """(status.checkpoint, status.output, the newest state) from what the trainer pods said when they ended; what
    earlier status recorded stands where no pod says more (the pods of earlier Jobs are gone)."""
    destination = (spec.get("output") or {}).get("destination") or ""
    checkpoint = dict(old.get("checkpoint") or {}) or None
    output = dict(old.get("output") or {}) or None
    newest = None
    for state, code, message in trainer_states(pods):
        newest = state
        said = state.get("checkpoint") if isinstance(state.get("checkpoint"), dict) else {}
        if _count(said.get("step")) is not None:
            checkpoint = {k: v for k, v in (checkpoint or {}).items()
                          if k in ("interruptCheckpoint", "lostSteps", "message")}
            checkpoint["step"] = said["step"]
            for key, value in (("path", _under(destination, said.get("path"))), ("bytes", _count(said.get("bytes"))),
                               ("time", said.get("time") if isinstance(said.get("time"), str)
                                and _RFC3339.match(said["time"]) else None)):
                if value is not None:
                    checkpoint[key] = value
        interrupt = state.get("interrupt")
        if (code == ExitCode.INTERRUPTED and interrupt in ("written", "skipped")) or (
                interrupt == "lost" and code != ExitCode.INTERRUPTED):
            # lost: killed while writing it (the message the trainer left before the write began).
            checkpoint = checkpoint or {}
            checkpoint["interruptCheckpoint"] = "Written" if interrupt == "written" else "Skipped"
            lost = _count(state.get("lostSteps")) if interrupt != "written" else 0
            checkpoint["lostSteps"] = lost or 0
            checkpoint["message"] = _short(message)
        said_output = state.get("output") if isinstance(state.get("output"), dict) else {}
        path = _under(destination, said_output.get("path"))
        if path:
            output = {"path": path}
            for key in ("files", "bytes"):
                if _count(said_output.get(key)) is not None:
                    output[key] = said_output[key]
            if isinstance(said_output.get("verified"), bool):
                output["verified"] = said_output["verified"]
    return checkpoint, output, newest


def stopped_progress(old: dict[str, Any], checkpoint: dict[str, Any] | None) -> dict[str, Any] | None:
    """After an interruption the run goes on from its newest checkpoint: progress shows that step, not the step
    the stopped trainer had reached (those after the checkpoint are trained again)."""
    progress = old.get("progress") or {}
    step = (checkpoint or {}).get("step")
    if not progress or step is None or progress.get("step") == step:
        return None
    total = progress.get("totalSteps")
    return {**progress, "step": step, "display": f"{step}/{total}" if total else str(step), "etaSeconds": None}


# --- conditions --------------------------------------------------------------------------------------------------
def merge_conditions(old: Iterable[dict[str, Any]], new: Iterable[dict[str, Any]], now: datetime,
                     generation: int | None = None) -> list[dict[str, Any]]:
    """New conditions, keeping lastTransitionTime where a condition's status did not change; conditions of
    types this module does not own are kept as they were. New ones get metav1.Condition's shape: a message
    (the reason if none: v1.20's API server refuses an empty string in a required field) and, given the
    FineTuneJob's `generation`, observedGeneration."""
    previous = {c.get("type"): c for c in old or []}
    merged: list[dict[str, Any]] = []
    new = list(new)
    for cond in new:
        before = previous.get(cond["type"])
        kept = before.get("lastTransitionTime") if before and before.get("status") == cond["status"] else None
        merged.append({**cond, "message": cond.get("message") or cond.get("reason") or cond["type"],
                       "lastTransitionTime": kept or rfc3339(now),
                       **({"observedGeneration": generation} if generation is not None else {})})
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
                  changed_fields: list[str] | None = None, seen_pods: list[dict[str, Any]] | None = None
                  ) -> dict[str, Any]:
    """The FineTuneJob's status (wire form) from its Job and Pods as they are.

    `pods`: the trainer pods of the current Job (any order); `changed_fields`: spec fields changed after the
    run started (from `spec_changes`), reported as the SpecLocked condition; `seen_pods`: every pod of the Job for
    the record of attempts (status.attempts) when `pods` leaves some out of the phase (those a suspend stopped);
    default `pods`.
    """
    old = ftj.get("status") or {}
    pods = sorted(pods, key=_created)
    record = old.get("attempts")
    if job is None or job["metadata"].get("deletionTimestamp"):
        # No Job, or one being deleted (suspend, a stop, a recreate): what was counted stands; pods stopped by the
        # deletion are not interruptions.
        counts = Counts(int(old.get("interruptions") or 0), int(old.get("failures") or 0))
    else:
        # Counted once each, when final, and kept: the pods that said it may be gone (record_attempts).
        record, mine = record_attempts(record, job, pods if seen_pods is None else seen_pods,
                                       stopped_by_operator(ftj, job))
        counts = with_prior(job, mine)
    phase, reason, message = _phase(ftj, job, pods, counts, record)
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
        "conditions": merge_conditions(old.get("conditions") or [], conditions, now,
                                       (ftj.get("metadata") or {}).get("generation")),
        "observedGeneration": (ftj.get("metadata") or {}).get("generation"),
    }
    status["jobName"] = job["metadata"]["name"] if job is not None else old.get("jobName")
    status["interruptions"] = counts.interruptions
    status["failures"] = counts.failures
    status["restarts"] = counts.interruptions + counts.failures
    status["attempts"] = record if isinstance(record, dict) else None
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
    checkpoint, output, _newest = checkpoint_and_output(ftj.get("spec") or {}, old, pods)
    if checkpoint:
        status["checkpoint"] = checkpoint
    if output:
        status["output"] = output
    current = pods[-1] if pods else None
    current_ended = current is not None and classify_pod(current) is not None
    if phase != Phase.Running.value and phase != Phase.Succeeded.value and (current_ended or job is None):
        progress = stopped_progress(old, checkpoint)
        if progress:
            status["progress"] = progress
    completion = old.get("completionTime")
    if finished and not completion:
        done = (job_condition(job, "Complete") or job_condition(job, "Failed") or {})
        completion = (((job or {}).get("status") or {}).get("completionTime")
                      or done.get("lastTransitionTime") or rfc3339(now))
    status["completionTime"] = completion if finished else None
    return status
