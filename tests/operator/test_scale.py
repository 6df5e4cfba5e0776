"""Scale (issue 12, 5): server-side selectors on the children's watches, reads from the watch cache, and nothing kept
for FineTuneJobs that are gone. The cache tests run one Reconciler against the real kube-apiserver (no operator
process), its WatchCache bound to plain dicts where kopf would bind its indexes."""

from __future__ import annotations

import json
import time

import kopf
import pytest
from kubernetes import config as kube_config

from kubesloth.operator import handlers, metrics, progress
from kubesloth.operator.builders import LABEL_FTJ, build_configmap, job_name
from kubesloth.operator.kube import KubeApi, WatchCache, slim
from kubesloth.operator.reconcile import Reconciler
from kubesloth.operator.settings import OperatorSettings


def test_the_child_watches_carry_a_server_side_label_selector():
    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    selectors = settings.watching.label_selectors
    for resource in (kopf.Resource("batch", "v1", "jobs"), kopf.Resource("", "v1", "pods"),
                     kopf.Resource("", "v1", "configmaps")):
        assert selectors.collect(resource) == [LABEL_FTJ], resource
    # Not the FineTuneJobs (all of them are ours), nor anything else of the same names.
    for resource in (kopf.Resource("kubesloth.io", "v1alpha1", "finetunejobs"),
                     kopf.Resource("metrics.k8s.io", "v1beta1", "pods"), kopf.Resource("batch", "v1", "cronjobs")):
        assert selectors.collect(resource) == [], resource


def test_kopf_sends_the_selector_in_the_list_and_watch_requests():
    """What kopf 1.45 puts on the wire for the Pods watch (its own request builders, not our reading of them)."""
    import inspect

    from kopf._cogs.clients import fetching, watching

    for module in (fetching, watching):
        assert "settings.watching.label_selectors.collect(resource)" in inspect.getsource(module)
        assert "params['labelSelector'] = label_selector" in inspect.getsource(module)


def test_the_cache_drops_managed_fields_and_keeps_the_rest():
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "managedFields": [{"big": 1}],
                                                            "labels": {"a": "b"}}, "status": {"phase": "Pending"}}
    assert slim(body) == {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"a": "b"}},
                          "status": {"phase": "Pending"}}


def ftj(name: str, **spec) -> dict:
    return {"apiVersion": "kubesloth.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
            "spec": {"model": {"source": "pvc://models/tiny-llama"},
                     "dataset": {"source": "pvc://data/alpaca-tiny.jsonl"},
                     "training": {"maxSteps": 1}, "output": {"destination": f"pvc://outputs/{name}"}, **spec}}


@pytest.fixture
def cached(cluster):
    api = KubeApi(kube_config.new_client_from_config(config_file=str(cluster.kubeconfig)))
    indexes = {"jobs": {}, "configmaps": {}, "pods": {}}
    api.cache = WatchCache()
    api.cache.bind(indexes["jobs"], indexes["configmaps"], indexes["pods"])
    api.cache.ready.set()
    return api, indexes


def _per_object_reads(api: KubeApi, before) -> dict:
    return {key: count - before.get(key, 0) for key, count in api.reads.items()
            if key[1] == "api" and count - before.get(key, 0)}


def test_a_resync_pass_lists_once_and_reads_no_object_from_the_api(cached, kubectl, namespace):
    api, _ = cached
    for i in range(3):
        kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(ftj(f"s{i}", suspend=True)))
    reconciler = Reconciler(api, OperatorSettings())
    assert handlers.resync_pass(reconciler, [namespace]) == 3  # first sight of each: a GET, a status patch
    before = dict(api.reads)
    assert handlers.resync_pass(reconciler, [namespace]) == 3
    assert _per_object_reads(api, before) == {("finetunejob_list", "api"): 1}
    assert api.reads[("job", "cache")] - before.get(("job", "cache"), 0) == 3
    # Someone else changes one: its listed body is newer than what the reconcile left, so it is read fresh.
    kubectl("annotate", "ftj", "s1", "-n", namespace, "someone=else")
    before = dict(api.reads)
    handlers.resync_pass(reconciler, [namespace])
    assert _per_object_reads(api, before) == {("finetunejob_list", "api"): 1, ("finetunejob", "api"): 1}


