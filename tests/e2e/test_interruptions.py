"""Issue 11's "must show", end to end: the real v1.20 API server and controller-manager, the real operator (a kopf
subprocess), the node agent running the real trainer (`python -m kubesloth.trainer`, CPU engine) on the tiny model.

- SIGTERM three times with backoffLimit 1: resumed each time from the newest checkpoint, Succeeded, per-step losses
  equal to an uninterrupted twin's, 3 interruptions and 0 failures.
- A checkpoint write slower than the grace period: the interrupt checkpoint is skipped (never half-written), the
  run resumes from the previous one, status says the interrupt checkpoint was lost. And when the estimate is wrong
  (a 30 s interrupt write, SIGKILL after 10 s): the cut write stays in staging, status says lost, an interruption.
- A FineTuneJob recreated with the same output: refused (OutputInUse naming the fields) for a finished run, another
  learning rate, another model; `spec.output.onExisting: resume|restart` continue or start over.
- The pod deleted while a checkpoint is written, a free GPU for the replacement: never two writers (the lock),
  every COMPLETE checkpoint loads. A running pod deleted (`kubectl delete pod`) and gone: its attempt stays counted
  as an interruption (status.attempts), the run Succeeded with 1 interruption and 0 failures.
- Eviction and preemption written into the pod's status as a kubelet (and scheduler) write them: their own reasons,
  interruptions, not failures.

Signals go to the trainer process the node agent started (its pid is the pod's containerID, `local://PID`); the
"kubelet" part of a signal (SIGKILL once the grace period is over) is played by the test where it matters.
Per-test trainer env (a slow checkpoint write, a short lock heartbeat) goes through the node agent's namespace env
hook, so one operator serves every test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from kubesloth.api.contract import CHECKPOINTS_DIR, COMPLETE_MARKER, LOCK_FILE, SUMMARY_FILE, parse_state

from .conftest import make_stack
from .stack import finetunejob, wait_for

STEP_LINE = re.compile(r"^(?:\S+ )?\[trainer\] step (\d+)/(\d+) loss ([0-9.]+|nan) ")
RESUMING = re.compile(r"resuming from (\S+) \(step (\d+)\)")
INTERRUPTED_AT = re.compile(r"interrupted at step (\d+)/(\d+)")
# One intra-op thread: the tiny model gains nothing from more, and the machine is shared.
BASE_ENV = {"OMP_NUM_THREADS": "1"}
# Tiny CPU steps take ~10 ms on an idle machine: 50 ms more each (the trainer's test-only hook) lets a test signal
# a run mid-run, on an idle or a loaded machine alike.
PACED = {**BASE_ENV, "KUBESLOTH_TEST_STEP_DELAY_SECONDS": "0.05"}


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory, tiny_model):
    # Two GPUs: an uninterrupted twin runs beside the interrupted run; a replacement pod can start while the
    # deleted one still writes.
    stack = make_stack(cluster, tmp_path_factory, tiny_model, {"KUBESLOTH_OPERATOR_ENGINE": "cpu"}, gpus=2)
    yield stack
    stack.stop()


# --- reading what happened ---------------------------------------------------------------------------------------
def trainer_pods(k8s, name: str) -> list[dict]:
    return sorted(k8s.pods(name), key=lambda p: (p["metadata"]["creationTimestamp"], p["metadata"]["name"]))


def container_state(pod: dict) -> dict:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return (statuses[0].get("state") or {}) if statuses else {}


def pid_of(pod: dict) -> int | None:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    if not statuses or "running" not in (statuses[0].get("state") or {}):
        return None
    container_id = statuses[0].get("containerID") or ""
    return int(container_id.removeprefix("local://")) if container_id.startswith("local://") else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by the node agent) is not a writer
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def steps(log: str) -> list[tuple[int, float]]:
    return [(int(m[1]), float(m[3])) for m in map(STEP_LINE.match, log.splitlines()) if m]


def resumed_step(log: str) -> int | None:
    match = RESUMING.search(log)
    return int(match[2]) if match else None


def output_dir(stack, name: str) -> Path:
    return stack.volumes / "outputs" / name


def complete_checkpoints(output: Path) -> dict[int, Path]:
    root = output / CHECKPOINTS_DIR
    found = {}
    for entry in sorted(root.glob("step-*")) if root.is_dir() else []:
        if (entry / COMPLETE_MARKER).is_file():
            found[int(entry.name.split("-")[1])] = entry
    return found


def assert_every_complete_checkpoint_loads(output: Path) -> list[int]:
    """Each directory marked COMPLETE: every file its manifest names, with its size; the weights, optimizer and
    trainer state load."""
    import torch
    from safetensors.torch import load_file

    from kubesloth.trainer.checkpoints import verify_manifest

    loaded = []
    for step, path in complete_checkpoints(output).items():
        assert (path / "kubesloth-manifest.json").is_file(), f"{path}: COMPLETE without a manifest"
        assert verify_manifest(path) is None, f"{path}: {verify_manifest(path)}"
        assert load_file(path / "model.safetensors"), path
        torch.load(path / "optimizer.pt", weights_only=True)
        assert json.loads((path / "trainer_state.json").read_text())["global_step"] == step
        loaded.append(step)
    return loaded


def wait_new_running_pod(stack, k8s, name: str, seen: set[str], timeout: float = 180) -> dict:
    def probe():
        for pod in trainer_pods(k8s, name):
            if pod["metadata"]["name"] not in seen and pid_of(pod):
                return pod
        return None
    return wait_for(f"a new running trainer pod of {name} (seen {sorted(seen)})", probe, timeout=timeout)


def wait_trained_past(stack, pod: dict, step: int, timeout: float = 180) -> int:
    """The newest step the pod's trainer logged, once it is >= `step`."""
    def probe():
        done = steps(stack.pod_log(pod))
        return done[-1][0] if done and done[-1][0] >= step else None
    return wait_for(f"{pod['metadata']['name']} past step {step}", probe, timeout=timeout, every=0.05)


