"""The reconcile's decision (operator/plan.py) as a table of scenarios: hand-written FineTuneJob, Job, ConfigMap and
Pod dicts in, the actions and the status out, for a v1.20 server (the local control plane) and newer ones whose
behaviour the local control plane cannot run. No cluster, no API calls."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Optional

import pytest

from kubesloth.api.contract import ExitCode
from kubesloth.operator import builders, plan as plan_mod
from kubesloth.operator.estimate import Estimate
from kubesloth.operator.settings import OperatorSettings, ServerFeatures

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=timezone.utc)
T_START = "2026-12-01T11:00:00Z"
SETTINGS = OperatorSettings(trainer_image="default/trainer:1")
V1_20, V1_24, V1_26, V1_29 = (ServerFeatures(1, 20), ServerFeatures(1, 24), ServerFeatures(1, 26),
                              ServerFeatures(1, 29))
NEWER = [V1_24, V1_26, V1_29]
ALL = [V1_20] + NEWER


# --- the objects, as the API server would return them ------------------------------------------------------------
def make_ftj(status: dict | None = None, generation: int = 2, **spec: Any) -> dict:
    body = {"apiVersion": "kubesloth.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "run", "namespace": "ml", "uid": "ftj-uid", "generation": generation,
                         "resourceVersion": "100"},
            "spec": {"model": {"source": "pvc://models/tiny-llama"},
                     "dataset": {"source": "pvc://data/alpaca.jsonl"},
                     "training": {"maxSteps": 10},
                     "output": {"destination": "pvc://outputs/run"},
                     "backoffLimit": 1, "maxInterruptions": 3, **spec}}
    if status is not None:
        body["status"] = status
    return body


def started(interruptions: int = 0, failures: int = 0, phase: str = "Running", **more: Any) -> dict:
    """A status of a run that started (its first pod ran)."""
    return {"phase": phase, "startTime": T_START, "interruptions": interruptions, "failures": failures,
            "jobName": "run-trainer", "conditions": [], **more}


def make_configmap(ftj: dict) -> dict:
    body = builders.build_configmap(ftj, SETTINGS)
    body["metadata"].update(uid="cm-uid", resourceVersion="7")
    return body


def make_job(ftj: dict, features: ServerFeatures, conditions: list | None = None, deleting: bool = False,
             suspend: Optional[bool] = None, prior: tuple[int, int] = (0, 0), **spec: Any) -> dict:
    body = builders.build_job(ftj, SETTINGS, features, *prior)
    body["metadata"].update(uid="job-uid", creationTimestamp=T_START, resourceVersion="55")
    if deleting:
        body["metadata"]["deletionTimestamp"] = "2026-12-01T11:59:00Z"
    if suspend is not None:
        body["spec"]["suspend"] = suspend
    body["spec"].update(spec)
    body["status"] = {"startTime": T_START, "conditions": conditions or []}
    return body


def job_condition(kind: str, reason: str, message: str = "") -> dict:
    return {"type": kind, "status": "True", "reason": reason, "message": message,
            "lastTransitionTime": "2026-12-01T11:50:00Z"}


def make_pod(name: str, phase: str, state: dict | None = None, job_uid: str = "job-uid", reason: str | None = None,
             conditions: list | None = None, deleting: bool = False, created: str = T_START) -> dict:
    status: dict[str, Any] = {"phase": phase, "conditions": conditions or []}
    if reason:
        status["reason"] = reason
    if state is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": state}]
    meta = {"name": name, "namespace": "ml", "uid": f"{name}-uid", "creationTimestamp": created,
            "labels": {builders.LABEL_FTJ: "run", "controller-uid": job_uid},
            "annotations": {builders.ANNOTATION_FTJ: "run"}}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-01T11:59:00Z"
    return {"metadata": meta, "spec": {"terminationGracePeriodSeconds": 600}, "status": status}


def running(name: str = "run-trainer-a", **kw: Any) -> dict:
    return make_pod(name, "Running", {"running": {"startedAt": "2026-12-01T11:01:00Z"}}, **kw)


def ended(name: str, code: int, reason: str = "Error", created: str = T_START, **kw: Any) -> dict:
    return make_pod(name, "Failed", {"terminated": {"exitCode": code, "reason": reason, "message": "",
                                                    "startedAt": "2026-12-01T11:01:00Z"}}, created=created, **kw)


FITS = Estimate(status={"fits": True, "peakBytes": 1}, condition={"type": "Fits", "status": "True",
                                                                  "reason": "Fits", "message": "fits in 24 GiB"})
NO_FIT = Estimate(status={"fits": False}, condition={"type": "Fits", "status": "False", "reason": "DoesNotFit",
                                                     "message": "needs 90 GiB"},
                  refusal_field="spec.resources.gpuMemoryGiB", refusal="needs 90 GiB of 24 GiB: use lean")


# --- reading a plan -----------------------------------------------------------------------------------------------
def summary(plan: plan_mod.Plan) -> list[str]:
    """The plan's actions other than status patches, in order, as short strings."""
    said = []
    for action in plan.actions:
        if isinstance(action, plan_mod.CreateChildren):
            cm = "" if action.configmap is None else ("replace ConfigMap, " if action.configmap_replace
                                                      else "create ConfigMap, ")
            said.append(f"{cm}create Job")
        elif isinstance(action, (plan_mod.DeleteJob, plan_mod.StopJob, plan_mod.DeleteFineTuneJob)):
            said.append(action.label)
        elif isinstance(action, plan_mod.Event):
            said.append(f"event {action.type} {action.reason}")
        elif isinstance(action, (plan_mod.PatchStatus, plan_mod.PatchBestEffortStatus)):
            continue
        else:
            said.append(describe(action))
    return said