def test_an_absent_job_in_the_cache_is_checked_with_the_api_before_creating(cached, kubectl, namespace):
    """A foreign Job with the child's name is not in the (label-selected) cache: still a NameConflict, nothing
    created."""
    api, _ = cached
    kubectl("create", "job", job_name("taken"), "-n", namespace, "--image=busybox")
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(ftj("taken")))
    Reconciler(api, OperatorSettings()).reconcile(namespace, "taken")
    status = json.loads(kubectl("get", "ftj", "taken", "-n", namespace, "-o", "json").stdout)["status"]
    running = next(c for c in status["conditions"] if c["type"] == "Running")
    assert running["reason"] == "NameConflict", status
    assert kubectl("get", "configmap", "-n", namespace, "-l", LABEL_FTJ, "-o", "name").stdout.strip() == ""


def test_children_are_read_from_the_cache(cached, kubectl, namespace):
    api, indexes = cached
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(ftj("made")))
    reconciler = Reconciler(api, OperatorSettings())
    outcome = reconciler.reconcile(namespace, "made")
    assert outcome.actions == ["created ConfigMap", "created Job"]
    job = json.loads(kubectl("get", "job", job_name("made"), "-n", namespace, "-o", "json").stdout)
    indexes["jobs"][namespace, job_name("made")] = [slim(job)]
    owner = json.loads(kubectl("get", "ftj", "made", "-n", namespace, "-o", "json").stdout)
    configmap = build_configmap(owner, OperatorSettings())
    indexes["configmaps"][namespace, configmap["metadata"]["name"]] = [configmap]
    before = dict(api.reads)
    assert reconciler.reconcile(namespace, "made").actions == []
    assert {k for k in _per_object_reads(api, before)} == {("finetunejob", "api")}  # event-triggered: a GET


def test_nothing_is_kept_for_deleted_finetunejobs(cached, kubectl, namespace):
    api, _ = cached
    names = [f"d{i}" for i in range(4)]
    for name in names:
        kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(ftj(name, suspend=True)))
    observed = metrics.METRICS  # the one the resync prunes
    reconciler = Reconciler(api, OperatorSettings(), observers=[metrics.observe_reconcile])
    handlers.resync_pass(reconciler, [namespace])
    keys = {(namespace, name) for name in names}
    assert keys <= set(reconciler._estimates) and keys <= set(reconciler._versions)
    assert keys <= set(observed._jobs)
    assert reconciler._locks == {}  # a lock lives only while a reconcile holds or waits for it
    reconciler._backoff[namespace, "d0"] = (1, 1, time.monotonic() + 60)
    for name in names[:2]:
        kubectl("delete", "ftj", name, "-n", namespace)
    # An event-triggered reconcile of a deleted one forgets it at once.
    reconciler.reconcile(namespace, "d0")
    assert (namespace, "d0") not in reconciler._estimates and (namespace, "d0") not in reconciler._backoff
    # The resync forgets those deleted while no event reached us; the metric series go with them.
    handlers.resync_pass(reconciler, [namespace])
    gone = {(namespace, "d0"), (namespace, "d1")}
    for kept in (reconciler._estimates, reconciler._backoff, reconciler._versions, reconciler._touched):
        assert not gone & set(kept), kept
    assert not gone & set(observed._jobs)
    assert reconciler._locks == {}


