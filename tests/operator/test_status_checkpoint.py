"""Issue 11, the operator's side: OutputInUse fails at once; status.checkpoint / status.output from the trainer's
termination state (api.contract.with_state); a skipped interrupt checkpoint is recorded; progress after a stop
shows the checkpoint's step; nothing the trainer says can break the status patch."""

from __future__ import annotations

from kubesloth.api import contract
from kubesloth.api.contract import ExitCode
from kubesloth.api.v1alpha1 import FineTuneJobStatus
from kubesloth.operator.status import derive_status

from datetime import datetime, timezone

NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=timezone.utc)
T0 = "2026-11-29T11:00:00Z"


def ftj(status: dict | None = None, **spec) -> dict:
    body = {"apiVersion": "kubesloth.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "run", "namespace": "ml", "uid": "u", "generation": 4},
            "spec": {"backoffLimit": 2, **spec}}
    if status is not None:
        body["status"] = status
    return body


def job(conditions: list | None = None) -> dict:
    return {"metadata": {"name": "run-trainer", "uid": "job-uid"}, "spec": {"backoffLimit": 2},
            "status": {"conditions": conditions or []}}


def job_cond(kind: str) -> dict:
    return {"type": kind, "status": "True", "reason": None, "message": "", "lastTransitionTime": T0}


def pod(name: str, phase: str, state: dict, created: str = T0) -> dict:
    return {"metadata": {"name": name, "creationTimestamp": created},
            "status": {"phase": phase, "conditions": [], "containerStatuses": [{"name": "trainer", "state": state}]}}


def failed_pod(code: int, message: str) -> dict:
    return pod("p0", "Failed", {"terminated": {"exitCode": code, "reason": "Error", "message": message,
                                               "startedAt": T0}})


def cond(status: dict, kind: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == kind)

DEST = "pvc://outputs/run"


def ended(code: int, message: str, state: dict | None, name: str = "p0", created: str = T0) -> dict:
    text = contract.with_state(message, state)
    phase = "Succeeded" if code == 0 else "Failed"
    return pod(name, phase, {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                            "message": text, "startedAt": T0}}, created=created)


def spec_with_output(**extra):
    return ftj(output={"destination": DEST}, **extra)


def test_output_in_use_fails_at_once_with_the_trainers_message():
    said = ("OutputInUse: spec.output.destination (/mnt/pvc/outputs/run) holds checkpoints (newest step 20) of "
            "another run (FineTuneJob ml/run); differs in: metadata.uid a -> b; not resumed. To continue them set "
            "spec.output.onExisting: resume")
    status = derive_status(spec_with_output(), job(), [failed_pod(int(ExitCode.OUTPUT_IN_USE), said)], NOW)
    assert status["phase"] == "Failed"
    failed = cond(status, "Failed")
    assert failed["reason"] == "OutputInUse"
    assert "onExisting: resume" in failed["message"] and "not retried" in failed["message"]
    assert status["failures"] == 1


def test_checkpoint_and_output_from_the_succeeded_trainer():
    state = {"checkpoint": {"step": 30, "path": "checkpoints/step-00000030", "bytes": 1740966,
                            "time": "2026-11-29T11:59:00Z"},
             "output": {"path": "model", "files": 6, "bytes": 583709, "verified": True}}
    done = ended(0, contract.success_message(30, 30, 13577, 4.9e4, 1.6, "/mnt/pvc/outputs/run/model"), state)
    status = derive_status(spec_with_output(), job([job_cond("Complete")]), [done], NOW)
    assert status["phase"] == "Succeeded"
    assert status["checkpoint"] == {"step": 30, "path": f"{DEST}/checkpoints/step-00000030", "bytes": 1740966,
                                    "time": "2026-11-29T11:59:00Z"}
    assert status["output"] == {"path": f"{DEST}/model", "files": 6, "bytes": 583709, "verified": True}
    FineTuneJobStatus.model_validate(status)  # the CRD's types


