"""The chart installed into the real local control plane (RBAC on) with the Helm v4 SDK, and the operator run as a
local process exactly as the chart's Deployment runs it (command, args, env resolved from the installed objects),
authenticated only as the chart's ServiceAccount (its token Secret, made by the 1.20 token controller).

It proves the RBAC is enough (FineTuneJobs go Pending → Running → Succeeded → deleted by TTL, and suspend deletes a
running Job, with no 403 in the operator's log) and no more (other verbs are refused by the API server).
The node agent plays the kubelet with the admin credentials; the trainer command is a short sleep: what runs in
the pod is not under test here, the operator's API access is."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from kubesloth.local.cluster import REPO_ROOT, free_port

from e2e.stack import wait_for  # the e2e tests' poller (rootdir-relative, as tests/observability does)

from .chart import CHART_DIR

RELEASE_NAMESPACE = "kubesloth-system"
BIN = Path(sys.executable).parent
# An RBAC refusal as the API server words it (kopf and the kubernetes client log the message), or kopf's own note.
# Not any 403: creating in a namespace being deleted (another test's leftovers) is a 403 too, but not RBAC.
FORBIDDEN = re.compile(r'forbidden: User "[^"]+" cannot|Not enough permissions')
TRAINER_SECONDS = 12


def _values(**extra) -> dict:
    return {
        "operator": {
            # Ports free on this machine: the operator runs here, not in a pod.
            "healthPort": free_port(),
            "metricsPort": free_port(),
            "extraEnv": [
                {"name": "KUBESLOTH_OPERATOR_TRAINER_COMMAND",
                 "value": f"python -c 'import time; time.sleep({TRAINER_SECONDS})'"},
                {"name": "KUBESLOTH_OPERATOR_RESYNC_SECONDS", "value": "2"},
            ],
        },
        **extra,
    }


def _ftj(name: str, **spec) -> dict:
    doc = yaml.safe_load((REPO_ROOT / "examples" / "finetunejob-tiny.yaml").read_text())
    doc["metadata"] = {"name": name}
    doc["spec"].update(spec)
    return doc


class Release:
    """One installed release and the credentials of its ServiceAccount."""

    def __init__(self, cluster, kubectl, config: helm.Config, name: str, values: dict, work: Path):
        self.cluster, self.kubectl, self.config, self.name, self.values = cluster, kubectl, config, name, values
        self.work = work
        self.release = config.install(str(CHART_DIR), name, values, namespace=RELEASE_NAMESPACE,
                                      create_namespace=True, timeout=120)
        self.deployment = self._get("deployment", f"{name}-kubesloth")
        self.service_account = self.deployment["spec"]["template"]["spec"]["serviceAccountName"]
        self.kubeconfig = self._service_account_kubeconfig()

    def _get(self, kind: str, name: str, namespace: str = RELEASE_NAMESPACE) -> dict:
        return json.loads(self.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)

    def _service_account_kubeconfig(self) -> Path:
        """A kubeconfig holding only the ServiceAccount's token (from the Secret the token controller creates)."""
        def token_secret():
            sa = self._get("serviceaccount", self.service_account)
            return (sa.get("secrets") or [{}])[0].get("name")

        secret = self._get("secret", wait_for("the ServiceAccount's token Secret", token_secret))
        assert secret["type"] == "kubernetes.io/service-account-token"
        token = base64.b64decode(secret["data"]["token"]).decode()
        server = self.cluster.info()["server"]
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "sa",
            "clusters": [{"name": "local", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
            "users": [{"name": self.service_account, "user": {"token": token}}],
            "contexts": [{"name": "sa", "context": {"cluster": "local", "user": self.service_account}}],
        }
        path = self.work / f"{self.name}-sa.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def as_sa(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        """kubectl with the ServiceAccount's token only."""
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        proc = subprocess.run(["kubectl", *args], env=env, capture_output=True, text=True, timeout=60)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def operator_command(self) -> tuple[list[str], dict[str, str]]:
        """The Deployment's container command, args and env, resolved as the kubelet would."""
        container = self.deployment["spec"]["template"]["spec"]["containers"][0]
        configmaps: dict[str, dict] = {}
        env: dict[str, str] = {}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
                continue
            source = item["valueFrom"]
            if "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                if ref["name"] not in configmaps:
                    configmaps[ref["name"]] = self._get("configmap", ref["name"])["data"]
                env[item["name"]] = configmaps[ref["name"]][ref["key"]]
            elif source.get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
                env[item["name"]] = RELEASE_NAMESPACE
            else:
                raise AssertionError(f"cannot resolve env {item}")
        command = [str(BIN / container["command"][0]), *container["command"][1:], *container.get("args", [])]
        return command, env

    def uninstall(self) -> None:
        self.config.uninstall(self.name, ignore_not_found=True, timeout=60)


@contextmanager
def running(argv: list[str], env: dict[str, str], log: Path):
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=log.parent)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextmanager
def operator(release: Release):
    """The operator as the chart runs it, with the ServiceAccount's kubeconfig and nothing of the admin's."""
    command, chart_env = release.operator_command()
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(release.work), "LANG": "C.UTF-8",
           "KUBECONFIG": str(release.kubeconfig), **chart_env}
    log = release.work / f"{release.name}-operator.log"
    with running(command, env, log) as proc:
        health = release.values["operator"]["healthPort"]

        def healthy():
            assert proc.poll() is None, f"operator exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        # kopf's liveness endpoint, the one the Deployment's probes call.
        wait_for("the operator's /healthz", healthy, timeout=60)
        yield log