def describe(action: Any) -> str:
    if isinstance(action, (plan_mod.PatchJob, plan_mod.ReplaceConfigMap)):
        return action.label
    return type(action).__name__


def created_job(plan: plan_mod.Plan) -> dict:
    return next(a.job for a in plan.actions if isinstance(a, plan_mod.CreateChildren))


def running_reason(status: dict) -> str:
    return next(c["reason"] for c in status["conditions"] if c["type"] == "Running")


def status_patch(plan: plan_mod.Plan) -> dict:
    """Everything the plan writes to status, merged."""
    merged: dict = {}
    for action in plan.actions:
        if isinstance(action, plan_mod.PatchStatus):
            merged.update(action.status)
    return merged


# --- the table ----------------------------------------------------------------------------------------------------
@dataclass
class Scenario:
    name: str
    features: list[ServerFeatures]
    given: Callable[[ServerFeatures], dict]  # -> Inputs keyword arguments (ftj, job, configmap, pods, ...)
    phase: Optional[str]
    reason: Optional[str] = None  # the Running condition's reason (None: not checked)
    actions: list[str] = field(default_factory=list)
    check: Optional[Callable[[plan_mod.Plan, ServerFeatures], None]] = None
    retry_after: Optional[float] = None


def new_job(f):
    return {"ftj": make_ftj(), "estimate": FITS, "estimate_new": True}


def check_new_job(plan, features):
    job = created_job(plan)
    assert ("podFailurePolicy" in job["spec"]) == features.pod_failure_policy
    assert ("podReplacementPolicy" in job["spec"]) == features.pod_replacement_policy
    assert "suspend" not in job["spec"]  # no queue: runs at once
    assert plan.status["jobName"] == "run-trainer" and plan.pods == []
    conditions = {c["type"]: c["status"] for c in status_patch(plan)["conditions"]}
    # the phase conditions and Fits in the first status (the estimate's merge once dropped the phase ones)
    assert conditions == {"Fits": "True", "Running": "False", "Succeeded": "False", "Failed": "False",
                          "Suspended": "False"}


def queued_new_job(f):
    return {"ftj": make_ftj(queueName="team-a"), "estimate": FITS}


def check_queued(plan, features):
    job = created_job(plan)
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"][builders.LABEL_QUEUE] == "team-a"


def does_not_fit(f):
    return {"ftj": make_ftj(), "estimate": NO_FIT, "estimate_new": True}


def check_nothing_created(plan, features):
    assert not any(isinstance(a, plan_mod.CreateChildren) for a in plan.actions)
    assert status_patch(plan)["message"] == NO_FIT.refusal
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status_patch(plan)["conditions"]}
    assert conditions == {"Fits": ("False", "DoesNotFit"), "Running": ("False", "DoesNotFit")}


def running_run(f):
    ftj = make_ftj(started())
    return {"ftj": ftj, "job": make_job(ftj, f), "configmap": make_configmap(ftj), "pods": [running()]}


def interrupted(code_or_pod):
    def given(f):
        ftj = make_ftj(started())
        return {"ftj": ftj, "job": make_job(ftj, f), "configmap": make_configmap(ftj), "pods": [code_or_pod()]}
    return given


def exit6():
    return ended("run-trainer-a", int(ExitCode.INTERRUPTED))


def evicted():
    pod = ended("run-trainer-a", 137, reason="Error")
    pod["status"].update(reason="Evicted", message="The node was low on resource: memory.")
    return pod


def disruption():
    return ended("run-trainer-a", 143, conditions=[{"type": "DisruptionTarget", "status": "True",
                                                    "reason": "PreemptionByScheduler", "message": "preempted"}])


def check_counted_as_interruption(plan, features):
    assert plan.status["interruptions"] == 1 and plan.status["failures"] == 0


def failed_past_backoff_v120(f):
    ftj = make_ftj(started(failures=1))
    job = make_job(ftj, f, prior=(0, 1))
    return {"ftj": ftj, "job": job, "configmap": make_configmap(ftj),
            "pods": [ended("run-trainer-b", 1, created="2026-12-01T11:30:00Z")]}


def failed_past_backoff_newer(f):
    ftj = make_ftj(started(failures=1))
    job = make_job(ftj, f, prior=(0, 1), conditions=[job_condition("Failed", "BackoffLimitExceeded")])
    return {"ftj": ftj, "job": job, "configmap": make_configmap(ftj),
            "pods": [ended("run-trainer-b", 1, created="2026-12-01T11:30:00Z")]}


def check_failed(plan, features):
    assert plan.status["failures"] == 2 and plan.status["completionTime"]


def suspend_running(f):
    ftj = make_ftj(started(), suspend=True)
    return {"ftj": ftj, "job": make_job(ftj, f), "configmap": make_configmap(ftj), "pods": [running()]}


def suspended_no_job(f):
    ftj = make_ftj(started(interruptions=1, phase="Suspended"), suspend=True)
    return {"ftj": ftj, "job": None, "configmap": make_configmap(ftj), "pods": []}


def resumed_job_still_deleting(f):
    ftj = make_ftj(started(interruptions=1, phase="Suspended"))
    return {"ftj": ftj, "job": make_job(ftj, f, deleting=True), "configmap": make_configmap(ftj),
            "pods": [running(deleting=True)]}


def resumed_job_gone(f):
    ftj = make_ftj(started(interruptions=2, failures=1, phase="Suspended"))
    return {"ftj": ftj, "job": None, "configmap": make_configmap(ftj), "pods": []}


def check_counts_carried(plan, features):
    job = created_job(plan)
    assert job["metadata"]["annotations"][builders.ANNOTATION_PRIOR_INTERRUPTIONS] == "2"
    assert job["metadata"]["annotations"][builders.ANNOTATION_PRIOR_FAILURES] == "1"
    assert plan.status["interruptions"] == 2 and plan.status["failures"] == 1
    assert not any(isinstance(a, plan_mod.CreateChildren) and a.configmap for a in plan.actions)  # the record stays


