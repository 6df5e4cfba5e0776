"""One level-triggered reconcile of one FineTuneJob: read what is, act, write status.

Called by every trigger (the FineTuneJob's own handlers, its Job's and Pods' watch events, the periodic resync),
always with the same effect for the same state of the cluster; a lock per FineTuneJob keeps two triggers from
acting at once, and the FineTuneJob is read fresh inside it (an event's body may be stale).
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Optional

import yaml
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kubesloth.api import contract
from kubesloth.api.v1alpha1 import FINISHED_PHASES, Phase

from kubesloth.api.v1alpha1 import FineTuneJobSpec

from . import builders, status as status_mod
from .estimate import Estimate, estimate_for
from .kube import KubeApi
from .settings import OperatorSettings

log = logging.getLogger("kubesloth.operator")

# Hooks another module can fill without touching the reconcile:
#   enricher(ftj, job, pods, status) -> status   e.g. operator/progress.py adds status.progress from the metrics
#   observer(ftj, status, outcome, seconds)      e.g. operator/metrics.py counts reconciles and phases
Enricher = Callable[[dict, Optional[dict], list, dict], dict]
Observer = Callable[[dict, Optional[dict], str, float], None]

WARNING_PHASES = {Phase.Failed.value}
TRANSIENT_HTTP = {409, 429, 500, 502, 503, 504}
UNKNOWN_FIELDS = "UnknownFields"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
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
        # (namespace, name) -> [lock, holders and waiters]: an entry lives only while a reconcile uses it.
        self._locks: dict[tuple[str, str], list] = {}
        self._locks_guard = threading.Lock()
        # (namespace, name) -> resourceVersion of the FineTuneJob as the last reconcile left it: a listed body with
        # the same version is what a GET would return (the resync then reads none).
        self._versions: dict[tuple[str, str], str] = {}
        # (namespace, name) -> time.monotonic() of its last reconcile (`retain` spares what is newer than a list)
        self._touched: dict[tuple[str, str], float] = {}
        # (namespace, name) -> ((ConfigMap uid, resourceVersion), the started spec parsed from it)
        self._specs: dict[tuple[str, str], tuple[tuple[Any, Any], Any]] = {}
        # (namespace, name) -> (generation, failures, monotonic time of the next try) of refused child creations
        self._backoff: dict[tuple[str, str], tuple[Any, int, float]] = {}
        # (namespace, name) -> ((uid, generation), Estimate): the plan of the generation last seen
        self._estimates: dict[tuple[str, str], tuple[tuple[Any, Any], Estimate]] = {}

    @contextmanager
    def _lock(self, namespace: str, name: str):
        """The FineTuneJob's lock, held for the block; the entry goes when its last user leaves (so 1000 deleted
        FineTuneJobs leave no 1000 locks behind, and a waiter always waits on the lock its holder holds)."""
        key = (namespace, name)
        with self._locks_guard:
            entry = self._locks.get(key)
            if entry is None:
                entry = self._locks[key] = [threading.Lock(), 0]
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._locks_guard:
                entry[1] -= 1
                if entry[1] == 0 and self._locks.get(key) is entry:
                    del self._locks[key]

    def forget(self, namespace: str, name: str) -> None:
        """The FineTuneJob is gone: drop what was kept for it (plan, backoff, version, parsed started spec)."""
        key = (namespace, name)
        for kept in (self._estimates, self._backoff, self._versions, self._touched, self._specs):
            kept.pop(key, None)

    def _started_spec(self, namespace: str, name: str, configmap: dict[str, Any] | None) -> dict[str, Any] | None:
        """The spec in the run's ConfigMap, parsed once per version of it (YAML parsing was a fifth of a
        reconcile's time in a resync of 1000); a copy, so no caller can change the kept one."""
        if configmap is None:
            return None
        stamp = (configmap["metadata"].get("uid"), configmap["metadata"].get("resourceVersion"))
        kept = self._specs.get((namespace, name))
        if kept is None or kept[0] != stamp or stamp[1] is None:
            kept = (stamp, _spec_in(configmap))
            self._specs[namespace, name] = kept
        return copy.deepcopy(kept[1])

    def retain(self, keys: set[tuple[str, str]], listed_at: float) -> int:
        """Forget every FineTuneJob not in `keys` (a list started at time.monotonic() `listed_at`) and not
        reconciled since: deleted while no event reached us. Returns how many were forgotten."""
        gone = [key for key, at in list(self._touched.items()) if key not in keys and at < listed_at]
        gone += [key for kept in (self._estimates, self._backoff, self._versions, self._specs) for key in list(kept)
                 if key not in keys and key not in self._touched]
        for key in set(gone):
            self.forget(*key)
        return len(set(gone))

    def reconcile(self, namespace: str, name: str, listed: dict[str, Any] | None = None) -> Outcome:
        """`listed`: the FineTuneJob as a list just returned it (the resync); used instead of a GET when its
        resourceVersion is the one the last reconcile left (nothing changed it since), else read fresh."""
        started = time.monotonic()
        ftj: dict[str, Any] | None = None
        result = "error"
        key = (namespace, name)
        try:
            with self._lock(namespace, name):
                version = (listed or {}).get("metadata", {}).get("resourceVersion")
                if version is not None and version == self._versions.get(key):
                    ftj = listed
                else:
                    ftj = self.api.get_ftj(namespace, name)
                if ftj is None or ftj["metadata"].get("deletionTimestamp"):
                    result = "gone"
                    self.forget(namespace, name)
                    return Outcome()
                self._touched[key] = time.monotonic()
                self.api.take_written_version(namespace, name)
                try:
                    outcome = self._reconcile(ftj)
                finally:
                    written = self.api.take_written_version(namespace, name)
                    self._versions[key] = written or ftj["metadata"].get("resourceVersion")
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
        # A ConfigMap whose run never started (its Job was refused, or suspended before a pod ran) records nothing:
        # the live spec is used and the ConfigMap rewritten before the next Job.
        run_started = job is not None or bool(old.get("startTime"))
        started_spec = self._started_spec(namespace, name, configmap) if run_started else None
        self._report_dropped_fields(ftj, now)
        changed = status_mod.spec_changes(started_spec, live_spec)
        effective = dict(ftj)
        if started_spec is not None:
            effective["spec"] = {**started_spec,
                                 **{k: v for k, v in live_spec.items() if k in status_mod.MUTABLE_SPEC_FIELDS}}
            for key in status_mod.MUTABLE_SPEC_FIELDS - set(live_spec):
                effective["spec"].pop(key, None)

        finished = old.get("phase") in FINISHED_PHASES or status_mod.job_finished(job)
        # The memory plan, before anything is scheduled (operator/estimate.py): a spec that cannot fit its budget
        # is refused with what would fit, and nothing is created. Planned once per generation.
        planned = self._plan(ftj, live_spec) if not finished and not run_started else None
        if planned is not None and planned.refusal:
            return self._does_not_fit(ftj, now, planned)
        if not finished:
            if effective["spec"].get("suspend"):
                if job is not None and not job["metadata"].get("deletionTimestamp"):
                    self.api.delete_job(namespace, job["metadata"]["name"], job["metadata"]["uid"])
                    outcome.actions.append("deleted Job (suspend)")
                    job = self.api.get_job(namespace, builders.job_name(name), fresh=True)
            elif job is None:
                refusal = builders.image_refusal(effective["spec"], self.settings)
                if refusal:
                    return self._blocked(ftj, now, "ImageNotAllowed", refusal)
                # Counted on earlier Jobs of this run (suspend/resume, a recreate) carry over to the new one.
                job_body = builders.build_job(
                    effective, self.settings, self.api.server_features(), int(old.get("interruptions") or 0),
                    int(old.get("failures") or 0))
                created: dict[str, Any] = {}
                refused = self._create_children(ftj, effective, configmap, run_started, job_body, now, outcome,
                                                created)
                if refused is not None:
                    return refused
                job = created.get("Job") or self.api.get_job(namespace, job_body["metadata"]["name"], fresh=True)
            elif job["metadata"].get("deletionTimestamp"):
                # Resumed while the suspended Job's pod is still stopping: create the new Job once it is gone.
                outcome.retry_after = 1.0

        live_job = job is not None and not job["metadata"].get("deletionTimestamp")
        pods = self.api.pods_of(namespace, builders.label_value(name), name,
                                job["metadata"]["uid"] if live_job else None)
        live = {**ftj, "spec": effective["spec"]}
        new_status = status_mod.derive_status(live, job, pods, now, changed)
        if planned is not None:
            new_status.update(self._estimate_status(ftj, planned, new_status, now))
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

    def _plan(self, ftj: dict[str, Any], live_spec: dict[str, Any]) -> Estimate:
        """The planner's estimate of this generation (cached: hub reads and the search run once per change)."""
        meta = ftj["metadata"]
        key = (meta["namespace"], meta["name"])
        stamp = (meta.get("uid"), meta.get("generation"))
        cached = self._estimates.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        planned = estimate_for(FineTuneJobSpec.model_validate(live_spec), self.settings)
        self._estimates[key] = (stamp, planned)
        if planned.changes:
            changed = "; ".join(f"{c['field']}={c['value']}: {c['planned']}" for c in planned.changes)
            self.api.post_event(ftj, "Normal", "PlanChangedFields", f"the plan runs these fields differently: "
                                                                    f"{changed} (status.estimate.changes says why)")
        return planned

    def _estimate_status(self, ftj: dict[str, Any], planned: Estimate, status: dict[str, Any], now: datetime
                         ) -> dict[str, Any]:
        estimate = {**(planned.status or {}), "generation": ftj["metadata"].get("generation")}
        if planned.status is None:
            estimate["message"] = planned.condition["message"]
        conditions = status_mod.merge_conditions(status.get("conditions") or [], [planned.condition], now,
                                                 ftj["metadata"].get("generation"))
        return {"estimate": estimate, "conditions": conditions}

    def _does_not_fit(self, ftj: dict[str, Any], now: datetime, planned: Estimate) -> Outcome:
        """Refused before scheduling: Fits=False (with what would fit), phase Pending, one Warning event, no
        child. A changed spec (a new generation) is planned again."""
        old = ftj.get("status") or {}
        reason = planned.condition["reason"]
        status = {"phase": Phase.Pending.value, "message": planned.refusal,
                  "observedGeneration": ftj["metadata"].get("generation")}
        status.update(self._estimate_status(ftj, planned, {"conditions": status_mod.merge_conditions(
            old.get("conditions") or [], [{"type": "Running", "status": "False", "reason": reason,
                                           "message": planned.refusal}], now, ftj["metadata"].get("generation"))},
            now))
        if _differs(old, status):
            self.api.patch_ftj_status(ftj["metadata"]["namespace"], ftj["metadata"]["name"], status)
        if _condition_reason(old, "Fits") != reason or old.get("message") != planned.refusal:
            self.api.post_event(ftj, "Warning", reason, planned.refusal)
        ftj["status"] = {**old, **status}
        return Outcome(phase=Phase.Pending.value)

    def _blocked(self, ftj: dict[str, Any], now: datetime, reason: str, message: str) -> Outcome:
        """Nothing can be created (a child name is taken, the spec is unusable): say so in status and once as a
        Warning event; the next reconcile after the cause is fixed proceeds."""
        old = ftj.get("status") or {}
        if old.get("phase") in FINISHED_PHASES:
            return Outcome(phase=old["phase"])
        conditions = [{"type": "Running", "status": "False", "reason": reason, "message": message}]
        status = {"phase": Phase.Pending.value, "message": message, "observedGeneration":
                  ftj["metadata"].get("generation"),
                  "conditions": status_mod.merge_conditions(old.get("conditions") or [], conditions, now,
                                                            ftj["metadata"].get("generation"))}
        if _differs(old, status):
            self.api.patch_ftj_status(ftj["metadata"]["namespace"], ftj["metadata"]["name"], status)
        if _condition_reason(old, "Running") != reason:
            self.api.post_event(ftj, "Warning", reason, message)
        ftj["status"] = {**old, **status}
        return Outcome(phase=Phase.Pending.value)

    def _create_children(self, ftj: dict[str, Any], effective: dict[str, Any], configmap: dict[str, Any] | None,
                         run_started: bool, job_body: dict[str, Any], now: datetime, outcome: Outcome,
                         created: dict[str, Any] | None = None) -> Outcome | None:
        """Create the ConfigMap and the Job, or nothing: rules the schema cannot hold are checked first, then both
        objects are created with dryRun=All (validation and admission, nothing stored), and only then for real.
        A refusal is a condition with the API server's message and one Warning event; it is tried again with
        backoff (10 s doubling to 10 min) while the spec is unchanged, at once after a change. Returns the
        Outcome to end the reconcile with when refused, None when the Job exists."""
        meta = ftj["metadata"]
        key = (meta["namespace"], meta["name"])
        refusal = operator_refusal(effective["spec"])
        if refusal:
            return self._blocked(ftj, now, "InvalidSpec", refusal)
        pause = self._backoff.get(key)
        if pause and pause[0] == meta.get("generation") and time.monotonic() < pause[2]:
            return Outcome(phase=(ftj.get("status") or {}).get("phase"), retry_after=pause[2] - time.monotonic())
        cm_body = builders.build_configmap(ftj, self.settings)
        stale = configmap is not None and not run_started and (configmap.get("data") or {}) != cm_body["data"]
        steps = []
        if configmap is None:
            steps.append(("ConfigMap", self.api.create_configmap, cm_body))
        elif stale:  # the run never started: record the spec it starts with now
            cm_body["metadata"]["resourceVersion"] = configmap["metadata"]["resourceVersion"]
            steps.append(("ConfigMap", self.api.replace_configmap, cm_body))
        steps.append(("Job", self.api.create_job, job_body))
        try:
            for dry_run in (True, False):
                current = "Job"
                for kind, call, body in steps:
                    current = kind
                    if dry_run:
                        try:
                            call(body, dry_run=True)
                        except ApiException as err:
                            if err.status != 409:  # 409: exists (an earlier attempt's answer was lost)
                                raise
                            if self.api.cached():
                                # The watch cache holds only our labelled children and may lag our own writes:
                                # what has the name, says the API server.
                                held = self._exists(kind, body, ftj)
                                if held is not None:
                                    return held
                    elif call is self.api.create_job:
                        made = self._create(call, body, lambda ns, n: self.api.get_job(ns, n, fresh=True))
                        if created is not None:
                            created["Job"] = made
                    elif call is self.api.create_configmap:
                        self._create(call, body, lambda ns, n: self.api.get_configmap(ns, n, fresh=True))
                    else:
                        call(body)
                    if not dry_run:
                        outcome.actions.append(f"{'replaced' if call is self.api.replace_configmap else 'created'} "
                                               f"{kind}")
        except ApiException as err:
            if err.status in TRANSIENT_HTTP or err.status is None or err.status < 400:
                raise  # the API server's trouble, not the object's: the handler's retry
            failures = (pause[1] + 1) if pause and pause[0] == meta.get("generation") else 1
            delay = min(10.0 * 2 ** (failures - 1), 600.0)
            self._backoff[key] = (meta.get("generation"), failures, time.monotonic() + delay)
            name = next(b["metadata"]["name"] for k, _, b in steps if k == current)
            message = (f"{current} {name} refused by the API server ({err.status}): {_api_message(err)}; "
                       f"nothing was created; trying again in {delay:.0f}s, or at once when the spec changes")
            blocked = self._blocked(ftj, now, f"{current}Refused", message)
            blocked.retry_after = delay
            return blocked
        self._backoff.pop(key, None)
        return None

    def _report_dropped_fields(self, ftj: dict[str, Any], now: datetime) -> None:
        """Fields the API server dropped (unknown to the schema; v1.20 drops them silently): those in
        `kubectl apply`'s last-applied-configuration the stored object lacks. Condition UnknownFields and one
        Warning event when the list changes."""
        dropped = dropped_fields(ftj)
        old = ftj.get("status") or {}
        before = next((c for c in old.get("conditions") or [] if c.get("type") == UNKNOWN_FIELDS), None)
        if not dropped and (before is None or before.get("status") == "False"):
            return
        if dropped:
            message = ("the API server dropped fields the FineTuneJob schema does not have, so they have no "
                       f"effect: {', '.join(dropped)} (misspelled? see docs/api.md)")
            cond = {"type": UNKNOWN_FIELDS, "status": "True", "reason": "FieldsDropped", "message": message}
        else:
            cond = {"type": UNKNOWN_FIELDS, "status": "False", "reason": "NoneDropped",
                    "message": "every applied field is in the schema"}
        if before and before.get("status") == cond["status"] and before.get("message") == cond["message"]:
            return
        conditions = status_mod.merge_conditions(old.get("conditions") or [], [cond], now,
                                                 ftj["metadata"].get("generation"))
        # merge_conditions puts the new one first and keeps the others: keep the original order instead.
        order = [c.get("type") for c in old.get("conditions") or []]
        conditions.sort(key=lambda c: order.index(c["type"]) if c["type"] in order else len(order))
        self.api.patch_ftj_status(ftj["metadata"]["namespace"], ftj["metadata"]["name"],
                                  {"conditions": conditions})
        ftj["status"] = {**old, "conditions": conditions}
        if dropped:
            self.api.post_event(ftj, "Warning", "UnknownFields", cond["message"])

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

    def _exists(self, kind: str, body: dict[str, Any], ftj: dict[str, Any]) -> Outcome | None:
        """A child the cache did not have exists (a dry-run create said 409): not ours -> NameConflict, nothing
        created; ours (the watch has not brought it yet) -> stop here and reconcile again in a moment."""
        meta = body["metadata"]
        read = self.api.get_job if kind == "Job" else self.api.get_configmap
        existing = read(meta["namespace"], meta["name"], fresh=True)
        if existing is None:
            return None  # gone again since: go on
        if not _owned_by(existing, ftj):
            return self._blocked(ftj, self.clock(), "NameConflict", (
                f"{kind} {meta['name']} already exists and is not owned by this FineTuneJob; delete or rename it"))
        return Outcome(phase=(ftj.get("status") or {}).get("phase"), retry_after=1.0)

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


