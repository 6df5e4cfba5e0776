"""The few Kubernetes API calls the operator makes, on plain dicts (wire form), 404 -> None.

Raw JSON (`_preload_content=False`) keeps objects exactly as the API server sent them, the same shape the pure
builders and status functions take and the unit tests write by hand.

Reads of the children (Job, ConfigMap, Pods) come from a `WatchCache` once the operator's watches have listed them
(kopf indexes fed by server-side label-selected watches, see operator/handlers.py); before that, or with no cache,
from the API server. `fresh=True` asks the API server regardless (the cache holds only labelled objects and lags
the operator's own writes by a moment).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Iterator

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubesloth.api.contract import Env
from kubesloth.api.v1alpha1 import GROUP, PLURAL, VERSION

from .builders import ANNOTATION_FTJ, LABEL_FTJ
from .settings import ServerFeatures

EVENT_SOURCE = "kubesloth-operator"
LIST_PAGE = 100  # FineTuneJobs per page of the resync's list


def _json(response: Any) -> dict[str, Any]:
    return json.loads(response.data)


def _done(response: Any) -> None:
    """Read an answer whose body nothing needs to its end. urllib3 puts a connection back into the pool only once
    its response is read (`_preload_content=False` leaves that to us): an unread answer took its connection out
    of the pool for good, so every event posted cost a new TLS connection (a new SSL context loading the CA
    store: half the operator's CPU in a burst of creates) and the requests after it one more."""
    getattr(response, "data", None)


def slim(body: Any) -> dict[str, Any]:
    """A watched object as the cache keeps it: a plain dict without `metadata.managedFields` (often half of a
    Pod's bytes, read by nothing here); of a Job's and a Pod's spec only what the status and progress read (the
    pod template, volumes and env of 1000 Jobs and 1000 Pods were most of the operator's memory)."""
    meta = {key: value for key, value in (body.get("metadata") or {}).items() if key != "managedFields"}
    kept = {**{key: body[key] for key in body if key not in ("metadata", "spec")}, "metadata": meta}
    spec = body.get("spec")
    if spec is None:
        return kept
    if body.get("kind") == "Job":
        kept["spec"] = {key: spec[key] for key in JOB_SPEC_READ if key in spec}
    elif body.get("kind") == "Pod":
        kept["spec"] = {key: spec[key] for key in POD_SPEC_READ if key in spec}
        kept["spec"]["containers"] = [
            {"name": c.get("name"), "ports": c.get("ports") or [],
             "env": [e for e in c.get("env") or [] if e.get("name") in POD_ENV_READ]}
            for c in spec.get("containers") or []]
    else:
        kept["spec"] = spec
    return kept


def packed(body: Any) -> bytes:
    """A watched object as the cache stores it: `slim(body)` as compact JSON, one allocation. Parsed dicts of 3000
    children are some 300 000 small Python objects (strings, dicts, lists), each in CPython's small-object arenas
    next to the short-lived ones of the events and lists they came from: an arena returns to the system only
    when everything in it is free, so a few long-lived objects in each kept most of a burst's memory. The bytes
    go to malloc instead, and a read parses them (a fresh dict each time: no caller can change the cache)."""
    return json.dumps(slim(body), separators=(",", ":")).encode()


def unpacked(entry: Any) -> dict[str, Any]:
    return json.loads(entry) if isinstance(entry, (bytes, str)) else entry


# What of a child's spec the operator reads (status.py, progress.py, reconcile.py); the cache keeps only these.
JOB_SPEC_READ = ("parallelism", "completions", "backoffLimit", "activeDeadlineSeconds", "suspend")
POD_SPEC_READ = ("nodeName", "nodeSelector")
POD_ENV_READ = frozenset({Env.METRICS_PORT.value})


def _values(store: Any) -> list[dict[str, Any]]:
    """A kopf index store's values, parsed (the asyncio thread may update it while a reconcile thread reads it)."""
    for _ in range(5):
        try:
            entries = list(store)
            break
        except RuntimeError:  # changed size during iteration
            continue
    else:
        entries = list(store)
    return [unpacked(entry) for entry in entries]


class WatchCache:
    """The children as the operator's watches last saw them: three kopf indexes (operator/handlers.py), keyed
    (namespace, name) for Jobs and ConfigMaps and (namespace, label value of the FineTuneJob) for Pods. kopf
    fills them from its own list+watch of label-selected objects, drops an object on its DELETED event, and runs
    no other handler before every index has had its initial listing, so once `ready` is set an absent key means
    no such labelled object."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self._jobs: Any = None
        self._configmaps: Any = None
        self._pods: Any = None

    def bind(self, jobs: Any, configmaps: Any, pods: Any) -> None:
        self._jobs, self._configmaps, self._pods = jobs, configmaps, pods

    def usable(self) -> bool:
        return self.ready.is_set() and self._jobs is not None

    @staticmethod
    def _one(index: Any, key: tuple[str, str]) -> dict[str, Any] | None:
        store = index.get(key)
        if not store:
            return None
        # One name, one live object; two only while a DELETED event is on its way: the newest.
        return max(_values(store), key=lambda o: o["metadata"].get("creationTimestamp") or "")

    def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._one(self._jobs, (namespace, name))

    def configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._one(self._configmaps, (namespace, name))

    def pods(self, namespace: str, label_value: str) -> list[dict[str, Any]]:
        store = self._pods.get((namespace, label_value))
        return _values(store) if store else []


class KubeApi:
    def __init__(self, api_client: client.ApiClient | None = None):
        self.api_client = api_client or client.ApiClient()
        self.core = client.CoreV1Api(self.api_client)
        self.batch = client.BatchV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)
        self._features: ServerFeatures | None = None
        self.cache: WatchCache | None = None
        # Reads by (what, "cache" | "api"): the operator metrics' kubesloth_operator_reads_total.
        self.reads: Counter[tuple[str, str]] = Counter()
        # (namespace, name) -> resourceVersion of the FineTuneJob the operator's last status patch returned.
        self._written: dict[tuple[str, str], str] = {}
        self._written_guard = threading.Lock()

    def cached(self) -> bool:
        return self.cache is not None and self.cache.usable()

    def server_features(self) -> ServerFeatures:
        """What the API server's version allows (GET /version, read once and kept; an upgrade of the control plane
        is seen after an operator restart). Unreadable: the oldest supported (v1.20), not cached."""
        if self._features is None:
            try:
                info = _json(client.VersionApi(self.api_client).get_code(_preload_content=False))
            except (ApiException, OSError, ValueError):
                return ServerFeatures()
            self._features = ServerFeatures.from_version(info)
        return self._features

    @staticmethod
    def _or_none(call, *args, **kwargs) -> dict[str, Any] | None:
        try:
            return _json(call(*args, _preload_content=False, **kwargs))
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    # FineTuneJobs
    def get_ftj(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads["finetunejob", "api"] += 1
        return self._or_none(self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)

    def list_ftjs(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return [ftj for page in self.list_ftj_pages(namespace) for ftj in page]

    def list_ftj_pages(self, namespace: str | None = None, limit: int = LIST_PAGE
                       ) -> Iterator[list[dict[str, Any]]]:
        """The FineTuneJobs in pages of `limit` (the API server's chunked list: `limit` and `continue`, one
        consistent snapshot), so a resync holds one page of parsed bodies at a time, not all of them. An
        expired continue token (410, after etcd compaction) raises like any failed list."""
        token = None
        while True:
            self.reads["finetunejob_list", "api"] += 1
            extra = {"_continue": token} if token else {}
            if namespace:
                data = _json(self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, limit=limit,
                                                                       _preload_content=False, **extra))
            else:
                data = _json(self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, limit=limit,
                                                                    _preload_content=False, **extra))
            token = (data.get("metadata") or {}).get("continue")
            yield data.get("items", [])
            del data
            if not token:
                return

    def patch_ftj_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """The patched FineTuneJob; its resourceVersion is kept for `take_written_version`."""
        written = _json(self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": status}, _preload_content=False))
        version = (written.get("metadata") or {}).get("resourceVersion")
        if version:
            with self._written_guard:
                self._written[namespace, name] = version
        return written

    def take_written_version(self, namespace: str, name: str) -> str | None:
        """The resourceVersion of the last status patch of this FineTuneJob since the last call (then forgotten)."""
        with self._written_guard:
            return self._written.pop((namespace, name), None)

    def delete_ftj(self, namespace: str, name: str, uid: str) -> None:
        body = client.V1DeleteOptions(propagation_policy="Background", preconditions=client.V1Preconditions(uid=uid))
        try:
            _done(self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body=body,
                                                              _preload_content=False))
        except ApiException as err:
            if err.status not in (404, 409):  # gone already, or a newer object with the same name (uid precondition)
                raise

    # Jobs, Pods, ConfigMaps
    def get_job(self, namespace: str, name: str, fresh: bool = False) -> dict[str, Any] | None:
        if not fresh and self.cached():
            self.reads["job", "cache"] += 1
            return self.cache.job(namespace, name)
        self.reads["job", "api"] += 1
        return self._or_none(self.batch.read_namespaced_job, name, namespace)

    def create_job(self, body: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        """dry_run: validated and admitted by the API server, not stored (dryRun=All)."""
        extra = {"dry_run": "All"} if dry_run else {}
        return _json(self.batch.create_namespaced_job(body["metadata"]["namespace"], body, _preload_content=False,
                                                      **extra))

    def delete_job(self, namespace: str, name: str, uid: str) -> None:
        # Foreground: the Job object stays until its pods are gone, so a resume cannot start a second trainer
        # next to a still-terminating one (both would write the same checkpoints).
        body = client.V1DeleteOptions(propagation_policy="Foreground", preconditions=client.V1Preconditions(uid=uid))
        try:
            _done(self.batch.delete_namespaced_job(name, namespace, body=body, _preload_content=False))
        except ApiException as err:
            if err.status not in (404, 409):
                raise

    def stop_job(self, namespace: str, name: str, uid: str) -> None:
        """No more pods (parallelism 0; the running one gets SIGTERM), the failed ones and their logs kept: a run
        the operator decided is Failed while the Job would still retry (every version has parallelism)."""
        patch = {"metadata": {"uid": uid}, "spec": {"parallelism": 0}}  # the uid: a precondition (409 if replaced)
        try:
            _done(self.batch.patch_namespaced_job(name, namespace, patch, _preload_content=False))
        except ApiException as err:
            if err.status not in (404, 409):
                raise

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        self.reads["pods", "api"] += 1
        data = _json(self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False))
        return data.get("items", [])

    def pods_of(self, namespace: str, label_value: str, ftj_name: str, controller_uid: str | None = None
                ) -> list[dict[str, Any]]:
        """The trainer pods of one FineTuneJob: those of the Job with `controller_uid` (every version labels its
        pods `controller-uid`), else every pod labelled and annotated for the FineTuneJob (a Job being deleted)."""
        if self.cached():
            self.reads["pods", "cache"] += 1
            pods = self.cache.pods(namespace, label_value)
        elif controller_uid:
            return self.list_pods(namespace, f"controller-uid={controller_uid}")
        else:
            pods = self.list_pods(namespace, f"{LABEL_FTJ}={label_value}")
        if controller_uid:
            return [p for p in pods if (p["metadata"].get("labels") or {}).get("controller-uid") == controller_uid]
        return [p for p in pods if (p["metadata"].get("annotations") or {}).get(ANNOTATION_FTJ) == ftj_name]

    def get_configmap(self, namespace: str, name: str, fresh: bool = False) -> dict[str, Any] | None:
        if not fresh and self.cached():
            self.reads["configmap", "cache"] += 1
            return self.cache.configmap(namespace, name)
        self.reads["configmap", "api"] += 1
        return self._or_none(self.core.read_namespaced_config_map, name, namespace)

    def create_configmap(self, body: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        extra = {"dry_run": "All"} if dry_run else {}
        return _json(self.core.create_namespaced_config_map(body["metadata"]["namespace"], body,
                                                            _preload_content=False, **extra))

    def replace_configmap(self, body: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        """PUT with the body's resourceVersion: refused (409) if the ConfigMap changed since it was read."""
        extra = {"dry_run": "All"} if dry_run else {}
        meta = body["metadata"]
        return _json(self.core.replace_namespaced_config_map(meta["name"], meta["namespace"], body,
                                                             _preload_content=False, **extra))

    # Events
    def post_event(self, ftj: dict[str, Any], kind: str, reason: str, message: str) -> None:
        meta = ftj["metadata"]
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name'][:200]}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": ftj["apiVersion"], "kind": ftj["kind"], "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"],
                               "resourceVersion": meta.get("resourceVersion")},
            "reason": reason, "message": message[:1024], "type": kind,
            "source": {"component": EVENT_SOURCE}, "reportingComponent": EVENT_SOURCE,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        _done(self.core.create_namespaced_event(meta["namespace"], body, _preload_content=False))