def job_deleted_by_hand(f):
    """Someone deleted the Job of a running run (or it was recreated): a new one, the started spec, the counts."""
    first = make_ftj(started(interruptions=1))
    ftj = make_ftj(started(interruptions=1), training={"maxSteps": 99})  # edited since: locked
    return {"ftj": ftj, "job": None, "configmap": make_configmap(first), "pods": [],
            "started_spec": builders.normalized(first)["spec"]}


def check_started_spec(plan, features):
    job = created_job(plan)
    assert job["metadata"]["annotations"][builders.ANNOTATION_PRIOR_INTERRUPTIONS] == "1"
    locked = next(c for c in status_patch(plan)["conditions"] if c["type"] == "SpecLocked")
    assert locked["status"] == "True" and "spec.training.maxSteps" in locked["message"]


def resuming_after_job_gave_up(f):
    """A Job without podFailurePolicy counted interruptions as failures and gave up: recreate to resume."""
    ftj = make_ftj(started())
    job = make_job(ftj, f, conditions=[job_condition("Failed", "BackoffLimitExceeded")])
    return {"ftj": ftj, "job": job, "configmap": make_configmap(ftj),
            "pods": [ended("run-trainer-a", int(ExitCode.INTERRUPTED))]}


def deadline(f):
    ftj = make_ftj(started(), activeDeadlineSeconds=3600)
    job = make_job(ftj, f, conditions=[job_condition("Failed", "DeadlineExceeded")])
    return {"ftj": ftj, "job": job, "configmap": make_configmap(ftj), "pods": [running()]}


def deadline_after_resume(f):
    """The Job got what was left (600 of 3600 s) and used it up: the message names the run's deadline."""
    given = deadline(f)
    given["job"]["spec"]["activeDeadlineSeconds"] = 600
    given["job"]["metadata"]["annotations"][plan_mod.ANNOTATION_ACTIVE_SECONDS] = "3000"
    return given


def check_deadline_message(plan, features):
    assert "activeDeadlineSeconds (3600s)" in plan.status["message"], plan.status["message"]