def wait_ended(k8s, pod: dict, timeout: float = 120) -> dict:
    """The pod's terminated container state, once it has one."""
    def probe():
        now = k8s.get("pod", pod["metadata"]["name"])
        return container_state(now).get("terminated") if now else None
    return wait_for(f"{pod['metadata']['name']} ended", probe, timeout=timeout)


def sigterm_like_kubelet(pid: int, grace: float) -> bool:
    """SIGTERM the trainer, SIGKILL it if it is still running after `grace` seconds. True when it exited in time."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
        return False
    return True


def kubelet_status(k8s, pod: dict, **status) -> None:
    """Write the pod's status through the API server, as the kubelet (or the scheduler) would."""
    k8s.kubectl("patch", "pod", pod["metadata"]["name"], "-n", k8s.namespace, "--subresource=status",
                "--type=merge", "-p", json.dumps({"status": status}))


def phase_in(k8s, name: str, *phases: str):
    return lambda: k8s.phase(name) in phases and k8s.status(name)


def running_in(k8s, name: str, pod: dict):
    """The status once it says Running in `pod`."""
    def probe():
        status = k8s.status(name)
        return status if status.get("phase") == "Running" and status.get("podName") == pod["metadata"]["name"] \
            else None
    return probe


# --- 1. SIGTERM three times --------------------------------------------------------------------------------------
def test_three_sigterms_with_backoff_limit_1_resume_to_the_uninterrupted_losses(stack, k8s):
    stack.set_namespace_env(k8s.namespace, PACED)
    spec = dict(training={"maxSteps": 40}, output={"checkpointEverySteps": 5, "checkpointsToKeep": 20},
                backoffLimit=1)
    k8s.apply(finetunejob("sigterm", **spec))
    k8s.apply(finetunejob("straight", **spec))  # the uninterrupted twin, on the second GPU

    seen: set[str] = set()
    interrupted_at: list[int] = []
    for kill in range(3):
        pod = wait_new_running_pod(stack, k8s, "sigterm", seen)
        seen.add(pod["metadata"]["name"])
        start = resumed_step(wait_for("the trainer's first step", lambda: steps(stack.pod_log(pod))
                                      and stack.pod_log(pod), timeout=180)) or 0
        if kill:
            assert start == interrupted_at[-1], f"attempt {kill + 1} resumed from {start}, not the newest checkpoint"
        wait_trained_past(stack, pod, start + 2)  # mid-run: some steps of this attempt trained, more to come
        assert sigterm_like_kubelet(pid_of(pod), grace=120), "the trainer did not exit on SIGTERM"
        ended = wait_ended(k8s, pod)
        assert ended["exitCode"] == 6, ended  # Interrupted: checkpointed, resumable
        at = int(INTERRUPTED_AT.search(ended["message"])[1])
        assert at < 40, f"the SIGTERM came too late to interrupt ({at}/40)"
        state = parse_state(ended["message"])
        assert state["interrupt"] == "written" and state["checkpoint"]["step"] == at, state
        assert at in complete_checkpoints(output_dir(stack, "sigterm"))
        interrupted_at.append(at)

    status = wait_for("sigterm Succeeded", phase_in(k8s, "sigterm", "Succeeded", "Failed"), timeout=240)
    assert status["phase"] == "Succeeded", status
    assert (status["interruptions"], status["failures"], status["restarts"]) == (3, 0, 3), status
    pods = trainer_pods(k8s, "sigterm")
    assert len(pods) == 4 and pods[-1]["metadata"]["name"] not in seen
    assert resumed_step(stack.pod_log(pods[-1])) == interrupted_at[-1]
    straight = wait_for("straight Succeeded", phase_in(k8s, "straight", "Succeeded", "Failed"), timeout=240)
    assert straight["phase"] == "Succeeded", straight

    reference = dict(steps(stack.pod_log(trainer_pods(k8s, "straight")[0])))
    assert sorted(reference) == list(range(1, 41))
    trained = [(step, loss) for pod in trainer_pods(k8s, "sigterm") for step, loss in steps(stack.pod_log(pod))]
    assert {step for step, _ in trained} == set(range(1, 41))
    # Every logged step of every attempt (steps after a checkpoint trained twice included) is the twin's.
    off = [(step, loss, reference[step]) for step, loss in trained if abs(loss - reference[step]) > 1e-3]
    assert not off, off
    summary = json.loads((output_dir(stack, "sigterm") / SUMMARY_FILE).read_text())
    assert summary["steps"] == 40 and summary["resumed_from_step"] == interrupted_at[-1]
    assert_every_complete_checkpoint_loads(output_dir(stack, "sigterm"))


