"""The reconcile's decision as a pure function: what is (FineTuneJob, Job, ConfigMap, Pods, server features, now,
settings) -> what to do (actions) and what the status becomes.

No API calls, no clock, no memory: `operator/reconcile.py` gathers the inputs (the Job, ConfigMap and Pods from the
watch cache or the API server, the memory plan, its own creation backoff), calls `plan()`, runs the enrichers
(progress and cost, read from the trainer) on `Plan.status`, and executes the actions in order. The unit tests
(tests/operator/test_plan.py) run it as a table of scenarios, for a v1.20 server and for newer ones.

The plan assumes each action succeeds: after "create Job" the status is derived from the Job it creates, after
"delete Job" from that Job being deleted. The one action whose outcome the plan cannot know is the creation of the
children (the API server's dry run may refuse them): the executor then asks `blocked()` for the refusal's status.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Optional

from pydantic import ValidationError

from kubesloth.api.v1alpha1 import FINISHED_PHASES, Phase

from . import builders, status as status_mod
from .estimate import Estimate
from .settings import OperatorSettings, ServerFeatures

WARNING_PHASES = {Phase.Failed.value}
QUIET_PENDING_REASONS = {"Creating", "PodCreating", "PodStarting"}  # the normal way to Running
UNKNOWN_FIELDS = "UnknownFields"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
# Status fields read from the trainer's metrics (operator/progress.py): written apart from the phase.
BEST_EFFORT_STATUS = frozenset({"progress", "cost"})
# Seconds the run was active (its Jobs not suspended) before now: on a Job, those of earlier periods and earlier
# Jobs; on the ConfigMap, those of Jobs deleted since (suspend on v1.20, a recreate): the activeDeadlineSeconds
# budget is what is left of spec.activeDeadlineSeconds.
ANNOTATION_ACTIVE_SECONDS = "kubesloth.io/active-seconds"
# The FineTuneJob generation whose spec.suspend=true the operator set on the Job (Job.spec.suspend servers): a
# Job of a queue found unsuspended again for that same generation was admitted again by Kueue.
ANNOTATION_SUSPENDED_GENERATION = "kubesloth.io/suspended-generation"


# --- actions: one API call each -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatchStatus:
    """Patch the FineTuneJob's status subresource with `status` (the phase, conditions and counts)."""
    status: dict[str, Any]


@dataclass(frozen=True)
class PatchBestEffortStatus:
    """Patch status.progress/cost: `status` as the plan derived it; the executor adds what the enrichers read
    from the trainer and patches only if it differs. A refusal costs this patch, never the phase."""
    status: dict[str, Any]


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class CreateChildren:
    """Create (or, for a run that never started, replace) the ConfigMap, then create the Job: every object with
    dryRun=All first, then for real. `configmap_replace`: the ConfigMap body carries the resourceVersion read."""
    job: dict[str, Any]
    configmap: Optional[dict[str, Any]] = None
    configmap_replace: bool = False


@dataclass(frozen=True)
class DeleteJob:
    name: str
    uid: str
    label: str  # what Outcome.actions says, e.g. "deleted Job (suspend)"


@dataclass(frozen=True)
class StopJob:
    """parallelism: 0 (no more pods; the failed ones and their logs stay)."""
    name: str
    uid: str
    label: str = "stopped Job (failed)"


@dataclass(frozen=True)
class PatchJob:
    """A patch of the Job with its uid as a precondition (Job.spec.suspend, the deadline left, annotations)."""
    name: str
    uid: str
    patch: dict[str, Any]
    label: str


@dataclass(frozen=True)
class ReplaceConfigMap:
    """PUT of the run's ConfigMap (its resourceVersion a precondition): the active seconds of a deleted Job."""
    body: dict[str, Any]
    label: str = "recorded active seconds"


@dataclass(frozen=True)
class DeleteFineTuneJob:
    name: str
    uid: str
    label: str = "deleted FineTuneJob (TTL)"


Action = Any  # one of the dataclasses above


