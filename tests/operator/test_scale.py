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
from kubesloth.operator.builders import ANNOTATION_FTJ, LABEL_FTJ, build_configmap, job_name
from kubesloth.operator.kube import CHILD_KINDS, ChildWatch, KubeApi, WatchCache, slim
from kubesloth.operator.reconcile import Reconciler
from kubesloth.operator.settings import OperatorSettings


def test_kopf_watches_only_the_finetunejobs():
    """The children are followed by the operator's own watches (kube.ChildWatch), not kopf's: kopf kept a
    ResourceMemory, a worker and a queue for each of 3000 children, and wrapped each of their events."""
    registry = kopf.get_default_registry()
    selectors = {handler.selector for sub in (registry._indexing, registry._watching, registry._changing,
                                               registry._spawning) for handler in sub.get_all_handlers()}
    assert {(s.group, s.version, s.any_name) for s in selectors} == {("kubesloth.io", "v1alpha1", "finetunejobs")}


class FakeLists:
    """A KubeApi stand-in for ChildWatch: `lists` answers (one per list call, in order) and `watches` (lines, or
    an exception to raise) per kind; every call's arguments recorded."""

    def __init__(self, lists, watches):
        self.lists, self.watches, self.calls = lists, watches, []
        self.core = self.batch = self

    def __getattr__(self, call):
        kind = next(k for k, (_, everywhere, namespaced) in CHILD_KINDS.items() if call in (everywhere, namespaced))

        def answer(*args, **kwargs):
            self.calls.append((call, args, kwargs))
            if kwargs.get("watch"):
                lines = self.watches[kind].pop(0)
                if isinstance(lines, Exception):
                    raise lines
                return FakeResponse(lines)
            return FakeResponse([json.dumps(self.lists[kind].pop(0))])
        return answer


class FakeResponse:
    def __init__(self, lines):
        self.data = "\n".join(lines).encode()

    def stream(self, amt=None, decode_content=False):
        yield self.data + b"\n"

    def release_conn(self):
        pass


def pod(name, owner, version, phase="Pending"):
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": version,
                         "labels": {LABEL_FTJ: owner}, "annotations": {ANNOTATION_FTJ: owner}},
            "spec": {"containers": [{"name": "trainer", "image": "i"}]}, "status": {"phase": phase}}


def test_the_child_watch_lists_watches_and_lists_again_when_its_version_is_too_old():
    """A list (with the label selector, in pages), a watch from its version: the events go to the cache and
    trigger their FineTuneJob's reconcile; a 410 lists again, and what is gone or changed meanwhile is
    reconciled."""
    from kubernetes.client.exceptions import ApiException

    lists = {"pods": [{"metadata": {"resourceVersion": "5", "continue": "next"}, "items": [pod("a-1", "a", "3")]},
                      {"metadata": {"resourceVersion": "5"}, "items": [pod("b-1", "b", "4")]},
                      {"metadata": {"resourceVersion": "9"}, "items": [pod("a-1", "a", "3"), pod("c-1", "c", "8")]}]}
    watches = {"pods": [[json.dumps({"type": "MODIFIED", "object": pod("a-1", "a", "6", "Running")}),
                         json.dumps({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "7"}}})],
                        ApiException(status=410, reason="Gone"),
                        [json.dumps({"type": "ERROR", "object": {"code": 410, "reason": "Expired"}})]]}
    api, cache, changed = FakeLists(lists, watches), WatchCache(), []
    watch = ChildWatch(api, cache, lambda ns, name: changed.append(name), namespaces=["ns"], page=1)
    assert watch.list("pods", "ns") == "5"
    assert [kwargs.get("_continue") for _, _, kwargs in api.calls] == [None, "next"]
    assert all(kwargs["label_selector"] == LABEL_FTJ and kwargs["limit"] == 1 for _, _, kwargs in api.calls)
    assert [p["metadata"]["name"] for p in cache.pods("ns", "b")] == ["b-1"] and changed == []  # a first list
    assert cache.pods("ns", "a")[0]["kind"] == "Pod"  # list items have none: added
    assert watch.watch("pods", "ns", "5") == "7"  # the bookmark's version
    assert api.calls[-1][2]["resource_version"] == "5" and api.calls[-1][2]["label_selector"] == LABEL_FTJ
    assert cache.pods("ns", "a")[0]["status"]["phase"] == "Running" and changed == ["a"]
    with pytest.raises(ApiException):
        watch.watch("pods", "ns", "7")
    assert not cache.ready.is_set()  # jobs and configmaps not listed yet
    changed.clear()
    assert watch.list("pods", "ns") == "9"  # a-1 went back to version 3 (changed), b-1 gone, c-1 new
    assert sorted(changed) == ["a", "b", "c"]
    assert cache.pods("ns", "b") == [] and cache.pods("ns", "a")[0]["status"]["phase"] == "Pending"
    with pytest.raises(ApiException) as raised:
        watch.watch("pods", "ns", "9")  # the 410 as a watch event
    assert raised.value.status == 410