# --- 2. a checkpoint write slower than the grace period ----------------------------------------------------------
def test_a_checkpoint_slower_than_the_grace_period_is_skipped_not_half_written(stack, k8s):
    # Every checkpoint commit sleeps 11 s (the trainer's test-only slow-volume hook); the grace period is 10 s.
    stack.set_namespace_env(k8s.namespace, {**PACED, "KUBESLOTH_TEST_CHECKPOINT_DELAY_SECONDS": "11"})
    name = "slowwrite"
    k8s.apply(finetunejob(name, training={"maxSteps": 19}, output={"checkpointEverySteps": 10},
                          terminationGracePeriodSeconds=10))
    output = output_dir(stack, name)
    pod = wait_new_running_pod(stack, k8s, name, set())
    assert k8s.get("pod", pod["metadata"]["name"])["spec"]["terminationGracePeriodSeconds"] == 10
    wait_for("the step 10 checkpoint complete", lambda: 10 in complete_checkpoints(output), timeout=180)
    wait_trained_past(stack, pod, 12)

    # SIGTERM; SIGKILL after the 10 s grace period, as a kubelet does. The last write took 11 s: the trainer does
    # not start one it cannot finish, and exits in time.
    assert sigterm_like_kubelet(pid_of(pod), grace=10), "SIGKILLed: the trainer started a write it could not finish"
    ended = wait_ended(k8s, pod)
    assert ended["exitCode"] == 6, ended
    at = int(INTERRUPTED_AT.search(ended["message"])[1])
    assert 10 < at < 19, ended["message"]
    assert "interrupt checkpoint skipped" in ended["message"] and "10s grace period" in ended["message"]
    # Nothing half-written: the one checkpoint is step 10, complete with every file; no directory for step `at`.
    assert sorted(complete_checkpoints(output)) == [10]
    assert not list((output / CHECKPOINTS_DIR).glob(f"*{at:08d}")), "a directory of the skipped checkpoint"
    assert_every_complete_checkpoint_loads(output)

    # Status says the interrupt checkpoint was lost, and how many steps go again.
    def lost():
        checkpoint = k8s.status(name).get("checkpoint") or {}
        return checkpoint if checkpoint.get("interruptCheckpoint") == "Skipped" else None
    checkpoint = wait_for("status.checkpoint.interruptCheckpoint Skipped", lost, timeout=60)
    assert checkpoint["step"] == 10 and checkpoint["lostSteps"] == at - 10, checkpoint
    assert "interrupt checkpoint skipped" in checkpoint["message"]
    assert checkpoint["path"].endswith(f"outputs/{name}/checkpoints/step-00000010")

    # The run resumes from the previous checkpoint (10) and finishes.
    again = wait_new_running_pod(stack, k8s, name, {pod["metadata"]["name"]})
    wait_for("the resumed trainer's first step", lambda: steps(stack.pod_log(again)), timeout=180)
    assert resumed_step(stack.pod_log(again)) == 10
    assert steps(stack.pod_log(again))[0][0] == 11
    status = wait_for(f"{name} Succeeded", phase_in(k8s, name, "Succeeded", "Failed"), timeout=240)
    assert status["phase"] == "Succeeded", status
    assert (status["interruptions"], status["failures"]) == (1, 0)
    assert status["checkpoint"]["interruptCheckpoint"] == "Skipped"  # still said after the run went on
    assert_every_complete_checkpoint_loads(output)


