"""The operator's own Prometheus metrics, on their own port, from a private registry.

Fleet: `kubesloth_finetunejobs{phase}` (every phase always present, 0 when empty), `kubesloth_reconcile_total{result}`,
`kubesloth_reconcile_duration_seconds`, `kubesloth_job_failures_total{namespace,reason}` (jobs that ended Failed),
`kubesloth_trainer_failures_total{namespace,reason}` (every failed trainer attempt, retried or not; interruptions are not failures).
Resync: `kubesloth_resync_duration_seconds` (histogram of full passes), `kubesloth_resync_finetunejobs` (how many the
last pass reconciled), `kubesloth_operator_reads_total{object,source}` (reads of FineTuneJobs, Jobs, ConfigMaps and
Pods from the watch `cache` or the `api` server).
Per job (labels `namespace`, `finetunejob`), only while the job is not finished — a Succeeded, Failed or deleted
job's series disappear: `kubesloth_job_restarts`, `kubesloth_job_cost_dollars`,
`kubesloth_job_gpu_memory_capacity_bytes`; and only while it is Running: `kubesloth_job_progress_ratio`,
`kubesloth_job_step`, `kubesloth_job_tokens_per_second`, `kubesloth_job_peak_gpu_memory_bytes`,
`kubesloth_job_eta_seconds` (so a suspended job never looks stalled).

The per-job gauges are produced at scrape time from a dict of the jobs' latest status (a custom collector), so
forgetting a job is one `del` and a series can never outlive its job; a job no reconcile has seen for
`stale_after_seconds` (deleted while no event reached us) is dropped too. Labels are bounded: namespace and name
of existing objects, a phase from the enum, a failure reason from the operator's own CamelCase reasons.

Wiring: `observe_reconcile` is the Reconciler's observer hook; `serve_from_env` (or `METRICS.serve(port)`) starts
the endpoint; `KUBESLOTH_OPERATOR_PROMETHEUS_PORT` / `_ADDR` choose where (port 0 = off).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kubesloth.api.v1alpha1 import FINISHED_PHASES, Phase

from .status import parse_time

# Not KUBESLOTH_OPERATOR_METRICS_PORT: operator/settings.py uses that for the trainer pods' metrics port.
PORT_ENV = "KUBESLOTH_OPERATOR_PROMETHEUS_PORT"
ADDR_ENV = "KUBESLOTH_OPERATOR_PROMETHEUS_ADDR"
DEFAULT_PORT = 9090
DEFAULT_ADDR = "0.0.0.0"
# The Reconciler's outcomes: ok, requeue (must run again soon), error (raised), gone (the object was deleted).
RESULTS = ("ok", "requeue", "error", "gone")
STALE_AFTER_SECONDS = 300.0
# A job first seen already Failed (operator restarted) counts as a new failure only if it failed this recently:
# the previous operator process most likely counted older ones.
FRESH_FAILURE_WINDOW = timedelta(minutes=10)
_REASON = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,62}$")


def settings_from_env(env: Mapping[str, str] | None = None) -> tuple[str, int]:
    """(addr, port) from KUBESLOTH_OPERATOR_PROMETHEUS_ADDR/PORT; port 0 turns the endpoint off."""
    env = os.environ if env is None else env
    raw = env.get(PORT_ENV, str(DEFAULT_PORT))
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"{PORT_ENV}={raw!r}: must be an integer port 0-65535 (0 = metrics off)") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{PORT_ENV}={raw!r}: must be an integer port 0-65535 (0 = metrics off)")
    return env.get(ADDR_ENV, DEFAULT_ADDR), port


@dataclass
class _Job:
    phase: str | None
    status: Mapping[str, Any]
    spec: Mapping[str, Any]
    seen: float  # time.monotonic() of the last observation
    uid: str | None = None


# What the collector reads of a job's status and spec; only these are kept per job. The whole status and spec (a
# shallow copy: the parsed body's nested dicts and lists) of the last reconcile were kept for each job before,
# about a hundred small objects per FineTuneJob made anew on every reconcile, each pass's scattered over the
# small-object arenas the parsed bodies of that pass had used (and kept those arenas from being returned).
PROGRESS_READ = ("step", "totalSteps", "tokensPerSecond", "peakGpuMemoryBytes", "etaSeconds")


def _kept_status(status: Mapping[str, Any]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    if status.get("restarts"):
        kept["restarts"] = status["restarts"]
    dollars = (status.get("cost") or {}).get("dollars")
    if dollars is not None:
        kept["cost"] = {"dollars": dollars}
    progress = {k: v for k, v in (status.get("progress") or {}).items() if k in PROGRESS_READ and v is not None}
    if progress:
        kept["progress"] = progress
    return kept


def _kept_spec(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    gib = ((spec or {}).get("resources") or {}).get("gpuMemoryGiB")
    return {"resources": {"gpuMemoryGiB": gib}} if gib else {}


class _JobCollector(Collector):
    def __init__(self, owner: "OperatorMetrics"):
        self.owner = owner

    def collect(self):
        jobs = self.owner._live_jobs()
        by_phase = GaugeMetricFamily("kubesloth_finetunejobs", "FineTuneJobs by phase.", labels=["phase"])
        counts = {phase.value: 0 for phase in Phase}
        for job in jobs.values():
            if job.phase in counts:
                counts[job.phase] += 1
        for phase, count in counts.items():
            by_phase.add_metric([phase], count)
        yield by_phase

        labels = ["namespace", "finetunejob"]
        families = {
            "progress": GaugeMetricFamily("kubesloth_job_progress_ratio",
                                          "Optimizer steps done / planned, 0 to 1.", labels=labels),
            "step": GaugeMetricFamily("kubesloth_job_step", "Optimizer steps done.", labels=labels),
            "tps": GaugeMetricFamily("kubesloth_job_tokens_per_second", "Recent training throughput.",
                                     labels=labels),
            "peak": GaugeMetricFamily("kubesloth_job_peak_gpu_memory_bytes",
                                      "Peak GPU memory (NVML device peak, else torch reserved peak).",
                                      labels=labels),
            "eta": GaugeMetricFamily("kubesloth_job_eta_seconds", "Estimated seconds to completion.",
                                     labels=labels),
            "restarts": GaugeMetricFamily("kubesloth_job_restarts", "Trainer pod restarts and retries.",
                                          labels=labels),
            "cost": GaugeMetricFamily("kubesloth_job_cost_dollars", "GPU cost so far at the price table's rate.",
                                      labels=labels),
            "capacity": GaugeMetricFamily("kubesloth_job_gpu_memory_capacity_bytes",
                                          "GPU memory the job must fit into (spec.resources.gpuMemoryGiB).",
                                          labels=labels),
        }
        for (namespace, name), job in sorted(jobs.items()):
            if job.phase in FINISHED_PHASES:
                continue
            key = [namespace, name]
            families["restarts"].add_metric(key, job.status.get("restarts") or 0)
            dollars = (job.status.get("cost") or {}).get("dollars")
            if dollars is not None:
                families["cost"].add_metric(key, dollars)
            gib = (job.spec.get("resources") or {}).get("gpuMemoryGiB")
            if gib:
                families["capacity"].add_metric(key, float(gib) * 2**30)
            if job.phase != Phase.Running.value:
                continue
            progress = job.status.get("progress") or {}
            step, total = progress.get("step"), progress.get("totalSteps")
            if step is not None:
                families["step"].add_metric(key, step)
                if total:
                    families["progress"].add_metric(key, min(step / total, 1.0))
            for family, field in (("tps", "tokensPerSecond"), ("peak", "peakGpuMemoryBytes"),
                                  ("eta", "etaSeconds")):
                if progress.get(field) is not None:
                    families[family].add_metric(key, progress[field])
        yield from families.values()


class OperatorMetrics:
    """All operator metrics in one private registry (tests make their own; the operator uses `METRICS`)."""

    def __init__(self, stale_after_seconds: float = STALE_AFTER_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.stale_after_seconds = stale_after_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], _Job] = {}
        self._failed_pods: OrderedDict[str, None] = OrderedDict()  # uids already counted (bounded)
        self.reconciles = Counter("kubesloth_reconcile", "Reconciles of FineTuneJobs by result (ok, requeue = "
                                  "must run again soon, error = raised, gone = the object was deleted).",
                                  ["result"], registry=self.registry)
        for result in RESULTS:
            self.reconciles.labels(result)  # present at 0, so rate() and alerts see them from the start
        self.reconcile_seconds = Histogram("kubesloth_reconcile_duration_seconds", "Time spent in one reconcile.",
                                           buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                           registry=self.registry)
        self.failures = Counter("kubesloth_job_failures", "FineTuneJobs that ended Failed, by namespace and "
                                "reason (OutOfMemory, BackoffLimitExceeded, DeadlineExceeded, ...).",
                                ["namespace", "reason"], registry=self.registry)
        self.trainer_failures = Counter("kubesloth_trainer_failures", "Failed trainer attempts (pods), retried or "
                                        "not, by namespace and reason (OutOfMemory, TrainerError, ...).",
                                        ["namespace", "reason"], registry=self.registry)
        self.resync_seconds = Histogram("kubesloth_resync_duration_seconds", "Time one full resync pass took (list "
                                        "the FineTuneJobs, reconcile each).",
                                        buckets=(.1, .25, .5, 1, 2.5, 5, 10, 20, 30, 60, 120),
                                        registry=self.registry)
        self.resync_objects = Gauge("kubesloth_resync_finetunejobs", "FineTuneJobs the last resync pass reconciled.",
                                    registry=self.registry)
        self.reads = Counter("kubesloth_operator_reads", "Reads by the reconcile, by object and source (cache = "
                             "the watch cache, api = the API server).", ["object", "source"],
                             registry=self.registry)
        self._reads_seen: dict[tuple[str, str], int] = {}
        self.registry.register(_JobCollector(self))

    # --- reconciles -------------------------------------------------------------------------------------------
    def observe_reconcile(self, namespace: str | None, name: str | None, status: Mapping[str, Any] | None,
                          spec: Mapping[str, Any] | None, result: str, seconds: float,
                          uid: str | None = None) -> None:
        """One reconcile's result and duration, and the job's status as it wrote it."""
        self.reconciles.labels(result if result in RESULTS else "error").inc()
        self.reconcile_seconds.observe(seconds)
        if namespace and name:
            if result == "gone":
                self.forget_job(namespace, name)
            elif status:
                self.observe_job(namespace, name, status, spec, uid=uid)

    # --- jobs -------------------------------------------------------------------------------------------------
    def observe_job(self, namespace: str, name: str, status: Mapping[str, Any] | None,
                    spec: Mapping[str, Any] | None = None, now: datetime | None = None,
                    uid: str | None = None) -> None:
        """Record a job's latest status (wire form). Counts a failure when the job turns Failed."""
        status = dict(status or {})
        phase = status.get("phase")
        key = (namespace, name)
        with self._lock:
            previous = self._jobs.get(key)
            same_object = previous is not None and (uid is None or previous.uid in (None, uid))
            if same_object and previous.phase in FINISHED_PHASES and phase not in FINISHED_PHASES:
                # A finished run never runs again: this is an older reading that arrived late (observers run
                # after the reconcile's lock is released). Keep the newer one, and count nothing twice.
                previous.seen = self.clock()
                return
            kept_status, kept_spec = _kept_status(status), _kept_spec(spec)
            if (previous is not None and previous.uid == uid and previous.phase == phase
                    and previous.status == kept_status and previous.spec == kept_spec):
                previous.seen = self.clock()  # unchanged (every resync pass): nothing new allocated
            else:
                self._jobs[key] = _Job(phase, kept_status, kept_spec, self.clock(), uid)
        if phase == Phase.Failed.value and (previous is None or previous.phase != Phase.Failed.value):
            if previous is not None or _failed_recently(status, now or datetime.now(timezone.utc)):
                self.failures.labels(namespace, _failure_reason(status)).inc()

    def observe_failed_pods(self, namespace: str, failures: list[tuple[str, str, str | None]],
                            now: datetime | None = None) -> None:
        """Count each failed trainer pod once: (uid, reason, finishedAt). After an operator restart, pods that
        failed longer ago than FRESH_FAILURE_WINDOW are taken as already counted."""
        now = now or datetime.now(timezone.utc)
        for uid, reason, finished_at in failures:
            with self._lock:
                if uid in self._failed_pods:
                    continue
                self._failed_pods[uid] = None
                while len(self._failed_pods) > 10_000:
                    self._failed_pods.popitem(last=False)
            if _recent(finished_at, now):
                self.trainer_failures.labels(namespace, reason if _REASON.match(reason or "") else "Unknown").inc()

    def forget_job(self, namespace: str, name: str) -> None:
        """The job was deleted: drop all its series."""
        with self._lock:
            self._jobs.pop((namespace, name), None)

    def retain(self, keys: set[tuple[str, str]], listed_at: float) -> int:
        """Drop the series of jobs not in `keys` (a list of the FineTuneJobs started at `listed_at`, on this
        metrics' clock) and not observed since; returns how many went."""
        with self._lock:
            gone = [key for key, job in self._jobs.items() if key not in keys and job.seen < listed_at]
            for key in gone:
                del self._jobs[key]
        return len(gone)

    def observe_resync(self, count: int, seconds: float, reads: Mapping[tuple[str, str], int] | None = None) -> None:
        """One full resync pass; `reads`: the API wrapper's running totals of reads (KubeApi.reads)."""
        self.resync_seconds.observe(seconds)
        self.resync_objects.set(count)
        for (what, source), total in list((reads or {}).items()):
            added = total - self._reads_seen.get((what, source), 0)
            if added > 0:
                self.reads.labels(what, source).inc(added)
                self._reads_seen[what, source] = total

    def _live_jobs(self) -> dict[tuple[str, str], _Job]:
        cutoff = self.clock() - self.stale_after_seconds
        with self._lock:
            for key in [key for key, job in self._jobs.items() if job.seen < cutoff]:
                del self._jobs[key]
            return dict(self._jobs)

    def serve(self, port: int, addr: str = DEFAULT_ADDR):
        """Start the /metrics HTTP endpoint in a daemon thread; returns (server, thread)."""
        return start_http_server(port, addr=addr, registry=self.registry)

    def exposition(self) -> str:
        return generate_latest(self.registry).decode("utf-8")


