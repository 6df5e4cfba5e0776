"""A local node agent: plays the kubelet for this machine on the local control plane.

It registers a Node with a fake `nvidia.com/gpu` count (and cpu, memory, pods and the volumes root's disk as
ephemeral-storage: what kube-scheduler, which the local control plane runs, places pods against), and runs each
pod bound to it as
a local process (`python` -> this interpreter) with the pod's env (secretKeyRef, configMapKeyRef, fieldRef
resolved), its ConfigMap/Secret volumes written to a local folder, PVC volumes mapped to `<volumes-root>/<claim>`
and every env value/argument that points into a mount path rewritten to the local folder. Each pod gets a
loopback IP 127.0.0.N. It reports phase, container state, exit code and termination message (the file the
container's terminationMessagePath maps to; the log tail under FallbackToLogsOnError), enforces the memory limit
(RSS above it -> SIGKILL -> OOMKilled, exit 137), and stops the process when the pod is deleted (SIGTERM, the
grace period, then SIGKILL), reports how it ended (exit code, termination message) and only then removes the pod
object, as a kubelet does. A pod whose status another node component set to a final phase while its process runs
(the kubelet's eviction manager, played by a test through the API server: `reason: Evicted`, exit 137) has its
process killed at once; the status written stands. Conditions others set on the pod (`DisruptionTarget`, written
by the scheduler or the eviction API on >= 1.26) are kept when the agent reports.

Test hook: with `--namespace-env-dir DIR`, the pods of namespace NS also get the env in `DIR/NS.json` (a JSON
object): one end-to-end test's trainer hooks (e.g. a slow checkpoint write) without restarting the operator.

One container per pod, no init containers, no images: this is a stand-in for tests and the demo, not a runtime.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger("kubesloth.nodeagent")

GPU = "nvidia.com/gpu"
# What the API server and the node lifecycle controller put on a Node that has not yet reported Ready.
STARTUP_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
MERGE = "application/merge-patch+json"
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES = 80
OOM_EXIT = 137
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
# On the Node: the folder holding <namespace>_<pod>_<uid[:8]>/<container>.log for every pod this agent ran.
POD_LOG_DIR_ANNOTATION = "kubesloth.io/pod-log-dir"

_SUFFIX = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "m": 1e-3}


def parse_quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("2Gi", "500m", "1.5") as a number."""
    match = re.fullmatch(r"([0-9.]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?", str(value).strip())
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2) or ""]


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def rewrite_path(value: str, mounts: list[tuple[str, Path]]) -> str:
    """A value that is a mount path or lies under one, rewritten to the local folder (longest mount first).

    A parent of mount paths is rewritten too when every mount under it maps to the same local parent: with
    /mnt/pvc/models -> VOLUMES/models and /mnt/pvc/data -> VOLUMES/data, a root like /mnt/pvc becomes VOLUMES.
    """
    for mount_path, local in mounts:
        if value == mount_path:
            return str(local)
        if value.startswith(mount_path.rstrip("/") + "/"):
            return str(local) + value[len(mount_path.rstrip("/")):]
    if value.startswith("/") and len(value) > 1:
        prefix = value.rstrip("/") + "/"
        parents = {str(local)[: len(str(local)) - len(path) + len(prefix) - 1]
                   for path, local in mounts if path.startswith(prefix) and str(local).endswith(path[len(prefix) - 1:])}
        below = [path for path, _ in mounts if path.startswith(prefix)]
        if below and len(parents) == 1 and all(
                str(local).endswith(path[len(prefix) - 1:]) for path, local in mounts if path.startswith(prefix)):
            return parents.pop()
    return value


def process_tree_rss(pgid: int) -> int:
    """Resident memory (bytes) of every process in the process group `pgid` (the container's processes)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # fields after the comm: state, ppid, pgrp, ...
                continue
            with open(f"/proc/{entry}/statm") as statm:
                total += int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total


def _port_free(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((ip, port))
        except OSError:
            return False
    return True


class StartError(Exception):
    """The container cannot start yet (missing Secret/ConfigMap): reported as a waiting reason, retried."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class Running:
    """A container process this agent started."""

    pod_uid: str
    namespace: str
    name: str
    proc: subprocess.Popen
    ip: str
    started_at: str
    log_path: Path
    termination_path: Path
    fallback_to_logs: bool
    memory_limit: float | None
    image: str
    container: str
    gpus: int
    oom_killed: bool = False
    term_sent_at: float | None = None
    kill_deadline: float | None = None