def test_an_interrupt_checkpoint_cut_by_sigkill_is_lost_never_half_complete(stack, k8s):
    # The estimate is wrong this time: the regular checkpoints are quick, the interrupt one takes 30 s (the
    # trainer's test-only hook) and the kubelet's SIGKILL comes after the 10 s grace period, mid-write.
    stack.set_namespace_env(k8s.namespace, {**PACED, "KUBESLOTH_TEST_INTERRUPT_CHECKPOINT_DELAY_SECONDS": "30",
                                            "KUBESLOTH_LOCK_HEARTBEAT_SECONDS": "1"})
    name = "cutwrite"
    k8s.apply(finetunejob(name, training={"maxSteps": 40}, output={"checkpointEverySteps": 5},
                          terminationGracePeriodSeconds=10))  # backoffLimit 0: a failure would end the run
    output = output_dir(stack, name)
    pod = wait_new_running_pod(stack, k8s, name, set())
    wait_for("a checkpoint", lambda: complete_checkpoints(output), timeout=180)
    wait_trained_past(stack, pod, 7)
    assert not sigterm_like_kubelet(pid_of(pod), grace=10), "the 30 s write finished within 10 s?"
    ended = wait_ended(k8s, pod)
    assert ended["exitCode"] == 137, ended
    newest = max(complete_checkpoints(output))
    at = int(re.search(r"interrupt checkpoint at step (\d+)", ended["message"])[1])
    assert at > newest and "killed while writing the interrupt checkpoint" in ended["message"]
    # The cut write is a staging directory, never a step directory, never marked COMPLETE.
    assert (output / CHECKPOINTS_DIR / ".staging" / f"checkpoint-{at}").is_dir()
    assert not (output / CHECKPOINTS_DIR / f"step-{at:08d}").exists()
    assert_every_complete_checkpoint_loads(output)

    def lost():
        status = k8s.status(name)
        return status if (status.get("checkpoint") or {}).get("interruptCheckpoint") == "Skipped" else None
    status = wait_for("status: the interrupt checkpoint lost", lost, timeout=60)
    assert status["checkpoint"]["step"] == newest and status["checkpoint"]["lostSteps"] == at - newest
    assert "killed while writing the interrupt checkpoint" in status["checkpoint"]["message"]
    assert (status["interruptions"], status["failures"]) == (1, 0), status  # GracePeriodExceeded, not a crash

    again = wait_new_running_pod(stack, k8s, name, {pod["metadata"]["name"]})
    wait_for("the resumed trainer's first step", lambda: steps(stack.pod_log(again)), timeout=180)
    log = stack.pod_log(again)
    assert "removed staging leftovers" in log and resumed_step(log) == newest
    status = wait_for(f"{name} Succeeded", phase_in(k8s, name, "Succeeded", "Failed"), timeout=240)
    assert status["phase"] == "Succeeded", status
    assert (status["interruptions"], status["failures"]) == (1, 0)
    assert_every_complete_checkpoint_loads(output)