@contextmanager
def node_agent(cluster, kubectl, work: Path, gpus: int = 2):
    node = f"chart-{uuid.uuid4().hex[:6]}"
    argv = [str(BIN / "kubesloth"), "dev", "nodeagent", "--node-name", node,
            "--gpus", str(gpus), "--work-dir", str(work / "nodeagent"), "--volumes-root", str(work / "volumes"),
            "--kubeconfig", str(cluster.kubeconfig)]
    try:
        with running(argv, cluster.env(), work / "nodeagent.log") as proc:
            yield proc
    finally:
        kubectl("delete", "node", node, "--ignore-not-found", "--wait=false", check=False)


def kopf_handled(log: Path, namespace: str, name: str) -> bool:
    """kopf's own watch ran a FineTuneJob handler for it (whatever the handler's id)."""
    return re.search(rf"\[{namespace}/{name}\] Handler '[^']+' succeeded", log.read_text()) is not None


def forbidden_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if FORBIDDEN.search(line)]


@pytest.fixture(scope="module")
def helm_config(cluster):
    config = helm.Config(kubeconfig_path=str(cluster.kubeconfig), namespace=RELEASE_NAMESPACE)
    yield config
    config.close()


@pytest.fixture(scope="module")
def cluster_wide(cluster, kubectl, helm_config, tmp_path_factory):
    release = Release(cluster, kubectl, helm_config, "cw", _values(), tmp_path_factory.mktemp("chart-cw"))
    yield release
    release.uninstall()


def _phase(kubectl, namespace: str, name: str) -> str | None:
    proc = kubectl("get", "ftj", name, "-n", namespace, "-o", "json", check=False)
    if proc.returncode != 0:
        return "<deleted>" if "NotFound" in proc.stderr else None
    return json.loads(proc.stdout).get("status", {}).get("phase")


def _exists(kubectl, kind: str, namespace: str, name: str) -> bool:
    return kubectl("get", kind, name, "-n", namespace, check=False).returncode == 0


