"""Shared fixtures. `cluster` is a real local control plane (etcd + kube-apiserver + kube-controller-manager),
one per test session; each test that needs isolation takes a fresh `namespace`."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from kubesloth.local.cluster import LocalCluster
from kubesloth.local.demo import Kubectl, install_crd


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