def operator_refusal(spec: dict[str, Any]) -> str | None:
    """What the schema cannot refuse at the door but the operator must, naming the field; None if nothing."""
    destination = (spec.get("output") or {}).get("destination") or ""
    if destination.startswith("file://"):
        return (f"spec.output.destination: {destination!r} is not on a volume in the trainer pod (only pvc:// "
                "claims are mounted; /tmp is an emptyDir): the model would be lost with the pod. Use "
                "pvc://CLAIM/path")
    return None


def dropped_fields(ftj: dict[str, Any]) -> list[str]:
    """Paths in the last-applied-configuration annotation (kubectl apply) missing from the stored object."""
    text = ((ftj.get("metadata") or {}).get("annotations") or {}).get(LAST_APPLIED)
    if not text:
        return []
    try:
        applied = json.loads(text)
    except ValueError:
        return []
    found: list[str] = []

    def walk(sent: Any, stored: Any, path: str) -> None:
        if isinstance(sent, dict) and isinstance(stored, dict):
            for key, value in sent.items():
                if value is None:
                    continue
                if key not in stored:
                    found.append(f"{path}.{key}" if path else key)
                else:
                    walk(value, stored[key], f"{path}.{key}" if path else key)
        elif isinstance(sent, list) and isinstance(stored, list) and len(sent) == len(stored):
            for index, (a, b) in enumerate(zip(sent, stored)):
                walk(a, b, f"{path}[{index}]")

    walk({k: v for k, v in applied.items() if k not in ("apiVersion", "kind", "metadata", "status")},
         {k: v for k, v in ftj.items() if k not in ("apiVersion", "kind", "metadata", "status")}, "")
    return found


def _api_message(err: ApiException) -> str:
    try:
        return str(json.loads(err.body).get("message") or err.reason)
    except (TypeError, ValueError, AttributeError):
        return str(err.body or err.reason)


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