# --- 3. recreated with the same output ---------------------------------------------------------------------------
def test_recreated_with_the_same_output_never_resumes_silently(stack, k8s):
    from kubesloth.trainer.tiny import make_tiny_model

    stack.set_namespace_env(k8s.namespace, BASE_ENV)
    narrow = stack.volumes / "models" / "tiny-narrow"
    if not narrow.exists():
        make_tiny_model(narrow, hidden=32)  # another model: another shape
    shared = {"destination": "pvc://outputs/recreated", "checkpointEverySteps": 2}
    output = output_dir(stack, "recreated")

    def delete_and_wait(name: str) -> None:
        k8s.kubectl("delete", "ftj", name, "-n", k8s.namespace)
        wait_for(f"{name}'s children collected", lambda: not k8s.get("job", f"{name}-trainer")
                 and not k8s.get("configmap", f"{name}-config") and not k8s.pods(name), timeout=90)

    k8s.apply(finetunejob("first", output=shared))
    done = wait_for("first Succeeded", phase_in(k8s, "first", "Succeeded", "Failed"), timeout=240)
    assert done["phase"] == "Succeeded", done
    first_uid = json.loads((output / SUMMARY_FILE).read_text())["run"]["uid"]
    delete_and_wait("first")

    # The same FineTuneJob again (a new uid), another learning rate, another model: each refused at once.
    k8s.apply(finetunejob("first", output=shared))
    k8s.apply(finetunejob("otherlr", output=shared, training={"learningRate": 1e-3}))
    k8s.apply(finetunejob("othermodel", output=shared, model={"source": "pvc://models/tiny-narrow"}))
    k8s.apply(finetunejob("othershape", output={**shared, "onExisting": "resume"},
                          model={"source": "pvc://models/tiny-narrow"}))
    expected = {"first": ["metadata.uid"],
                "otherlr": ["metadata.uid", "spec.training.learningRate 0.003 -> 0.001"],
                "othermodel": ["metadata.uid", "spec.model.source pvc://models/tiny-llama -> pvc://models/tiny-narrow"],
                "othershape": ["another model shape", "hidden_size 64 -> 32"]}
    for name, words in expected.items():
        status = wait_for(f"{name} Failed", phase_in(k8s, name, "Succeeded", "Failed"), timeout=240)
        failed = k8s.condition(name, "Failed")
        assert status["phase"] == "Failed" and failed["reason"] == "OutputInUse", (name, status)
        for word in words:
            assert word in failed["message"], (name, word, failed["message"])
        assert "spec.output.onExisting" in failed["message"] and "not retried" in failed["message"]
        assert status["failures"] >= 1 and status["interruptions"] == 0
        pod = trainer_pods(k8s, name)[0]
        assert container_state(pod)["terminated"]["exitCode"] == 7
        assert not steps(stack.pod_log(pod)), f"{name} trained"
    # Nothing of the finished run was touched.
    summary = json.loads((output / SUMMARY_FILE).read_text())
    assert summary["run"]["uid"] == first_uid and summary["steps"] == 4
    assert sorted(complete_checkpoints(output)) == [2, 4]
    for name in expected:
        delete_and_wait(name)

    # The documented way on: onExisting: resume continues the old checkpoints (here to 8 steps) ...
    k8s.apply(finetunejob("first", output={**shared, "onExisting": "resume"}, training={"maxSteps": 8}))
    status = wait_for("resumed Succeeded", phase_in(k8s, "first", "Succeeded", "Failed"), timeout=240)
    assert status["phase"] == "Succeeded", status
    log = stack.pod_log(trainer_pods(k8s, "first")[0])
    assert "onExisting resume: continuing checkpoints (newest step 4)" in log
    assert resumed_step(log) == 4 and [s for s, _ in steps(log)] == [5, 6, 7, 8]
    summary = json.loads((output / SUMMARY_FILE).read_text())
    assert summary["steps"] == 8 and summary["resumed_from_step"] == 4 and summary["run"]["uid"] != first_uid
    delete_and_wait("first")

    # ... and onExisting: restart moves them aside and starts fresh.
    k8s.apply(finetunejob("fresh", output={**shared, "onExisting": "restart"}))
    status = wait_for("restarted Succeeded", phase_in(k8s, "fresh", "Succeeded", "Failed"), timeout=240)
    assert status["phase"] == "Succeeded", status
    log = stack.pod_log(trainer_pods(k8s, "fresh")[0])
    assert "onExisting restart:" in log and resumed_step(log) is None
    assert [s for s, _ in steps(log)] == [1, 2, 3, 4]
    moved = list((output / "superseded").iterdir())
    assert len(moved) == 1 and sorted(complete_checkpoints(moved[0])) == [6, 8]  # the resumed run's, kept
    assert json.loads((output / SUMMARY_FILE).read_text())["resumed_from_step"] is None


