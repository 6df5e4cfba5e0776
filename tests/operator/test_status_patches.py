"""The phase and progress go to the API server in separate status patches (needs the local control plane, no
operator process: one Reconciler in this test against the real kube-apiserver).

progress is read from the trainer, which runs the user's code; a value there the API server refuses must cost
that patch only: the phase and conditions are written first, on their own.
"""

from __future__ import annotations

import logging

import pytest
from kubernetes import config as kube_config

from e2e.stack import Cluster, finetunejob
from kubesloth.operator.kube import KubeApi
from kubesloth.operator.reconcile import Reconciler
from kubesloth.operator.settings import OperatorSettings


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # the local control plane
def test_a_progress_patch_the_api_server_refuses_costs_progress_not_the_phase(cluster, kubectl, namespace, caplog):
    api = KubeApi(kube_config.new_client_from_config(config_file=str(cluster.kubeconfig)))

    def progress_beyond_int64(ftj, job, pods, status):  # what an enricher without range checks would send
        return {**status, "progress": {"step": 2**70, "display": f"{2**70}/10"}}

    reconciler = Reconciler(api, OperatorSettings(), enrichers=[progress_beyond_int64])
    k8s = Cluster(kubectl, namespace)
    k8s.apply(finetunejob("refused-progress"))
    with caplog.at_level(logging.WARNING, logger="kubesloth.operator"):
        outcome = reconciler.reconcile(namespace, "refused-progress")

    status = k8s.status("refused-progress")
    assert outcome.phase == status["phase"] == "Pending" and status["conditions"], status
    assert "progress" not in status
    assert "status.progress/cost of" in caplog.text and "API 422" in caplog.text, caplog.text
