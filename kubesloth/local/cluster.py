"""A real local Kubernetes control plane: etcd + kube-apiserver + kube-controller-manager + kube-scheduler on loopback.

No scheduler and no kubelet: the node agent (kubesloth.local.nodeagent) plays the node. The binaries are built
once from Debian's own kubernetes source package by hack/build-control-plane.sh and cached outside the clone.
Facts and pitfalls: docs/local-control-plane.md.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

KUBE_VERSION = "v1.20.2"
REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-control-plane.sh"
ADMIN_TOKEN_USER = "kubesloth-admin"


def cache_root() -> Path:
    if os.environ.get("KUBESLOTH_CACHE"):
        return Path(os.environ["KUBESLOTH_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kubesloth"


def bin_dir() -> Path:
    return cache_root() / f"control-plane-{KUBE_VERSION}" / "bin"


# What runs, in start order (stopped in reverse). kube-scheduler places the pods (nodeSelector, tolerations, taints,
# priority, nvidia.com/gpu and the other requests against the node's allocatable); the node agent only runs them.
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


# The scheduler's volume plugins look up PersistentVolumeClaims and their PersistentVolumes; here a claim is a
# directory of the node agent's volumes root (no PVC object, no storage), so they are off. Everything else is the
# default profile: node selectors and affinity, taints and tolerations, resources, priority and preemption.
VOLUME_PLUGINS = ("VolumeBinding", "VolumeRestrictions", "VolumeZone", "NodeVolumeLimits", "EBSLimits",
                  "GCEPDLimits", "AzureDiskLimits")


def scheduler_configuration(kubeconfig: Path, healthz_port: int) -> dict:
    """kube-scheduler's KubeSchedulerConfiguration (v1beta1, what v1.20 reads; JSON is YAML)."""
    off = lambda *names: {"disabled": [{"name": name} for name in names]}  # noqa: E731
    return {"apiVersion": "kubescheduler.config.k8s.io/v1beta1", "kind": "KubeSchedulerConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)}, "leaderElection": {"leaderElect": False},
            # Its insecure healthz/metrics listener on a free loopback port (the default, 0.0.0.0:10251, would
            # clash between two local clusters; v1.20 refuses port 0 here).
            "healthzBindAddress": f"127.0.0.1:{healthz_port}", "metricsBindAddress": f"127.0.0.1:{healthz_port}",
            "profiles": [{"schedulerName": "default-scheduler", "plugins": {
                "preFilter": off("VolumeBinding"), "filter": off(*VOLUME_PLUGINS), "reserve": off("VolumeBinding"),
                "preBind": off("VolumeBinding")}}]}


def ensure_binaries() -> Path:
    """Build (first time, ~6 minutes) or find the cached control-plane binaries."""
    binaries = bin_dir()
    if not all((binaries / name).exists() for name in CONTROL_PLANE):
        subprocess.run(["bash", str(BUILD_SCRIPT)], check=True)
    return binaries


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ControlPlaneError(RuntimeError):
    pass