def test_a_concurrent_reconcile_waits_on_the_same_lock():
    """The lock entry goes only when its last user leaves: a waiter and a newcomer never hold two locks."""
    import threading

    class Api:
        def __init__(self):
            self.inside = 0
            self.most = 0

        def get_ftj(self, namespace, name):
            self.inside += 1
            self.most = max(self.most, self.inside)
            time.sleep(0.05)
            self.inside -= 1
            return None

        def take_written_version(self, namespace, name):
            return None

    api = Api()
    reconciler = Reconciler(api, OperatorSettings())
    threads = [threading.Thread(target=reconciler.reconcile, args=("ns", "same")) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert api.most == 1
    assert reconciler._locks == {}


def test_the_scraper_forgets_old_readings():
    scraper = progress.BackgroundScraper(workers=1, max_age=0.05)
    scraper.latest("pod-a http://x", lambda: progress.TrainerSample({}), wait=1.0)
    assert "pod-a http://x" in scraper._readings
    time.sleep(0.1)
    assert scraper.prune() == 1 and scraper._readings == {}


def test_metrics_retain_drops_series_of_jobs_not_listed():
    clock = [100.0]
    observed = metrics.OperatorMetrics(clock=lambda: clock[0])
    observed.observe_job("ns", "a", {"phase": "Running"})
    observed.observe_job("ns", "b", {"phase": "Running"})
    clock[0] = 200.0
    observed.observe_job("ns", "c", {"phase": "Pending"})  # created after the list started: kept
    assert observed.retain({("ns", "a")}, listed_at=150.0) == 1
    assert set(observed._jobs) == {("ns", "a"), ("ns", "c")}


def test_every_api_answer_returns_its_connection_to_the_pool(cached, kubectl, namespace, monkeypatch):
    """Answers read raw (`_preload_content=False`) and not needed (an event posted, a deletion, a patch) are still
    read to their end: urllib3 returns a connection to its pool only then, and an unread one made every later
    request open a new TLS connection (an SSL context, the CA store loaded: most of a burst's CPU)."""
    import urllib3.connection

    api, _ = cached
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(ftj("pooled", suspend=True)))
    owner = api.get_ftj(namespace, "pooled")
    connects = []
    real = urllib3.connection.HTTPSConnection.connect
    monkeypatch.setattr(urllib3.connection.HTTPSConnection, "connect",
                        lambda self, *a, **k: (connects.append(1), real(self, *a, **k))[1])
    for i in range(10):
        api.post_event(owner, "Normal", "PoolTest", f"event {i}")
        api.delete_job(namespace, "no-such-job", "0")
        api.stop_job(namespace, "no-such-job", "0")
        api.get_ftj(namespace, "pooled")
    assert len(connects) <= 1, f"{len(connects)} new connections for 40 sequential requests"


def test_child_events_coalesce_per_finetunejob_and_never_run_one_twice_at_once():
    """Six events of one FineTuneJob queued before a worker is free: one reconcile. An event while its
    reconcile runs: one more after it (the running one may have read before the change). Never two at once."""
    import threading

    started, release, runs, inside = threading.Event(), threading.Event(), [], {"now": 0, "most": 0}

    def run(namespace, name):
        inside["now"] += 1
        inside["most"] = max(inside["most"], inside["now"])
        runs.append(name)
        started.set()
        release.wait(5)
        inside["now"] -= 1

    events = handlers.ChildEvents(run, workers=2)
    assert [events.submit("ns", "a") for _ in range(6)] == [True] + [False] * 5
    events.start()
    try:
        assert started.wait(5)
        assert events.submit("ns", "a")  # running: queued once more, not run beside it
        assert not events.submit("ns", "a")
        time.sleep(0.2)
        assert runs == ["a"] and inside["most"] == 1 and events.pending() == 1
        release.set()
        deadline = time.monotonic() + 5
        while (len(runs) < 2 or inside["now"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runs == ["a", "a"] and inside["most"] == 1 and events.pending() == 0
    finally:
        events.stop()


def test_the_resync_list_comes_in_pages_and_the_cache_keeps_bytes(cached, kubectl, namespace):
    api, indexes = cached
    for i in range(3):
        kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(ftj(f"p{i}", suspend=True)))
    pages = list(api.list_ftj_pages(namespace, limit=2))
    assert [len(page) for page in pages] == [2, 1]
    assert sorted(f["metadata"]["name"] for page in pages for f in page) == ["p0", "p1", "p2"]
    # What the index handlers store: one bytes object, parsed again (a fresh dict) on each read.
    import asyncio

    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p0-x", "namespace": namespace,
                                                          "labels": {LABEL_FTJ: "p0"}, "managedFields": [{}]},
           "spec": {"nodeName": "n", "containers": [{"name": "trainer", "image": "i"}]}, "status": {"phase": "Pending"}}
    entry = asyncio.run(handlers.child_pods(namespace=namespace, labels=pod["metadata"]["labels"],
                                            body=kopf.Body(pod)))
    (key, packed_pod), = entry.items()
    assert key == (namespace, "p0") and isinstance(packed_pod, bytes)
    indexes["pods"][key] = [packed_pod]
    first, second = api.cache.pods(namespace, "p0"), api.cache.pods(namespace, "p0")
    assert first == second == [slim(pod)] and first[0] is not second[0]