@dataclass(frozen=True)
class Inputs:
    """What one reconcile reads. `pods`: every trainer pod of the FineTuneJob (labelled and annotated for it, of
    any Job: the plan picks those of the live Job); `started_spec`: the spec in the ConfigMap (None: none);
    `live_spec`: the FineTuneJob's spec normalized by the API types (None: the plan normalizes it);
    `estimate`: the memory plan, needed when `needs_estimate()` says so, `estimate_new` when it was just made
    (its changes are announced once); `backoff_left`: seconds until a refused creation may be tried again
    (None: no pause)."""

    ftj: dict[str, Any]
    job: Optional[dict[str, Any]]
    configmap: Optional[dict[str, Any]]
    pods: list[dict[str, Any]]
    features: ServerFeatures
    now: datetime
    settings: OperatorSettings
    started_spec: Optional[dict[str, Any]] = None
    live_spec: Optional[dict[str, Any]] = None
    estimate: Optional[Estimate] = None
    estimate_new: bool = False
    backoff_left: Optional[float] = None


@dataclass
class Plan:
    """`first`: run before the status is derived (child changes, the dropped-fields condition); `status`: the
    derived status for the enrichers (None when the plan stopped early: nothing to enrich); `job`/`pods`: what the
    status was derived from (the Job as the actions leave it); `then`: the status patches, Job stop/delete,
    events, the TTL. `phase`, `retry_after`, `expires_in`: the reconcile's Outcome."""

    first: list[Action] = field(default_factory=list)
    then: list[Action] = field(default_factory=list)
    status: Optional[dict[str, Any]] = None
    job: Optional[dict[str, Any]] = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    phase: Optional[str] = None
    retry_after: Optional[float] = None
    expires_in: Optional[float] = None

    @property
    def actions(self) -> list[Action]:
        return self.first + self.then


# --- helpers ------------------------------------------------------------------------------------------------------
def owned_by(obj: dict[str, Any], ftj: dict[str, Any]) -> bool:
    return any(ref.get("uid") == ftj["metadata"]["uid"] for ref in obj["metadata"].get("ownerReferences") or [])


def deleting(obj: Optional[dict[str, Any]]) -> bool:
    return obj is not None and bool(obj["metadata"].get("deletionTimestamp"))


def needs_estimate(ftj: dict[str, Any], job: Optional[dict[str, Any]]) -> bool:
    """The memory plan is needed (and made, once per generation) before anything of the run is created."""
    old = ftj.get("status") or {}
    finished = old.get("phase") in FINISHED_PHASES or status_mod.job_finished(job)
    run_started = job is not None or bool(old.get("startTime"))
    return not finished and not run_started


