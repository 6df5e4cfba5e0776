"""Status from what is: phase, reasons and conditions derived from hand-written Job and Pod dicts (no cluster)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from kubesloth.api.contract import ExitCode
from kubesloth.operator.status import (FAILURE, FATAL, INTERRUPTION, RESUMING, classify_pod, derive_status,
                                       merge_conditions, spec_changes)

NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=timezone.utc)
T0 = "2026-11-29T11:00:00Z"


def ftj(status: dict | None = None, **spec) -> dict:
    body = {"apiVersion": "kubesloth.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "run", "namespace": "ml", "uid": "u", "generation": 4},
            "spec": {"backoffLimit": 2, **spec}}
    if status is not None:
        body["status"] = status
    return body


def job(conditions: list | None = None, failed: int = 0, suspend: bool | None = None, **spec) -> dict:
    body = {"metadata": {"name": "run-trainer", "uid": "job-uid", "labels": {"kueue.x-k8s.io/queue-name": "q"}},
            "spec": {"backoffLimit": 2, **spec}, "status": {"conditions": conditions or []}}
    if failed:
        body["status"]["failed"] = failed
    if suspend is not None:
        body["spec"]["suspend"] = suspend
    return body


def job_cond(kind: str, reason: str | None = None, message: str = "") -> dict:
    return {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": "2026-11-29T11:30:00Z"}


def pod(name: str = "run-trainer-abcde", phase: str = "Pending", state: dict | None = None,
        conditions: list | None = None, created: str = T0) -> dict:
    status = {"phase": phase, "conditions": conditions or []}
    if state is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": state}]
    return {"metadata": {"name": name, "creationTimestamp": created}, "status": status}


def running_pod(name: str = "run-trainer-abcde", created: str = T0) -> dict:
    return pod(name, "Running", {"running": {"startedAt": "2026-11-29T11:01:00Z"}}, created=created)


def failed_pod(code: int, message: str = "", reason: str = "Error", name: str = "run-trainer-fail1",
               created: str = T0) -> dict:
    return pod(name, "Failed", {"terminated": {"exitCode": code, "reason": reason, "message": message,
                                               "startedAt": "2026-11-29T11:01:00Z"}}, created=created)


def cond(status: dict, kind: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == kind)


def test_no_job_yet_is_pending():
    status = derive_status(ftj(), None, [], NOW)
    assert status["phase"] == "Pending"
    assert cond(status, "Running")["status"] == "False" and cond(status, "Running")["reason"] == "Creating"
    assert status["observedGeneration"] == 4


def test_job_without_pod_is_pending():
    status = derive_status(ftj(), job(), [], NOW)
    assert status["phase"] == "Pending" and status["jobName"] == "run-trainer"


def test_unschedulable_pod():
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    p = pod(conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}])
    status = derive_status(ftj(), job(), [p], NOW)
    assert status["phase"] == "Pending"
    assert cond(status, "Running")["reason"] == "Unschedulable"
    assert cond(status, "Running")["message"] == message
    assert status["podName"] == "run-trainer-abcde"


@pytest.mark.parametrize("waiting", ["ImagePullBackOff", "ErrImagePull"])
def test_image_pull_backoff(waiting):
    p = pod(state={"waiting": {"reason": waiting, "message": "manifest unknown"}})
    status = derive_status(ftj(), job(), [p], NOW)
    assert status["phase"] == "Pending"
    assert cond(status, "Running")["reason"] == "ImagePullBackOff"
    assert "manifest unknown" in status["message"]


def test_missing_secret_is_reported():
    p = pod(state={"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "hf-token" not found'}})
    status = derive_status(ftj(), job(), [p], NOW)
    assert cond(status, "Running")["reason"] == "CreateContainerConfigError"
    assert 'secret "hf-token" not found' in status["message"]


def test_queued_when_kueue_holds_the_job():
    status = derive_status(ftj(queueName="q"), job(suspend=True), [], NOW)
    assert status["phase"] == "Queued"
    assert "q" in status["message"]


def test_running():
    status = derive_status(ftj(), job(), [running_pod()], NOW)
    assert status["phase"] == "Running"
    assert cond(status, "Running") | {"lastTransitionTime": None} == {
        "type": "Running", "status": "True", "reason": "TrainerRunning",
        "message": "trainer pod run-trainer-abcde is running", "lastTransitionTime": None, "observedGeneration": 4}
    assert cond(status, "Succeeded")["status"] == "False" and cond(status, "Failed")["status"] == "False"
    assert status["startTime"] == "2026-11-29T11:01:00Z"
    assert status["podName"] == "run-trainer-abcde" and status["restarts"] == 0


def test_succeeded():
    j = job([job_cond("Complete")])
    j["status"]["completionTime"] = "2026-11-29T11:50:00Z"
    done = pod(phase="Succeeded", state={"terminated": {"exitCode": 0, "reason": "Completed",
                                                        "startedAt": "2026-11-29T11:01:00Z"}})
    status = derive_status(ftj(), j, [done], NOW)
    assert status["phase"] == "Succeeded"
    assert cond(status, "Succeeded")["status"] == "True" and cond(status, "Succeeded")["reason"] == "Completed"
    assert cond(status, "Running")["status"] == "False"
    assert status["completionTime"] == "2026-11-29T11:50:00Z"
    assert status["startTime"] == "2026-11-29T11:01:00Z"


@pytest.mark.parametrize("code, reason", [
    (ExitCode.ERROR, "TrainerError"), (ExitCode.OUT_OF_MEMORY, "OutOfMemory"), (42, "TrainerError"),
])
def test_retried_failures_fail_after_backoff_limit_with_the_trainer_message(code, reason):
    j = job([job_cond("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")], failed=3)
    pods = [failed_pod(int(code), f"attempt {i}: boom", name=f"p{i}", created=f"2026-11-29T11:0{i}:00Z")
            for i in range(3)]
    status = derive_status(ftj(), j, pods, NOW)
    assert status["phase"] == "Failed"
    failed = cond(status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == reason
    assert "attempt 2: boom" in failed["message"]  # the newest attempt's termination message
    assert "backoffLimit 2 reached after 3 failures" in failed["message"]
    assert (status["failures"], status["interruptions"], status["restarts"]) == (3, 0, 3)
    assert status["completionTime"] == "2026-11-29T11:30:00Z"


@pytest.mark.parametrize("code, reason", [
    (ExitCode.BAD_CONFIG, "InvalidConfig"), (ExitCode.SOURCE_NOT_FOUND, "SourceNotFound"),
    (ExitCode.OUTPUT_UNWRITABLE, "OutputUnwritable"),
])
def test_deterministic_failures_fail_at_once_without_burning_retries(code, reason):
    # The Job (v1.20: no podFailurePolicy) would retry; the first such exit is final.
    status = derive_status(ftj(backoffLimit=5), job(failed=1), [failed_pod(int(code), f"{reason}: no good")], NOW)
    assert status["phase"] == "Failed"
    failed = cond(status, "Failed")
    assert failed["reason"] == reason and "no good" in failed["message"] and "not retried" in failed["message"]
    assert f"{reason}: {reason}" not in failed["message"]  # the trainer's own lead is not repeated
    assert status["failures"] == 1 and status["interruptions"] == 0


def test_oom_killed_is_out_of_memory():
    j = job([job_cond("Failed", "BackoffLimitExceeded")], failed=1)
    status = derive_status(ftj(backoffLimit=0), j, [failed_pod(137, reason="OOMKilled")], NOW)
    assert cond(status, "Failed")["reason"] == "OutOfMemory"
    assert "OOMKilled" in status["message"]
    assert status["failures"] == 1 and status["interruptions"] == 0


def test_deadline_exceeded_wins_over_the_pod_exit():
    j = job([job_cond("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")],
            activeDeadlineSeconds=60)
    status = derive_status(ftj(), j, [failed_pod(143)], NOW)
    assert status["phase"] == "Failed"
    assert cond(status, "Failed")["reason"] == "DeadlineExceeded"
    assert "60s" in status["message"]


def test_backoff_limit_without_a_pod_left():
    j = job([job_cond("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")], failed=3)
    status = derive_status(ftj(), j, [], NOW)
    assert cond(status, "Failed")["reason"] == "BackoffLimitExceeded"


def test_a_failed_attempt_with_retries_left_is_not_failed():
    pods = [failed_pod(1, "first try broke", name="p0")]
    status = derive_status(ftj(), job(failed=1), pods, NOW)
    assert status["phase"] == "Pending"
    assert "first try broke" in status["message"]
    assert cond(status, "Failed")["status"] == "False"
    retry = running_pod("p1", created="2026-11-29T11:05:00Z")
    status = derive_status(ftj(), job(failed=1), pods + [retry], NOW)
    assert status["phase"] == "Running" and status["podName"] == "p1" and status["restarts"] == 1
    assert "attempt 2: 0 interruptions, 1 failures before" in status["message"]


def test_suspended_while_the_pod_stops_and_after():
    stopping = derive_status(ftj(suspend=True), None, [running_pod()], NOW)
    assert stopping["phase"] == "Suspended" and cond(stopping, "Suspended")["reason"] == "Suspending"
    gone = derive_status(ftj(suspend=True), None, [], NOW)
    assert gone["phase"] == "Suspended" and cond(gone, "Suspended")["reason"] == "Suspended"
    assert cond(gone, "Running")["status"] == "False"
    assert gone["podName"] is None


def test_a_finished_run_stays_finished_when_its_job_is_gone():
    old = {"phase": "Succeeded", "message": "done", "completionTime": "2026-11-29T11:50:00Z",
           "jobName": "run-trainer", "podName": "p0", "startTime": T0,
           "conditions": [{"type": "Succeeded", "status": "True", "reason": "Completed",
                           "lastTransitionTime": "2026-11-29T11:50:00Z"}]}
    status = derive_status(ftj(old), None, [], NOW)
    assert status["phase"] == "Succeeded" and status["completionTime"] == "2026-11-29T11:50:00Z"
    assert cond(status, "Succeeded")["lastTransitionTime"] == "2026-11-29T11:50:00Z"
    # ... even if someone sets suspend afterwards
    assert derive_status(ftj(old, suspend=True), None, [], NOW)["phase"] == "Succeeded"


def test_transition_time_is_kept_while_the_status_does_not_change():
    first = derive_status(ftj(), job(), [running_pod()], NOW)
    later = derive_status(ftj(first), job(), [running_pod()], NOW + timedelta(minutes=5))
    assert cond(later, "Running")["lastTransitionTime"] == cond(first, "Running")["lastTransitionTime"]
    done = job([job_cond("Complete")])
    final = derive_status(ftj(later), done, [], NOW + timedelta(minutes=9))
    assert cond(final, "Running")["lastTransitionTime"] == "2026-11-29T12:09:00Z"
    assert cond(final, "Succeeded")["lastTransitionTime"] == "2026-11-29T12:09:00Z"
    assert cond(final, "Failed")["lastTransitionTime"] == cond(first, "Failed")["lastTransitionTime"]
    assert final["startTime"] == first["startTime"]


def test_conditions_of_other_owners_are_kept():
    old = [{"type": "Fits", "status": "True", "reason": "EstimateFits", "lastTransitionTime": T0}]
    merged = merge_conditions(old, [{"type": "Running", "status": "True", "reason": "x"}], NOW)
    assert {"type": "Fits", "status": "True", "reason": "EstimateFits", "lastTransitionTime": T0} in merged


def test_spec_changes_ignore_mutable_fields():
    started = {"training": {"learningRate": 1e-5}, "suspend": False, "ttlSecondsAfterFinished": None}
    assert spec_changes(started, {**started, "suspend": True, "ttlSecondsAfterFinished": 60}) == []
    assert spec_changes(started, {**started, "training": {"learningRate": 2e-5}}) == ["spec.training.learningRate"]
    assert spec_changes(None, started) == []


def test_spec_locked_condition():
    status = derive_status(ftj(), job(), [running_pod()], NOW, ["spec.training.learningRate"])
    locked = cond(status, "SpecLocked")
    assert locked["status"] == "True" and locked["reason"] == "SpecChangeRefused"
    assert "spec.training.learningRate" in locked["message"]
    reverted = derive_status(ftj(status), job(), [running_pod()], NOW, [])
    assert cond(reverted, "SpecLocked")["status"] == "False"


# --- how a pod ends: interruptions are not failures ---------------------------------------------------------------
DELETED = "2026-11-29T11:20:00Z"


def ended_pod(name: str = "p0", created: str = T0, *, code: int | None = 137, term_reason: str = "Error",
              message: str = "", pod_reason: str | None = None, pod_message: str | None = None,
              disruption: tuple[str, str] | None = None, deleted: bool = False, grace: int = 252) -> dict:
    """A trainer pod that ended, as the kubelet (and, >= 1.26, the controller that disrupted it) writes it."""
    body = pod(name, "Failed", {"terminated": {"exitCode": code, "reason": term_reason, "message": message,
                                               "startedAt": "2026-11-29T11:01:00Z",
                                               "finishedAt": "2026-11-29T11:21:00Z"}} if code is not None else None,
               created=created)
    if pod_reason:
        body["status"]["reason"] = pod_reason
    if pod_message:
        body["status"]["message"] = pod_message
    if disruption:
        body["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": disruption[0],
                                             "message": disruption[1], "lastTransitionTime": DELETED})
    if deleted:
        body["metadata"]["deletionTimestamp"] = DELETED
    body["spec"] = {"terminationGracePeriodSeconds": grace}
    return body


LOW_MEMORY = ("The node was low on resource: memory. Threshold quantity: 100Mi, available: 91Mi. Container trainer "
              "was using 71Gi, request is 64Gi, has larger consumption of memory. ")
SHUTDOWN = "Pod was terminated in response to imminent node shutdown."

INTERRUPTIONS = {
    # name: (pod, reason)
    "exit 6 after a checkpoint": (ended_pod(code=6, message="Interrupted: SIGTERM at step 120; checkpoint "
                                                            "step-00000120 written; resumable"), "Interrupted"),
    "evicted for memory pressure (v1.20)": (ended_pod(pod_reason="Evicted", pod_message=LOW_MEMORY), "Evicted"),
    "evicted, no container status left": (ended_pod(code=None, pod_reason="Evicted", pod_message=LOW_MEMORY),
                                          "Evicted"),
    "evicted for memory pressure (>= 1.27)": (ended_pod(pod_reason="Evicted", pod_message=LOW_MEMORY,
                                                        disruption=("TerminationByKubelet", LOW_MEMORY)), "Evicted"),
    "preempted by the scheduler, checkpointed": (ended_pod(code=6, deleted=True, disruption=(
        "PreemptionByScheduler", "Kubernetes default scheduler: preempting to accommodate a higher priority pod")),
        "Preempted"),
    "preempted (1.26 spelling)": (ended_pod(deleted=True, disruption=("PreemptionByKubeScheduler", "preempting")),
                                  "Preempted"),
    "drained (eviction API)": (ended_pod(code=6, deleted=True, disruption=("EvictionByEvictionAPI",
                                                                          "Eviction API: evicting")), "Evicted"),
    "NoExecute taint": (ended_pod(deleted=True, disruption=(
        "DeletionByTaintManager", "Taint manager: deleting due to NoExecute taint")), "NodeTainted"),
    "node gone (pod GC)": (ended_pod(code=None, disruption=("DeletionByPodGC", "PodGC: node no longer exists")),
                           "NodeLost"),
    "node shutdown (>= 1.26)": (ended_pod(code=6, pod_reason="Terminated", pod_message=SHUTDOWN,
                                          disruption=("TerminationByKubelet", SHUTDOWN)), "NodeShutdown"),
    "node shutdown (v1.20)": (ended_pod(code=6, pod_reason="Terminated", pod_message=SHUTDOWN), "NodeShutdown"),
    "node lost (v1.20)": (ended_pod(code=None, pod_reason="NodeLost",
                                    pod_message="Node n1 which was running pod p0 is unresponsive"), "NodeLost"),
    "critical pod preemption by the kubelet": (ended_pod(code=None, pod_reason="Preempting",
                                                         pod_message="Preempted in order to admit critical pod"),
                                               "Preempted"),
    "SIGKILL after the grace period": (ended_pod(code=137, deleted=True), "GracePeriodExceeded"),
    "deleted, died on SIGTERM": (ended_pod(code=143, deleted=True), "PodDeleted"),
}


@pytest.mark.parametrize("name", INTERRUPTIONS)
def test_interruptions_get_their_own_reason_and_are_not_failures(name):
    ended, reason = INTERRUPTIONS[name]
    attempt = classify_pod(ended)
    assert attempt is not None and attempt.kind == INTERRUPTION and attempt.reason == reason, attempt
    # backoffLimit 0: a single counted failure would fail the run
    status = derive_status(ftj(backoffLimit=0), job(failed=1), [ended], NOW)
    assert status["phase"] == "Pending", status["message"]
    assert cond(status, "Running")["reason"] == reason and cond(status, "Failed")["status"] == "False"
    assert status["message"].startswith("resuming after an interruption")
    assert (status["interruptions"], status["failures"]) == (1, 0)


def test_eviction_says_what_the_kubelet_said_and_is_not_out_of_memory():
    status = derive_status(ftj(), job(), [INTERRUPTIONS["evicted for memory pressure (v1.20)"][0]], NOW)
    assert "The node was low on resource: memory" in status["message"]
    assert "spec.resources.memory" not in status["message"]


def test_sigkill_after_the_grace_period_names_the_field():
    attempt = classify_pod(INTERRUPTIONS["SIGKILL after the grace period"][0])
    assert "spec.terminationGracePeriodSeconds" in attempt.message and "252s" in attempt.message


@pytest.mark.parametrize("ended, kind, reason", [
    (ended_pod(code=137, term_reason="OOMKilled"), FAILURE, "OutOfMemory"),
    (ended_pod(code=137, term_reason="OOMKilled", deleted=True), FAILURE, "OutOfMemory"),
    (ended_pod(code=1), FAILURE, "TrainerError"),
    (ended_pod(code=5), FAILURE, "OutOfMemory"),
    (ended_pod(code=2), FATAL, "InvalidConfig"),
    (ended_pod(code=2, deleted=True, disruption=("EvictionByEvictionAPI", "Eviction API: evicting")), FATAL,
     "InvalidConfig"),
    (ended_pod(code=3), FATAL, "SourceNotFound"),
    (ended_pod(code=4), FATAL, "OutputUnwritable"),
])
def test_failures_are_failures(ended, kind, reason):
    attempt = classify_pod(ended)
    assert (attempt.kind, attempt.reason) == (kind, reason)


def test_pods_that_did_not_end_in_failure_are_not_attempts():
    assert classify_pod(running_pod()) is None
    assert classify_pod(pod(state={"waiting": {"reason": "ContainerCreating"}})) is None
    assert classify_pod(pod(phase="Succeeded", state={"terminated": {"exitCode": 0, "reason": "Completed"}})) is None


def sigterm(i: int) -> dict:
    return ended_pod(f"p{i}", f"2026-11-29T11:0{i}:00Z", code=6, message="Interrupted: SIGTERM; resumable")


def test_sigterm_three_times_with_backoff_limit_1_is_not_failed():
    # The operator's v1.20 Job: backoffLimit = spec.backoffLimit + spec.maxInterruptions, so it retries on.
    pods = [sigterm(i) for i in range(3)] + [running_pod("p3", created="2026-11-29T11:03:00Z")]
    status = derive_status(ftj(backoffLimit=1), job(failed=3, backoffLimit=101), pods, NOW)
    assert status["phase"] == "Running"
    assert (status["interruptions"], status["failures"], status["restarts"]) == (3, 0, 3)
    assert "attempt 4: 3 interruptions, 0 failures before" in status["message"]


def test_a_job_that_gave_up_on_interruptions_is_resumed_not_failed():
    # A Job that counts interruptions (no podFailurePolicy, an older operator's backoffLimit): the run is not Failed;
    # the reconcile recreates the Job (reason Resuming).
    j = job([job_cond("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")], failed=2,
            backoffLimit=1)
    status = derive_status(ftj(backoffLimit=1), j, [sigterm(0), sigterm(1)], NOW)
    assert status["phase"] == "Pending" and cond(status, "Running")["reason"] == RESUMING
    assert cond(status, "Failed")["status"] == "False"
    assert (status["interruptions"], status["failures"]) == (2, 0)
    # ... and while that Job is being deleted, with its pods already gone, it stays Resuming (not Failed)
    j["metadata"]["deletionTimestamp"] = DELETED
    deleting = derive_status(ftj(status, backoffLimit=1), j, [], NOW)
    assert cond(deleting, "Running")["reason"] == RESUMING
    assert (deleting["interruptions"], deleting["failures"]) == (2, 0)


def test_counts_carry_over_from_earlier_jobs():
    j = job()
    j["metadata"]["annotations"] = {"kubesloth.io/prior-interruptions": "4", "kubesloth.io/prior-failures": "1"}
    status = derive_status(ftj(backoffLimit=2), j, [sigterm(0), failed_pod(1, name="p1", created="2026-11-29T11:05:00Z")], NOW)
    assert (status["interruptions"], status["failures"]) == (5, 2) and status["phase"] == "Pending"
    over = derive_status(ftj(backoffLimit=1), j, [failed_pod(1, name="p1")], NOW)
    assert over["phase"] == "Failed" and "backoffLimit 1 reached after 2 failures" in over["message"]
    # no Job (suspended): what was counted stands
    kept = derive_status(ftj(status, suspend=True), None, [], NOW)
    assert (kept["interruptions"], kept["failures"]) == (5, 2)


def test_too_many_interruptions_fail_the_run():
    pods = [sigterm(i) for i in range(3)]
    status = derive_status(ftj(maxInterruptions=2), job(failed=3), pods, NOW)
    assert status["phase"] == "Failed" and cond(status, "Failed")["reason"] == "TooManyInterruptions"
    assert "maxInterruptions 2" in status["message"]
    assert derive_status(ftj(maxInterruptions=3), job(failed=3), pods, NOW)["phase"] == "Pending"


def test_the_running_message_keeps_the_last_interruptions_reason():
    # The evicted pod is gone soon (and the Job replaced it at once): the running message still says why.
    evicted = ended_pod("p0", "2026-11-29T11:00:00Z", pod_reason="Evicted",
                        pod_message="The node was low on resource: memory.")
    preempted = ended_pod("p1", "2026-11-29T11:01:00Z",
                          disruption=("PreemptionByScheduler", "kube-scheduler: preempting"))
    status = derive_status(ftj(backoffLimit=0), job(failed=1, backoffLimit=100),
                           [evicted, running_pod("p2", created="2026-11-29T11:02:00Z")], NOW)
    assert status["phase"] == "Running" and (status["interruptions"], status["failures"]) == (1, 0)
    assert "attempt 2: 1 interruptions, 0 failures before; the last: Evicted" in status["message"]
    status = derive_status(ftj(backoffLimit=0), job(failed=2, backoffLimit=100),
                           [evicted, preempted, running_pod("p2", created="2026-11-29T11:02:00Z")], NOW)
    assert (status["interruptions"], status["failures"]) == (2, 0)
    assert status["message"].endswith("the last: Preempted)")


def test_the_running_message_names_the_last_reason_after_its_pod_is_gone():
    # Recorded while the evicted pod existed; then it is deleted: the count stands and so does its reason.
    evicted = ended_pod("p0", "2026-11-29T11:00:00Z", pod_reason="Evicted",
                        pod_message="The node was low on resource: memory.")
    running = running_pod("p1", created="2026-11-29T11:01:00Z")
    first = derive_status(ftj(backoffLimit=0), job(failed=1, backoffLimit=100), [evicted, running], NOW)
    assert "the last: Evicted" in first["message"]
    later = derive_status(ftj(first, backoffLimit=0), job(failed=1, backoffLimit=100), [running], NOW)
    assert later["phase"] == "Running" and (later["interruptions"], later["failures"]) == (1, 0)
    assert later["message"].endswith("1 interruptions, 0 failures before; the last: Evicted)")


# --- the record of attempts (status.attempts) ---------------------------------------------------------------------
def at(minute: int) -> str:
    return (datetime(2026, 11, 29, 11, 0, tzinfo=timezone.utc) + timedelta(minutes=minute)).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def with_uid(body: dict) -> dict:
    body["metadata"]["uid"] = body["metadata"]["name"] + "-uid"
    return body


def test_the_record_stays_small_over_many_interruptions():
    # 150 pods, each seen running, then deleted by hand and gone before its end was seen; the Job keeps replacing.
    status: dict = {}
    for i in range(150):
        current = with_uid(running_pod(f"p{i}", created=at(i)))
        status = derive_status(ftj(status, maxInterruptions=200), job(), [current], NOW)
        assert (status["interruptions"], status["failures"]) == (i, 0), i
        assert len(status["attempts"]["pods"]) <= 2, status["attempts"]
    assert status["attempts"]["earlierInterruptions"] == 149 and [p["name"] for p in status["attempts"]["pods"]] == [
        "p149"]
    assert status["phase"] == "Running" and "attempt 150: 149 interruptions, 0 failures before" in status["message"]


def test_an_ended_pod_kept_by_the_job_is_counted_once_across_reconciles():
    # v1.20 Jobs keep their failed pods: seen again and again (the record folded past them), still counted once.
    pods = [with_uid(sigterm(i)) for i in range(3)] + [with_uid(running_pod("p3", created="2026-11-29T11:03:00Z"))]
    status: dict = {}
    for _ in range(3):
        status = derive_status(ftj(status, backoffLimit=1), job(failed=3, backoffLimit=101), pods, NOW)
        assert (status["interruptions"], status["failures"]) == (3, 0)
    assert status["attempts"]["before"] == "2026-11-29T11:03:00Z" and status["attempts"]["earlierInterruptions"] == 3
    assert [p["name"] for p in status["attempts"]["pods"]] == ["p3"]


def test_a_decided_attempt_is_not_decided_again():
    # Deleted by hand, checkpointed, exit 6: an interruption. The run then fails for another reason and the operator
    # stops the Job: the pod (still there, being deleted) would now read as stopped by the operator; it stays counted.
    deleted = with_uid(ended_pod("p0", at(0), code=6, deleted=True, message="Interrupted: SIGTERM; resumable"))
    first = derive_status(ftj(), job(), [deleted], NOW)
    assert first["attempts"]["pods"][0]["ended"] == "Interruption" and first["interruptions"] == 1
    oom = with_uid(ended_pod("p1", at(5), code=137, term_reason="OOMKilled"))
    stopped = derive_status(ftj(first, backoffLimit=0), job(parallelism=0), [deleted, oom], NOW)
    assert (stopped["interruptions"], stopped["failures"]) == (1, 1) and stopped["phase"] == "Failed"


def test_a_record_of_another_job_or_unreadable_is_not_used():
    current = with_uid(running_pod("p9", created=at(9)))
    other = {"jobUid": "an-earlier-job", "earlierInterruptions": 7, "pods": [{"uid": "x", "ended": "Failure"}]}
    status = derive_status(ftj({"attempts": other}), job(), [current], NOW)
    assert (status["interruptions"], status["failures"]) == (0, 0) and status["attempts"]["jobUid"] == "job-uid"
    for garbage in ("text", {"jobUid": "job-uid", "pods": "no", "earlierFailures": "2", "before": 5},
                    {"jobUid": "job-uid", "pods": [None, {"ended": "Failure"}, {"uid": 3}]}):
        status = derive_status(ftj({"attempts": garbage}), job(), [current], NOW)
        assert (status["interruptions"], status["failures"]) == (0, 0), garbage
        assert [p["name"] for p in status["attempts"]["pods"]] == ["p9"]


def test_pods_that_never_ran_or_succeeded_are_not_counted_when_gone():
    pending = with_uid(pod("p0", created=at(0)))
    status = derive_status(ftj(), job(), [pending], NOW)
    gone = derive_status(ftj(status), job(), [with_uid(running_pod("p1", created=at(1)))], NOW)
    assert (gone["interruptions"], gone["failures"]) == (0, 0)  # deleted while Pending: no attempt
    done = with_uid(pod("p1", "Succeeded", {"terminated": {"exitCode": 0, "reason": "Completed"}}, created=at(1)))
    finished = derive_status(ftj(gone), job([job_cond("Complete")]), [done], NOW)
    assert finished["phase"] == "Succeeded" and (finished["interruptions"], finished["failures"]) == (0, 0)
    assert derive_status(ftj(finished), job([job_cond("Complete")]), [], NOW)["interruptions"] == 0


@pytest.mark.parametrize("why, ftj_spec, ftj_status, job_spec, job_conditions", [
    ("FineTuneJob suspended", {"suspend": True}, None, {}, None),
    ("the Job suspended (Job.spec.suspend, Kueue)", {}, None, {"suspend": True}, None),
    ("the Job stopped by the operator (parallelism 0)", {}, None, {"parallelism": 0}, None),
    ("the Job's deadline", {}, None, {}, [job_cond("Failed", "DeadlineExceeded")]),
    ("the run had failed", {}, {"phase": "Failed"}, {}, None),
])
def test_pods_the_operator_stopped_are_not_counted(why, ftj_spec, ftj_status, job_spec, job_conditions):
    seen = derive_status(ftj(), job(), [with_uid(running_pod("p0", created=at(0)))], NOW)
    stopped = with_uid(ended_pod("p0", at(0), code=6, deleted=True, message="Interrupted: SIGTERM; resumable"))
    old = {**seen, **(ftj_status or {})}
    for pods in ([stopped], []):  # ended while being deleted, then gone
        status = derive_status(ftj(old, **ftj_spec), job(job_conditions, **job_spec), pods, NOW)
        assert (status["interruptions"], status["failures"]) == (0, 0), (why, pods)
        old = {**status, **(ftj_status or {})}
    assert [(p["name"], p["ended"], p["reason"]) for p in status["attempts"]["pods"]] == [("p0", "NotCounted",
                                                                                           "Stopped")]
