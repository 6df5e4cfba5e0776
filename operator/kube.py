"""The few Kubernetes API calls the operator makes, on plain dicts (wire form), 404 -> None.

Raw JSON (`_preload_content=False`) keeps objects exactly as the API server sent them, the same shape the pure
builders and status functions take and the unit tests write by hand.

Reads of the children (Job, ConfigMap, Pods) come from a `WatchCache` once the operator's own watches of them
(`ChildWatch`: server-side label-selected list+watch, no kopf) have listed them; before that, or with no cache,
from the API server. `fresh=True` asks the API server regardless (the cache holds only labelled objects and lags
the operator's own writes by a moment).
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import uuid
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines
from urllib3.util.ssl_ import create_urllib3_context

from kubesloth.api.contract import Env
from kubesloth.api.v1alpha1 import GROUP, PLURAL, VERSION

from .builders import ANNOTATION_FTJ, LABEL_FTJ
from .settings import ServerFeatures

log = logging.getLogger("kubesloth.operator")
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


def _unvalidated(api: Any, call: str, **params: Any) -> Any:
    """`api.<call>(**params, _preload_content=False)` without the client's argument validation: the generated
    methods (kubernetes 37, pydantic `validate_call`) turn a dict body into the model (a CoreV1Event for an event)
    and serialize that back into a dict, parsing and formatting its timestamps on the way: a few hundred
    objects an event, and `isoformat` of an aware datetime leaves small blocks allocated (CPython 3.11 keeps some
    200): after deleting 300 FineTuneJobs, 207 from the events' serialization were still allocated, in CPython
    arenas the burst had added (issue 12). The body goes as built (the same JSON the API server reads); an
    answer outside 2xx raises ApiException as the generated call does; returns the raw urllib3 response."""
    serialize = getattr(api, f"_{call}_serialize")
    request = serialize(**{**_serialize_defaults(serialize), **params})
    return api.api_client._call_with_legacy_options(request, {}, False, False, None, True)


def _serialize_defaults(serialize: Callable) -> dict[str, Any]:
    names = serialize.__func__.__code__.co_varnames[1:serialize.__func__.__code__.co_argcount]
    return {**{name: None for name in names}, "_host_index": 0}


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


class WatchCache:
    """The children as the operator's own watches (`ChildWatch`) last saw them, each one `packed` bytes object:
    Jobs and ConfigMaps by (namespace, name), Pods by (namespace, label value of the FineTuneJob) and pod name.
    Once `ready` is set (every watch has had its first list) an absent key means no such labelled object. Read
    from the reconcile threads, written by the watch threads: one lock, held only for a dict operation."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self._guard = threading.Lock()
        self._jobs: dict[tuple[str, str], bytes] = {}
        self._configmaps: dict[tuple[str, str], bytes] = {}
        self._pods: dict[tuple[str, str], dict[str, bytes]] = {}

    def usable(self) -> bool:
        return self.ready.is_set()

    def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._guard:
            entry = self._jobs.get((namespace, name))
        return unpacked(entry) if entry is not None else None

    def configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._guard:
            entry = self._configmaps.get((namespace, name))
        return unpacked(entry) if entry is not None else None

    def pods(self, namespace: str, label_value: str) -> list[dict[str, Any]]:
        with self._guard:
            entries = list((self._pods.get((namespace, label_value)) or {}).values())
        return [unpacked(entry) for entry in entries]

    def __len__(self) -> int:
        with self._guard:
            return len(self._jobs) + len(self._configmaps) + sum(len(p) for p in self._pods.values())

    # Writes (the watches; tests)
    def put(self, kind: str, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        if "kind" not in body:  # a list's items have no apiVersion and kind
            body = {"apiVersion": KIND_OF[kind][0], "kind": KIND_OF[kind][1], **body}
        entry = packed(body)
        with self._guard:
            if kind == "pods":
                label = (meta.get("labels") or {}).get(LABEL_FTJ) or ""
                self._pods.setdefault((meta["namespace"], label), {})[meta["name"]] = entry
            else:
                self._store(kind)[meta["namespace"], meta["name"]] = entry

    def drop(self, kind: str, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        with self._guard:
            if kind == "pods":
                key = (meta["namespace"], (meta.get("labels") or {}).get(LABEL_FTJ) or "")
                pods = self._pods.get(key)
                if pods is not None:
                    pods.pop(meta["name"], None)
                    if not pods:
                        del self._pods[key]
            else:
                self._store(kind).pop((meta["namespace"], meta["name"]), None)

    def adopt(self, kind: str, namespace: str | None, fresh: "WatchCache") -> list[dict[str, Any]]:
        """`fresh` (a new list of `kind` in `namespace`, None: all) replaces what was kept of that kind there.
        Returns the objects that are gone or changed (each FineTuneJob's children while the watch was away)."""
        with self._guard:
            mine, theirs = self._store(kind), fresh._store(kind)
            kept = [key for key in mine if namespace is None or key[0] == namespace]
            if kind == "pods":
                changed = [entry for key in kept for name, entry in mine[key].items()
                           if (theirs.get(key) or {}).get(name) is None]
                changed += [entry for key, pods in theirs.items() for name, entry in pods.items()
                            if (mine.get(key) or {}).get(name) != entry]
            else:
                changed = [mine[key] for key in kept if key not in theirs]
                changed += [entry for key, entry in theirs.items() if mine.get(key) != entry]
            for key in kept:
                del mine[key]
            mine.update(theirs)
        return [unpacked(entry) for entry in changed]

    def _store(self, kind: str) -> dict:
        return {"jobs": self._jobs, "configmaps": self._configmaps, "pods": self._pods}[kind]


WATCH_SECONDS = 300  # the API server ends each watch after this; it is opened again from the last version
WATCH_PAGE = 500  # objects per page of a watch's list
# The children's kinds as the watches list them: (API group attribute of KubeApi, list call for all namespaces,
# list call for one namespace). Only Jobs' and Pods' changes trigger a reconcile; ConfigMaps are only read.
CHILD_KINDS = {
    "jobs": ("batch", "list_job_for_all_namespaces", "list_namespaced_job"),
    "pods": ("core", "list_pod_for_all_namespaces", "list_namespaced_pod"),
    "configmaps": ("core", "list_config_map_for_all_namespaces", "list_namespaced_config_map"),
}
KIND_OF = {"jobs": ("batch/v1", "Job"), "pods": ("v1", "Pod"), "configmaps": ("v1", "ConfigMap")}
TRIGGERING = ("jobs", "pods")


class ChildWatch:
    """The operator's children followed by one list+watch per kind (and namespace), with the server-side label
    selector `selector`, into a `WatchCache`; a change of a Job or a Pod calls `on_change(namespace, FineTuneJob
    name)` (the annotation the builders put on every child). This replaced kopf's indexes and event handlers on
    the children: kopf keeps a ResourceMemory (a memo, an error throttler, index and daemon memories), a worker
    task and a queue for every watched object, and wraps each event in bodies, patches and loggers — 3000
    children's worth of long-lived objects and a burst's worth of short-lived ones, all for an index entry and
    a queued reconcile. Here an event is parsed, packed and dropped in one thread.

    What kopf's watching did that this keeps: a paged list first, then a watch from its resourceVersion (with
    bookmarks), opened again from the last version seen when the API server ends it or the connection breaks
    (1 s doubling to 10 s between failed tries), and a fresh list when the version is too old (410 Gone): what
    the list no longer has is dropped from the cache and its FineTuneJob reconciled."""

    def __init__(self, api: "KubeApi", cache: WatchCache, on_change: Callable[[str, str], Any],
                 namespaces: tuple[str, ...] | list[str] = (), selector: str = LABEL_FTJ,
                 page: int = WATCH_PAGE, watch_seconds: int = WATCH_SECONDS):
        self.api = api
        self.cache = cache
        self.on_change = on_change
        self.namespaces = list(namespaces) or [None]
        self.selector = selector
        self.page = page
        self.watch_seconds = watch_seconds
        self._stopped = threading.Event()
        self._listed: set[tuple[str, str | None]] = set()
        self._listed_guard = threading.Lock()

    def start(self) -> None:
        self._stopped.clear()
        for kind in CHILD_KINDS:
            for namespace in self.namespaces:
                threading.Thread(target=self.run, args=(kind, namespace), daemon=True,
                                 name=f"kubesloth-watch-{kind}-{namespace or 'all'}").start()

    def stop(self) -> None:
        self._stopped.set()

    def _call(self, kind: str, namespace: str | None, **kwargs: Any) -> Any:
        group, everywhere, namespaced = CHILD_KINDS[kind]
        api = getattr(self.api, group)
        if namespace is None:
            return getattr(api, everywhere)(label_selector=self.selector, _preload_content=False, **kwargs)
        return getattr(api, namespaced)(namespace, label_selector=self.selector, _preload_content=False, **kwargs)

    def run(self, kind: str, namespace: str | None) -> None:
        version, delay = None, 1.0
        while not self._stopped.is_set():
            try:
                if version is None:
                    version = self.list(kind, namespace)
                version = self.watch(kind, namespace, version)
                delay = 1.0
            except ApiException as err:
                if err.status == 410:
                    version = None  # too old: list again
                    continue
                if self._stopped.is_set():
                    return
                log.warning("watch of %s (%s) failed: API %s %s; again in %.0f s", kind, namespace or "all",
                            err.status, err.reason, delay)
                self._stopped.wait(delay)
                delay = min(delay * 2, 10.0)
            except Exception as err:  # the API server away, a broken connection: again from the last version
                if self._stopped.is_set():
                    return
                log.warning("watch of %s (%s) failed: %s; again in %.0f s", kind, namespace or "all", err, delay)
                self._stopped.wait(delay)
                delay = min(delay * 2, 10.0)

    def list(self, kind: str, namespace: str | None) -> str:
        """Every labelled object of `kind`, page by page (one page parsed at a time), into the cache; returns the
        list's resourceVersion."""
        fresh = WatchCache()
        token = None
        while True:
            data = _json(self._call(kind, namespace, limit=self.page, **({"_continue": token} if token else {})))
            for item in data.get("items") or []:
                fresh.put(kind, item)
            meta = data.get("metadata") or {}
            token = meta.get("continue")
            data = None
            if not token:
                break
        changed = self.cache.adopt(kind, namespace, fresh)
        with self._listed_guard:
            first = (kind, namespace) not in self._listed
            self._listed.add((kind, namespace))
            if len(self._listed) == len(CHILD_KINDS) * len(self.namespaces):
                self.cache.ready.set()
        if not first and kind in TRIGGERING:  # after the first list, the FineTuneJobs' own handlers reconcile
            for body in changed:
                self._changed(body)
        return meta.get("resourceVersion")

    def watch(self, kind: str, namespace: str | None, version: str) -> str:
        """Follow `kind` from `version` until the API server ends the watch; returns the last version seen.
        Raises ApiException(410) when the version is too old."""
        response = self._call(kind, namespace, watch=True, resource_version=version, allow_watch_bookmarks=True,
                              timeout_seconds=self.watch_seconds, _request_timeout=(10, self.watch_seconds + 30))
        try:
            for line in iter_resp_lines(response):
                if self._stopped.is_set():
                    break
                if not line:
                    continue
                event = json.loads(line)
                kind_of_event, body = event.get("type"), event.get("object") or {}
                if kind_of_event == "ERROR":
                    raise ApiException(status=body.get("code"), reason=body.get("reason") or body.get("message"))
                version = (body.get("metadata") or {}).get("resourceVersion") or version
                if kind_of_event == "DELETED":
                    self.cache.drop(kind, body)
                elif kind_of_event != "BOOKMARK":
                    self.cache.put(kind, body)
                if kind in TRIGGERING and kind_of_event != "BOOKMARK":
                    self._changed(body)
                # Nothing of it is held while waiting for the next line (which may come minutes later, after
                # the burst this one came in is gone: its objects would keep that burst's arenas).
                line = event = body = kind_of_event = None
        finally:
            response.release_conn()
        return version

    def _changed(self, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        owner = (meta.get("annotations") or {}).get(ANNOTATION_FTJ)
        if owner and meta.get("namespace"):
            try:
                self.on_change(meta["namespace"], owner)
            except Exception:
                log.exception("child event of %s/%s not handled", meta["namespace"], meta.get("name"))


def share_ssl_context(api_client: client.ApiClient) -> None:
    """One TLS context for every connection of the client's pool. urllib3 builds a new SSLContext for each new
    connection, and where the configuration names no CA (a kubeconfig with insecure-skip-tls-verify, as the local
    control plane's) loads the system's CA store into it: 0.9 MiB of OpenSSL memory per connection, held while
    the connection stays pooled. After a burst (8 handler threads, 2 child-event threads, the resync) that was
    some 10 MiB of glibc heap in use after deleting everything (the after-deletion dump: 37.9 against 27.1 MiB
    at idle, while the traced Python heap was back at its idle size). urllib3 passes a given `ssl_context` to
    every connection and still applies the configuration's CA file and client certificate to it; it loads the
    default store only into contexts of its own, so that is done here once, where it would have."""
    pool = getattr(getattr(api_client, "rest_client", None), "pool_manager", None)
    if pool is None or pool.connection_pool_kw.get("ssl_context") is not None:
        return
    config = api_client.configuration
    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED if config.verify_ssl else ssl.CERT_NONE)
    if not (config.ssl_ca_cert or config.ca_cert_data):
        context.load_default_certs()
    pool.connection_pool_kw["ssl_context"] = context


class KubeApi:
    def __init__(self, api_client: client.ApiClient | None = None):
        self.api_client = api_client or client.ApiClient()
        share_ssl_context(self.api_client)
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
        _done(_unvalidated(self.core, "create_namespaced_event", namespace=meta["namespace"], body=body))
