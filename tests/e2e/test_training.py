"""End to end with the real trainer: kubectl apply -> operator (kopf subprocess) -> Job -> node agent runs
`python -m kubesloth.trainer` on the tiny model -> status, conditions and events at each step."""

from __future__ import annotations

import json

import pytest

from .conftest import make_stack
from .stack import finetunejob, wait_for


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory, tiny_model):
    # The real trainer (the default command) on the CPU engine.
    stack = make_stack(cluster, tmp_path_factory, tiny_model, {"KUBESLOTH_OPERATOR_ENGINE": "cpu"})
    yield stack
    stack.stop()


def test_apply_to_succeeded_with_status_conditions_and_events(stack, k8s):
    name = "tiny"
    k8s.apply(finetunejob(name))
    seen: list[str] = []

    def phase_is(wanted):
        def probe():
            phase = k8s.phase(name)
            if phase and (not seen or seen[-1] != phase):
                seen.append(phase)
            return phase == wanted
        return probe

    # The Job, owned by the FineTuneJob (GC deletes it with its owner), with one GPU pod.
    job = wait_for("the trainer Job", lambda: k8s.get("job", f"{name}-trainer"), timeout=30)
    ftj = k8s.get("ftj", name)
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == \
        ("FineTuneJob", name, ftj["metadata"]["uid"], True)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"

    wait_for("phase Running", phase_is("Running"), timeout=60, every=0.2)
    status = k8s.status(name)
    running = k8s.condition(name, "Running")
    assert running["status"] == "True" and running["reason"] == "TrainerRunning"
    assert status["jobName"] == f"{name}-trainer"
    pod = k8s.get("pod", status["podName"])
    assert pod["status"]["phase"] == "Running"
    assert pod["status"]["podIP"].startswith("127.0.0.")
    assert status["startTime"]

    wait_for("phase Succeeded", phase_is("Succeeded"), timeout=240, every=0.5)
    status = k8s.status(name)
    succeeded = k8s.condition(name, "Succeeded")
    assert succeeded["status"] == "True" and succeeded["reason"] == "Completed"
    assert k8s.condition(name, "Running")["status"] == "False"
    assert k8s.condition(name, "Failed")["status"] == "False"
    assert status["completionTime"] and status["restarts"] == 0
    assert status["observedGeneration"] == ftj["metadata"]["generation"]
    assert seen[-1] == "Succeeded" and "Running" in seen and "Failed" not in seen

    # One event per phase transition, in order.
    events = k8s.events(name)
    assert [e["reason"] for e in events] == ["Pending", "Running", "Succeeded"], events
    assert all(e["type"] == "Normal" and e["source"]["component"] == "kubesloth-operator" for e in events)
    assert "trainer pod" in events[1]["message"]

    # The trainer really trained and saved the model where the pvc:// destination maps.
    model_dir = stack.volumes / "outputs" / name / "model"
    assert (model_dir / "config.json").exists()
    assert list(model_dir.glob("*.safetensors"))
    summary = json.loads((stack.volumes / "outputs" / name / "summary.json").read_text())
    assert summary  # written after the verified save

    # Deleting the FineTuneJob garbage-collects its Job, pod and ConfigMap (ownerReferences).
    pod_name = status["podName"]
    k8s.kubectl("delete", "ftj", name, "-n", k8s.namespace)
    wait_for("Job, pod and ConfigMap collected", lambda: not k8s.get("job", f"{name}-trainer")
             and not k8s.get("pod", pod_name) and not k8s.get("configmap", f"{name}-config"), timeout=60)


def test_bad_config_fails_at_once_with_the_trainer_reason(stack, k8s):
    """A dataset the trainer cannot use (a .txt file) passes the API schema; the real trainer exits 2
    (InvalidConfig), which fails the same way again: Failed at once with the trainer's message, no retry burnt
    (v1.20 has no podFailurePolicy: the operator decides and stops the Job, keeping the failed pod)."""
    (stack.volumes / "data" / "notes.txt").write_text("not a dataset\n")
    name = "badconfig"
    k8s.apply(finetunejob(name, dataset={"source": "pvc://data/notes.txt"}, backoffLimit=1))
    wait_for("phase Failed", lambda: k8s.phase(name) == "Failed", timeout=180)
    failed = k8s.condition(name, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "InvalidConfig", failed
    assert "spec.dataset.source" in failed["message"] and "notes.txt" in failed["message"]
    assert "not retried" in failed["message"]
    wait_for("Job stopped", lambda: k8s.get("job", f"{name}-trainer")["spec"]["parallelism"] == 0, timeout=30)
    pods = k8s.pods(name)
    first = min(pods, key=lambda p: p["metadata"]["creationTimestamp"])
    assert first["status"]["phase"] == "Failed"  # kept, with its log
    assert first["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 2
    assert len(pods) <= 2  # the v1.20 Job controller may have started one retry before the operator stopped it
    assert k8s.status(name)["failures"] >= 1 and k8s.status(name)["interruptions"] == 0
    warnings = [e for e in k8s.events(name) if e["reason"] == "Failed"]
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning" and "InvalidConfig" in warnings[0]["message"]
