"""The local node agent against the real control plane, with bare pods (no operator): binding and GPU
accounting, env/volume resolution, termination messages, OOM kills and pod deletion."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from .stack import Process, wait_for


@pytest.fixture(scope="module")
def agent(cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("nodeagent")
    process = Process([sys.executable, "-m", "kubesloth.cli", "dev", "nodeagent", "--gpus", "1",
                       "--gpu-product", "Test-GPU", "--work-dir", str(work / "agent"),
                       "--volumes-root", str(work / "volumes")], cluster.env(), work / "nodeagent.log").start()
    process.volumes = work / "volumes"
    yield process
    process.stop()


def pod(name: str, script: str, gpus: int = 1, memory: str | None = None, **extra) -> dict:
    limits = {"nvidia.com/gpu": str(gpus)}
    if memory:
        limits["memory"] = memory
    container = {"name": "main", "image": "unused", "command": ["python", "-c", textwrap.dedent(script)],
                 "resources": {"limits": limits}, **extra.pop("container", {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 5, "containers": [container],
                     **extra}}


def create(kubectl, namespace, body) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))


def get_pod(kubectl, namespace, name) -> dict | None:
    proc = kubectl("get", "pod", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def terminated(kubectl, namespace, name) -> dict | None:
    body = get_pod(kubectl, namespace, name) or {}
    statuses = (body.get("status") or {}).get("containerStatuses") or []
    return statuses and statuses[0]["state"].get("terminated")


def test_node_is_registered_with_fake_gpus(agent, kubectl):
    def registered():
        proc = kubectl("get", "node", "kubesloth-local", "-o", "json", check=False)
        node = json.loads(proc.stdout) if proc.returncode == 0 else {}
        # (an earlier module's agent may have registered the same node name with other labels; the agent creates
        # the Node, then writes its status: wait for both)
        ours = node.get("metadata", {}).get("labels", {}).get("nvidia.com/gpu.product") == "Test-GPU"
        return node if ours and "allocatable" in node.get("status", {}) else None
    node = wait_for("the node registered by this agent", registered, timeout=30)
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "1"
    assert [c["status"] for c in node["status"]["conditions"] if c["type"] == "Ready"] == ["True"]


def test_env_volumes_and_termination_message(agent, kubectl, namespace):
    kubectl("create", "secret", "generic", "tok", "-n", namespace, "--from-literal=token=s3cret")
    kubectl("create", "configmap", "cfg", "-n", namespace, "--from-literal=settings.yaml=lr: 0.1")
    script = """
        import json, os, sys
        out = os.path.join(os.environ["DATA"], "result.json")
        json.dump({"token": os.environ["TOKEN"], "ip": os.environ["POD_IP"], "ns": os.environ["NS"],
                   "cfg": open(sys.argv[1]).read(), "tmp": os.environ.get("TMPDIR", "")}, open(out, "w"))
        open(os.environ["TERM_LOG"], "w").write("all good")
    """
    body = pod("envs", script, container={
        "args": ["/etc/cfg/settings.yaml"],
        "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "token"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "DATA", "value": "/mnt/data/sub"},
                {"name": "TERM_LOG", "value": "/dev/termination-log"}],
        "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}, {"name": "data", "mountPath": "/mnt/data"},
                         {"name": "tmp", "mountPath": "/tmp"}]},
        volumes=[{"name": "cfg", "configMap": {"name": "cfg"}},
                 {"name": "data", "persistentVolumeClaim": {"claimName": "claim-a"}},
                 {"name": "tmp", "emptyDir": {}}])
    (agent.volumes / "claim-a" / "sub").mkdir(parents=True)
    create(kubectl, namespace, body)
    state = wait_for("the pod to finish", lambda: terminated(kubectl, namespace, "envs"), timeout=60)
    assert state["exitCode"] == 0 and state["reason"] == "Completed" and state["message"] == "all good"
    result = json.loads((agent.volumes / "claim-a" / "sub" / "result.json").read_text())
    assert result["token"] == "s3cret" and result["ns"] == namespace and result["cfg"] == "lr: 0.1"
    assert result["ip"].startswith("127.0.0.") and result["ip"] == get_pod(kubectl, namespace, "envs")["status"]["podIP"]
    assert result["tmp"] and result["tmp"] != "/tmp"
    assert get_pod(kubectl, namespace, "envs")["status"]["phase"] == "Succeeded"


def test_failure_falls_back_to_the_log_tail(agent, kubectl, namespace):
    body = pod("crash", "import sys; print('boom: the last words'); sys.exit(3)",
               container={"terminationMessagePolicy": "FallbackToLogsOnError"})
    create(kubectl, namespace, body)
    state = wait_for("the pod to fail", lambda: terminated(kubectl, namespace, "crash"), timeout=60)
    assert state["exitCode"] == 3 and state["reason"] == "Error" and "boom: the last words" in state["message"]
    assert get_pod(kubectl, namespace, "crash")["status"]["phase"] == "Failed"


def test_memory_limit_is_enforced_as_oom_killed(agent, kubectl, namespace):
    script = "import time\nblob = bytearray(400 * 1024 * 1024)\nblob[::4096] = b'x' * len(blob[::4096])\ntime.sleep(60)"
    create(kubectl, namespace, pod("hog", script, memory="150Mi"))
    state = wait_for("the OOM kill", lambda: terminated(kubectl, namespace, "hog"), timeout=60)
    assert state["reason"] == "OOMKilled" and state["exitCode"] == 137


def test_gpu_count_is_respected_and_deletion_stops_the_process(agent, kubectl, namespace):
    marker = agent.volumes / "claim-b" / "stopped"
    script = f"""
        import signal, sys, time
        def stop(*_):
            open({str(marker)!r}, "w").write("SIGTERM")
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        time.sleep(120)
    """
    (agent.volumes / "claim-b").mkdir(parents=True, exist_ok=True)
    create(kubectl, namespace, pod("first", script))
    wait_for("first running", lambda: (get_pod(kubectl, namespace, "first") or {}).get("status", {}).get("phase")
             == "Running", timeout=60)
    create(kubectl, namespace, pod("second", "print('second ran')"))

    def unschedulable():
        conditions = (get_pod(kubectl, namespace, "second") or {}).get("status", {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == "PodScheduled" and c["status"] == "False"), None)
    condition = wait_for("second unschedulable", unschedulable, timeout=30)
    assert condition["reason"] == "Unschedulable" and "Insufficient nvidia.com/gpu" in condition["message"]

    kubectl("delete", "pod", "first", "-n", namespace, "--wait=false")
    wait_for("first gone", lambda: get_pod(kubectl, namespace, "first") is None, timeout=30)
    assert marker.read_text() == "SIGTERM"  # the process got SIGTERM and its grace period
    state = wait_for("second ran once the GPU was free", lambda: terminated(kubectl, namespace, "second"), timeout=60)
    assert state["exitCode"] == 0
