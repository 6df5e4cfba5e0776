"""Scale (issue 12, 5): what a burst of FineTuneJobs made that outlived it. CPython returns a 1 MiB arena of its
small-object allocator only when everything in it is free, so an object made during a burst that lives on keeps
the arena the burst added; these tests hold the operator to making its long-lived things before any burst and to
keeping nothing of an event once handled."""

from __future__ import annotations

import gc
import json
import threading
from concurrent.futures import wait

import kopf
from kubernetes import client
from kubernetes.client.models import CoreV1Event

from kubesloth.operator import handlers
from kubesloth.operator.kube import ChildWatch, KubeApi, WatchCache


def test_kopf_s_executor_has_all_its_threads_before_the_first_handler():
    """kopf's ThreadPoolExecutor started a thread only when a handler found none idle: most of its 8 were started
    by the first burst of creations, their objects among the burst's. They are started with the operator now, so a
    burst of concurrent handlers starts none."""
    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    executor = settings.execution.executor
    try:
        assert executor._max_workers == handlers.HANDLER_THREADS == 8
        assert len(executor._threads) == 8 and all(t.is_alive() for t in executor._threads)
        before = set(executor._threads)
        barrier = threading.Barrier(8)
        wait([executor.submit(barrier.wait, 10) for _ in range(8)], timeout=20)  # 8 handlers at once
        assert set(executor._threads) == before
    finally:
        executor.shutdown(wait=False)


class Recorded:
    """A rest client that answers every request 201 and keeps what was sent."""

    def __init__(self):
        self.requests = []

    def request(self, method, url, headers=None, body=None, post_params=None, _request_timeout=None):
        self.requests.append((method, url, body))
        return Answer()


class Answer:
    status, reason, data = 201, "Created", b"{}"
    response = None

    def read(self):
        return self.data

    def getheaders(self):
        return {}


def test_an_event_is_posted_as_built_without_the_client_s_model(monkeypatch):
    """The client's generated call validated the dict into a CoreV1Event and serialized it back (timestamps parsed
    and formatted again: objects of every event posted, some of which outlived the burst). The dict goes as built,
    to the same path."""
    def no_model(*args, **kwargs):
        raise AssertionError("the event went through the client's model")

    monkeypatch.setattr(CoreV1Event, "from_dict", no_model)
    monkeypatch.setattr(CoreV1Event, "__init__", no_model)
    api_client = client.ApiClient(client.Configuration(host="https://api.example"))
    recorded = Recorded()
    api_client.rest_client = recorded
    ftj = {"apiVersion": "kubesloth.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "a", "namespace": "ns", "uid": "u-1", "resourceVersion": "7"}}
    KubeApi(api_client).post_event(ftj, "Warning", "Unschedulable", "0/0 nodes are available")
    [(method, url, body)] = recorded.requests
    assert method == "POST" and url == "https://api.example/api/v1/namespaces/ns/events"
    assert body["reason"] == "Unschedulable" and body["involvedObject"]["uid"] == "u-1"
    assert body["firstTimestamp"].endswith("Z") and body["firstTimestamp"] == body["lastTimestamp"]  # as built


def test_an_event_refused_raises_as_the_client_s_call_did():
    from kubernetes.client.exceptions import ApiException

    class Refused(Answer):
        status, reason, data, headers = 403, "Forbidden", b'{"reason": "Forbidden"}', {}

    api_client = client.ApiClient(client.Configuration(host="https://api.example"))
    api_client.rest_client = type("R", (), {"request": lambda self, *a, **k: Refused()})()
    ftj = {"apiVersion": "v", "kind": "K", "metadata": {"name": "a", "namespace": "ns", "uid": "u"}}
    try:
        KubeApi(api_client).post_event(ftj, "Normal", "Pending", "m")
    except ApiException as err:
        assert err.status == 403
    else:
        raise AssertionError("no ApiException")


def test_the_watch_holds_nothing_of_a_bookmark_while_it_waits_for_the_next_line():
    """A watch waits minutes between lines; the last event it read (a bookmark skipped the clearing) was kept
    meanwhile, with whatever burst it came in."""
    held = []

    class Stream:
        def stream(self, amt=None, decode_content=False):
            yield json.dumps({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "42"}}}).encode() + b"\n"
            gc.collect()
            # Plain dicts only: other tests' imports leave dict subclasses whose get() fails (dill's).
            held.extend(o for o in gc.get_objects() if type(o) is dict and o.get("type") == "BOOKMARK")

        def release_conn(self):
            pass

    class Api:
        core = batch = None

    watch = ChildWatch(Api(), WatchCache(), lambda ns, name: None)
    watch._call = lambda *args, **kwargs: Stream()
    assert watch.watch("pods", "ns", "1") == "42"
    assert held == []
