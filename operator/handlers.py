"""kopf handlers: decorators and two-line adapters over `Reconciler` (run: `kubesloth operator`).

Triggers, all calling the same level-triggered reconcile of one FineTuneJob:
  * the FineTuneJob's create/update/resume (retried with backoff, bounded: `handler_retries`),
  * watch events of its Job and Pods (label kubesloth.io/finetunejob): status follows the pod within a second,
  * a resync thread every `resync_seconds` (pods change without any event reaching us while the operator was
    down; TTLs expire with no event at all): one list of FineTuneJobs per pass, children from the watch cache.
kopf watches only the FineTuneJobs. Jobs, Pods and ConfigMaps are followed by the operator's own list+watch per
kind with a server-side label selector (kube.ChildWatch), packed into kube.WatchCache, which the reconcile reads
instead of the API: kopf's per-object bookkeeping for 3000 children was most of the operator's memory at scale.
No handler needs a finalizer (children go by ownerReferences; no timers/daemons, which would add one), so a
stopped operator never blocks `kubectl delete ftj`.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import gc
import logging
import os
import sys
import threading
import time

import kopf
import urllib3
from kubernetes import client as kube_client
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from kubesloth.api.v1alpha1 import GROUP, PLURAL, VERSION

from . import metrics, progress
from .builders import LABEL_FTJ
from .kube import ChildWatch, KubeApi, WatchCache
from .reconcile import Reconciler
from .settings import OperatorSettings

log = logging.getLogger("kubesloth.operator")


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own heap arena (up to 8 per core), and the reconciles run in
    kopf's 8 worker threads, the resync and the scrapers: freed memory then stays spread over arenas that are
    rarely empty enough to give back. Two arenas (MALLOC_ARENA_MAX=2, set before those threads start) keep RSS
    close to what is live. No-op off glibc or where the environment already says."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _install_memory_dump() -> None:
    """Diagnosis only, off unless KUBESLOTH_OPERATOR_TRACEMALLOC names a file prefix: tracemalloc from import on
    (KUBESLOTH_OPERATOR_TRACEMALLOC_FRAMES frames, default 1; 0: no tracing), and on SIGUSR1 `PREFIX.N.txt` gets
    RSS, the traced total and top allocation sites (by line and by file), the most numerous object types after a
    gc, glibc's heap (mallinfo2) and CPython's obmalloc statistics (without tracing only). `bench/operator_scale.py
    --tracemalloc DIR` signals it at idle, at N and after deletion. Tracing costs CPU and roughly doubles the
    memory it traces: never on in production."""
    prefix = os.environ.get("KUBESLOTH_OPERATOR_TRACEMALLOC")
    if not prefix:
        return
    import collections
    import gc
    import signal
    import tracemalloc

    frames = int(os.environ.get("KUBESLOTH_OPERATOR_TRACEMALLOC_FRAMES", "1"))
    if frames > 0:
        tracemalloc.start(frames)
    dumps = [0]

    def dump(*_) -> None:
        gc.collect()
        rss = next((line.split(":", 1)[1].strip() for line in open("/proc/self/status")
                    if line.startswith("VmRSS:")), "?")
        dumps[0] += 1
        with open(f"{prefix}.{dumps[0]}.txt", "w") as out:
            current, peak = tracemalloc.get_traced_memory()
            out.write(f"VmRSS {rss}; traced {current / 2**20:.1f} MiB (peak {peak / 2**20:.1f} MiB)\n\n")
            snapshot = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
            if snapshot is not None:  # for comparing two dumps by traceback (what survived a deletion)
                snapshot.dump(f"{prefix}.{dumps[0]}.snapshot")
            for group, top in (("lineno", 60), ("filename", 30)) if snapshot else ():
                out.write(f"--- by {group}\n")
                for stat in snapshot.statistics(group)[:top]:
                    out.write(f"{stat.size / 2**20:8.2f} MiB {stat.count:8d}  {stat.traceback}\n")
            out.write("--- objects by type\n")
            for kind, n in collections.Counter(type(o).__name__ for o in gc.get_objects()).most_common(30):
                out.write(f"{n:9d} {kind}\n")
            out.write(f"--- glibc malloc (mallinfo2, all arenas): {_mallinfo()}\n--- CPython obmalloc\n")
            out.flush()
            saved = os.dup(2)  # sys._debugmallocstats() writes to the C stderr
            try:
                os.dup2(out.fileno(), 2)
                sys._debugmallocstats()
            finally:
                os.dup2(saved, 2)
                os.close(saved)

    def dump_and_survivors(*_) -> None:
        dump()
        if os.environ.get("KUBESLOTH_OPERATOR_TRACEMALLOC_SURVIVORS"):
            with open(f"{prefix}.{dumps[0]}.survivors.txt", "w") as out:
                _survivors(out, dumps[0] == 1)
        open(f"{prefix}.{dumps[0]}.done", "w").close()  # the bench waits for this

    signal.signal(signal.SIGUSR1, dump_and_survivors)


_IDLE: dict = {}


def _survivors(out, first: bool) -> None:
    """Diagnosis (KUBESLOTH_OPERATOR_TRACEMALLOC_SURVIVORS=1 with the dump): the first dump remembers every
    gc-tracked object and the 16 KiB pools (CPython's unit inside a 1 MiB arena) they lie in; a later one lists
    the objects made since that are still alive, by type and by where they were allocated (tracemalloc), the
    pools holding only such objects, and what refers to a sample of each type (chains of referrers)."""
    import collections
    import tracemalloc

    if first:  # the snapshot first, so that its own objects count as from before
        _IDLE["snapshot"] = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
    objects = gc.get_objects()
    if first:
        _IDLE["ids"] = {id(o): type(o) for o in objects}
        out.write(f"{len(objects)} gc objects remembered\n")
        return
    ids = _IDLE["ids"]
    new = [o for o in objects if ids.get(id(o)) is not type(o)]
    old_pools = {i >> 14 for i in ids}
    new_pools = collections.Counter(id(o) >> 14 for o in new)
    alone = {p: n for p, n in new_pools.items() if p not in old_pools}
    arenas = collections.Counter(p >> 6 for p in alone)
    out.write(f"{len(new)} gc objects made since the first dump alive; in {len(new_pools)} pools, {len(alone)} "
              f"with no object from before ({sum(alone.values())} objects), ~{len(arenas)} 1 MiB regions\n")
    out.write("--- new by type\n")
    for kind, n in collections.Counter(type(o).__qualname__ for o in new).most_common(50):
        out.write(f"{n:7d} {kind}\n")
    out.write("--- new in pools of their own, by type\n")
    for kind, n in collections.Counter(type(o).__qualname__ for o in new
                                       if (id(o) >> 14) in alone).most_common(40):
        out.write(f"{n:7d} {kind}\n")
    if tracemalloc.is_tracing():
        out.write("--- new by allocation traceback (innermost last)\n")
        where = collections.Counter()
        for o in new:
            tb = tracemalloc.get_object_traceback(o)
            where[" <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in reversed(tb)) if tb
                  else "?"] += 1
        for key, n in where.most_common(40):
            out.write(f"{n:7d} {key}\n")
        if _IDLE.get("snapshot") is not None:
            out.write("--- all allocations (gc or not) grown since the first dump, by traceback\n")
            mine = [tracemalloc.Filter(False, __file__, all_frames=True),
                    tracemalloc.Filter(False, tracemalloc.__file__, all_frames=True)]
            now = tracemalloc.take_snapshot().filter_traces(mine)
            for stat in sorted(now.compare_to(_IDLE["snapshot"].filter_traces(mine), "traceback"), key=lambda s: -s.count_diff)[:40]:
                if stat.count_diff <= 0:
                    break
                out.write(f"{stat.count_diff:+7d} {stat.size_diff / 1024:+9.1f} KiB  "
                          + " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}"
                                        for f in reversed(stat.traceback)) + "\n")
    out.write("--- referrer chains of samples (type: referrer types, up to 3 deep)\n")
    skip = {id(objects), id(new)}
    by_type = collections.defaultdict(list)
    for o in new:
        by_type[type(o)].append(o)

    def describe(o) -> str:
        if isinstance(o, dict):
            keys = list(o)[:4]
            return f"dict{keys!r:.80}"
        if isinstance(o, (list, tuple, set, frozenset, collections.deque)):
            return f"{type(o).__name__}[{len(o)}]"
        if isinstance(o, type(sys)):
            return f"module {o.__name__}"
        if callable(o) and hasattr(o, "__qualname__"):
            return f"{type(o).__name__} {getattr(o, '__module__', '')}.{o.__qualname__}"
        return type(o).__qualname__

    def chain(o, depth: int, seen: set) -> list[str]:
        if depth == 0:
            return []
        refs = [r for r in gc.get_referrers(o) if id(r) not in skip and id(r) not in seen
                and type(r).__name__ not in ("frame", "list_iterator")]
        skip.add(id(refs))
        lines = []
        top = refs[:2]
        skip.add(id(top))
        for r in top:
            seen.add(id(r))
            lines.append("  " * (4 - depth) + describe(r) + (" (old)" if ids.get(id(r)) is type(r) else ""))
            if ids.get(id(r)) is not type(r) and not isinstance(r, type(sys)):
                lines += chain(r, depth - 1, seen)
        return lines

    skip.update(id(v) for v in by_type.values())
    for kind, items in sorted(by_type.items(), key=lambda kv: -len(kv[1]))[:15]:
        sample = items[:: max(1, len(items) // 2)][:2]
        skip.add(id(sample))
        for o in sample:
            out.write(f"{kind.__qualname__} ({len(items)}): {describe(o)}\n")
            for line in chain(o, 3, {id(o)}):
                out.write(f"    {line}\n")
    del new, objects, by_type


def _mallinfo() -> dict[str, float]:
    """glibc's heap in MiB: `heap` from the system (brk and arenas), `mmapped` (large blocks), `in_use`, `free`
    (kept by malloc; malloc_trim can return whole free pages of it)."""
    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost")]
    try:
        mallinfo2 = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {}
    mallinfo2.restype = Info
    info = mallinfo2()
    return {"heap": round(info.arena / 2**20, 1), "mmapped": round(info.hblkhd / 2**20, 1),
            "in_use": round(info.uordblks / 2**20, 1), "free": round(info.fordblks / 2**20, 1)}


_limit_malloc_arenas()
_install_memory_dump()
SETTINGS = OperatorSettings.from_env()  # read once, at import by `kopf run`
RECONCILER: Reconciler | None = None
_stop = threading.Event()
TRANSIENT_HTTP = {409, 429, 500, 502, 503, 504}
CACHE = WatchCache()
# Only objects labelled kubesloth.io/finetunejob (every child the operator builds is) are sent by the API server.
CHILD_SELECTOR = LABEL_FTJ  # a label selector: "the key exists"
WATCH: ChildWatch | None = None


def _serve_metrics() -> None:
    """The operator's own /metrics (operator/metrics.py), where KUBESLOTH_OPERATOR_PROMETHEUS_PORT says."""
    try:
        metrics.serve_from_env()
    except (OSError, ValueError) as err:  # a taken port must not keep the operator from reconciling
        log.warning("operator metrics endpoint not started: %s", err)


def reconcile_or_retry(namespace: str, name: str) -> None:
    """Reconcile; API trouble becomes kopf.TemporaryError (retried with backoff), bad requests PermanentError."""
    assert RECONCILER is not None, "operator not started"
    # A resume while the suspended Job's pod still stops needs no handler retry: the old Job's DELETED event and
    # the resync reconcile again (a retry would have kopf log a failing handler meanwhile).
    try:
        RECONCILER.reconcile(namespace, name)
    except ApiException as err:
        if err.status in TRANSIENT_HTTP:
            raise kopf.TemporaryError(f"API {err.status} {err.reason}", delay=SETTINGS.handler_backoff_seconds)
        raise kopf.PermanentError(f"API {err.status} {err.reason}: {err.body}") from err
    except HTTPError as err:
        raise kopf.TemporaryError(f"API unreachable: {err}", delay=SETTINGS.handler_backoff_seconds)


def resync_pass(reconciler: Reconciler, namespaces: list[str] | None = None) -> int | None:
    """One pass: list the FineTuneJobs once, reconcile each from its listed body and the watch cache, then forget
    what was kept for FineTuneJobs that are gone (locks, plans, backoff, metric series, scrape readings). Returns
    how many were reconciled, None when the list failed."""
    started = time.monotonic()
    keys = set()
    try:
        # Page by page (kube.LIST_PAGE): the parsed bodies of one page at a time, not of all of them.
        for pages in ([reconciler.api.list_ftj_pages(ns) for ns in namespaces] if namespaces
                      else [reconciler.api.list_ftj_pages()]):
            for items in pages:
                for ftj in items:
                    namespace, name = ftj["metadata"]["namespace"], ftj["metadata"]["name"]
                    keys.add((namespace, name))
                    try:
                        reconciler.reconcile(namespace, name, listed=ftj)
                    except Exception as err:
                        log.warning("resync of %s/%s failed: %s", namespace, name, err)
                items = ftj = None  # this page goes before the next is read
    except Exception as err:  # the API server may be briefly away; the next round tries again
        # An incomplete list forgets nothing (what it did not reach is not gone).
        log.warning("resync: cannot list FineTuneJobs: %s", err)
        return None
    forgotten = reconciler.retain(keys, started)
    forgotten += metrics.METRICS.retain(keys, started)
    if progress.SCRAPER is not None:
        progress.SCRAPER.prune()
    # Most deletions are forgotten by the reconciles their children's DELETED events trigger, not here, and the
    # children leave the cache over minutes (garbage collection): trim whenever fewer are held than last pass.
    cache = getattr(reconciler.api, "cache", None)
    held = len(keys) + (len(cache) if cache is not None else 0)
    if forgotten or held < _HELD[0]:
        _trim_memory(reconciler.api)
    _HELD[0] = held
    seconds = time.monotonic() - started
    metrics.METRICS.observe_resync(len(keys), seconds, reconciler.api.reads)
    if seconds > SETTINGS.resync_seconds:
        log.warning("resync: %d FineTuneJobs took %.1f s, longer than its %g s period", len(keys), seconds,
                    SETTINGS.resync_seconds)
    return len(keys)


_HELD = [0]  # FineTuneJobs listed + children cached at the last resync pass


def _trim_memory(api: KubeApi | None = None) -> None:
    """After many objects went: empty the URL caches of kopf's HTTP client, close the idle pooled connections of
    `api` and collect cycles, then give freed heap back to the system (glibc keeps it otherwise; no-op
    elsewhere). yarl (aiohttp's URLs) keeps the last 128 URLs of each of its parsing functions, each URL with a
    cache of its parts: a URL of every FineTuneJob kopf patched last, allocated during the burst of creations or
    deletions and so scattered over CPython's 1 MiB arenas, each of which they alone kept from being returned
    (the after-deletion snapshots: about half the objects left over idle). The connections a burst opened (one
    per thread that needed one at once) stay pooled for good, each some fifty objects made mid-burst, and its
    TLS state. Both are made again on the next request."""
    if api is not None:
        try:
            api.api_client.rest_client.pool_manager.clear()  # in-flight requests finish; their connections close
        except AttributeError:
            pass
    for module in ("yarl._url", "yarl._parse"):
        for value in list(vars(sys.modules.get(module) or object).values()):
            clear = getattr(value, "cache_clear", None)
            if callable(clear) and hasattr(value, "cache_info"):
                clear()
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class ChildEvents:
    """Reconciles triggered by the children's watch events, one queued per FineTuneJob at a time, run by a few
    threads of their own. A FineTuneJob's child events come in runs (its ConfigMap, Job and Pod are created
    together, then the Job's and the Pod's status follow: about six per FineTuneJob): a reconcile reads everything
    fresh when it starts, so an event for a FineTuneJob whose reconcile is queued and not started yet needs no
    second one, and one that arrives while it runs queues one more (the running one may have read before the
    change). Off kopf's executor, so a burst of child events never holds up the creating handlers there."""

    def __init__(self, run, workers: int = 2):
        self._run = run
        self._workers = workers
        self._queued: dict[tuple[str, str], None] = {}  # insertion-ordered: first come, first reconciled
        self._running: set[tuple[str, str]] = set()
        self._cond = threading.Condition()
        self._stopped = False

    def submit(self, namespace: str, name: str) -> bool:
        """Queue a reconcile; False when one is already queued (and not started)."""
        with self._cond:
            if (namespace, name) in self._queued:
                return False
            self._queued[namespace, name] = None
            self._cond.notify()
            return True

    def _next(self) -> tuple[str, str] | None:
        with self._cond:
            while True:
                if self._stopped:
                    return None
                key = next((k for k in self._queued if k not in self._running), None)
                if key is not None:
                    del self._queued[key]
                    self._running.add(key)
                    return key
                self._cond.wait()

    def _work(self) -> None:
        while (key := self._next()) is not None:
            try:
                self._run(*key)
            except Exception as err:  # logged like kopf logged a failing event handler; the resync tries again
                log.warning("reconcile of %s/%s after a child's event failed: %s", key[0], key[1], err)
            finally:
                with self._cond:
                    self._running.discard(key)
                    self._cond.notify_all()

    def start(self) -> None:
        with self._cond:
            self._stopped = False
        for i in range(self._workers):
            threading.Thread(target=self._work, name=f"kubesloth-child-events-{i}", daemon=True).start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._queued)