def test_the_child_watch_is_ready_when_every_kind_is_listed():
    empty = {"metadata": {"resourceVersion": "1"}, "items": []}
    api = FakeLists({kind: [empty, empty] for kind in CHILD_KINDS}, {})
    cache = WatchCache()
    watch = ChildWatch(api, cache, lambda ns, name: None, namespaces=["a", "b"])
    for kind in CHILD_KINDS:
        watch.list(kind, "a")
    assert not cache.usable()
    for kind in CHILD_KINDS:
        watch.list(kind, "b")
    assert cache.usable()


def test_the_child_watch_follows_labelled_children_of_the_real_api_server(cluster, kubectl, namespace):
    api = KubeApi(kube_config.new_client_from_config(config_file=str(cluster.kubeconfig)))
    cache, changed = WatchCache(), []
    watch = ChildWatch(api, cache, lambda ns, name: changed.append((ns, name)), namespaces=[namespace])
    kubectl("create", "configmap", "before", "-n", namespace)
    kubectl("label", "configmap", "before", "-n", namespace, f"{LABEL_FTJ}=x")
    kubectl("create", "configmap", "foreign", "-n", namespace)
    watch.start()
    try:
        assert cache.ready.wait(30)
        assert cache.configmap(namespace, "before")["metadata"]["labels"] == {LABEL_FTJ: "x"}
        assert cache.configmap(namespace, "foreign") is None  # not labelled: never sent
        job = {"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {"name": "x-trainer", "namespace": namespace, "labels": {LABEL_FTJ: "x"},
                            "annotations": {ANNOTATION_FTJ: "x"}},
               "spec": {"parallelism": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [
                   {"name": "c", "image": "busybox"}]}}}}
        kubectl("apply", "-f", "-", input=json.dumps(job))
        deadline = time.monotonic() + 30
        while cache.job(namespace, "x-trainer") is None and time.monotonic() < deadline:
            time.sleep(0.1)
        kept = cache.job(namespace, "x-trainer")
        assert kept["spec"]["parallelism"] == 0
        assert "template" not in kept["spec"] and "managedFields" not in kept["metadata"]
        assert (namespace, "x") in changed
        kubectl("delete", "job", "x-trainer", "-n", namespace)
        while cache.job(namespace, "x-trainer") is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cache.job(namespace, "x-trainer") is None
    finally:
        watch.stop()


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
    api.cache = WatchCache()
    api.cache.ready.set()
    return api, api.cache


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
    indexes.put("jobs", job)
    owner = json.loads(kubectl("get", "ftj", "made", "-n", namespace, "-o", "json").stdout)
    indexes.put("configmaps", build_configmap(owner, OperatorSettings()))
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
    # What the cache stores: one bytes object per child, parsed again (a fresh dict) on each read.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p0-x", "namespace": namespace,
                                                          "labels": {LABEL_FTJ: "p0"}, "managedFields": [{}]},
           "spec": {"nodeName": "n", "containers": [{"name": "trainer", "image": "i"}]}, "status": {"phase": "Pending"}}
    indexes.put("pods", pod)
    assert [type(entry) for entry in indexes._pods[namespace, "p0"].values()] == [bytes]
    first, second = api.cache.pods(namespace, "p0"), api.cache.pods(namespace, "p0")
    assert first == second == [slim(pod)] and first[0] is not second[0]
    indexes.drop("pods", pod)
    assert api.cache.pods(namespace, "p0") == [] and indexes._pods == {}


