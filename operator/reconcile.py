"""One level-triggered reconcile of one FineTuneJob: read what is, act, write status.

Called by every trigger (the FineTuneJob's own handlers, its Job's and Pods' watch events, the periodic resync),
always with the same effect for the same state of the cluster; a lock per FineTuneJob keeps two triggers from
acting at once, and the FineTuneJob is read fresh inside it (an event's body may be stale).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Optional

import yaml
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kubesloth.api import contract
from kubesloth.api.v1alpha1 import FINISHED_PHASES, Phase

from . import builders, status as status_mod
from .kube import KubeApi
from .settings import OperatorSettings

log = logging.getLogger("kubesloth.operator")

# Hooks another module can fill without touching the reconcile:
#   enricher(ftj, job, pods, status) -> status   e.g. operator/progress.py adds status.progress from the metrics
#   observer(ftj, status, outcome, seconds)      e.g. operator/metrics.py counts reconciles and phases
Enricher = Callable[[dict, Optional[dict], list, dict], dict]
Observer = Callable[[dict, Optional[dict], str, float], None]

WARNING_PHASES = {Phase.Failed.value}
QUIET_PENDING_REASONS = {"Creating", "PodCreating", "PodStarting"}  # the normal way to Running


@dataclass
class Outcome:
    """What one reconcile saw and did. `retry_after`: run again soon (the suspended Job is still being deleted);
    `expires_in`: seconds until the TTL deletes the finished FineTuneJob (the resync loop takes care of it)."""

    phase: str | None = None
    actions: list[str] = field(default_factory=list)
    retry_after: float | None = None
    expires_in: float | None = None


class Reconciler:
    def __init__(self, api: KubeApi, settings: OperatorSettings, enrichers: list[Enricher] | None = None,
                 observers: list[Observer] | None = None, clock: Callable[[], datetime] | None = None):
        self.api = api
        self.settings = settings
        self.enrichers = list(enrichers or [])
        self.observers = list(observers or [])
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def reconcile(self, namespace: str, name: str) -> Outcome:
        started = time.monotonic()
        ftj: dict[str, Any] | None = None
        result = "error"
        try:
            with self._lock(namespace, name):
                ftj = self.api.get_ftj(namespace, name)
                if ftj is None or ftj["metadata"].get("deletionTimestamp"):
                    result = "gone"
                    return Outcome()
                outcome = self._reconcile(ftj)
                result = "requeue" if outcome.retry_after else "ok"
                return outcome
        finally:
            for observer in self.observers:
                try:
                    seen = ftj or {"metadata": {"namespace": namespace, "name": name}}
                    observer(seen, seen.get("status"), result, time.monotonic() - started)
                except Exception:  # a metrics bug must never break reconciling
                    log.exception("status observer failed")

    # ---------------------------------------------------------------------------------------------------------
    def _reconcile(self, ftj: dict[str, Any]) -> Outcome:
        meta = ftj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        old = ftj.get("status") or {}
        outcome = Outcome()
        now = self.clock()

        job = self.api.get_job(namespace, builders.job_name(name))
        configmap = self.api.get_configmap(namespace, builders.configmap_name(name))
        for child in (job, configmap):
            if child is not None and not _owned_by(child, ftj):
                return self._blocked(ftj, now, "NameConflict", (
                    f"{child['kind']} {child['metadata']['name']} already exists and is not owned by this "
                    "FineTuneJob; delete or rename it"))
        try:
            live_spec = builders.normalized(ftj)["spec"]
        except ValidationError as err:  # the CRD schema is generated from the same types, so this is rare
            problems = "; ".join(f"spec.{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}"
                                 for e in err.errors() if e["loc"][:1] == ("spec",))
            return self._blocked(ftj, now, "InvalidSpec", problems or str(err))

        # The spec the run started with is the one in its ConfigMap; later changes (other than the mutable fields)
        # are refused, and a Job recreated on resume uses the started spec.
        started_spec = _spec_in(configmap)
        changed = status_mod.spec_changes(started_spec, live_spec)
        effective = dict(ftj)
        if started_spec is not None:
            effective["spec"] = {**started_spec,
                                 **{k: v for k, v in live_spec.items() if k in status_mod.MUTABLE_SPEC_FIELDS}}
            for key in status_mod.MUTABLE_SPEC_FIELDS - set(live_spec):
                effective["spec"].pop(key, None)

        finished = old.get("phase") in FINISHED_PHASES or status_mod.job_finished(job)
        if not finished:
            if effective["spec"].get("suspend"):
                if job is not None and not job["metadata"].get("deletionTimestamp"):
                    self.api.delete_job(namespace, job["metadata"]["name"], job["metadata"]["uid"])
                    outcome.actions.append("deleted Job (suspend)")
                    job = self.api.get_job(namespace, builders.job_name(name))
            elif job is None:
                refusal = builders.image_refusal(effective["spec"], self.settings)
                if refusal:
                    return self._blocked(ftj, now, "ImageNotAllowed", refusal)
                if configmap is None:
                    configmap = self._create(self.api.create_configmap, builders.build_configmap(ftj, self.settings),
                                             self.api.get_configmap)
                    outcome.actions.append("created ConfigMap")
                # Counted on earlier Jobs of this run (suspend/resume, a recreate) carry over to the new one.
                job = self._create(self.api.create_job, builders.build_job(
                    effective, self.settings, self.api.server_features(), int(old.get("interruptions") or 0),
                    int(old.get("failures") or 0)), self.api.get_job)
                outcome.actions.append("created Job")
            elif job["metadata"].get("deletionTimestamp"):
                # Resumed while the suspended Job's pod is still stopping: create the new Job once it is gone.
                outcome.retry_after = 1.0

        if job is not None and not job["metadata"].get("deletionTimestamp"):
            pods = self.api.list_pods(namespace, f"controller-uid={job['metadata']['uid']}")
        else:
            pods = self.api.list_pods(namespace, f"{builders.LABEL_FTJ}={builders.label_value(name)}")
            pods = [p for p in pods if (p["metadata"].get("annotations") or {}).get(builders.ANNOTATION_FTJ) == name]
        live = {**ftj, "spec": effective["spec"]}
        new_status = status_mod.derive_status(live, job, pods, now, changed)
        for enrich in self.enrichers:
            try:
                new_status = enrich(ftj, job, pods, new_status) or new_status
            except Exception:  # progress is best effort; the phase must still be written
                log.exception("status enricher failed for %s/%s", namespace, name)
        outcome.phase = new_status["phase"]

        # Phase and conditions first, in a patch of their own; then progress/cost, read from the trainer (which
        # the user's code runs in): a value the API server refuses there costs that patch, never the phase.
        phase_status = {k: v for k, v in new_status.items() if k not in BEST_EFFORT_STATUS}
        if _differs(old, phase_status):
            self.api.patch_ftj_status(namespace, name, phase_status)
            ftj["status"] = {**old, **phase_status}
        best_effort = {k: v for k, v in new_status.items() if k in BEST_EFFORT_STATUS}
        if _differs(old, best_effort):
            try:
                self.api.patch_ftj_status(namespace, name, best_effort)
                ftj["status"] = {**(ftj.get("status") or old), **best_effort}
            except ApiException as err:
                log.warning("status.progress/cost of %s/%s not written (the phase was): API %s %s",
                            namespace, name, err.status, str(err.body or err.reason or "")[:300])
        if job is not None and not job["metadata"].get("deletionTimestamp"):
            if (new_status["phase"] == Phase.Failed.value and not status_mod.job_finished(job)
                    and (job.get("spec") or {}).get("parallelism") != 0):
                # Failed by the run's own counts while the Job would retry (v1.20 has no podFailurePolicy; too many
                # interruptions): no more pods; the failed ones (and their logs) stay.
                self.api.stop_job(namespace, job["metadata"]["name"], job["metadata"]["uid"])
                outcome.actions.append("stopped Job (failed)")
            elif _condition_reason(new_status, "Running") == status_mod.RESUMING and status_mod.job_finished(job):
                # The Job gave up on interruptions: deleted, and recreated once gone (the counts carry over).
                self.api.delete_job(namespace, job["metadata"]["name"], job["metadata"]["uid"])
                outcome.actions.append("deleted Job (recreate to resume)")
        if new_status["phase"] != old.get("phase"):
            kind = "Warning" if new_status["phase"] in WARNING_PHASES else "Normal"
            self.api.post_event(ftj, kind, new_status["phase"], _event_message(new_status))
        if new_status["phase"] == Phase.Pending.value:
            # Stuck or retrying without a phase change (Unschedulable, ImagePullBackOff, a failed attempt):
            # a Warning the first time each reason appears, so `kubectl describe` shows why.
            reason = _condition_reason(new_status, "Running")
            if reason != _condition_reason(old, "Running") and reason not in QUIET_PENDING_REASONS:
                self.api.post_event(ftj, "Warning", reason, _condition_message(new_status, "Running"))
        if changed and not _has_true(old, status_mod.SPEC_LOCKED):
            self.api.post_event(ftj, "Warning", "SpecChangeRefused", _condition_message(new_status, "SpecLocked"))

        if new_status["phase"] in FINISHED_PHASES:
            self._expire(ftj, new_status, effective["spec"], now, outcome)
        return outcome

    def _blocked(self, ftj: dict[str, Any], now: datetime, reason: str, message: str) -> Outcome:
        """Nothing can be created (a child name is taken, the spec is unusable): say so in status and once as a
        Warning event; the next reconcile after the cause is fixed proceeds."""
        old = ftj.get("status") or {}
        if old.get("phase") in FINISHED_PHASES:
            return Outcome(phase=old["phase"])
        conditions = [{"type": "Running", "status": "False", "reason": reason, "message": message}]
        status = {"phase": Phase.Pending.value, "message": message, "observedGeneration":
                  ftj["metadata"].get("generation"),
                  "conditions": status_mod.merge_conditions(old.get("conditions") or [], conditions, now)}
        if _differs(old, status):
            self.api.patch_ftj_status(ftj["metadata"]["namespace"], ftj["metadata"]["name"], status)
        if _condition_reason(old, "Running") != reason:
            self.api.post_event(ftj, "Warning", reason, message)
        ftj["status"] = {**old, **status}
        return Outcome(phase=Phase.Pending.value)

    def _expire(self, ftj: dict[str, Any], status: dict[str, Any], spec: dict[str, Any], now: datetime,
                outcome: Outcome) -> None:
        ttl = spec.get("ttlSecondsAfterFinished")
        done = status_mod.parse_time(status.get("completionTime"))
        if ttl is None or done is None:
            return
        left = (done + timedelta(seconds=ttl) - now).total_seconds()
        meta = ftj["metadata"]
        if left <= 0:
            # The FineTuneJob goes, and its Job, Pods and ConfigMap with it (ownerReferences): nothing remains
            # that could be recreated (Kubeflow #2991 deleted only the child and recreated it forever).
            self.api.post_event(ftj, "Normal", "Expired", f"deleting the finished FineTuneJob: "
                                                          f"ttlSecondsAfterFinished ({ttl}s) elapsed")
            self.api.delete_ftj(meta["namespace"], meta["name"], meta["uid"])
            outcome.actions.append("deleted FineTuneJob (TTL)")
        else:
            outcome.expires_in = left

    def _create(self, create, body: dict[str, Any], read) -> dict[str, Any]:
        try:
            return create(body)
        except ApiException as err:
            if err.status != 409:
                raise
            # Created by an earlier attempt whose answer was lost: use it (its ownership was checked above).
            existing = read(body["metadata"]["namespace"], body["metadata"]["name"])
            if existing is None:
                raise
            return existing


def _owned_by(obj: dict[str, Any], ftj: dict[str, Any]) -> bool:
    return any(ref.get("uid") == ftj["metadata"]["uid"] for ref in obj["metadata"].get("ownerReferences") or [])


def _spec_in(configmap: dict[str, Any] | None) -> dict[str, Any] | None:
    if configmap is None:
        return None
    text = (configmap.get("data") or {}).get(contract.CONFIG_FILE_NAME)
    return (yaml.safe_load(text) or {}).get("spec") if text else None


# Status fields read from the trainer's metrics (operator/progress.py): written apart from the phase.
BEST_EFFORT_STATUS = frozenset({"progress", "cost"})


def _differs(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return any(old.get(key) != value for key, value in new.items())


def _condition_reason(status: dict[str, Any], kind: str) -> str | None:
    return next((c.get("reason") for c in status.get("conditions") or [] if c.get("type") == kind), None)


def _has_true(status: dict[str, Any], kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True" for c in status.get("conditions") or [])


def _condition_message(status: dict[str, Any], kind: str) -> str:
    for cond in status.get("conditions") or []:
        if cond.get("type") == kind:
            return cond.get("message") or ""
    return ""


def _event_message(status: dict[str, Any]) -> str:
    reason = next((c.get("reason") for c in status["conditions"] if c["type"] == status["phase"]), None) \
        or next((c.get("reason") for c in status["conditions"] if c["type"] == "Running"), "")
    return f"{status['phase']} ({reason}): {status.get('message') or ''}"