# --- 4. the pod deleted while a checkpoint is written ------------------------------------------------------------
def test_pod_deleted_while_a_checkpoint_is_written_never_two_writers(stack, k8s):
    # Each checkpoint commit takes 4 s on purpose; the grace period (30 s) covers the write and an interrupt one.
    stack.set_namespace_env(k8s.namespace, {**BASE_ENV, "KUBESLOTH_TEST_CHECKPOINT_DELAY_SECONDS": "4"})
    name = "deleted"
    k8s.apply(finetunejob(name, training={"maxSteps": 14},
                          output={"checkpointEverySteps": 6, "checkpointsToKeep": 10},
                          terminationGracePeriodSeconds=30))
    output = output_dir(stack, name)
    old = wait_new_running_pod(stack, k8s, name, set())
    old_pid = pid_of(old)
    staging = output / CHECKPOINTS_DIR / ".staging" / "checkpoint-6"
    wait_for("the step 6 checkpoint being written", lambda: staging.is_dir(), timeout=180, every=0.05)
    assert 6 not in complete_checkpoints(output)
    k8s.kubectl("delete", "pod", old["metadata"]["name"], "-n", k8s.namespace, "--wait=false")

    # The Job (v1.20: no podReplacementPolicy) replaces the pod at once, on the free GPU, while the old trainer
    # still writes: the replacement waits for the output's lock.
    new = wait_new_running_pod(stack, k8s, name, {old["metadata"]["name"]}, timeout=120)
    both_alive = alive(old_pid)
    acquired: dict = {}

    def new_holds_the_lock():
        try:
            lock = json.loads((output / LOCK_FILE).read_text())
        except (OSError, ValueError):
            return None
        if lock.get("pod") == new["metadata"]["name"]:
            acquired.update(lock)
            return lock
        return None
    wait_for("the replacement holding the lock", new_holds_the_lock, timeout=180, every=0.05)
    assert both_alive, "the old trainer had exited before the replacement started: nothing was tested"
    new_log = stack.pod_log(new)
    assert f"is held by pod {old['metadata']['name']}" in new_log and "waiting" in new_log
    assert "removed staging leftovers" not in new_log  # the old writer's staging was never touched

    status = wait_for(f"{name} Succeeded", phase_in(k8s, name, "Succeeded", "Failed"), timeout=240)
    assert status["phase"] == "Succeeded", status
    assert (status["interruptions"], status["failures"]) == (1, 0), status  # the deleted pod's attempt, gone or not
    old_log = stack.pod_log(old)
    assert "checkpoint step 6 ->" in old_log  # the write in progress was finished, not cut
    interrupted = int(INTERRUPTED_AT.search(old_log)[1])
    new_log = stack.pod_log(new)
    assert resumed_step(new_log) == interrupted and steps(new_log)[0][0] == interrupted + 1
    # Each checkpoint was written by one trainer: every file of the old one's (the step being written when the pod
    # was deleted, and the interrupt checkpoint) before the replacement got the lock, every file of the
    # replacement's after.
    checkpoints = complete_checkpoints(output)
    assert {6, interrupted, 12} <= set(checkpoints), sorted(checkpoints)
    taken = acquired["acquired_at"]
    for step, path in checkpoints.items():
        times = [f.stat().st_mtime for f in path.rglob("*") if f.is_file()]
        if step <= interrupted:
            assert max(times) < taken, (step, max(times), taken)
        else:
            assert min(times) >= taken, (step, min(times), taken)
    assert sorted(assert_every_complete_checkpoint_loads(output)) == sorted(checkpoints)