def _failure_reason(status: Mapping[str, Any]) -> str:
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            reason = condition.get("reason") or ""
            return reason if _REASON.match(reason) else "Unknown"
    return "Unknown"


def _failed_recently(status: Mapping[str, Any], now: datetime) -> bool:
    return _recent(status.get("completionTime"), now)


def _recent(moment: str | None, now: datetime) -> bool:
    try:
        when = parse_time(moment)
    except ValueError:
        return False
    return when is None or now - when <= FRESH_FAILURE_WINDOW


METRICS = OperatorMetrics()


def observe_reconcile(ftj: Mapping[str, Any], status: Mapping[str, Any] | None, result: str,
                      seconds: float) -> None:
    """The Reconciler's observer hook (operator/reconcile.py): feeds METRICS."""
    meta = (ftj or {}).get("metadata") or {}
    METRICS.observe_reconcile(meta.get("namespace"), meta.get("name"), status, (ftj or {}).get("spec"),
                              result, seconds, uid=meta.get("uid"))


_SERVED: tuple | None = None


def serve_from_env(env: Mapping[str, str] | None = None, port: int | None = None):
    """Start METRICS' endpoint where KUBESLOTH_OPERATOR_PROMETHEUS_ADDR/PORT say (`port` overrides, e.g. from a
    flag); None when the port is 0. Idempotent: a second call (kopf re-running startup) keeps the first server."""
    global _SERVED
    if _SERVED is not None:
        return _SERVED
    addr, env_port = settings_from_env(env)
    port = env_port if port is None else port
    if port == 0:
        return None
    _SERVED = METRICS.serve(port, addr)
    return _SERVED