def test_a_pass_after_children_went_trims_memory_and_empties_the_url_caches(monkeypatch):
    """Deletions are mostly forgotten by event-triggered reconciles, so the pass cannot wait for one it forgot
    itself: it trims when fewer FineTuneJobs and children are held than at the last pass."""
    import yarl
    from yarl import _url

    class Api:
        reads = {}

        def __init__(self):
            self.cache = WatchCache()

        def list_ftj_pages(self, namespace=None):
            yield []

    trims = []
    monkeypatch.setattr(handlers, "_trim_memory", lambda api=None: trims.append(1))
    monkeypatch.setattr(handlers, "_HELD", [0])
    monkeypatch.setattr(metrics, "METRICS", metrics.OperatorMetrics())  # no other test's series to forget
    api = Api()
    reconciler = Reconciler(api, OperatorSettings())
    api.cache.put("configmaps", {"metadata": {"name": "c", "namespace": "ns"}})
    handlers.resync_pass(reconciler)
    handlers.resync_pass(reconciler)
    assert trims == []  # nothing went
    api.cache.drop("configmaps", {"metadata": {"name": "c", "namespace": "ns"}})
    handlers.resync_pass(reconciler)
    assert trims == [1]
    monkeypatch.undo()
    yarl.URL("https://127.0.0.1:6443/apis/kubesloth.io/v1alpha1/namespaces/ns/finetunejobs/x")
    assert _url.encode_url.cache_info().currsize > 0
    handlers._trim_memory()
    assert _url.encode_url.cache_info().currsize == 0


def test_the_trim_closes_the_idle_pooled_connections(cached, kubectl, namespace):
    """The connections a burst opened stay pooled for good (made mid-burst, they pinned arenas): the trim closes
    the idle ones, and the next request opens one again."""
    api, _ = cached
    api.get_ftj(namespace, "none")
    manager = api.api_client.rest_client.pool_manager
    assert len(manager.pools) == 1
    handlers._trim_memory(api)
    assert len(manager.pools) == 0
    assert api.get_ftj(namespace, "none") is None and len(manager.pools) == 1


def test_the_metrics_keep_only_what_they_export_and_nothing_new_when_unchanged():
    observed = metrics.OperatorMetrics()
    status = {"phase": "Running", "conditions": [{"type": "Running", "status": "True", "message": "x" * 100}],
              "restarts": 1, "cost": {"dollars": 0.5, "ratePerHour": 2.0},
              "progress": {"step": 3, "totalSteps": 10, "loss": 1.5, "tokensPerSecond": 100.0}}
    spec = {"model": {"source": "pvc://m"}, "resources": {"gpuMemoryGiB": 24}}
    observed.observe_job("ns", "a", status, spec, uid="u")
    job = observed._jobs["ns", "a"]
    assert job.status == {"restarts": 1, "cost": {"dollars": 0.5},
                          "progress": {"step": 3, "totalSteps": 10, "tokensPerSecond": 100.0}}
    assert job.spec == {"resources": {"gpuMemoryGiB": 24}}
    observed.observe_job("ns", "a", json.loads(json.dumps(status)), json.loads(json.dumps(spec)), uid="u")
    assert observed._jobs["ns", "a"] is job  # the same reading again (a resync pass): the kept one stays
    observed.observe_job("ns", "a", {**status, "progress": {**status["progress"], "step": 4}}, spec, uid="u")
    assert observed._jobs["ns", "a"] is not job and observed._jobs["ns", "a"].status["progress"]["step"] == 4
    text = observed.exposition()
    for line in ('kubesloth_job_step{finetunejob="a",namespace="ns"} 4.0',
                 'kubesloth_job_restarts{finetunejob="a",namespace="ns"} 1.0',
                 'kubesloth_job_cost_dollars{finetunejob="a",namespace="ns"} 0.5',
                 'kubesloth_job_gpu_memory_capacity_bytes{finetunejob="a",namespace="ns"} 2.5769803776e+10'):
        assert line in text, (line, text)


def test_every_connection_of_the_client_shares_one_tls_context(cluster, monkeypatch):
    """urllib3 made an SSLContext per connection and, with no CA configured (insecure-skip-tls-verify), loaded the
    system CA store into each (0.9 MiB of OpenSSL memory per pooled connection)."""
    import ssl
    import threading

    loads = []
    real = ssl.SSLContext.load_default_certs
    monkeypatch.setattr(ssl.SSLContext, "load_default_certs", lambda self, *a: (loads.append(1), real(self, *a))[1])
    api = KubeApi(kube_config.new_client_from_config(config_file=str(cluster.kubeconfig)))
    assert api.api_client.configuration.verify_ssl is False  # the local control plane's kubeconfig
    barrier = threading.Barrier(4)

    def read():
        barrier.wait()
        for _ in range(3):
            api.get_ftj("default", "no-such-job")

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pools = api.api_client.rest_client.pool_manager.pools
    (pool,) = [pools[key] for key in pools.keys()]
    connections = [c for c in list(pool.pool.queue) if c is not None]
    assert len(connections) >= 2  # concurrent requests: more than one connection was opened
    shared = api.api_client.rest_client.pool_manager.connection_pool_kw["ssl_context"]
    assert all(c.ssl_context is shared for c in connections)
    assert len(loads) == 1  # once for the shared context, not once per connection