def test_operator_with_only_the_chart_rbac_runs_finetunejobs(cluster, kubectl, namespace, cluster_wide):
    release = cluster_wide
    # The installed objects are the chart's: ClusterRole bound to the ServiceAccount, the CRD from crds/.
    kubectl("get", "clusterrole", "cw-kubesloth")
    kubectl("get", "crd", "finetunejobs.kubesloth.io")
    with operator(release) as log, node_agent(cluster, kubectl, release.work):
        kubectl("apply", "-n", namespace, "-f", "-",
                input=json.dumps(_ftj("short", ttlSecondsAfterFinished=3)))
        kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_ftj("long")))

        # The Job and the ConfigMap are created and status.phase is set, by the ServiceAccount.
        wait_for("short's Job", lambda: _exists(kubectl, "job", namespace, "short-trainer"))
        assert _exists(kubectl, "configmap", namespace, "short-config")
        wait_for("short's phase", lambda: _phase(kubectl, namespace, "short"))

        # Suspend a running one: the operator deletes its Job (and the node agent stops the pod).
        wait_for("long Running", lambda: _phase(kubectl, namespace, "long") == "Running", timeout=60)
        kubectl("patch", "ftj", "long", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": true}}')
        wait_for("long's Job deleted", lambda: not _exists(kubectl, "job", namespace, "long-trainer"), timeout=60)
        wait_for("long Suspended", lambda: _phase(kubectl, namespace, "long") == "Suspended")

        # short runs to the end, then its TTL makes the operator delete the FineTuneJob itself.
        seen: list[str] = []

        def finished_and_deleted():
            phase = _phase(kubectl, namespace, "short")
            if phase and (not seen or seen[-1] != phase):
                seen.append(phase)
            return phase == "<deleted>"

        wait_for("short Succeeded and deleted by its TTL", finished_and_deleted, timeout=TRAINER_SECONDS + 60)
        assert "Succeeded" in seen, seen

        # The operator's own metrics are served on the port the chart's Service targets.
        metrics_port = release.values["operator"]["metricsPort"]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            assert "kubesloth_reconcile_total" in response.read().decode()

        # Events were posted (events: create).
        events = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
        assert any(e["involvedObject"]["name"] == "long" and e["involvedObject"]["kind"] == "FineTuneJob"
                   for e in events), [e["reason"] for e in events]
    # kopf's watch (not only the resync) handled them, and not one call was refused along the way.
    assert kopf_handled(log, namespace, "short")
    assert forbidden_lines(log) == [], "\n".join(forbidden_lines(log))


# (kubectl auth can-i arguments, allowed?) for the ServiceAccount of a cluster-wide release
CAN_I = [
    (["create", "jobs.batch", "-n", "default"], True),
    (["patch", "finetunejobs.kubesloth.io/status", "-n", "default"], True),
    (["watch", "pods", "--all-namespaces"], True),
    (["get", "secrets", "-n", "default"], False),
    (["delete", "secrets", "-n", RELEASE_NAMESPACE], False),
    (["create", "deployments.apps", "-n", "default"], False),
    (["create", "pods", "-n", "default"], False),
    (["delete", "pods", "-n", "default"], False),
    (["update", "finetunejobs.kubesloth.io", "-n", "default"], False),
    (["create", "finetunejobs.kubesloth.io", "-n", "default"], False),
    (["patch", "configmaps", "-n", "default"], False),
    (["create", "clusterrolebindings.rbac.authorization.k8s.io"], False),
    (["delete", "customresourcedefinitions.apiextensions.k8s.io"], False),
    (["list", "namespaces"], False),  # not needed cluster-wide (kopf lists namespaces only for a list of them)
]


@pytest.mark.parametrize("args,allowed", CAN_I, ids=[" ".join(a) for a, _ in CAN_I])
def test_service_account_can_do_only_what_the_operator_needs(cluster_wide, args, allowed):
    proc = cluster_wide.as_sa("auth", "can-i", *args)
    assert proc.stdout.strip() == ("yes" if allowed else "no"), proc.stdout + proc.stderr


def test_calls_outside_the_rbac_are_refused(kubectl, namespace, cluster_wide):
    kubectl("create", "secret", "generic", "hf-token", "-n", namespace, "--from-literal=token=hunter2")
    refused = [
        ("get", "secret", "hf-token", "-n", namespace),
        ("delete", "secret", "hf-token", "-n", namespace),
        ("create", "deployment", "miner", "--image=busybox", "-n", namespace),
        ("delete", "crd", "finetunejobs.kubesloth.io"),
        ("create", "clusterrolebinding", "escalate", "--clusterrole=cluster-admin",
         f"--serviceaccount={RELEASE_NAMESPACE}:{cluster_wide.service_account}"),
    ]
    for args in refused:
        proc = cluster_wide.as_sa(*args)
        assert proc.returncode != 0 and "forbidden" in proc.stderr.lower(), (args, proc.stdout, proc.stderr)
        # The API server's wording is what the operator-log check above looks for: that check is not vacuous.
        assert FORBIDDEN.search(proc.stderr), proc.stderr
    # Nothing happened: the secret is still there, no deployment was made.
    assert _exists(kubectl, "secret", namespace, "hf-token")
    assert not _exists(kubectl, "deployment", namespace, "miner")
    # The same credentials do work for what is granted (the refusals above are RBAC, not a broken token).
    cluster_wide.as_sa("get", "jobs", "-n", namespace, check=True)


def test_namespaced_release_serves_only_its_namespaces(cluster, kubectl, helm_config, tmp_path):
    watched, other = (f"t-{uuid.uuid4().hex[:8]}" for _ in range(2))
    for ns in (watched, other):
        kubectl("create", "namespace", ns)
    release = Release(cluster, kubectl, helm_config, "nsd", _values(watchNamespaces=[watched]), tmp_path)
    try:
        kubectl("get", "role", "nsd-kubesloth", "-n", watched)
        assert release.as_sa("auth", "can-i", "create", "jobs.batch", "-n", watched).stdout.strip() == "yes"
        assert release.as_sa("auth", "can-i", "create", "jobs.batch", "-n", other).stdout.strip() == "no"
        assert release.as_sa("auth", "can-i", "list", "finetunejobs.kubesloth.io", "-A").stdout.strip() == "no"
        with operator(release) as log:
            for ns in (watched, other):
                kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(_ftj("mine")))
            wait_for("the watched namespace's Job", lambda: _exists(kubectl, "job", watched, "mine-trainer"))
            wait_for("its phase", lambda: _phase(kubectl, watched, "mine"))
            # Two resync rounds later, the other namespace's FineTuneJob is still untouched.
            time.sleep(5)
            assert not _exists(kubectl, "job", other, "mine-trainer")
            assert _phase(kubectl, other, "mine") is None
        # kopf's own watch served it (not only the operator's resync), and nothing was refused.
        assert kopf_handled(log, watched, "mine")
        assert f"[{other}/mine]" not in log.read_text()
        assert forbidden_lines(log) == [], "\n".join(forbidden_lines(log))
    finally:
        release.uninstall()
        for ns in (watched, other):
            kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_upgrade_never_touches_the_crd_and_restarts_the_operator_on_new_prices(kubectl, cluster_wide, tmp_path):
    # A newer chart whose CRD differs: Helm must leave the installed CRD alone (docs/install.md: apply it first).
    chart = tmp_path / "kubesloth"
    shutil.copytree(CHART_DIR, chart)
    crd_file = chart / "crds" / "kubesloth.io_finetunejobs.yaml"
    crd_file.write_text(crd_file.read_text().replace("    app.kubernetes.io/part-of: kubesloth\n",
                                                     "    app.kubernetes.io/part-of: kubesloth\n"
                                                     "    kubesloth.io/newer-chart: \"true\"\n", 1))
    assert "newer-chart" in crd_file.read_text()
    before = cluster_wide._get("deployment", "cw-kubesloth")
    values = {**cluster_wide.values, "gpuPrices": {"NVIDIA-L40S": 0.5}}
    release = cluster_wide.config.upgrade(str(chart), "cw", values, namespace=RELEASE_NAMESPACE, timeout=120)
    assert release["revision"] == 2, sorted(release)
    crd = json.loads(kubectl("get", "crd", "finetunejobs.kubesloth.io", "-o", "json").stdout)
    assert "kubesloth.io/newer-chart" not in crd["metadata"].get("labels", {})
    # The new price reached the ConfigMap, and the pod template changed so the operator restarts with it.
    prices = json.loads(cluster_wide._get("configmap", "cw-kubesloth-config")["data"]["gpu-prices.json"])
    assert prices["NVIDIA-L40S"] == 0.5
    after = cluster_wide._get("deployment", "cw-kubesloth")
    annotation = "checksum/config"
    assert (after["spec"]["template"]["metadata"]["annotations"][annotation]
            != before["spec"]["template"]["metadata"]["annotations"][annotation])


def test_uninstall_keeps_the_crd_and_the_finetunejobs(kubectl, namespace, cluster_wide):
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_ftj("kept", suspend=True)))
    cluster_wide.uninstall()
    assert not _exists(kubectl, "deployment", RELEASE_NAMESPACE, "cw-kubesloth")
    assert kubectl("get", "clusterrole", "cw-kubesloth", check=False).returncode != 0
    # Helm never deletes crds/: the CRD and every FineTuneJob outlive the release (docs/install.md).
    kubectl("get", "crd", "finetunejobs.kubesloth.io")
    assert _exists(kubectl, "ftj", namespace, "kept")