def test_a_deleted_running_pod_stays_counted_as_an_interruption_once_it_is_gone(stack, k8s):
    # `kubectl delete pod` of a running trainer: it checkpoints on SIGTERM and exits 6, the node agent (as a
    # kubelet) removes the pod object, the Job's replacement resumes. The pod that said "interrupted" is gone:
    # status.attempts keeps its attempt.
    stack.set_namespace_env(k8s.namespace, PACED)
    name = "deletedpod"
    k8s.apply(finetunejob(name, training={"maxSteps": 30}, output={"checkpointEverySteps": 5}))  # backoffLimit 0
    first = wait_new_running_pod(stack, k8s, name, set())
    wait_trained_past(stack, first, 3)
    running = wait_for("Running in the first pod", running_in(k8s, name, first), timeout=60)
    assert (running["interruptions"], running["failures"]) == (0, 0), running
    k8s.kubectl("delete", "pod", first["metadata"]["name"], "-n", k8s.namespace, "--wait=true", "--timeout=120s")
    assert k8s.get("pod", first["metadata"]["name"]) is None, "the deleted pod object is still there"

    second = wait_new_running_pod(stack, k8s, name, {first["metadata"]["name"]})
    running = wait_for("Running in the replacement", running_in(k8s, name, second), timeout=90)
    assert (running["interruptions"], running["failures"]) == (1, 0), running
    counted = {p["name"]: p for p in running["attempts"]["pods"]}
    ended = counted.get(first["metadata"]["name"]) or {}
    assert running["attempts"]["earlierInterruptions"] == 1 or ended.get("ended") == "Interruption", running
    log = wait_for("the replacement's first step", lambda: steps(stack.pod_log(second)) and stack.pod_log(second),
                   timeout=180)
    assert resumed_step(log), "the replacement did not resume from the deleted trainer's checkpoint"

    status = wait_for(f"{name} Succeeded", phase_in(k8s, name, "Succeeded", "Failed"), timeout=240)
    assert status["phase"] == "Succeeded", status
    assert (status["interruptions"], status["failures"], status["restarts"]) == (1, 0, 1), status
    assert [p["metadata"]["name"] for p in trainer_pods(k8s, name)] == [second["metadata"]["name"]]
    assert_every_complete_checkpoint_loads(output_dir(stack, name))


