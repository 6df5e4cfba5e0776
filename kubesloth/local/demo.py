"""README command 1: a FineTuneJob end to end on the local control plane.

Brings the control plane up, installs the CRD, starts the operator and the node agent as subprocesses (logs in
.kubesloth/logs/), puts the tiny model and the bundled data where the example's pvc:// claims point
(.kubesloth/volumes/<claim>), applies the example, waits for Succeeded or Failed, prints `kubectl get ftj -o wide`
and where the model was written. Everything is stopped afterwards unless --keep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from kubesloth.api import contract
from kubesloth.local.cluster import REPO_ROOT, LocalCluster, alive, stop_process_group

CRD_FILE = REPO_ROOT / "crds" / "kubesloth.io_finetunejobs.yaml"
DATA_FILE = REPO_ROOT / "examples" / "data" / "alpaca-tiny.jsonl"


def kubectl(cluster: LocalCluster, *args: str, check: bool = True, capture: bool = False
            ) -> subprocess.CompletedProcess:
    return subprocess.run(["kubectl", *args], env=cluster.env(), check=check, text=True,
                          capture_output=capture)


class Kubectl:
    """kubectl bound to one local control plane, for tests: captured output, a 120 s limit, and a failure that
    shows kubectl's stderr (check=False: the CompletedProcess whatever the exit code)."""

    def __init__(self, cluster: LocalCluster):
        self.cluster = cluster

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["kubectl", *args], env=self.cluster.env(), input=input, text=True,
                              capture_output=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc


def install_crd(cluster: LocalCluster) -> None:
    kubectl(cluster, "apply", "-f", str(CRD_FILE))
    # Polled: right after the apply the CRD may have no status yet, and `kubectl wait` then fails at once
    # ("status.conditions accessor error: <nil>") instead of waiting.
    deadline = time.monotonic() + 60
    while kubectl(cluster, "get", "crd/finetunejobs.kubesloth.io", "-o",
                  'jsonpath={.status.conditions[?(@.type=="Established")].status}', check=False,
                  capture=True).stdout.strip() != "True":
        if time.monotonic() > deadline:
            raise RuntimeError("crd/finetunejobs.kubesloth.io was not Established within 60 s")
        time.sleep(0.2)


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


class Background:
    """The operator and node agent processes; their pids are kept in a file so a later run (or --keep) can stop
    them: two operators on one control plane would fight over every object."""

    def __init__(self, root: Path):
        self.root = root
        self.pid_file = root / "demo-pids.json"
        self.logs = root / "logs"

    def stop_leftovers(self) -> None:
        if not self.pid_file.exists():
            return
        for name, pid in json.loads(self.pid_file.read_text()).items():
            if alive(pid):
                say(f"stopping the {name} left by an earlier run (pid {pid})")
                stop_process_group(pid, grace=15.0)
        self.pid_file.unlink()

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=REPO_ROOT, start_new_session=True)
        pids = json.loads(self.pid_file.read_text()) if self.pid_file.exists() else {}
        pids[name] = proc.pid
        self.pid_file.write_text(json.dumps(pids))
        return proc

    def stop_all(self) -> None:
        if not self.pid_file.exists():
            return
        for pid in json.loads(self.pid_file.read_text()).values():
            stop_process_group(pid, grace=15.0)
        self.pid_file.unlink()


def prepare_volumes(volumes: Path, spec: dict) -> Path:
    """The tiny model and the data where the example's claims point; a fresh output folder (no resume)."""
    model = volumes / "models" / "tiny-llama"
    if not (model / "config.json").exists():
        say(f"making the tiny model in {model}")
        subprocess.run([sys.executable, "-m", "kubesloth.trainer.tiny", "--out", str(model)], check=True)
    (volumes / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA_FILE, volumes / "data" / DATA_FILE.name)
    destination = spec["output"]["destination"]
    if not destination.startswith("pvc://"):
        raise SystemExit(f"the demo maps pvc:// destinations to local folders; got {destination}")
    output = volumes / destination[len("pvc://"):]
    if output.exists():
        shutil.rmtree(output)
    return output


def wait_for_outcome(cluster: LocalCluster, name: str, namespace: str, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        proc = kubectl(cluster, "get", "ftj", name, "-n", namespace, "-o", "json", check=False, capture=True)
        if proc.returncode == 0:
            status = json.loads(proc.stdout).get("status") or {}
            phase = status.get("phase")
            progress = (status.get("progress") or {}).get("display")
            line = (f"{phase} {progress or ''} {status.get('message') or ''}".strip() if phase
                    else "waiting for the operator")
            if line != last:
                say(line)
                last = line
            if phase in ("Succeeded", "Failed"):
                return phase
        time.sleep(2)
    return None


def run_demo(state_dir: Path, example: Path, timeout: float = 600.0, keep: bool = False) -> int:
    cluster = LocalCluster(state_dir)
    root = cluster.state_dir.parent  # .kubesloth/
    volumes = root / "volumes"
    background = Background(root)
    background.stop_leftovers()
    body = yaml.safe_load(Path(example).read_text())
    name = body["metadata"]["name"]
    namespace = body["metadata"].get("namespace", "default")

    say(f"starting the local control plane in {cluster.state_dir}")
    cluster.up()
    ok = False
    try:
        install_crd(cluster)
        output = prepare_volumes(volumes, body["spec"])
        env = cluster.env()
        background.start("nodeagent", [sys.executable, "-m", "kubesloth.cli", "dev", "nodeagent",
                                       "--work-dir", str(root / "nodeagent"), "--volumes-root", str(volumes)], env)
        # One machine: the operator reads models where the node agent mounts them (the planner's config.json).
        background.start("operator", [sys.executable, "-m", "kubesloth.cli", "operator"],
                         {**env, "KUBESLOTH_OPERATOR_VOLUME_ROOT": str(volumes)})
        say(f"operator and node agent started (logs in {background.logs})")
        # A rerun starts from scratch: the old FineTuneJob goes first, its Job and ConfigMap before it (foreground),
        # so the new one does not find their names taken.
        kubectl(cluster, "delete", "ftj", name, "-n", namespace, "--ignore-not-found", "--cascade=foreground",
                "--wait=true", "--timeout=120s")
        kubectl(cluster, "apply", "-f", str(example))
        phase = wait_for_outcome(cluster, name, namespace, timeout)
        kubectl(cluster, "get", "ftj", "-n", namespace, "-o", "wide")
        if phase == "Succeeded":
            say(f"the fine-tuned model is in {output / contract.FINAL_MODEL_DIR}")
            ok = True
        elif phase == "Failed":
            say(f"the run failed; see `kubectl describe ftj {name}` and {background.logs}")
        else:
            say(f"no outcome after {timeout:.0f}s; see {background.logs}")
    finally:
        if keep:
            say(f"left running: export KUBECONFIG={cluster.kubeconfig}   (stop: kubesloth dev demo stops "
                f"leftovers; `make clean` stops the control plane)")
        else:
            background.stop_all()
            cluster.down()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_demo(Path(".kubesloth/cluster"), REPO_ROOT / "examples" / "finetunejob-tiny.yaml"))
