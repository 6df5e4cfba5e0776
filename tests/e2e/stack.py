"""The pieces of an end-to-end test: the real operator (`kubesloth operator`, i.e. kopf run) and the real node agent,
each a subprocess with KUBECONFIG set, stopped by pid; and small helpers to read what the API server holds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kubesloth.local.cluster import REPO_ROOT, LocalCluster

PYTHON = sys.executable


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60.0, every: float = 0.3) -> Any:
    """Poll `probe` until it returns something truthy; fail with `what` and the last value after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")


@dataclass
class Process:
    """A subprocess in its own session, logged to a file, stopped by its pid."""

    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self) -> "Process":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=REPO_ROOT, start_new_session=True)
        return self

    def stop(self, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Stack:
    """One operator and one node agent against the session's control plane."""

    cluster: LocalCluster
    work: Path
    operator_env: dict[str, str] = field(default_factory=dict)
    gpus: int = 1
    operator: Process | None = None
    agent: Process | None = None

    @property
    def volumes(self) -> Path:
        return self.work / "volumes"

    def start_operator(self) -> Process:
        env = {**self.cluster.env(), "KUBESLOTH_OPERATOR_RESYNC_SECONDS": "2",
               "KUBESLOTH_OPERATOR_PROMETHEUS_PORT": "0",
               # No hub from here. Tests of the planner before scheduling add KUBESLOTH_OPERATOR_VOLUME_ROOT (the
               # operator then reads pvc:// models where the node agent mounts them).
               "KUBESLOTH_OPERATOR_HUB_CONFIGS": "false",
               **self.operator_env}
        self.operator = Process([PYTHON, "-m", "kubesloth.cli", "operator", "--verbose"], env,
                                self.work / "logs" / "operator.log").start()
        return self.operator

    @property
    def namespace_env_dir(self) -> Path:
        return self.work / "namespace-env"

    def set_namespace_env(self, namespace: str, env: dict[str, str]) -> None:
        """Extra env for the pods the node agent starts in `namespace` from now on (its test hook)."""
        self.namespace_env_dir.mkdir(parents=True, exist_ok=True)
        (self.namespace_env_dir / f"{namespace}.json").write_text(json.dumps(env))

    def pod_log(self, pod: dict) -> str:
        """What the node agent captured of the pod's container (stdout + stderr), "" before it started."""
        meta = pod["metadata"]
        folder = self.work / "nodeagent" / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        logs = sorted(folder.glob("*.log")) if folder.is_dir() else []
        return logs[0].read_text(errors="replace") if logs else ""

    def start(self) -> "Stack":
        self.volumes.mkdir(parents=True, exist_ok=True)
        self.agent = Process([PYTHON, "-m", "kubesloth.cli", "dev", "nodeagent", "--gpus", str(self.gpus),
                              "--work-dir", str(self.work / "nodeagent"), "--volumes-root", str(self.volumes),
                              "--namespace-env-dir", str(self.namespace_env_dir)],
                             self.cluster.env(), self.work / "logs" / "nodeagent.log").start()
        self.start_operator()
        return self

    def stop(self) -> None:
        for process in (self.operator, self.agent):
            if process is not None:
                process.stop()

    def logs(self) -> str:
        return (f"--- operator ---\n{self.operator.log_tail() if self.operator else ''}\n"
                f"--- node agent ---\n{self.agent.log_tail() if self.agent else ''}")


class Cluster:
    """kubectl reads, returning parsed JSON (None when the object does not exist)."""

    def __init__(self, kubectl, namespace: str):
        self.kubectl = kubectl
        self.namespace = namespace

    def get(self, kind: str, name: str) -> dict | None:
        proc = self.kubectl("get", kind, name, "-n", self.namespace, "-o", "json", check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr or "not found" in proc.stderr:
                return None
            raise AssertionError(proc.stderr)
        return json.loads(proc.stdout)

    def list(self, kind: str, selector: str | None = None) -> list[dict]:
        args = ["get", kind, "-n", self.namespace, "-o", "json"]
        if selector:
            args += ["-l", selector]
        return json.loads(self.kubectl(*args).stdout)["items"]

    def status(self, name: str) -> dict:
        return ((self.get("ftj", name) or {}).get("status")) or {}

    def phase(self, name: str) -> str | None:
        return self.status(name).get("phase")

    def condition(self, name: str, kind: str) -> dict | None:
        return next((c for c in self.status(name).get("conditions") or [] if c["type"] == kind), None)

    def events(self, name: str) -> list[dict]:
        items = self.list("events")
        items = [e for e in items if e["involvedObject"].get("kind") == "FineTuneJob"
                 and e["involvedObject"].get("name") == name]
        # Timestamps have second resolution; the resourceVersion (etcd's revision) orders creation exactly.
        return sorted(items, key=lambda e: int(e["metadata"]["resourceVersion"]))

    def apply(self, body: dict) -> None:
        body = {**body, "metadata": {**body["metadata"], "namespace": self.namespace}}
        self.kubectl("apply", "-f", "-", input=json.dumps(body))

    def patch_spec(self, name: str, spec: dict) -> None:
        self.kubectl("patch", "ftj", name, "-n", self.namespace, "--type=merge", "-p", json.dumps({"spec": spec}))

    def pods(self, name: str) -> list[dict]:
        return self.list("pods", f"kubesloth.io/finetunejob={name}")


def finetunejob(name: str, **spec: Any) -> dict:
    """A FineTuneJob on the tiny model and the bundled data (pvc:// claims the node agent maps to folders)."""
    body = {
        "apiVersion": "kubesloth.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {
            "model": {"source": "pvc://models/tiny-llama", "maxSeqLength": 128},
            "dataset": {"source": "pvc://data/alpaca-tiny.jsonl", "format": "alpaca", "maxSamples": 64},
            "training": {"profile": "custom", "maxSteps": 4, "learningRate": 3e-3, "perDeviceBatchSize": 4,
                         "gradientAccumulationSteps": 1, "optimizer": "adamw_torch",
                         "gradientCheckpointing": "false", "lrScheduler": "constant", "warmupRatio": 0.0},
            "output": {"destination": f"pvc://outputs/{name}", "checkpointEverySteps": 2},
            "resources": {"memory": "4Gi", "cpu": "1"},
            "backoffLimit": 0,
        },
    }
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(body["spec"].get(key), dict):
            body["spec"][key] = {**body["spec"][key], **value}
        else:
            body["spec"][key] = value
    return body