def differs(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return any(old.get(key) != value for key, value in new.items())


def condition_reason(status: dict[str, Any], kind: str) -> Optional[str]:
    return next((c.get("reason") for c in status.get("conditions") or [] if c.get("type") == kind), None)


def has_true(status: dict[str, Any], kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True" for c in status.get("conditions") or [])


def condition_message(status: dict[str, Any], kind: str) -> str:
    for cond in status.get("conditions") or []:
        if cond.get("type") == kind:
            return cond.get("message") or ""
    return ""


def event_message(status: dict[str, Any]) -> str:
    reason = next((c.get("reason") for c in status["conditions"] if c["type"] == status["phase"]), None) \
        or next((c.get("reason") for c in status["conditions"] if c["type"] == "Running"), "")
    return f"{status['phase']} ({reason}): {status.get('message') or ''}"


def operator_refusal(spec: dict[str, Any]) -> Optional[str]:
    """What the schema cannot refuse at the door but the operator must, naming the field; None if nothing."""
    destination = (spec.get("output") or {}).get("destination") or ""
    if destination.startswith("file://"):
        return (f"spec.output.destination: {destination!r} is not on a volume in the trainer pod (only pvc:// "
                "claims are mounted; /tmp is an emptyDir): the model would be lost with the pod. Use "
                "pvc://CLAIM/path")
    return None


def dropped_fields(ftj: dict[str, Any]) -> list[str]:
    """Paths in the last-applied-configuration annotation (kubectl apply) missing from the stored object."""
    text = ((ftj.get("metadata") or {}).get("annotations") or {}).get(LAST_APPLIED)
    if not text:
        return []
    try:
        applied = json.loads(text)
    except ValueError:
        return []
    found: list[str] = []

    def walk(sent: Any, stored: Any, path: str) -> None:
        if isinstance(sent, dict) and isinstance(stored, dict):
            for key, value in sent.items():
                if value is None:
                    continue
                if key not in stored:
                    found.append(f"{path}.{key}" if path else key)
                else:
                    walk(value, stored[key], f"{path}.{key}" if path else key)
        elif isinstance(sent, list) and isinstance(stored, list) and len(sent) == len(stored):
            for index, (a, b) in enumerate(zip(sent, stored)):
                walk(a, b, f"{path}[{index}]")

    walk({k: v for k, v in applied.items() if k not in ("apiVersion", "kind", "metadata", "status")},
         {k: v for k, v in ftj.items() if k not in ("apiVersion", "kind", "metadata", "status")}, "")
    return found


def pods_of_job(pods: list[dict[str, Any]], job: Optional[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The pods the status is derived from: those of a live Job (its `controller-uid` label, set on every
    version), none of a Job about to be created, else every pod annotated for the FineTuneJob (a Job being
    deleted, or none)."""
    if job is not None and not deleting(job):
        uid = job["metadata"].get("uid")
        if uid is None:  # the Job this plan creates: no pod yet
            return []
        return [p for p in pods if (p["metadata"].get("labels") or {}).get("controller-uid") == uid]
    return [p for p in pods if (p["metadata"].get("annotations") or {}).get(builders.ANNOTATION_FTJ) == name]


def queue_of(job: Optional[dict[str, Any]]) -> Optional[str]:
    """The Kueue queue of the Job (the label build_job sets from spec.queueName): Kueue owns its suspend."""
    return ((job or {}).get("metadata", {}).get("labels") or {}).get(builders.LABEL_QUEUE)


def job_suspended(job: Optional[dict[str, Any]]) -> bool:
    return bool(((job or {}).get("spec") or {}).get("suspend"))


def _int_annotation(obj: Optional[dict[str, Any]], key: str) -> int:
    try:
        return max(0, int(((obj or {}).get("metadata", {}).get("annotations") or {}).get(key) or 0))
    except ValueError:
        return 0


def active_seconds(job: dict[str, Any], now: datetime) -> int:
    """Seconds the run has been active as this Job knows it: its annotation (earlier suspend periods, earlier
    Jobs) plus the open period (from status.startTime, which Kubernetes resets at each resume, to its finish or
    now; none while suspended)."""
    prior = _int_annotation(job, ANNOTATION_ACTIVE_SECONDS)
    start = status_mod.parse_time((job.get("status") or {}).get("startTime"))
    if job_suspended(job) or start is None:
        return prior
    done = status_mod.job_condition(job, "Complete") or status_mod.job_condition(job, "Failed")
    end = status_mod.parse_time((done or {}).get("lastTransitionTime")) or now
    return prior + max(0, int((end - start).total_seconds()))


def deadline_left(spec: dict[str, Any], used: int) -> Optional[int]:
    """The Job's activeDeadlineSeconds: what is left of the run's (at least 1: a spent budget fails the Job at
    once with DeadlineExceeded); None without a deadline."""
    total = spec.get("activeDeadlineSeconds")
    return max(1, int(total) - used) if total else None


def record_active(configmap: Optional[dict[str, Any]], seconds: int) -> list[Action]:
    """Keep the active seconds of a Job about to be deleted on the run's ConfigMap (the next Job starts there)."""
    if configmap is None or _int_annotation(configmap, ANNOTATION_ACTIVE_SECONDS) == seconds:
        return []
    body = copy.deepcopy(configmap)
    body["metadata"].setdefault("annotations", {})[ANNOTATION_ACTIVE_SECONDS] = str(seconds)
    return [ReplaceConfigMap(body)]


def _alive_or_stopping(pod: dict[str, Any]) -> bool:
    return deleting(pod) or (pod.get("status") or {}).get("phase") in (None, "Pending", "Running")


def _stopped_by_suspend(job: Optional[dict[str, Any]], pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pods of a suspended Job that its suspend deleted (the Job controller deletes the active pods; Kueue's
    preemption is a suspend too) and that ended as an interruption: not counted, like the pods of a Job deleted
    for a suspend on v1.20."""
    if job is None or deleting(job) or not job_suspended(job):
        return []
    stopped = []
    for pod in pods:
        attempt = status_mod.classify_pod(pod) if deleting(pod) else None
        if attempt is not None and attempt.kind == status_mod.INTERRUPTION:
            stopped.append(pod)
    return stopped


def _with_status(ftj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    """The FineTuneJob as an executed status patch leaves it (the executor updates its copy the same way)."""
    return {**ftj, "status": {**(ftj.get("status") or {}), **status}}


# --- refusals: nothing created, say why --------------------------------------------------------------------------
def blocked(ftj: dict[str, Any], now: datetime, reason: str, message: str) -> Plan:
    """Nothing can be created (a child name is taken, the spec is unusable, the API server refused a child):
    say so in status and once as a Warning event; the next reconcile after the cause is fixed proceeds."""
    old = ftj.get("status") or {}
    if old.get("phase") in FINISHED_PHASES:
        return Plan(phase=old["phase"])
    conditions = [{"type": "Running", "status": "False", "reason": reason, "message": message}]
    status = {"phase": Phase.Pending.value, "message": message, "observedGeneration":
              ftj["metadata"].get("generation"),
              "conditions": status_mod.merge_conditions(old.get("conditions") or [], conditions, now,
                                                        ftj["metadata"].get("generation"))}
    actions: list[Action] = []
    if differs(old, status):
        actions.append(PatchStatus(status))
    if condition_reason(old, "Running") != reason:
        actions.append(Event("Warning", reason, message))
    return Plan(then=actions, phase=Phase.Pending.value)


def estimate_status(ftj: dict[str, Any], planned: Estimate, status: dict[str, Any], now: datetime
                    ) -> dict[str, Any]:
    estimate = {**(planned.status or {}), "generation": ftj["metadata"].get("generation")}
    if planned.status is None:
        estimate["message"] = planned.condition["message"]
    kept = status.get("conditions") or []
    fits = status_mod.merge_conditions(kept, [planned.condition], now, ftj["metadata"].get("generation"))[0]
    # Fits first, then every other condition of `status` (merge_conditions alone would drop the phase
    # conditions: it expects them among the new ones).
    return {"estimate": estimate, "conditions": [fits] + [c for c in kept if c.get("type") != fits["type"]]}


def does_not_fit(ftj: dict[str, Any], now: datetime, planned: Estimate) -> Plan:
    """Refused before scheduling: Fits=False (with what would fit), phase Pending, one Warning event, no child.
    A changed spec (a new generation) is planned again."""
    old = ftj.get("status") or {}
    reason = planned.condition["reason"]
    status = {"phase": Phase.Pending.value, "message": planned.refusal,
              "observedGeneration": ftj["metadata"].get("generation")}
    status.update(estimate_status(ftj, planned, {"conditions": status_mod.merge_conditions(
        old.get("conditions") or [], [{"type": "Running", "status": "False", "reason": reason,
                                       "message": planned.refusal}], now, ftj["metadata"].get("generation"))},
        now))
    actions: list[Action] = []
    if differs(old, status):
        actions.append(PatchStatus(status))
    if condition_reason(old, "Fits") != reason or old.get("message") != planned.refusal:
        actions.append(Event("Warning", reason, planned.refusal))
    return Plan(then=actions, phase=Phase.Pending.value)


def dropped_fields_actions(ftj: dict[str, Any], now: datetime) -> list[Action]:
    """Fields the API server dropped (unknown to the schema; v1.20 drops them silently): those in `kubectl
    apply`'s last-applied-configuration the stored object lacks. Condition UnknownFields and one Warning event
    when the list changes."""
    dropped = dropped_fields(ftj)
    old = ftj.get("status") or {}
    before = next((c for c in old.get("conditions") or [] if c.get("type") == UNKNOWN_FIELDS), None)
    if not dropped and (before is None or before.get("status") == "False"):
        return []
    if dropped:
        message = ("the API server dropped fields the FineTuneJob schema does not have, so they have no "
                   f"effect: {', '.join(dropped)} (misspelled? see docs/api.md)")
        cond = {"type": UNKNOWN_FIELDS, "status": "True", "reason": "FieldsDropped", "message": message}
    else:
        cond = {"type": UNKNOWN_FIELDS, "status": "False", "reason": "NoneDropped",
                "message": "every applied field is in the schema"}
    if before and before.get("status") == cond["status"] and before.get("message") == cond["message"]:
        return []
    conditions = status_mod.merge_conditions(old.get("conditions") or [], [cond], now,
                                             ftj["metadata"].get("generation"))
    # merge_conditions puts the new one first and keeps the others: keep the original order instead.
    order = [c.get("type") for c in old.get("conditions") or []]
    conditions.sort(key=lambda c: order.index(c["type"]) if c["type"] in order else len(order))
    actions: list[Action] = [PatchStatus({"conditions": conditions})]
    if dropped:
        actions.append(Event("Warning", "UnknownFields", cond["message"]))
    return actions


def _expire(ftj: dict[str, Any], status: dict[str, Any], spec: dict[str, Any], now: datetime, plan: Plan) -> None:
    ttl = spec.get("ttlSecondsAfterFinished")
    done = status_mod.parse_time(status.get("completionTime"))
    if ttl is None or done is None:
        return
    left = (done + timedelta(seconds=ttl) - now).total_seconds()
    meta = ftj["metadata"]
    if left <= 0:
        # The FineTuneJob goes, and its Job, Pods and ConfigMap with it (ownerReferences): nothing remains that
        # could be recreated (Kubeflow #2991 deleted only the child and recreated it forever).
        plan.then.append(Event("Normal", "Expired", f"deleting the finished FineTuneJob: ttlSecondsAfterFinished "
                                                    f"({ttl}s) elapsed"))
        plan.then.append(DeleteFineTuneJob(meta["name"], meta["uid"]))
    else:
        plan.expires_in = left


def _deleted_view(job: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The Job as a Foreground deletion leaves it: still there, with a deletionTimestamp, until its pods are gone."""
    view = copy.deepcopy(job)
    view["metadata"]["deletionTimestamp"] = status_mod.rfc3339(now)
    return view


def _job_view(body: dict[str, Any]) -> dict[str, Any]:
    """The Job this plan creates, as the status reads it (no uid yet: no pods)."""
    view = copy.deepcopy(body)
    view["metadata"].pop("uid", None)
    return view


# --- the plan -----------------------------------------------------------------------------------------------------
def plan(inputs: Inputs) -> Plan:
    ftj, job, configmap, now = inputs.ftj, inputs.job, inputs.configmap, inputs.now
    meta = ftj["metadata"]
    name = meta["name"]
    old = ftj.get("status") or {}

    for child in (job, configmap):
        if child is not None and not owned_by(child, ftj):
            return blocked(ftj, now, "NameConflict", (
                f"{child['kind']} {child['metadata']['name']} already exists and is not owned by this "
                "FineTuneJob; delete or rename it"))
    live_spec = inputs.live_spec
    if live_spec is None:
        try:
            live_spec = builders.normalized(ftj)["spec"]
        except ValidationError as err:  # the CRD schema is generated from the same types, so this is rare
            problems = "; ".join(f"spec.{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}"
                                 for e in err.errors() if e["loc"][:1] == ("spec",))
            return blocked(ftj, now, "InvalidSpec", problems or str(err))

    result = Plan()
    # The spec the run started with is the one in its ConfigMap; later changes (other than the mutable fields) are
    # refused, and a Job recreated on resume uses the started spec. A ConfigMap whose run never started (its Job
    # was refused, or suspended before a pod ran) records nothing: the live spec is used and the ConfigMap
    # rewritten before the next Job.
    run_started = job is not None or bool(old.get("startTime"))
    started_spec = inputs.started_spec if run_started and configmap is not None else None
    result.first += dropped_fields_actions(ftj, now)
    for action in result.first:
        if isinstance(action, PatchStatus):
            ftj = _with_status(ftj, action.status)
    old = ftj.get("status") or {}
    changed = status_mod.spec_changes(started_spec, live_spec)
    effective = dict(ftj)
    if started_spec is not None:
        effective["spec"] = {**started_spec,
                             **{k: v for k, v in live_spec.items() if k in status_mod.MUTABLE_SPEC_FIELDS}}
        for key in status_mod.MUTABLE_SPEC_FIELDS - set(live_spec):
            effective["spec"].pop(key, None)

    finished = old.get("phase") in FINISHED_PHASES or status_mod.job_finished(job)
    # The memory plan, before anything is scheduled (operator/estimate.py): a spec that cannot fit its budget is
    # refused with what would fit, and nothing is created. Planned once per generation.
    planned = inputs.estimate if not finished and not run_started else None
    if planned is not None and inputs.estimate_new and planned.changes:
        changes = "; ".join(f"{c['field']}={c['value']}: {c['planned']}" for c in planned.changes)
        result.first.append(Event("Normal", "PlanChangedFields", f"the plan runs these fields differently: "
                                                                 f"{changes} (status.estimate.changes says why)"))
    if planned is not None and planned.refusal:
        refused = does_not_fit(ftj, now, planned)
        refused.first = result.first + refused.first
        return refused
    deadline = bool(effective["spec"].get("activeDeadlineSeconds"))
    status_spec = effective["spec"]
    if not finished:
        if effective["spec"].get("suspend"):
            if job is not None and not deleting(job):
                job = _suspend(inputs, ftj, job, deadline, result)
        elif job is None:
            refusal = builders.image_refusal(effective["spec"], inputs.settings)
            if refusal:
                return _after(result, blocked(ftj, now, "ImageNotAllowed", refusal))
            # Per-job pod settings beyond what this install allows (the chart's trainer.jobPodSettings).
            refused_settings = builders.pod_settings_refusal(effective["spec"], inputs.settings)
            if refused_settings:
                return _after(result, blocked(ftj, now, *refused_settings))
            if planned is not None and planned.status:
                # The plan made in this pass (its budget, the model's size) reaches the pod before it is stored.
                effective["status"] = {**old, "estimate": planned.status}
            # Counted on earlier Jobs of this run (suspend/resume, a recreate) carry over to the new one.
            job_body = builders.build_job(effective, inputs.settings, inputs.features,
                                          int(old.get("interruptions") or 0), int(old.get("failures") or 0))
            refusal = operator_refusal(effective["spec"])
            if refusal:
                return _after(result, blocked(ftj, now, "InvalidSpec", refusal))
            if inputs.backoff_left is not None and inputs.backoff_left > 0:
                return _after(result, Plan(phase=old.get("phase"), retry_after=inputs.backoff_left))
            # Earlier Jobs of this run were active that long (a pending pod counts, as for Kubernetes' deadline):
            # the new one gets what is left.
            used = _int_annotation(configmap, ANNOTATION_ACTIVE_SECONDS) if deadline else 0
            if used:
                job_body["metadata"]["annotations"][ANNOTATION_ACTIVE_SECONDS] = str(used)
                job_body["spec"]["activeDeadlineSeconds"] = deadline_left(effective["spec"], used)
            cm_body = builders.build_configmap(ftj, inputs.settings)
            if used:  # a ConfigMap rewritten (the run never started) keeps the count
                cm_body["metadata"]["annotations"][ANNOTATION_ACTIVE_SECONDS] = str(used)
            stale = configmap is not None and not run_started and (configmap.get("data") or {}) != cm_body["data"]
            if configmap is None:
                result.first.append(CreateChildren(job_body, cm_body))
            elif stale:  # the run never started: record the spec it starts with now
                cm_body["metadata"]["resourceVersion"] = configmap["metadata"]["resourceVersion"]
                result.first.append(CreateChildren(job_body, cm_body, configmap_replace=True))
            else:
                result.first.append(CreateChildren(job_body))
            job = _job_view(job_body)
        elif deleting(job):
            # Resumed while the suspended Job's pod is still stopping: create the new Job once it is gone; until
            # then the status says the pod is stopping (it read "Running" from the stopping trainer before).
            result.retry_after = 1.0
            if old.get("phase") == Phase.Suspended.value:
                status_spec = {**effective["spec"], "suspend": True}
        elif inputs.features.job_suspend and job_suspended(job) and not queue_of(job):
            # Resumed, the Job suspended by us (a Job of a queue is Kueue's to unsuspend, never ours). Not while
            # a pod of it still stops: 1.22-1.28 have no podReplacementPolicy, and two trainers would write one
            # output; until then the status says the pod is stopping.
            stopping = [p for p in pods_of_job(inputs.pods, job, name) if _alive_or_stopping(p)]
            if stopping:
                result.retry_after = 1.0
                status_spec = {**effective["spec"], "suspend": True}
            else:
                patch: dict[str, Any] = {"metadata": {"uid": job["metadata"]["uid"]}, "spec": {"suspend": False}}
                if deadline:
                    patch["spec"]["activeDeadlineSeconds"] = deadline_left(effective["spec"],
                                                                           active_seconds(job, now))
                result.first.append(PatchJob(job["metadata"]["name"], job["metadata"]["uid"], patch,
                                             "resumed Job"))
                job = _patched_view(job, patch)

    all_pods = pods_of_job(inputs.pods, job, name)
    stopped = _stopped_by_suspend(job, all_pods)
    pods = [p for p in all_pods if not any(p is s for s in stopped)]
    live = {**ftj, "spec": status_spec}
    status_job = job
    if job is not None and _int_annotation(job, ANNOTATION_ACTIVE_SECONDS) and status_spec.get(
            "activeDeadlineSeconds"):
        # The Job's activeDeadlineSeconds is what was left of the run's: DeadlineExceeded names the run's.
        status_job = copy.deepcopy(job)
        status_job["spec"]["activeDeadlineSeconds"] = status_spec["activeDeadlineSeconds"]
    new_status = status_mod.derive_status(live, status_job, pods, now, changed, seen_pods=all_pods)
    if stopped:  # not counted, but what they said of their checkpoint stands
        checkpoint, output, _ = status_mod.checkpoint_and_output(status_spec, old, all_pods)
        new_status.update({k: v for k, v in (("checkpoint", checkpoint), ("output", output)) if v})
    if planned is not None:
        new_status.update(estimate_status(ftj, planned, new_status, now))
    result.status, result.job, result.pods = new_status, job, all_pods
    result.phase = new_status["phase"]
    result.then = after_status(ftj, old, job, new_status, changed, effective["spec"], now, result,
                               configmap if deadline else None)
    return result


def _patched_view(job: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    view = copy.deepcopy(job)
    view["metadata"].setdefault("annotations", {}).update(patch.get("metadata", {}).get("annotations") or {})
    view["spec"].update(patch.get("spec") or {})
    return view


def _suspend(inputs: Inputs, ftj: dict[str, Any], job: dict[str, Any], deadline: bool, result: Plan
             ) -> dict[str, Any]:
    """spec.suspend=true on a live Job; returns the Job as the actions leave it.

    Servers with Job.spec.suspend (ServerFeatures.job_suspend): the Job's spec.suspend=true (its controller
    deletes the pod; SIGTERM, the grace period, the interrupt checkpoint), the Job, its pods' history and its
    counts stay. A Job of a queue too: suspend is Kueue's field, but a user's suspend is a stop; if Kueue
    unsuspends it again for the same generation (it starts the Jobs of admitted Workloads), the operator does
    not fight it: it deletes the Job (Kueue drops the Workload and its quota) and recreates it, suspended and
    queued, on resume. v1.20 (no Job.spec.suspend): the Job is deleted (Foreground) and recreated on resume."""
    meta, now = job["metadata"], inputs.now
    generation = str(ftj["metadata"].get("generation"))
    if inputs.features.job_suspend:
        marked = (meta.get("annotations") or {}).get(ANNOTATION_SUSPENDED_GENERATION) == generation
        if job_suspended(job) and (marked or not queue_of(job)):
            return job
        # (A queued Job, still suspended, is marked too: when Kueue admits it, it is not the user's to run.)
        if not (queue_of(job) and marked):
            patch: dict[str, Any] = {"metadata": {"uid": meta["uid"], "annotations": {
                ANNOTATION_SUSPENDED_GENERATION: generation}}, "spec": {"suspend": True}}
            if deadline:
                patch["metadata"]["annotations"][ANNOTATION_ACTIVE_SECONDS] = str(active_seconds(job, now))
            result.first.append(PatchJob(meta["name"], meta["uid"], patch, "suspended Job"))
            return _patched_view(job, patch)
        result.first.append(Event("Warning", "KueueUnsuspended", (
            f"Kueue started Job {meta['name']} of queue {queue_of(job)} again after the operator suspended it; "
            "deleting the Job instead (Kueue drops its Workload); spec.suspend=false creates it again, queued")))
    if deadline:
        result.first += record_active(inputs.configmap, active_seconds(job, now))
    result.first.append(DeleteJob(meta["name"], meta["uid"], "deleted Job (suspend)"))
    return _deleted_view(job, now)


def _after(prelude: Plan, tail: Plan) -> Plan:
    tail.first = prelude.first + tail.first
    return tail


def after_status(ftj: dict[str, Any], old: dict[str, Any], job: Optional[dict[str, Any]],
                 new_status: dict[str, Any], changed: list[str], spec: dict[str, Any], now: datetime,
                 result: Plan, deadline_configmap: Optional[dict[str, Any]] = None) -> list[Action]:
    """What follows from the derived status: its patches (phase and conditions first, in a patch of their own;
    then progress/cost, read from the trainer, which the user's code runs in: a value the API server refuses there
    costs that patch, never the phase), the Job stopped or deleted when the run's counts say so, the events,
    the TTL."""
    then: list[Action] = []
    phase_status = {k: v for k, v in new_status.items() if k not in BEST_EFFORT_STATUS}
    if differs(old, phase_status):
        then.append(PatchStatus(phase_status))
    then.append(PatchBestEffortStatus({k: v for k, v in new_status.items() if k in BEST_EFFORT_STATUS}))
    if job is not None and not deleting(job) and job["metadata"].get("uid") is not None:
        if (new_status["phase"] == Phase.Failed.value and not status_mod.job_finished(job)
                and (job.get("spec") or {}).get("parallelism") != 0):
            # Failed by the run's own counts while the Job would retry (v1.20 has no podFailurePolicy; too many
            # interruptions): no more pods; the failed ones (and their logs) stay.
            then.append(StopJob(job["metadata"]["name"], job["metadata"]["uid"]))
        elif condition_reason(new_status, "Running") == status_mod.RESUMING and status_mod.job_finished(job):
            # The Job gave up on interruptions: deleted, and recreated once gone (the counts carry over; with a
            # deadline, the seconds it was active too).
            then += record_active(deadline_configmap, active_seconds(job, now)) if deadline_configmap else []
            then.append(DeleteJob(job["metadata"]["name"], job["metadata"]["uid"], "deleted Job (recreate to resume)"))
    if new_status["phase"] != old.get("phase"):
        kind = "Warning" if new_status["phase"] in WARNING_PHASES else "Normal"
        then.append(Event(kind, new_status["phase"], event_message(new_status)))
    if new_status["phase"] == Phase.Pending.value:
        # Stuck or retrying without a phase change (Unschedulable, ImagePullBackOff, a failed attempt): a Warning
        # the first time each reason appears, so `kubectl describe` shows why.
        reason = condition_reason(new_status, "Running")
        if reason != condition_reason(old, "Running") and reason not in QUIET_PENDING_REASONS:
            then.append(Event("Warning", reason, condition_message(new_status, "Running")))
    if changed and not has_true(old, status_mod.SPEC_LOCKED):
        then.append(Event("Warning", "SpecChangeRefused", condition_message(new_status, "SpecLocked")))
    result.then = then
    if new_status["phase"] in FINISHED_PHASES:
        _expire(ftj, new_status, spec, now, result)
    return result.then
