"""Status from what is: phase, reasons and conditions derived from hand-written Job and Pod dicts (no cluster)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from kubesloth.api.contract import ExitCode
from kubesloth.operator.status import derive_status, merge_conditions, spec_changes

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
        "message": "trainer pod run-trainer-abcde is running", "lastTransitionTime": None}
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
    (ExitCode.ERROR, "TrainerError"), (ExitCode.BAD_CONFIG, "InvalidConfig"),
    (ExitCode.SOURCE_NOT_FOUND, "SourceNotFound"), (ExitCode.OUTPUT_UNWRITABLE, "OutputUnwritable"),
    (ExitCode.OUT_OF_MEMORY, "OutOfMemory"), (42, "TrainerError"),
])
def test_trainer_exit_codes_are_classified_with_the_trainer_message(code, reason):
    j = job([job_cond("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")], failed=3)
    pods = [failed_pod(int(code), f"attempt {i}: boom", name=f"p{i}", created=f"2026-11-29T11:0{i}:00Z")
            for i in range(3)]
    status = derive_status(ftj(), j, pods, NOW)
    assert status["phase"] == "Failed"
    failed = cond(status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == reason
    assert "attempt 2: boom" in failed["message"]  # the newest attempt's termination message
    assert "backoffLimit 2 reached after 3 attempts" in failed["message"]
    assert status["restarts"] == 3
    assert status["completionTime"] == "2026-11-29T11:30:00Z"


def test_oom_killed_is_out_of_memory():
    j = job([job_cond("Failed", "BackoffLimitExceeded")], failed=1)
    status = derive_status(ftj(), j, [failed_pod(137, reason="OOMKilled")], NOW)
    assert cond(status, "Failed")["reason"] == "OutOfMemory"
    assert "OOMKilled" in status["message"]


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
    assert "attempt 2" in status["message"]


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