@dataclass
class AgentConfig:
    node_name: str = "kubesloth-local"
    gpus: int = 1
    gpu_product: str = "Local-CPU"
    work_dir: Path = Path(".kubesloth/nodeagent")
    volumes_root: Path = Path(".kubesloth/volumes")
    python: str = sys.executable
    cpu: str = str(os.cpu_count() or 1)
    memory: str = str(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    poll_seconds: float = 0.5
    labels: dict[str, str] = field(default_factory=dict)
    namespace_env_dir: Path | None = None  # DIR/<namespace>.json: extra env for that namespace's pods (tests)


class NodeAgent:
    def __init__(self, config: AgentConfig, api_client=None):
        from kubernetes import client

        self.config = config
        self.config.work_dir = Path(config.work_dir).resolve()
        self.config.volumes_root = Path(config.volumes_root).resolve()
        self.api_client = api_client or client.ApiClient()
        self.core = client.CoreV1Api(self.api_client)
        self.running: dict[str, Running] = {}
        self.finished: set[str] = set()  # pod uids whose final status was reported
        self.waiting: dict[str, str] = {}  # pod uid -> waiting reason already reported
        self.stop = threading.Event()
        self.wake = threading.Event()
        self._last_heartbeat = 0.0

    # --- the node --------------------------------------------------------------------------------------------
    def node_labels(self) -> dict[str, str]:
        return {"kubernetes.io/hostname": self.config.node_name, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", GPU_PRODUCT_LABEL: self.config.gpu_product,
                "nvidia.com/gpu.count": str(self.config.gpus), "kubesloth.io/local-node": "true",
                **self.config.labels}

    def register(self) -> None:
        from kubernetes.client.exceptions import ApiException

        # No kubelet serves pods/log here: the annotation says where the pods' logs are (`kubesloth logs` reads them).
        annotations = {POD_LOG_DIR_ANNOTATION: str((self.config.work_dir / "pods").resolve())}
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.config.node_name, "labels": self.node_labels(), "annotations": annotations}}
        try:
            self.core.create_node(body, _preload_content=False)
        except ApiException as err:
            if err.status != 409:
                raise
            self.core.patch_node(self.config.node_name, {"metadata": {"labels": self.node_labels(),
                                                                      "annotations": annotations}},
                                 _content_type=MERGE, _preload_content=False)
        self.heartbeat(force=True)
        self._clear_startup_taints()
        log.info("node %s registered: %d x %s (%s)", self.config.node_name, self.config.gpus, GPU,
                 self.config.gpu_product)

    def _clear_startup_taints(self) -> None:
        """The API server taints a new Node not-ready (TaintNodesByCondition); the node lifecycle controller lifts
        it once the node reports Ready. That controller does not run here (it would also evict on missed
        heartbeats), so the agent lifts it after its first Ready status, as that controller would."""
        node = json.loads(self.core.read_node(self.config.node_name, _preload_content=False).data)
        taints = node["spec"].get("taints") or []
        kept = [t for t in taints if t.get("key") not in STARTUP_TAINTS]
        if kept != taints:
            self.core.patch_node(self.config.node_name, {"spec": {"taints": kept or None}}, _content_type=MERGE,
                                 _preload_content=False)

    def _disk_bytes(self) -> int:
        """The volumes root's file system size: where the pods' emptyDirs and caches would go."""
        try:
            stat = os.statvfs(self.config.volumes_root if self.config.volumes_root.exists() else "/")
        except OSError:
            return 0
        return stat.f_blocks * stat.f_frsize

    def heartbeat(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_heartbeat < 10:
            return
        self._last_heartbeat = time.monotonic()
        stamp = now_rfc3339()
        capacity = {"cpu": self.config.cpu, "memory": self.config.memory, "pods": "110",
                    GPU: str(self.config.gpus), "ephemeral-storage": str(self._disk_bytes())}
        status = {"capacity": capacity, "allocatable": capacity,
                  "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                                {"type": "Hostname", "address": self.config.node_name}],
                  "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                  "message": "kubesloth node agent is posting ready status",
                                  "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}],
                  "nodeInfo": {"kubeletVersion": "kubesloth-nodeagent", "operatingSystem": "linux",
                               "architecture": "amd64", "containerRuntimeVersion": "local-process://1",
                               "kernelVersion": os.uname().release, "osImage": "local", "kubeProxyVersion": "",
                               "machineID": "", "systemUUID": "", "bootID": ""}}
        self.core.patch_node_status(self.config.node_name, {"status": status}, _content_type=MERGE,
                                    _preload_content=False)

    # --- the loop --------------------------------------------------------------------------------------------
    def run(self) -> None:
        self.register()
        threading.Thread(target=self._watch, name="pod-watch", daemon=True).start()
        try:
            while not self.stop.is_set():
                self.wake.wait(self.config.poll_seconds)
                self.wake.clear()
                try:
                    self.sync()
                    self.heartbeat()
                except Exception:
                    log.exception("sync failed; retrying")
                    time.sleep(1)
        finally:
            self.shutdown()

    def _watch(self) -> None:
        """Wake the loop on any pod change (the loop itself lists; the watch only makes it prompt)."""
        while not self.stop.is_set():
            try:
                resp = self.core.list_pod_for_all_namespaces(watch=True, timeout_seconds=60,
                                                             _preload_content=False)
                for _ in resp.stream(amt=None):
                    self.wake.set()
                    if self.stop.is_set():
                        break
            except Exception:
                time.sleep(1)

    def sync(self) -> None:
        pods = json.loads(self.core.list_pod_for_all_namespaces(_preload_content=False).data)["items"]
        pods.sort(key=lambda p: p["metadata"].get("creationTimestamp") or "")
        seen = {p["metadata"]["uid"] for p in pods}
        for uid in [uid for uid in self.running if uid not in seen]:
            self._kill_now(self.running.pop(uid))  # deleted outright (grace 0): nothing to report to
        for pod in pods:
            meta, spec = pod["metadata"], pod["spec"]
            uid, phase = meta["uid"], (pod.get("status") or {}).get("phase")
            node = spec.get("nodeName")
            if meta.get("deletionTimestamp"):
                if node == self.config.node_name:
                    self._terminate(pod)
                continue
            if node == self.config.node_name:
                if uid in self.running and phase in ("Failed", "Succeeded"):
                    self._ended_elsewhere(pod, self.running.pop(uid))
                elif uid in self.running:
                    self._check(pod, self.running[uid])
                elif phase in (None, "Pending") and uid not in self.finished:
                    self._start(pod)
                elif phase == "Running" and uid not in self.finished:
                    # Running before this agent started: the process is gone (like a node that rebooted).
                    self._report_lost(pod)

    @staticmethod
    def _gpus_wanted(pod: dict[str, Any]) -> int:
        total = 0
        for container in pod["spec"].get("containers", []):
            resources = container.get("resources") or {}
            wanted = (resources.get("limits") or {}).get(GPU) or (resources.get("requests") or {}).get(GPU)
            total += int(parse_quantity(wanted)) if wanted else 0
        return total

    # --- starting a container --------------------------------------------------------------------------------
    def _pod_dir(self, pod: dict[str, Any]) -> Path:
        meta = pod["metadata"]
        return self.config.work_dir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"

    def _read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException
        call = self.core.read_namespaced_secret if kind == "Secret" else self.core.read_namespaced_config_map
        try:
            return json.loads(call(name, namespace, _preload_content=False).data)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def _volumes(self, pod: dict[str, Any], pod_dir: Path) -> dict[str, Path]:
        namespace = pod["metadata"]["namespace"]
        local: dict[str, Path] = {}
        for volume in pod["spec"].get("volumes") or []:
            name = volume["name"]
            if "persistentVolumeClaim" in volume:
                path = self.config.volumes_root / volume["persistentVolumeClaim"]["claimName"]
            elif "hostPath" in volume:
                path = Path(volume["hostPath"]["path"])
            elif "configMap" in volume or "secret" in volume:
                kind = "ConfigMap" if "configMap" in volume else "Secret"
                source = volume.get("configMap") or volume.get("secret")
                ref = source.get("name") or source.get("secretName")
                obj = self._read(kind, namespace, ref)
                if obj is None:
                    if source.get("optional"):
                        obj = {}
                    else:
                        raise StartError("ContainerCreating", f'{kind.lower()} "{ref}" not found')
                data = dict(obj.get("data") or {})
                if kind == "Secret":
                    data = {k: base64.b64decode(v).decode() for k, v in data.items()}
                path = pod_dir / "volumes" / name
                if path.exists():
                    shutil.rmtree(path)
                path.mkdir(parents=True)
                items = source.get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    target = path / item["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(data.get(item["key"], ""))
            else:  # emptyDir and anything else: a fresh folder
                path = pod_dir / "volumes" / name
            path.mkdir(parents=True, exist_ok=True)
            local[name] = path
        return local

    def _env(self, pod: dict[str, Any], container: dict[str, Any], ip: str) -> dict[str, str]:
        meta = pod["metadata"]
        fields = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
                  "metadata.uid": meta["uid"], "spec.nodeName": self.config.node_name,
                  "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
                  "status.podIP": ip, "status.hostIP": "127.0.0.1"}
        env: dict[str, str] = {}
        for item in container.get("env") or []:
            source = item.get("valueFrom")
            if source is None:
                env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)),
                                           item.get("value", ""))
            elif "fieldRef" in source:
                env[item["name"]] = fields.get(source["fieldRef"]["fieldPath"], "")
            elif "secretKeyRef" in source or "configMapKeyRef" in source:
                kind = "Secret" if "secretKeyRef" in source else "ConfigMap"
                ref = source.get("secretKeyRef") or source.get("configMapKeyRef")
                obj = self._read(kind, meta["namespace"], ref["name"])
                data = (obj or {}).get("data") or {}
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    what = f'{kind.lower()} "{ref["name"]}"'
                    raise StartError("CreateContainerConfigError", f"{what} not found" if obj is None
                                     else f"couldn't find key {ref['key']} in {what}")
                value = data[ref["key"]]
                env[item["name"]] = base64.b64decode(value).decode() if kind == "Secret" else value
            elif "resourceFieldRef" in source:
                resource = source["resourceFieldRef"]["resource"]
                kind, _, res = resource.partition(".")
                env[item["name"]] = str(((container.get("resources") or {}).get(kind) or {}).get(res, ""))
        env.update(self._namespace_env(meta["namespace"]))
        return env

    def _namespace_env(self, namespace: str) -> dict[str, str]:
        """The test hook's extra env for this namespace's pods (`--namespace-env-dir`), {} without one."""
        if self.config.namespace_env_dir is None:
            return {}
        path = Path(self.config.namespace_env_dir) / f"{namespace}.json"
        try:
            extra = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.warning("ignoring %s: %s", path, err)
            return {}
        return {str(k): str(v) for k, v in extra.items()} if isinstance(extra, dict) else {}

    def _start(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        containers = spec.get("containers") or []
        if len(containers) != 1 or spec.get("initContainers"):
            self._finish_without_process(pod, 1, "Unsupported",
                                         "the local node agent runs exactly one container and no init containers")
            return
        container = containers[0]
        pod_dir = self._pod_dir(pod)
        pod_dir.mkdir(parents=True, exist_ok=True)
        ip = self._allocate_ip([p["containerPort"] for p in container.get("ports") or [] if p.get("containerPort")])
        try:
            volumes = self._volumes(pod, pod_dir)
            env = self._env(pod, container, ip)
        except StartError as err:
            if self.waiting.get(uid) != err.message:
                self.waiting[uid] = err.message
                self._patch_pod_status(pod, {"phase": "Pending", "containerStatuses": [{
                    "name": container["name"], "ready": False, "restartCount": 0, "image": container.get("image", ""),
                    "imageID": "", "started": False,
                    "state": {"waiting": {"reason": err.reason, "message": err.message}}}]})
            return
        self.waiting.pop(uid, None)

        termination_path = pod_dir / "termination-log"
        termination_path.write_text("")
        mounts: list[tuple[str, Path]] = []
        for mount in container.get("volumeMounts") or []:
            if mount["name"] in volumes:
                local = volumes[mount["name"]] / mount.get("subPath", "")
                mounts.append((mount["mountPath"], local))
        mounts.sort(key=lambda item: len(item[0]), reverse=True)
        container_termination_path = container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
        mounts.insert(0, (container_termination_path, termination_path))

        env = {key: rewrite_path(value, mounts) for key, value in env.items()}
        command = [rewrite_path(arg, mounts) for arg in (container.get("command") or []) + (container.get("args") or [])]
        if not command:
            self._finish_without_process(pod, 1, "Unsupported",
                                         "the local node agent needs an explicit command (it cannot run images)")
            return
        if command[0] in ("python", "python3") or re.fullmatch(r"python3(\.\d+)?", command[0]):
            command[0] = self.config.python
        home = pod_dir / "home"
        home.mkdir(exist_ok=True)
        base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8",
                "HOSTNAME": meta["name"]}
        tmp = next((local for path, local in mounts if path == "/tmp"), None)
        if tmp:
            base["TMPDIR"] = str(tmp)
        workdir = rewrite_path(container["workingDir"], mounts) if container.get("workingDir") else str(pod_dir)
        log_path = pod_dir / f"{container['name']}.log"
        with open(log_path, "ab") as out:
            try:
                proc = subprocess.Popen(command, env={**base, **env}, cwd=workdir, stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as err:
                self._finish_without_process(pod, 128, "StartError", f"cannot run {command[0]}: {err}")
                return
        limit = ((container.get("resources") or {}).get("limits") or {}).get("memory")
        started = now_rfc3339()
        run = Running(pod_uid=uid, namespace=meta["namespace"], name=meta["name"], proc=proc, ip=ip,
                      started_at=started, log_path=log_path, termination_path=termination_path,
                      fallback_to_logs=container.get("terminationMessagePolicy") == "FallbackToLogsOnError",
                      memory_limit=parse_quantity(limit) if limit else None, image=container.get("image", ""),
                      container=container["name"], gpus=self._gpus_wanted(pod))
        self.running[uid] = run
        log.info("started pod %s/%s as pid %d on %s: %s", meta["namespace"], meta["name"], proc.pid, ip,
                 " ".join(command))
        self._patch_pod_status(pod, {
            "phase": "Running", "hostIP": "127.0.0.1", "podIP": ip, "podIPs": [{"ip": ip}], "startTime": started,
            "conditions": self._conditions(ready=True),
            "containerStatuses": [self._container_status(run, {"running": {"startedAt": started}}, ready=True)]})

    def _allocate_ip(self, ports: list[int]) -> str:
        """A loopback address no running pod has, where the pod's declared ports are free: every pod shares this
        machine's network, so another process on 127.0.0.2:9400 would make the trainer's metrics bind fail."""
        taken = {run.ip for run in self.running.values()}
        candidates = [f"127.0.0.{n}" for n in range(2, 255) if f"127.0.0.{n}" not in taken]
        if not candidates:
            raise RuntimeError("no free loopback address")
        # In random order: a second agent on this machine (another control plane) checks the same ports in the
        # seconds before our trainer binds them; the first free address would be the same for both.
        random.shuffle(candidates)
        for ip in candidates:
            if all(_port_free(ip, port) for port in ports):
                return ip
        return candidates[0]  # a wildcard bind holds the port everywhere: start anyway, the pod reports it

    @staticmethod
    def _conditions(ready: bool, pod: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The kubelet's own conditions, plus those others set on `pod` (DisruptionTarget: the status patch
        replaces the list, and a kubelet keeps conditions it does not own)."""
        stamp = now_rfc3339()
        value = "True" if ready else "False"
        own = [{"type": "Initialized", "status": "True", "lastTransitionTime": stamp},
               {"type": "Ready", "status": value, "lastTransitionTime": stamp},
               {"type": "ContainersReady", "status": value, "lastTransitionTime": stamp},
               {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp}]
        mine = {c["type"] for c in own}
        others = [c for c in ((pod or {}).get("status") or {}).get("conditions") or [] if c.get("type") not in mine]
        return own + others

    @staticmethod
    def _container_status(run: Running, state: dict[str, Any], ready: bool) -> dict[str, Any]:
        return {"name": run.container, "ready": ready, "started": ready, "restartCount": 0, "image": run.image,
                "imageID": "", "containerID": f"local://{run.proc.pid}", "state": state}

    # --- watching a running container ------------------------------------------------------------------------
    def _check(self, pod: dict[str, Any], run: Running) -> None:
        code = run.proc.poll()
        if code is None and run.memory_limit:
            rss = process_tree_rss(run.proc.pid)
            if rss > run.memory_limit:
                log.warning("pod %s/%s: RSS %d > limit %d: OOM kill", run.namespace, run.name, rss, run.memory_limit)
                run.oom_killed = True
                self._signal(run, signal.SIGKILL)
                code = run.proc.wait()
        if code is None:
            return
        self.running.pop(run.pod_uid, None)
        self._report_exit(pod, run, code)

    def _report_exit(self, pod: dict[str, Any], run: Running, code: int) -> None:
        if code < 0:  # killed by a signal: the container runtime reports 128 + signal
            code = 128 - code
        if run.oom_killed:
            reason, code = "OOMKilled", OOM_EXIT
        else:
            reason = "Completed" if code == 0 else "Error"
        message = run.termination_path.read_text(errors="replace")[:MAX_TERMINATION_MESSAGE].strip() \
            if run.termination_path.exists() else ""
        if not message and code != 0 and run.fallback_to_logs:
            lines = run.log_path.read_text(errors="replace").splitlines()[-FALLBACK_LOG_LINES:]
            message = "\n".join(lines)[-2048:]
        terminated = {"exitCode": code, "reason": reason, "startedAt": run.started_at, "finishedAt": now_rfc3339(),
                      "containerID": f"local://{run.proc.pid}"}
        if message:
            terminated["message"] = message
        self.finished.add(run.pod_uid)
        log.info("pod %s/%s exited %d (%s)", run.namespace, run.name, code, reason)
        self._patch_pod_status(pod, {
            "phase": "Succeeded" if code == 0 else "Failed",
            "conditions": self._conditions(ready=False, pod=pod),
            "containerStatuses": [self._container_status(run, {"terminated": terminated}, ready=False)]})

    def _ended_elsewhere(self, pod: dict[str, Any], run: Running) -> None:
        """The pod's status says it ended while its process runs: written by another part of the node (the
        kubelet's eviction manager kills the containers of a pod it evicts). Kill the process; the status stands."""
        self.finished.add(run.pod_uid)
        if run.proc.poll() is None:
            log.info("pod %s/%s: status phase %s (reason %s) set while running: killing pid %d", run.namespace,
                     run.name, pod["status"].get("phase"), pod["status"].get("reason", "-"), run.proc.pid)
            self._signal(run, signal.SIGKILL)
        run.proc.wait()

    def _finish_without_process(self, pod: dict[str, Any], code: int, reason: str, message: str) -> None:
        self.finished.add(pod["metadata"]["uid"])
        container = (pod["spec"].get("containers") or [{}])[0]
        stamp = now_rfc3339()
        self._patch_pod_status(pod, {"phase": "Failed", "reason": reason, "message": message,
                                     "conditions": self._conditions(ready=False),
                                     "containerStatuses": [{
                                         "name": container.get("name", "main"), "ready": False, "restartCount": 0,
                                         "image": container.get("image", ""), "imageID": "", "started": False,
                                         "state": {"terminated": {"exitCode": code, "reason": reason,
                                                                  "message": message, "startedAt": stamp,
                                                                  "finishedAt": stamp}}}]})

    def _report_lost(self, pod: dict[str, Any]) -> None:
        self._finish_without_process(pod, 137, "ContainerLost",
                                     "the node agent restarted and the container process is gone")

    # --- stopping --------------------------------------------------------------------------------------------
    @staticmethod
    def _signal(run: Running, sig: int) -> None:
        try:
            os.killpg(run.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _terminate(self, pod: dict[str, Any]) -> None:
        """A deleted pod: SIGTERM, the grace period, SIGKILL; then remove the pod object (the kubelet's part)."""
        meta = pod["metadata"]
        run = self.running.get(meta["uid"])
        if run is not None and run.proc.poll() is None:
            if run.term_sent_at is None:
                grace = meta.get("deletionGracePeriodSeconds")
                if grace is None:
                    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
                run.term_sent_at = time.monotonic()
                run.kill_deadline = run.term_sent_at + float(grace)
                log.info("pod %s/%s deleted: SIGTERM to pid %d (grace %ss)", run.namespace, run.name,
                         run.proc.pid, grace)
                self._signal(run, signal.SIGTERM)
            elif time.monotonic() >= (run.kill_deadline or 0):
                self._signal(run, signal.SIGKILL)
            if run.proc.poll() is None:
                return
        if run is not None:
            code = run.proc.wait()
            self.running.pop(meta["uid"], None)
            if meta["uid"] not in self.finished:
                # As a kubelet does: the container's end (exit code, termination message) is reported before the
                # pod object goes, so controllers and the operator see how a deleted pod ended.
                self._report_exit(pod, run, code)
        from kubernetes.client import V1DeleteOptions, V1Preconditions
        from kubernetes.client.exceptions import ApiException
        try:
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"], body=V1DeleteOptions(
                grace_period_seconds=0, preconditions=V1Preconditions(uid=meta["uid"])), _preload_content=False)
        except ApiException as err:
            if err.status not in (404, 409):
                raise
        self.finished.discard(meta["uid"])
        log.info("pod %s/%s removed", meta["namespace"], meta["name"])

    def _kill_now(self, run: Running, grace: float = 2.0) -> None:
        self._signal(run, signal.SIGTERM)
        try:
            run.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self._signal(run, signal.SIGKILL)
            run.proc.wait()

    def shutdown(self) -> None:
        self.stop.set()
        for run in list(self.running.values()):
            self._kill_now(run)
        self.running.clear()
        # The node goes with its agent: a Node left behind would have kube-scheduler bind pods that nobody runs
        # (and whose deletion then waits for a kubelet forever); the pod GC removes pods still bound to it.
        try:
            self.core.delete_node(self.config.node_name, _preload_content=False)
        except Exception:
            log.warning("could not delete node %s", self.config.node_name, exc_info=True)

    def _patch_pod_status(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException
        meta = pod["metadata"]
        try:
            self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": status},
                                                  _content_type=MERGE, _preload_content=False)
        except ApiException as err:
            if err.status != 404:
                raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubesloth dev nodeagent", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node-name", default="kubesloth-local")
    parser.add_argument("--gpus", type=int, default=1, help="fake nvidia.com/gpu count the node offers")
    parser.add_argument("--gpu-product", default="Local-CPU", help="the node's nvidia.com/gpu.product label")
    parser.add_argument("--work-dir", default=".kubesloth/nodeagent", help="pod folders, logs, ConfigMap files")
    parser.add_argument("--volumes-root", default=".kubesloth/volumes", help="pvc://CLAIM -> VOLUMES_ROOT/CLAIM")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="extra node label")
    parser.add_argument("--namespace-env-dir", default=None, metavar="DIR",
                        help="test hook: the pods of namespace NS also get the env in DIR/NS.json")
    parser.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG")


def run_from_args(args: argparse.Namespace) -> int:
    if args.gpus < 0:
        print("--gpus: must be >= 0", file=sys.stderr)
        return 2
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"--label {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        labels[key] = value
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kubernetes import config as kube_config
    kube_config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    from kubernetes import client as kube_client
    if not kube_client.Configuration.get_default_copy().verify_ssl:
        import urllib3  # the local control plane's kubeconfig skips TLS verification: one warning per request
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    agent = NodeAgent(AgentConfig(node_name=args.node_name, gpus=args.gpus, gpu_product=args.gpu_product,
                                  work_dir=Path(args.work_dir), volumes_root=Path(args.volumes_root), labels=labels,
                                  namespace_env_dir=Path(args.namespace_env_dir) if args.namespace_env_dir else None))

    def stop(signum, _frame):
        agent.stop.set()
        agent.wake.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
