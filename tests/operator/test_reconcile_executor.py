"""The Reconciler executing a plan against a fake KubeApi (no cluster): the answers the plan cannot foresee."""

from __future__ import annotations

from kubernetes.client.exceptions import ApiException

from kubesloth.operator.reconcile import Reconciler
from kubesloth.operator.settings import OperatorSettings, ServerFeatures


class FakeApi:
    def __init__(self, ftj, lost_answer: bool = False):
        self.ftj, self.lost_answer = ftj, lost_answer
        self.jobs: dict = {}
        self.configmaps: dict = {}
        self.calls: list = []

    def cached(self):
        return False

    def server_features(self):
        return ServerFeatures(1, 29)

    def take_written_version(self, namespace, name):
        return None

    def get_ftj(self, namespace, name):
        return self.ftj

    def get_job(self, namespace, name, fresh=False):
        return self.jobs.get(name)

    def get_configmap(self, namespace, name, fresh=False):
        return self.configmaps.get(name)

    def pods_of(self, namespace, label, name, uid=None):
        return []

    def create_configmap(self, body, dry_run=False):
        self.calls.append(("create ConfigMap", dry_run))
        if not dry_run:
            self.configmaps[body["metadata"]["name"]] = {**body, "metadata": {**body["metadata"], "uid": "cm"}}
        return body

    def create_job(self, body, dry_run=False):
        self.calls.append(("create Job", dry_run))
        if dry_run:
            return body
        stored = {**body, "metadata": {**body["metadata"], "uid": "job-uid"}}
        self.jobs[body["metadata"]["name"]] = stored
        if self.lost_answer:  # created, but the answer was lost: a retry of the request says 409
            raise ApiException(status=409, reason="AlreadyExists")
        return stored

    def patch_ftj_status(self, namespace, name, status):
        self.calls.append(("patch status", tuple(sorted(status))))
        return {}

    def post_event(self, ftj, kind, reason, message):
        self.calls.append(("event", reason))


def ftj():
    return {"apiVersion": "kubesloth.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "run", "namespace": "ml", "uid": "ftj-uid", "generation": 1},
            "spec": {"model": {"source": "pvc://models/tiny-llama"}, "dataset": {"source": "pvc://data/a.jsonl"},
                     "training": {"maxSteps": 1}, "output": {"destination": "pvc://outputs/run"}}}


def test_children_are_dry_run_then_created():
    api = FakeApi(ftj())
    outcome = Reconciler(api, OperatorSettings()).reconcile("ml", "run")
    assert outcome.actions == ["created ConfigMap", "created Job"]
    assert [c for c in api.calls if c[0].startswith("create")] == [
        ("create ConfigMap", True), ("create Job", True), ("create ConfigMap", False), ("create Job", False)]
    assert outcome.phase == "Pending"


def test_a_job_whose_create_answer_was_lost_is_used_not_retried():
    """409 on the real create of a Job the dry run found free: created by this very request (its answer lost);
    the Job is read and used (this path never ran before: `call is self.api.create_job` was always false)."""
    api = FakeApi(ftj(), lost_answer=True)
    outcome = Reconciler(api, OperatorSettings()).reconcile("ml", "run")
    assert outcome.actions == ["created ConfigMap", "created Job"]
    assert ("event", "Pending") in api.calls
