"""Shared fixtures. `cluster` is a real local control plane (etcd + kube-apiserver + kube-controller-manager),
one per test session; each test that needs isolation takes a fresh `namespace`."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from kubesloth.local.cluster import LocalCluster
from kubesloth.local.demo import install_crd


class Kubectl:
    def __init__(self, cluster: LocalCluster):
        self.cluster = cluster

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["kubectl", *args], env=self.cluster.env(), input=input, text=True,
                              capture_output=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> LocalCluster:
    local = LocalCluster(tmp_path_factory.mktemp("control-plane"))
    local.up()
    install_crd(local)  # applied, then polled until Established (kubesloth/local/demo.py)
    yield local
    local.down()


@pytest.fixture(scope="session")
def kubectl(cluster) -> Kubectl:
    return Kubectl(cluster)


@pytest.fixture
def namespace(kubectl) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


def pytest_collection_modifyitems(items):
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