CHILD_EVENTS = ChildEvents(lambda namespace, name: RECONCILER.reconcile(namespace, name))


# A deleted FineTuneJob is forgotten by the reconcile its children's DELETED events trigger (result "gone"), and
# by the next resync pass when it had none. (A kopf event handler on FineTuneJobs would run for every status patch
# of every one, in the same worker as the create handler, and log each: a cost for every object, always.)
def _resync_loop() -> None:
    while not _stop.wait(SETTINGS.resync_seconds):
        resync_pass(RECONCILER, SETTINGS.namespaces)


HANDLER_THREADS = 8


def started_executor(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """kopf's executor for the sync handlers, its `workers` threads started now. A ThreadPoolExecutor starts a
    thread only when a task finds none idle, so kopf's (max_workers 8) started most of its threads during the
    first burst of creations: each thread's objects (the Thread, its locks, conditions, events, the executor's
    weak references; some thirty in all) were made then, amid the burst's short-lived ones, and lived on in
    CPython's arenas that the burst had to add, each of which they kept from being returned after the burst was
    gone (the after-deletion survivors, issue 12). Started at startup they lie with the operator's other
    long-lived objects. Every thread waits at a barrier until all are up, so each task gets a thread of its
    own."""
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kopf-handler")
    barrier = threading.Barrier(workers)

    def meet() -> None:
        try:
            barrier.wait(timeout=10)
        except threading.BrokenBarrierError:  # a slow start: fewer started now, the rest when needed
            pass

    concurrent.futures.wait([executor.submit(meet) for _ in range(workers)])
    return executor


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf's settings for this operator (called at startup; a function so tests can check them)."""
    # kopf's bookkeeping in annotations under our own prefix: status stays ours alone (and the CRD schema
    # cannot prune it), and the markers survive a status reset.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubesloth.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kubesloth.io", key="last-handled-configuration")
    settings.persistence.finalizer = "kubesloth.io/finalizer"  # only used if a deletion handler is ever added
    # Events are posted explicitly on phase transitions; kopf posts only its own warnings (handler failures).
    settings.posting.level = logging.WARNING
    settings.execution.executor = started_executor(HANDLER_THREADS)
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_) -> None:
    global RECONCILER, WATCH
    configure(settings)
    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    if not kube_client.Configuration.get_default_copy().verify_ssl:
        # The kubeconfig itself says insecure-skip-tls-verify (the local control plane): one warning per
        # request would drown the log.
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    _serve_metrics()
    api = KubeApi()
    CACHE.ready.clear()
    api.cache = CACHE
    RECONCILER = Reconciler(api, SETTINGS, enrichers=[progress.enrich_status],
                            observers=[metrics.observe_reconcile])
    _stop.clear()
    CHILD_EVENTS.start()
    # Its own API client: the watches hold their connections for minutes, out of the reconciles' pool.
    WATCH = ChildWatch(KubeApi(), CACHE, CHILD_EVENTS.submit, SETTINGS.namespaces, CHILD_SELECTOR)
    WATCH.start()
    # The FineTuneJobs' resume handlers run after this: with the children listed by then, from the cache.
    if not CACHE.ready.wait(30):
        log.warning("the children's watches have not listed them in 30 s; reading them from the API meanwhile")
    threading.Thread(target=_resync_loop, name="kubesloth-resync", daemon=True).start()


@kopf.on.cleanup()
def cleanup(**_) -> None:
    _stop.set()
    CHILD_EVENTS.stop()
    if WATCH is not None:
        WATCH.stop()


RETRY = {"retries": SETTINGS.handler_retries, "backoff": SETTINGS.handler_backoff_seconds}


@kopf.on.resume(GROUP, VERSION, PLURAL, **RETRY)
@kopf.on.create(GROUP, VERSION, PLURAL, **RETRY)
@kopf.on.update(GROUP, VERSION, PLURAL, **RETRY)
def finetunejob_changed(namespace: str, name: str, **_) -> None:
    reconcile_or_retry(namespace, name)  # before the watches' first lists: the children read from the API