@dataclass
class LocalCluster:
    """One control plane whose state (etcd data, keys, logs, pids, kubeconfig) lives in `state_dir`."""

    state_dir: Path

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        self._argv: dict[str, list[str]] = {}

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def info_file(self) -> Path:
        return self.state_dir / "cluster.json"

    def info(self) -> dict:
        return json.loads(self.info_file.read_text())

    def env(self) -> dict[str, str]:
        """Environment for kubectl and clients talking to this cluster."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    # --- lifecycle -------------------------------------------------------------------------------------------
    def up(self, timeout: float = 90.0) -> "LocalCluster":
        if self.is_up():
            return self
        self.down()
        binaries = ensure_binaries()
        for sub in ("etcd", "certs", "logs"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        etcd_port, etcd_peer, api_port, kcm_port, scheduler_port = (free_port() for _ in range(5))
        token = os.urandom(16).hex()
        self._write_keys()
        (self.state_dir / "tokens.csv").write_text(
            f'{token},{ADMIN_TOKEN_USER},{ADMIN_TOKEN_USER},"system:masters"\n')
        pids: dict[str, int] = {}
        self._argv = {}
        info = {"apiPort": api_port, "etcdPort": etcd_port, "token": token, "pids": pids,
                "server": f"https://127.0.0.1:{api_port}", "argv": self._argv}
        self._write_kubeconfig(info["server"], token)

        pids["etcd"] = self._spawn("etcd", [
            str(binaries / "etcd"), "--data-dir", str(self.state_dir / "etcd"),
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
            "--log-level=warn",
        ])
        self.info_file.write_text(json.dumps(info))
        certs = self.state_dir / "certs"
        pids["kube-apiserver"] = self._spawn("kube-apiserver", [
            str(binaries / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            f"--secure-port={api_port}", "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--cert-dir={certs}",
            f"--token-auth-file={self.state_dir / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={self.state_dir / 'sa.pub'}",
            f"--service-account-signing-key-file={self.state_dir / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24", "--endpoint-reconciler-type=none",
            # No kubelet creates service-account tokens here: the admission plugin would race (403 "not found").
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=false", "--v=0",
        ])
        self.info_file.write_text(json.dumps(info))
        self._wait_ready(timeout)
        pids["kube-controller-manager"] = self._spawn("kube-controller-manager", [
            str(binaries / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--port=0",
            f"--secure-port={kcm_port}", "--bind-address=127.0.0.1",
            "--controllers=*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-route,-service",
            f"--service-account-private-key-file={self.state_dir / 'sa.key'}",
            f"--root-ca-file={certs / 'apiserver.crt'}",
            "--use-service-account-credentials=false", "--v=0",
        ])
        scheduler_config = self.state_dir / "kube-scheduler.yaml"
        scheduler_config.write_text(json.dumps(scheduler_configuration(self.kubeconfig, free_port())))
        pids["kube-scheduler"] = self._spawn("kube-scheduler", [
            str(binaries / "kube-scheduler"), f"--config={scheduler_config}", "--port=0",
            f"--secure-port={scheduler_port}", "--bind-address=127.0.0.1", "--v=0",
        ])
        self.info_file.write_text(json.dumps(info))
        self._wait_namespace("default", timeout)
        return self

    def down(self) -> None:
        if not self.info_file.exists():
            return
        pids = self.info().get("pids", {})
        for name in reversed(CONTROL_PLANE):
            pid = pids.get(name)
            if pid:
                stop_process_group(pid)
        self.info_file.unlink(missing_ok=True)

    def is_up(self) -> bool:
        if not self.info_file.exists():
            return False
        pids = self.info().get("pids", {})
        if len(pids) < 3 or not all(alive(pid) for pid in pids.values()):
            return False
        try:
            return self._get("/readyz") == "ok"
        except (OSError, ControlPlaneError):
            return False

    # --- helpers ---------------------------------------------------------------------------------------------
    def stop(self, name: str) -> None:
        """Stop one component (a fault test: an API server outage, an etcd restart); `start` brings it back."""
        info = self.info()
        stop_process_group(info["pids"][name])
        info["pids"][name] = None
        self.info_file.write_text(json.dumps(info))

    def start(self, name: str, timeout: float = 60.0) -> None:
        """Start a stopped component again with the argv it first ran with (same ports, same data)."""
        info = self.info()
        self._argv = dict(info["argv"])
        info["pids"][name] = self._spawn(name, info["argv"][name])
        self.info_file.write_text(json.dumps(info))
        if name in ("etcd", "kube-apiserver"):
            self._wait_ready(timeout)

    def _spawn(self, name: str, argv: list[str]) -> int:
        self._argv[name] = argv  # in the info file (up() writes it): start() runs it again
        log = open(self.state_dir / "logs" / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        log.close()
        time.sleep(0.2)
        if proc.poll() is not None:
            raise ControlPlaneError(f"{name} exited at once ({proc.returncode}); see {log.name}")
        return proc.pid

    def _get(self, path: str) -> str:
        info = self.info()
        req = urllib.request.Request(info["server"] + path, headers={"Authorization": f"Bearer {info['token']}"})
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
                return resp.read().decode()
        except urllib.error.HTTPError as err:
            raise ControlPlaneError(f"GET {path}: {err.code}") from err

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            for name, pid in self.info()["pids"].items():
                if not alive(pid):
                    raise ControlPlaneError(f"{name} died; see {self.state_dir / 'logs' / (name + '.log')}")
            try:
                if self._get("/readyz") == "ok":
                    return
            except (OSError, ControlPlaneError) as err:
                last = err
            time.sleep(0.5)
        raise ControlPlaneError(f"kube-apiserver not ready after {timeout}s: {last}")

    def _wait_namespace(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self._get(f"/api/v1/namespaces/{name}")
                return
            except (OSError, ControlPlaneError):
                time.sleep(0.5)
        raise ControlPlaneError(f"namespace {name} never appeared")

    def _write_keys(self) -> None:
        key, pub = self.state_dir / "sa.key", self.state_dir / "sa.pub"
        if key.exists() and pub.exists():
            return
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)], check=True,
                       capture_output=True)

    def _write_kubeconfig(self, server: str, token: str) -> None:
        import yaml

        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "kubesloth-local",
            "clusters": [{"name": "kubesloth-local",
                          "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
            "users": [{"name": ADMIN_TOKEN_USER, "user": {"token": token}}],
            "contexts": [{"name": "kubesloth-local",
                          "context": {"cluster": "kubesloth-local", "user": ADMIN_TOKEN_USER,
                                      "namespace": "default"}}],
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))
        self.kubeconfig.chmod(0o600)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def stop_process_group(pid: int, grace: float = 10.0) -> None:
    """SIGTERM to the process group `pid` leads (started with start_new_session), SIGKILL after `grace`."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.1)
    if alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