def test_a_skipped_interrupt_checkpoint_is_recorded_and_progress_shows_the_checkpoint_step():
    message = ("Interrupted: interrupted at step 17/400; interrupt checkpoint skipped: writing it needs ~9s (the "
               "last checkpoint took 3.0s to write, with margin) and 6s of the 6s grace period were left; the "
               "newest is step 10; the run resumes from step 10 (7 steps to train again); resumable")
    state = {"checkpoint": {"step": 10, "path": "checkpoints/step-00000010"}, "interrupt": "skipped",
             "lostSteps": 7}
    old = {"phase": "Running", "progress": {"step": 17, "totalSteps": 400, "display": "17/400", "etaSeconds": 30.0}}
    stopped = ended(int(ExitCode.INTERRUPTED), message, state)
    status = derive_status(spec_with_output(status=old), job(), [stopped], NOW)
    assert status["phase"] == "Pending" and cond(status, "Running")["reason"] == "Interrupted"
    assert "interrupt checkpoint skipped" in cond(status, "Running")["message"]
    assert "kubesloth-state" not in cond(status, "Running")["message"], "the facts go to status, not the message"
    checkpoint = status["checkpoint"]
    assert checkpoint["step"] == 10 and checkpoint["interruptCheckpoint"] == "Skipped"
    assert checkpoint["lostSteps"] == 7 and "interrupt checkpoint skipped" in checkpoint["message"]
    assert status["progress"]["step"] == 10 and status["progress"]["display"] == "10/400"
    assert status["interruptions"] == 1 and status["failures"] == 0
    FineTuneJobStatus.model_validate(status)

    # The next attempt runs and then writes its interrupt checkpoint: Written, the earlier loss stays in the past.
    written = ended(int(ExitCode.INTERRUPTED), "Interrupted: interrupted at step 25/400; checkpoint x; resumable",
                    {"checkpoint": {"step": 25, "path": "checkpoints/step-00000025"}, "interrupt": "written"},
                    name="p1", created="2026-11-29T11:10:00Z")
    again = derive_status(spec_with_output(status={**old, **status}), job(), [stopped, written], NOW)
    assert again["checkpoint"]["step"] == 25 and again["checkpoint"]["interruptCheckpoint"] == "Written"
    assert again["checkpoint"]["lostSteps"] == 0 and again["interruptions"] == 2


def test_what_the_trainer_says_cannot_break_the_status():
    hostile = {"checkpoint": {"step": 2**70, "path": "../../etc/passwd", "bytes": -1, "time": "yesterday"},
               "output": {"path": "/abs", "files": True}}
    status = derive_status(spec_with_output(), job(), [ended(int(ExitCode.INTERRUPTED), "Interrupted: x",
                                                             hostile)], NOW)
    assert "checkpoint" not in status and "output" not in status
    odd = {"checkpoint": {"step": 5, "path": "../x", "bytes": 2**64}}
    status = derive_status(spec_with_output(), job(), [ended(1, "TrainerError: x", odd)], NOW)
    assert status["checkpoint"] == {"step": 5}
    FineTuneJobStatus.model_validate(status)


def test_killed_while_writing_the_interrupt_checkpoint_is_a_lost_checkpoint_not_a_failure():
    # The trainer's last words, left before the write began; SIGKILL (after the grace period) cut the write. The
    # pod object was not deleted (a node shutdown's kill): only the words tell it from a crash.
    message = ("Interrupted: killed while writing the interrupt checkpoint at step 12 (it did not finish within the "
               "grace period; raise spec.terminationGracePeriodSeconds); lost; the run resumes from step 5 "
               "(7 steps to train again)")
    state = {"checkpoint": {"step": 5, "path": "checkpoints/step-00000005"}, "interrupt": "lost", "lostSteps": 7}
    killed = ended(137, message, state)
    status = derive_status(spec_with_output(backoffLimit=0), job(), [killed], NOW)
    assert status["phase"] == "Pending" and cond(status, "Running")["reason"] == "GracePeriodExceeded"
    assert "while writing its interrupt checkpoint" in cond(status, "Running")["message"]
    assert (status["interruptions"], status["failures"]) == (1, 0)
    checkpoint = status["checkpoint"]
    assert checkpoint["step"] == 5 and checkpoint["interruptCheckpoint"] == "Skipped"
    assert checkpoint["lostSteps"] == 7 and "killed while writing the interrupt checkpoint" in checkpoint["message"]
    FineTuneJobStatus.model_validate(status)

    # Exit 137 without those words (and not deleted) stays a failure: a crash is not an interruption.
    crashed = ended(137, "Segmentation fault", None)
    status = derive_status(spec_with_output(backoffLimit=0), job(), [crashed], NOW)
    assert status["phase"] == "Failed" and (status["interruptions"], status["failures"]) == (0, 1)
