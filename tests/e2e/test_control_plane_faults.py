"""Control-plane faults mid-run (issue 11's must-show: "API server outage and etcd restart mid-run keep passing"):
the real trainer on CPU under the real operator and node agent, on a control plane of this module's own (the
session's stays up for the other modules). Each run must end Succeeded with one Job and one pod start, its
checkpoints intact, the outage counted as neither an interruption nor a failure.
"""

from __future__ import annotations

import time

import pytest

from kubesloth.local.cluster import LocalCluster
from kubesloth.local.demo import Kubectl, install_crd

from .conftest import make_stack
from .stack import Cluster, finetunejob, wait_for

pytestmark = pytest.mark.cluster  # (the conftest marks tests of the session's `cluster`; this module has its own)

# Tiny CPU steps take ~10 ms; paced (the trainer's test-only hook) so the run is still going when the fault lands.
PACED = {"OMP_NUM_THREADS": "1", "KUBESLOTH_TEST_STEP_DELAY_SECONDS": "0.25"}
STEPS = 60


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory):
    local = LocalCluster(tmp_path_factory.mktemp("faulty-control-plane"))
    local.up()
    install_crd(local)
    yield local
    local.down()


@pytest.fixture(scope="module")
def stack(own_cluster, tmp_path_factory, tiny_model):
    stack = make_stack(own_cluster, tmp_path_factory, tiny_model, {})
    yield stack
    stack.stop()


@pytest.fixture
def k8s(own_cluster, stack):
    kubectl = Kubectl(own_cluster)  # this module's control plane, not the session's
    namespace = f"faults-{int(time.time() * 1000) % 10**8}"
    kubectl("create", "namespace", namespace)
    stack.set_namespace_env(namespace, PACED)
    yield Cluster(kubectl, namespace)
    kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def run_through(own_cluster, k8s, name: str, component: str, down_seconds: float) -> dict:
    k8s.apply(finetunejob(name, training={"maxSteps": STEPS}, output={"checkpointEverySteps": 10}))
    wait_for("training under way", lambda: ((k8s.status(name).get("progress") or {}).get("step") or 0) >= 5,
             timeout=120, every=0.5)
    own_cluster.stop(component)
    time.sleep(down_seconds)
    own_cluster.start(component)
    status = wait_for("Succeeded after the fault", lambda: k8s.phase(name) == "Succeeded" and k8s.status(name),
                      timeout=240, every=1)
    jobs = k8s.list("jobs", f"kubesloth.io/finetunejob={name}")
    pods = k8s.list("pods", f"kubesloth.io/finetunejob={name}")
    assert len(jobs) == 1 and len(pods) == 1, (jobs, pods)
    assert not status.get("interruptions") and not status.get("failures")
    assert status["progress"]["step"] == STEPS
    reasons = [e["reason"] for e in k8s.events(name)]
    assert reasons.count("Succeeded") == 1, reasons
    return status


def test_an_api_server_outage_mid_run(own_cluster, stack, k8s):
    """Operator, node agent, controller-manager and scheduler all lose the API server for 10 s; the trainer (which
    never talks to it) trains on; everyone catches up when it is back."""
    run_through(own_cluster, k8s, "apiserver-outage", "kube-apiserver", down_seconds=10)


def test_an_etcd_restart_mid_run(own_cluster, stack, k8s):
    """etcd stops for 5 s (the API server answers errors meanwhile) and comes back with its data."""
    run_through(own_cluster, k8s, "etcd-restart", "etcd", down_seconds=5)