# --- 5. eviction and preemption as a kubelet writes them ---------------------------------------------------------
def test_eviction_and_preemption_are_their_own_interruptions_not_failures(stack, k8s):
    # A SIGKILLed trainer leaves its lock: a 1 s heartbeat makes it stale after 6 s instead of 60 s.
    stack.set_namespace_env(k8s.namespace, {**PACED, "KUBESLOTH_LOCK_HEARTBEAT_SECONDS": "1"})
    name = "disrupted"
    k8s.apply(finetunejob(name, training={"maxSteps": 60}, output={"checkpointEverySteps": 4}, backoffLimit=0))
    output = output_dir(stack, name)
    seen: set[str] = set()

    def kill_status(pod: dict) -> dict:
        """The container as the kubelet reports it after killing it: exit 137, reason Error (not OOMKilled)."""
        current = k8s.get("pod", pod["metadata"]["name"])
        container = dict(current["status"]["containerStatuses"][0])
        started = container["state"]["running"]["startedAt"]
        container.update(ready=False, started=False, state={"terminated": {
            "exitCode": 137, "reason": "Error", "startedAt": started, "finishedAt": started}})
        return {"phase": "Failed", "containerStatuses": [container],
                "conditions": [c for c in current["status"].get("conditions") or []
                               if c["type"] not in ("Ready", "ContainersReady")]
                + [{"type": "Ready", "status": "False", "lastTransitionTime": started},
                   {"type": "ContainersReady", "status": "False", "lastTransitionTime": started}]}

    # Node-pressure eviction (every version): status.reason Evicted, the container killed.
    first = wait_new_running_pod(stack, k8s, name, seen)
    seen.add(first["metadata"]["name"])
    wait_for("a checkpoint", lambda: complete_checkpoints(output), timeout=180)
    wait_trained_past(stack, first, 6)
    status = kill_status(first)
    kubelet_status(k8s, first, reason="Evicted", message="The node was low on resource: memory. Threshold "
                   "quantity: 100Mi, available: 64Mi. Container trainer was using 3Gi, request is 4Gi.", **status)
    wait_for("the evicted trainer killed", lambda: not alive(pid_of(first)), timeout=30)

    second = wait_new_running_pod(stack, k8s, name, seen)
    seen.add(second["metadata"]["name"])
    running = wait_for("Running again", running_in(k8s, name, second), timeout=90)
    assert (running["interruptions"], running["failures"]) == (1, 0), running
    assert "the last: Evicted" in k8s.condition(name, "Running")["message"]
    log = wait_for("the second trainer's first step", lambda: steps(stack.pod_log(second))
                   and stack.pod_log(second), timeout=180)
    assert "taking over from pod " + first["metadata"]["name"] in log  # the killed trainer's stale lock
    start = resumed_step(log)
    assert start and start >= 4 and start in complete_checkpoints(output)

    # Preemption (>= 1.26: the scheduler's DisruptionTarget condition, then the kubelet kills the container).
    wait_trained_past(stack, second, start + 2)
    status = kill_status(second)
    status["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                                 "message": "kube-scheduler: preempting to accommodate a higher priority pod",
                                 "lastTransitionTime": status["conditions"][0].get("lastTransitionTime")})
    kubelet_status(k8s, second, **status)
    wait_for("the preempted trainer killed", lambda: not alive(pid_of(second)), timeout=30)

    third = wait_new_running_pod(stack, k8s, name, seen)
    running = wait_for("Running a third time", running_in(k8s, name, third), timeout=90)
    assert (running["interruptions"], running["failures"]) == (2, 0), running
    assert "the last: Preempted" in k8s.condition(name, "Running")["message"]

    status = wait_for(f"{name} Succeeded", phase_in(k8s, name, "Succeeded", "Failed"), timeout=240)
    assert status["phase"] == "Succeeded", status
    assert (status["interruptions"], status["failures"]) == (2, 0), status
    reasons = {e["reason"] for e in k8s.events(name)}
    assert not reasons & {"OutOfMemory", "TrainerError", "Failed"}, reasons
    pods = {p["metadata"]["name"]: p for p in trainer_pods(k8s, name)}
    assert pods[first["metadata"]["name"]]["status"]["reason"] == "Evicted"  # as written: nobody overwrote it
    assert any(c["type"] == "DisruptionTarget" for c in pods[second["metadata"]["name"]]["status"]["conditions"])
    assert_every_complete_checkpoint_loads(output)