def succeeded(ttl, done_minutes_ago):
    def given(f):
        done = (NOW - timedelta(minutes=done_minutes_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
        ftj = make_ftj(started(phase="Succeeded", completionTime=done), ttlSecondsAfterFinished=ttl)
        job = make_job(ftj, f, conditions=[job_condition("Complete", "Completed")])
        job["status"]["completionTime"] = done
        pod = make_pod("run-trainer-a", "Succeeded", {"terminated": {"exitCode": 0, "reason": "Completed"}})
        return {"ftj": ftj, "job": job, "configmap": make_configmap(ftj), "pods": [pod]}
    return given


def check_expires_in(plan, features):
    assert plan.expires_in == pytest.approx(1800)


def name_conflict(f):
    ftj = make_ftj()
    job = make_job(ftj, f)
    job["metadata"]["ownerReferences"] = [{"uid": "someone-else"}]
    return {"ftj": ftj, "job": job, "estimate": FITS}


def backoff_pause(f):
    return {"ftj": make_ftj(), "estimate": FITS, "backoff_left": 40.0}


SCENARIOS = [
    Scenario("new job fits", ALL, new_job, "Pending", "PodCreating",
             ["create ConfigMap, create Job", "event Normal Pending"], check_new_job),
    Scenario("new job with a queue: created suspended for Kueue", ALL, queued_new_job, "Queued", "Queued",
             ["create ConfigMap, create Job", "event Normal Queued"], check_queued),
    Scenario("does not fit: refused, nothing created", ALL, does_not_fit, "Pending", "DoesNotFit",
             ["event Warning DoesNotFit"], check_nothing_created),
    Scenario("running", ALL, running_run, "Running", "TrainerRunning", []),
    Scenario("interrupted: exit 6", ALL, interrupted(exit6), "Pending", "Interrupted",
             ["event Normal Pending", "event Warning Interrupted"], check_counted_as_interruption),
    Scenario("interrupted: Evicted", ALL, interrupted(evicted), "Pending", "Evicted",
             ["event Normal Pending", "event Warning Evicted"], check_counted_as_interruption),
    Scenario("interrupted: DisruptionTarget", NEWER, interrupted(disruption), "Pending", "Preempted",
             ["event Normal Pending", "event Warning Preempted"], check_counted_as_interruption),
    Scenario("failed past backoff: the operator stops the Job (no podFailurePolicy)", [V1_20],
             failed_past_backoff_v120, "Failed", "TrainerError", ["stopped Job (failed)", "event Warning Failed"],
             check_failed),
    Scenario("failed past backoff: the Job itself gave up", [V1_26, V1_29], failed_past_backoff_newer, "Failed",
             "TrainerError", ["event Warning Failed"], check_failed),
    Scenario("suspended with no Job: nothing to do", ALL, suspended_no_job, "Suspended", "Suspended", []),
    Scenario("resumed while the old Job is still deleting: wait, the pod is stopping", ALL,
             resumed_job_still_deleting, "Suspended", "Suspending", [], retry_after=1.0),
    Scenario("resumed: a new Job, the counts carried over", ALL, resumed_job_gone, "Pending", "PodCreating",
             ["create Job", "event Normal Pending"], check_counts_carried),
    Scenario("Job deleted by hand: recreated from the started spec", ALL, job_deleted_by_hand, "Pending",
             "PodCreating", ["create Job", "event Normal Pending", "event Warning SpecChangeRefused"],
             check_started_spec),
    Scenario("the Job gave up on interruptions: recreated to resume", ALL, resuming_after_job_gave_up, "Pending",
             "Resuming", ["deleted Job (recreate to resume)", "event Normal Pending", "event Warning Resuming"]),
    Scenario("deadline exceeded", ALL, deadline, "Failed", "DeadlineExceeded", ["event Warning Failed"],
             check_deadline_message),
    Scenario("deadline exceeded after a resume", ALL, deadline_after_resume, "Failed", "DeadlineExceeded",
             ["event Warning Failed"], check_deadline_message),
    Scenario("TTL elapsed: the FineTuneJob is deleted", ALL, succeeded(600, 30), "Succeeded", None,
             ["event Normal Expired", "deleted FineTuneJob (TTL)"]),
    Scenario("TTL not yet", ALL, succeeded(3600, 30), "Succeeded", None, [], check_expires_in),
    Scenario("a child name taken by someone else", ALL, name_conflict, "Pending", "NameConflict",
             ["event Warning NameConflict"]),
    Scenario("a refused creation waits out its backoff", ALL, backoff_pause, None, None, [], retry_after=40.0),
]

# --- suspend/resume: v1.20 deletes and recreates the Job; servers with Job.spec.suspend (>= 1.22) suspend it -----
GEN = "2"  # make_ftj's generation


def check_suspend_patch(plan, features):
    patch = next(a.patch for a in plan.actions if isinstance(a, plan_mod.PatchJob))
    assert patch == {"metadata": {"uid": "job-uid", "annotations": {plan_mod.ANNOTATION_SUSPENDED_GENERATION: GEN}},
                     "spec": {"suspend": True}}
    assert plan.job["spec"]["suspend"] is True and not plan.job["metadata"].get("deletionTimestamp")


def suspended_job(f, pods=(), queue=None, marked=True, **status):
    ftj = make_ftj(started(phase="Suspended", **status), suspend=True, **({"queueName": queue} if queue else {}))
    job = make_job(ftj, f, suspend=True, prior=(status.get("interruptions", 0), status.get("failures", 0)))
    if marked:
        job["metadata"]["annotations"][plan_mod.ANNOTATION_SUSPENDED_GENERATION] = GEN
    return {"ftj": ftj, "job": job, "configmap": make_configmap(ftj), "pods": list(pods)}


def stopped_by_suspend(f):
    """The Job controller deleted the pod for the suspend; the trainer checkpointed at step 40 and exited 6."""
    from kubesloth.api.contract import with_state

    pod = ended("run-trainer-a", int(ExitCode.INTERRUPTED), deleting=True)
    pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = with_state(
        "checkpointed", {"checkpoint": {"step": 40, "path": "checkpoint-40"}, "interrupt": "written"})
    earlier = ended("run-trainer-0", 1, created="2026-12-01T10:00:00Z")  # a failure before the suspend: counted
    return suspended_job(f, pods=[earlier, pod], failures=0)


def check_not_counted(plan, features):
    assert plan.status["interruptions"] == 0 and plan.status["failures"] == 1  # the earlier failure only
    assert plan.status["checkpoint"]["step"] == 40 and plan.status["checkpoint"]["interruptCheckpoint"] == "Written"


def resumed(f, pods=(), **kw):
    given = suspended_job(f, pods=pods, interruptions=1, failures=1, **kw)
    given["ftj"] = make_ftj(given["ftj"]["status"], generation=3, **{k: v for k, v in given["ftj"]["spec"].items()
                                                                      if k != "suspend"})
    return given


def check_resume_patch(plan, features):
    patch = next(a.patch for a in plan.actions if isinstance(a, plan_mod.PatchJob))
    assert patch == {"metadata": {"uid": "job-uid"}, "spec": {"suspend": False}}
    assert plan.status["interruptions"] == 1 and plan.status["failures"] == 1  # the Job's prior-* annotations


def kueue_running(f):
    ftj = make_ftj(started(), suspend=True, queueName="team-a")
    return {"ftj": ftj, "job": make_job(ftj, f, suspend=False), "configmap": make_configmap(ftj), "pods": [running()]}


def kueue_readmitted(f):
    given = kueue_running(f)
    given["job"]["metadata"]["annotations"][plan_mod.ANNOTATION_SUSPENDED_GENERATION] = GEN
    return given


def kueue_preempted(f):
    """Kueue suspended the Job to preempt it (the FineTuneJob is not suspended): the stopped pod is no failure and
    no interruption; Kueue readmits it."""
    ftj = make_ftj(started(), queueName="team-a")
    job = make_job(ftj, f, suspend=True)
    return {"ftj": ftj, "job": job, "configmap": make_configmap(ftj),
            "pods": [ended("run-trainer-a", int(ExitCode.INTERRUPTED), deleting=True)]}


def check_kueue_preempted(plan, features):
    assert plan.status["interruptions"] == 0 and plan.status["failures"] == 0


# --- the activeDeadlineSeconds budget survives suspend/resume ----------------------------------------------------
def deadline_suspend(f):
    ftj = make_ftj(started(), suspend=True, activeDeadlineSeconds=7200)
    job = make_job(ftj, f)
    job["metadata"]["annotations"][plan_mod.ANNOTATION_ACTIVE_SECONDS] = "600"  # an earlier period
    return {"ftj": ftj, "job": job, "configmap": make_configmap(ftj), "pods": [running()]}


def check_deadline_suspend_patch(plan, features):
    patch = next(a.patch for a in plan.actions if isinstance(a, plan_mod.PatchJob))
    # 600 s before + 11:00 -> 12:00 in this period
    assert patch["metadata"]["annotations"][plan_mod.ANNOTATION_ACTIVE_SECONDS] == "4200"


def check_deadline_recorded(plan, features):
    body = next(a.body for a in plan.actions if isinstance(a, plan_mod.ReplaceConfigMap))
    assert body["metadata"]["annotations"][plan_mod.ANNOTATION_ACTIVE_SECONDS] == "4200"
    assert body["metadata"]["resourceVersion"] == "7"  # a precondition: a stale read is refused (409)


def deadline_resume(used):
    def given(f):
        ftj = make_ftj(started(phase="Suspended"), generation=3, activeDeadlineSeconds=7200)
        job = make_job(ftj, f, suspend=True)
        job["metadata"]["annotations"][plan_mod.ANNOTATION_ACTIVE_SECONDS] = str(used)
        job["status"].pop("startTime")  # Kubernetes clears it while suspended and sets it again on resume
        return {"ftj": ftj, "job": job, "configmap": make_configmap(ftj), "pods": []}
    return given


def check_deadline_left(left):
    def check(plan, features):
        patch = next(a.patch for a in plan.actions if isinstance(a, plan_mod.PatchJob))
        assert patch["spec"] == {"suspend": False, "activeDeadlineSeconds": left}
    return check


def deadline_recreate(f):
    ftj = make_ftj(started(phase="Suspended"), generation=3, activeDeadlineSeconds=7200)
    configmap = make_configmap(ftj)
    configmap["metadata"]["annotations"][plan_mod.ANNOTATION_ACTIVE_SECONDS] = "4200"
    return {"ftj": ftj, "job": None, "configmap": configmap, "pods": []}


def check_deadline_on_new_job(plan, features):
    job = created_job(plan)
    assert job["spec"]["activeDeadlineSeconds"] == 3000
    assert job["metadata"]["annotations"][plan_mod.ANNOTATION_ACTIVE_SECONDS] == "4200"


SUSPEND_SCENARIOS = [
    Scenario("suspend on v1.20: the Job is deleted (Foreground)", [V1_20], suspend_running, "Suspended",
             "Suspending", ["deleted Job (suspend)", "event Normal Suspended"]),
    Scenario("suspend with Job.spec.suspend: the Job is suspended, not deleted", NEWER, suspend_running,
             "Suspended", "Suspending", ["suspended Job", "event Normal Suspended"], check_suspend_patch),
    Scenario("suspended: the pod the suspend stopped is not counted, its checkpoint is", NEWER, stopped_by_suspend,
             "Suspended", "Suspended", [], check_not_counted),
    Scenario("resume with Job.spec.suspend: unsuspended, the counts kept", NEWER, resumed, "Pending",
             "PodCreating", ["resumed Job", "event Normal Pending"], check_resume_patch),
    Scenario("resume while the stopped pod still terminates: wait (no two trainers)", NEWER,
             lambda f: resumed(f, pods=[running(deleting=True)]), "Suspended", "Suspending", [],
             retry_after=1.0),
    Scenario("queue, suspend: the admitted Job gets suspend=true", NEWER, kueue_running, "Suspended",
             "Suspending", ["suspended Job", "event Normal Suspended"], check_suspend_patch),
    Scenario("queue, suspend of a Job still queued: marked, so that Kueue's admission is not the user's resume",
             NEWER, lambda f: suspended_job(f, queue="team-a", marked=False), "Suspended", "Suspended",
             ["suspended Job"]),
    Scenario("queue: Kueue unsuspended it again for the same suspend: no fight, delete", NEWER, kueue_readmitted,
             "Suspended", "Suspending",
             ["event Warning KueueUnsuspended", "deleted Job (suspend)", "event Normal Suspended"]),
    Scenario("queue, resume: never unsuspended by the operator, Kueue admits it", NEWER,
             lambda f: resumed(f, queue="team-a"), "Queued", "Queued", ["event Normal Queued"]),
    Scenario("queue: Kueue preempted it (suspended the Job): not counted", NEWER, kueue_preempted, "Queued",
             "Queued", ["event Normal Queued"], check_kueue_preempted),
    Scenario("queue on v1.20: suspend deletes", [V1_20], kueue_running, "Suspended", "Suspending",
             ["deleted Job (suspend)", "event Normal Suspended"]),
    Scenario("deadline, suspend: the active seconds go with the suspend patch", NEWER, deadline_suspend,
             "Suspended", "Suspending", ["suspended Job", "event Normal Suspended"], check_deadline_suspend_patch),
    Scenario("deadline, suspend on v1.20: the active seconds go to the ConfigMap before the delete", [V1_20],
             deadline_suspend, "Suspended", "Suspending",
             ["recorded active seconds", "deleted Job (suspend)", "event Normal Suspended"], check_deadline_recorded),
    Scenario("deadline, resume: the Job gets what is left", NEWER, deadline_resume(4200), "Pending", "PodCreating",
             ["resumed Job", "event Normal Pending"], check_deadline_left(3000)),
    Scenario("deadline spent while suspended: 1 s left (fails with DeadlineExceeded)", NEWER,
             deadline_resume(9000), "Pending", "PodCreating", ["resumed Job", "event Normal Pending"],
             check_deadline_left(1)),
    Scenario("deadline, recreate (v1.20 resume, or after Kueue's delete): the new Job gets what is left", ALL,
             deadline_recreate, "Pending", "PodCreating", ["create Job", "event Normal Pending"],
             check_deadline_on_new_job),
]


def _cases(scenarios):
    return [pytest.param(s, f, id=f"{s.name} [{f.version}]") for s in scenarios for f in s.features]


@pytest.mark.parametrize("scenario, features", _cases(SCENARIOS + SUSPEND_SCENARIOS))
def test_scenario(scenario: Scenario, features: ServerFeatures):
    given = scenario.given(features)
    before = copy.deepcopy(given)
    plan = plan_mod.plan(plan_mod.Inputs(features=features, now=NOW, settings=SETTINGS,
                                         **{"job": None, "configmap": None, "pods": [], **given}))
    assert given == before, "the plan changed its inputs"
    assert plan.phase == scenario.phase, plan.status
    assert summary(plan) == scenario.actions
    if scenario.reason is not None:
        assert running_reason(plan.status or status_patch(plan)) == scenario.reason
    assert plan.retry_after == scenario.retry_after
    if scenario.check:
        scenario.check(plan, features)


def test_the_plan_is_a_function_of_its_inputs():
    given = running_run(V1_29)
    inputs = plan_mod.Inputs(features=V1_29, now=NOW, settings=SETTINGS, **given)
    assert plan_mod.plan(inputs) == plan_mod.plan(inputs)


def test_the_status_patch_is_split_from_progress():
    """Phase and conditions in one patch; progress/cost (read from the trainer) in a patch of their own."""
    ftj = make_ftj(started(interruptions=1, phase="Running", progress={"step": 7, "totalSteps": 10,
                                                                       "display": "7/10"},
                           checkpoint={"step": 5}))
    given = {"ftj": ftj, "job": make_job(ftj, V1_20, prior=(0, 0)), "configmap": make_configmap(ftj),
             "pods": [ended("run-trainer-a", int(ExitCode.INTERRUPTED))]}
    plan = plan_mod.plan(plan_mod.Inputs(features=V1_20, now=NOW, settings=SETTINGS, **given))
    phase = [a for a in plan.actions if isinstance(a, plan_mod.PatchStatus)]
    best = [a for a in plan.actions if isinstance(a, plan_mod.PatchBestEffortStatus)]
    assert len(phase) == 1 and "progress" not in phase[0].status and phase[0].status["phase"] == "Pending"
    assert len(best) == 1 and best[0].status["progress"]["step"] == 5  # the checkpoint's step after a stop


def test_unknown_fields_are_reported_before_anything_else():
    import json

    ftj = make_ftj()
    ftj["metadata"]["annotations"] = {plan_mod.LAST_APPLIED: json.dumps({"spec": {**ftj["spec"], "suspended": True}})}
    plan = plan_mod.plan(plan_mod.Inputs(ftj=ftj, job=None, configmap=None, pods=[], features=V1_20, now=NOW,
                                         settings=SETTINGS, estimate=FITS))
    assert isinstance(plan.first[0], plan_mod.PatchStatus)
    assert plan.first[0].status["conditions"][0]["type"] == "UnknownFields"
    assert summary(plan)[:2] == ["event Warning UnknownFields", "create ConfigMap, create Job"]


def test_a_blocked_plan_on_a_finished_run_does_nothing():
    ftj = make_ftj(started(phase="Succeeded"))
    assert plan_mod.blocked(ftj, NOW, "NameConflict", "taken").actions == []


@pytest.mark.parametrize("features, schema", [(ServerFeatures(1, 25), "1.25"), (V1_26, "1.26"),
                                              (ServerFeatures(1, 28), "1.28"), (V1_29, "1.29"),
                                              (ServerFeatures(1, 31), "1.31"), (ServerFeatures(1, 34), "1.34")])
def test_the_job_as_the_plan_leaves_it_matches_that_versions_schema(features, schema):
    """Created suspended for a queue, suspended by the operator with the active seconds, resumed with the deadline
    left: each Job (the built one with the plan's patches applied) is valid for that version (strict: no field it
    lacks). 1.24 has no schema here; 1.25 is the oldest at hand."""
    import kubernetes_validate

    created = created_job(plan_mod.plan(plan_mod.Inputs(features=features, now=NOW, settings=SETTINGS, job=None,
                                                        configmap=None, pods=[], **queued_new_job(features))))
    assert created["spec"]["suspend"] is True
    kubernetes_validate.validate(created, schema, strict=True)
    for given in (deadline_suspend(features), deadline_resume(4200)(features), kueue_running(features)):
        plan = plan_mod.plan(plan_mod.Inputs(features=features, now=NOW, settings=SETTINGS, **given))
        patched = next(a for a in plan.actions if isinstance(a, plan_mod.PatchJob))
        job = plan.job
        assert job["spec"]["suspend"] is patched.patch["spec"]["suspend"]
        body = {k: v for k, v in job.items() if k != "status"}
        body["metadata"] = {k: v for k, v in job["metadata"].items() if k not in ("uid", "creationTimestamp",
                                                                                  "resourceVersion")}
        kubernetes_validate.validate(body, schema, strict=True)


def test_the_plan_module_makes_no_calls():
    """Pure by construction: plan.py imports neither the Kubernetes client nor kopf nor the KubeApi, nor anything
    that reads the clock or the network (its `now` is an input)."""
    import ast
    from pathlib import Path

    source = (Path(plan_mod.__file__)).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(("." * node.level) + (node.module or ""))
    assert imported <= {"__future__", "copy", "json", "dataclasses", "datetime", "typing", "pydantic",
                        "kubesloth.api.v1alpha1", ".", ".estimate", ".settings"}, imported
    assert "datetime.now" not in source and "time.monotonic" not in source


def test_the_job_created_in_the_planning_pass_gets_what_the_plan_knows():
    """The estimate is made and the Job created in one pass: the pod must get the plan's facts (the GPU table's
    budget, the hub download's size) from that estimate, not from a status stored later."""
    estimate = Estimate(status={"fits": True, "budgetSource": "spec.resources.gpuProduct",
                                "budgetBytes": 48 * 2**30, "breakdown": {"weightsBytes": 16 * 2**30}},
                        condition=FITS.condition)
    ftj = make_ftj(model={"source": "hf://meta-llama/Llama-3.1-8B"}, resources={"gpuProduct": "NVIDIA-L40S"})
    plan = plan_mod.plan(plan_mod.Inputs(ftj=ftj, job=None, configmap=None, pods=[], features=V1_20, now=NOW,
                                         settings=SETTINGS, estimate=estimate, estimate_new=True))
    container = created_job(plan)["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBESLOTH_GPU_BUDGET_BYTES"] == str(48 * 2**30)
    assert container["resources"]["requests"]["ephemeral-storage"] == "17Gi"


# --- attempts counted once, when final, across reconciles (status.attempts) ---------------------------------------
# Each scenario is a sequence of observations; each reconcile's status patches are applied to the FineTuneJob the
# next one reads (as the executor does): the counts must stand when the pods that said them are gone, and a pod the
# operator's own action stopped is never counted.
def t(minute: int) -> str:
    return f"2026-12-01T11:{minute:02d}:00Z"


def gone_later(name: str, minute: int, **kw: Any) -> dict:
    return running(name, created=t(minute), **kw)


def exited(name: str, minute: int, code: int, deleting: bool = False, **kw: Any) -> dict:
    return ended(name, code, created=t(minute), deleting=deleting, **kw)


def apply_patches(ftj: dict, plan: plan_mod.Plan) -> dict:
    status = dict(ftj.get("status") or {})
    for key, value in status_patch(plan).items():  # a merge patch: null removes the field
        if value is None:
            status.pop(key, None)
        else:
            status[key] = value
    return {**ftj, "status": status}


@dataclass
class Step:
    pods: list[dict]
    job: Callable[[dict, ServerFeatures], Optional[dict]] = lambda ftj, f: make_job(ftj, f)
    spec: dict = field(default_factory=dict)  # spec changes from this step on
    phase: Optional[str] = None
    counts: tuple[int, int] = (0, 0)  # (interruptions, failures) after it
    actions: Optional[list[str]] = None


@dataclass
class Sequence:
    name: str
    features: list[ServerFeatures]
    steps: list[Step]
    spec: dict = field(default_factory=dict)


def stopped_job(ftj, f):
    return make_job(ftj, f, parallelism=0)


def deadline_job(ftj, f):
    return make_job(ftj, f, conditions=[job_condition("Failed", "DeadlineExceeded")])


def complete_job(ftj, f):
    return make_job(ftj, f, conditions=[job_condition("Complete", "Completed")])


def succeeded_pod(name: str, minute: int) -> dict:
    return make_pod(name, "Succeeded", {"terminated": {"exitCode": 0, "reason": "Completed",
                                                       "startedAt": t(minute)}}, created=t(minute))


def transient_then_evicted(final: bool) -> dict:
    """Container killed (exit 137, reason Error): on its own a TrainerError; the kubelet says Evicted with the
    terminal phase."""
    pod = make_pod("run-trainer-a", "Failed" if final else "Running",
                   {"terminated": {"exitCode": 137, "reason": "Error", "startedAt": t(1)}}, created=t(1))
    if final:
        pod["status"].update(reason="Evicted", message="The node was low on resource: memory.")
    return pod


SEQUENCES = [
    Sequence("kubectl delete pod: the trainer checkpoints (exit 6), the pod goes, the Job's replacement runs", ALL, [
        Step([gone_later("run-trainer-a", 1)], phase="Running"),
        Step([gone_later("run-trainer-a", 1, deleting=True)], phase="Running"),
        Step([exited("run-trainer-a", 1, int(ExitCode.INTERRUPTED), deleting=True),
              make_pod("run-trainer-b", "Pending", created=t(9))], phase="Pending", counts=(1, 0)),
        Step([gone_later("run-trainer-b", 9)], phase="Running", counts=(1, 0)),
        Step([succeeded_pod("run-trainer-b", 9)], job=complete_job, phase="Succeeded", counts=(1, 0)),
    ]),
    Sequence("a running pod deleted and gone before its end was seen: an interruption (PodDeleted)", ALL, [
        Step([gone_later("run-trainer-a", 1)], phase="Running"),
        Step([gone_later("run-trainer-b", 9)], phase="Running", counts=(1, 0)),
        Step([succeeded_pod("run-trainer-b", 9)], job=complete_job, phase="Succeeded", counts=(1, 0)),
        Step([], job=complete_job, phase="Succeeded", counts=(1, 0)),  # the Job's TTL, or pods deleted by hand
    ]),
    Sequence("refused OutputInUse: the retry the operator stopped (SIGTERM at start-up) is not counted", [V1_20], [
        Step([exited("run-trainer-a", 1, int(ExitCode.OUTPUT_IN_USE)), gone_later("run-trainer-b", 2)],
             phase="Failed", counts=(0, 1), actions=["stopped Job (failed)", "event Warning Failed"]),
        Step([exited("run-trainer-a", 1, int(ExitCode.OUTPUT_IN_USE)), gone_later("run-trainer-b", 2, deleting=True)],
             job=stopped_job, phase="Failed", counts=(0, 1), actions=[]),
        Step([exited("run-trainer-a", 1, int(ExitCode.OUTPUT_IN_USE)),
              exited("run-trainer-b", 2, int(ExitCode.INTERRUPTED), deleting=True)],
             job=stopped_job, phase="Failed", counts=(0, 1), actions=[]),
        Step([exited("run-trainer-a", 1, int(ExitCode.OUTPUT_IN_USE))], job=stopped_job, phase="Failed",
             counts=(0, 1), actions=[]),
        Step([], job=stopped_job, phase="Failed", counts=(0, 1), actions=[]),
    ]),
    Sequence("refused OutputInUse: the stopped retry gone before its end was seen is not counted", [V1_20], [
        Step([exited("run-trainer-a", 1, int(ExitCode.OUTPUT_IN_USE)), gone_later("run-trainer-b", 2)],
             phase="Failed", counts=(0, 1)),
        Step([exited("run-trainer-a", 1, int(ExitCode.OUTPUT_IN_USE))], job=stopped_job, phase="Failed",
             counts=(0, 1), actions=[]),
    ]),
    Sequence("a transient classification is not recorded: the kubelet's final word (Evicted) counts", ALL, [
        Step([gone_later("run-trainer-a", 1)], phase="Running"),
        Step([transient_then_evicted(final=False)], phase="Pending", counts=(0, 1)),  # provisional
        Step([transient_then_evicted(final=True)], phase="Pending", counts=(1, 0)),
        Step([gone_later("run-trainer-b", 9)], phase="Running", counts=(1, 0)),
    ]),
    Sequence("the Job's deadline stops the trainer: not an interruption", ALL, [
        Step([gone_later("run-trainer-a", 1)], phase="Running"),
        Step([exited("run-trainer-a", 1, int(ExitCode.INTERRUPTED), deleting=True)], job=deadline_job,
             phase="Failed", counts=(0, 0)),
        Step([], job=deadline_job, phase="Failed", counts=(0, 0)),
    ], spec={"activeDeadlineSeconds": 3600}),
    Sequence("a pod evicted, then deleted by hand once failed: still one interruption", ALL, [
        Step([gone_later("run-trainer-a", 1)], phase="Running"),
        Step([transient_then_evicted(final=True), gone_later("run-trainer-b", 9)], phase="Running", counts=(1, 0)),
        Step([gone_later("run-trainer-b", 9)], phase="Running", counts=(1, 0)),
    ]),
    Sequence("a failure whose pod is gone still counts against backoffLimit", ALL, [
        Step([exited("run-trainer-a", 1, 1)], phase="Pending", counts=(0, 1)),
        Step([exited("run-trainer-b", 9, 1)], phase="Failed", counts=(0, 2)),  # backoffLimit 1: the second fails it
    ]),
]


@pytest.mark.parametrize("sequence, features", [
    pytest.param(s, f, id=f"{s.name} [{f.version}]") for s in SEQUENCES for f in s.features])
def test_attempts_are_counted_once_when_final(sequence: Sequence, features: ServerFeatures):
    ftj = make_ftj(started(), **sequence.spec)
    for number, step in enumerate(sequence.steps, 1):
        ftj = {**ftj, "spec": {**ftj["spec"], **step.spec}}
        given = {"ftj": ftj, "job": step.job(ftj, features), "configmap": make_configmap(ftj), "pods": step.pods}
        before = copy.deepcopy(given)
        plan = plan_mod.plan(plan_mod.Inputs(features=features, now=NOW, settings=SETTINGS, **given))
        assert given == before, "the plan changed its inputs"
        assert plan.phase == step.phase, (number, plan.status["message"])
        assert (plan.status["interruptions"], plan.status["failures"]) == step.counts, (number, plan.status)
        assert plan.status["restarts"] == sum(step.counts)
        if step.actions is not None:
            assert summary(plan) == step.actions, number
        ftj = apply_patches(ftj, plan)
        # The same observation again changes nothing (a reconcile is level-triggered and may run any time).
        again = plan_mod.plan(plan_mod.Inputs(features=features, now=NOW, settings=SETTINGS,
                                              **{**given, "ftj": ftj}))
        assert (again.status["interruptions"], again.status["failures"]) == step.counts, (number, "again")
        assert again.status["attempts"] == ftj["status"].get("attempts"), number


def test_a_recreated_job_starts_a_new_record_and_the_counts_carry_over():
    """v1.20 suspend/resume: the Job is deleted (counts frozen), recreated with what was counted as its prior-*
    annotations; the old Job's record is dropped, not counted twice."""
    ftj = make_ftj(started())
    job = make_job(ftj, V1_20)

    def step(ftj, job, pods):
        plan = plan_mod.plan(plan_mod.Inputs(ftj=ftj, job=job, configmap=make_configmap(ftj), pods=pods,
                                             features=V1_20, now=NOW, settings=SETTINGS))
        return plan, apply_patches(ftj, plan)

    plan, ftj = step(ftj, job, [gone_later("run-trainer-a", 1)])
    plan, ftj = step(ftj, job, [gone_later("run-trainer-b", 9)])  # a deleted by hand
    assert plan.status["interruptions"] == 1 and ftj["status"]["attempts"]["jobUid"] == "job-uid"
    suspended = {**ftj, "spec": {**ftj["spec"], "suspend": True}}
    plan, ftj = step(suspended, job, [gone_later("run-trainer-b", 9)])
    assert summary(plan)[0] == "deleted Job (suspend)" and plan.status["interruptions"] == 1
    plan, ftj = step(ftj, None, [])
    resumed = {**ftj, "spec": {k: v for k, v in ftj["spec"].items() if k != "suspend"}}
    plan, ftj = step(resumed, None, [])
    new_job = created_job(plan)
    assert new_job["metadata"]["annotations"][builders.ANNOTATION_PRIOR_INTERRUPTIONS] == "1"
    assert plan.status["interruptions"] == 1 and "attempts" not in ftj["status"]
    new_job = {**copy.deepcopy(new_job), "status": {"startTime": t(30)}}
    new_job["metadata"].update(uid="job2-uid", creationTimestamp=t(30))
    plan, ftj = step(ftj, new_job, [gone_later("run-trainer-c", 31, job_uid="job2-uid")])
    assert plan.status["interruptions"] == 1 and ftj["status"]["attempts"]["jobUid"] == "job2-uid"
    plan, ftj = step(ftj, new_job, [gone_later("run-trainer-d", 40, job_uid="job2-uid")])
    assert (plan.status["interruptions"], plan.status["failures"]) == (2, 0)
