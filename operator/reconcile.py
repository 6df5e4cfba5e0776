"""One level-triggered reconcile of one FineTuneJob: read what is, act, write status.

The decision is operator/plan.py's pure `plan()`; this module gathers its inputs (the children from the watch cache
or the API server, the memory plan, the creation backoff), runs the enrichers, and executes the actions.

Called by every trigger (the FineTuneJob's own handlers, its Job's and Pods' watch events, the periodic resync),
always with the same effect for the same state of the cluster; a lock per FineTuneJob keeps two triggers from
acting at once, and the FineTuneJob is read fresh inside it (an event's body may be stale).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Optional

import yaml
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kubesloth.api import contract
from kubesloth.api.v1alpha1 import FineTuneJobSpec

from . import builders, plan as plan_mod
from .estimate import Estimate, estimate_for
from .kube import KubeApi
from .settings import OperatorSettings

log = logging.getLogger("kubesloth.operator")

# Hooks another module can fill without touching the reconcile:
#   enricher(ftj, job, pods, status) -> status   e.g. operator/progress.py adds status.progress from the metrics
#   observer(ftj, status, outcome, seconds)      e.g. operator/metrics.py counts reconciles and phases
Enricher = Callable[[dict, Optional[dict], list, dict], dict]
Observer = Callable[[dict, Optional[dict], str, float], None]

TRANSIENT_HTTP = {409, 429, 500, 502, 503, 504}


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
        # (namespace, name) -> ((ConfigMap uid, resourceVersion), the started spec parsed from it, as JSON bytes)
        self._specs: dict[tuple[str, str], tuple[tuple[Any, Any], bytes]] = {}
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
        """The spec in the run's ConfigMap, YAML-parsed once per version of it (YAML parsing was a fifth of a
        reconcile's time in a resync of 1000) and kept as JSON bytes: one block in malloc per FineTuneJob instead of
        a tree of small objects in CPython's arenas (see kube.packed); each call parses a fresh copy, so no caller
        can change the kept one."""
        if configmap is None:
            return None
        stamp = (configmap["metadata"].get("uid"), configmap["metadata"].get("resourceVersion"))
        kept = self._specs.get((namespace, name))
        if kept is None or kept[0] != stamp or stamp[1] is None:
            kept = (stamp, json.dumps(_spec_in(configmap), separators=(",", ":")).encode())
            self._specs[namespace, name] = kept
        return json.loads(kept[1])

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
                    written = self.api.take_written_version(namespace, name) or ftj["metadata"].get("resourceVersion")
                    if self._versions.get(key) != written:  # the same: the kept string stays (nothing new kept)
                        self._versions[key] = written
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
        """Gather what is, ask the plan (operator/plan.py) what to do, do it."""
        meta = ftj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        now = self.clock()
        job = self.api.get_job(namespace, builders.job_name(name))
        configmap = self.api.get_configmap(namespace, builders.configmap_name(name))
        inputs = self._inputs(ftj, job, configmap, now)
        return self._execute(ftj, inputs, plan_mod.plan(inputs))

    def _inputs(self, ftj: dict[str, Any], job: dict[str, Any] | None, configmap: dict[str, Any] | None,
                now: datetime) -> plan_mod.Inputs:
        meta = ftj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        key = (namespace, name)
        old = ftj.get("status") or {}
        owned = all(child is None or plan_mod.owned_by(child, ftj) for child in (job, configmap))
        try:
            live_spec = builders.normalized(ftj)["spec"]
        except ValidationError:
            live_spec = None  # the plan says why
        run_started = job is not None or bool(old.get("startTime"))
        started_spec = self._started_spec(namespace, name, configmap) if run_started and owned else None
        estimate, estimate_new = None, False
        if owned and live_spec is not None and plan_mod.needs_estimate(ftj, job):
            estimate, estimate_new = self._plan(ftj, live_spec)
        pause = self._backoff.get(key)
        backoff_left = None
        if pause and pause[0] == meta.get("generation") and time.monotonic() < pause[2]:
            backoff_left = pause[2] - time.monotonic()
        # Every trainer pod of the FineTuneJob (the plan picks those of the Job it leaves live): one read.
        pods = self.api.pods_of(namespace, builders.label_value(name), name, None) if owned else []
        return plan_mod.Inputs(ftj=ftj, job=job, configmap=configmap, pods=pods,
                               features=self.api.server_features(), now=now, settings=self.settings,
                               started_spec=started_spec, live_spec=live_spec, estimate=estimate,
                               estimate_new=estimate_new, backoff_left=backoff_left)

    def _execute(self, ftj: dict[str, Any], inputs: plan_mod.Inputs, plan: plan_mod.Plan) -> Outcome:
        """Run the plan's actions in order; the enrichers (progress, cost) between the child changes and the
        status patches. A refused child creation ends it with the refusal's status (plan.blocked)."""
        outcome = Outcome()
        for action in plan.first:
            refused = self._act(ftj, action, outcome, inputs, None)
            if refused is not None:
                return refused
        status = plan.status
        if status is not None:
            meta = ftj["metadata"]
            for enrich in self.enrichers:
                try:
                    status = enrich(ftj, plan.job, plan.pods, status) or status
                except Exception:  # progress is best effort; the phase must still be written
                    log.exception("status enricher failed for %s/%s", meta["namespace"], meta["name"])
        for action in plan.then:
            self._act(ftj, action, outcome, inputs, status)
        outcome.phase = plan.phase
        outcome.retry_after = plan.retry_after
        outcome.expires_in = plan.expires_in
        return outcome

    def _act(self, ftj: dict[str, Any], action: plan_mod.Action, outcome: Outcome,
             inputs: plan_mod.Inputs | None, enriched: dict[str, Any] | None) -> Outcome | None:
        meta = ftj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        if isinstance(action, plan_mod.PatchStatus):
            self.api.patch_ftj_status(namespace, name, action.status)
            ftj["status"] = {**(ftj.get("status") or {}), **action.status}
        elif isinstance(action, plan_mod.PatchBestEffortStatus):
            best_effort = {k: v for k, v in (enriched or action.status).items() if k in BEST_EFFORT_STATUS}
            if _differs(ftj.get("status") or {}, best_effort):
                try:
                    self.api.patch_ftj_status(namespace, name, best_effort)
                    ftj["status"] = {**(ftj.get("status") or {}), **best_effort}
                except ApiException as err:
                    log.warning("status.progress/cost of %s/%s not written (the phase was): API %s %s",
                                namespace, name, err.status, str(err.body or err.reason or "")[:300])
        elif isinstance(action, plan_mod.Event):
            self.api.post_event(ftj, action.type, action.reason, action.message)
        elif isinstance(action, plan_mod.DeleteJob):
            self.api.delete_job(namespace, action.name, action.uid)
            outcome.actions.append(action.label)
        elif isinstance(action, plan_mod.StopJob):
            self.api.stop_job(namespace, action.name, action.uid)
            outcome.actions.append(action.label)
        elif isinstance(action, plan_mod.PatchJob):
            self._patch_job(namespace, action)
            outcome.actions.append(action.label)
        elif isinstance(action, plan_mod.ReplaceConfigMap):
            self.api.replace_configmap(action.body)  # 409 when it changed since read: the handler's retry
            outcome.actions.append(action.label)
        elif isinstance(action, plan_mod.DeleteFineTuneJob):
            self.api.delete_ftj(namespace, action.name, action.uid)
            outcome.actions.append(action.label)
        elif isinstance(action, plan_mod.CreateChildren):
            return self._create_children(ftj, action, inputs.now if inputs else self.clock(), outcome)
        else:
            raise TypeError(f"unknown action {action!r}")
        return None

    def _patch_job(self, namespace: str, action: plan_mod.PatchJob) -> None:
        """A strategic-merge patch of the Job, `metadata.uid` in it a precondition (409 if the Job was replaced);
        gone (404) or replaced (409): the next reconcile sees what is there. (KubeApi has no general Job patch:
        stop_job is the only other one.)"""
        try:
            self.api.batch.patch_namespaced_job(action.name, namespace, action.patch, _preload_content=False)
        except ApiException as err:
            if err.status not in (404, 409):
                raise

    def _finish(self, ftj: dict[str, Any], plan: plan_mod.Plan) -> Outcome:
        """Execute a plan that stops early (a refusal: its status patch and event)."""
        outcome = Outcome()
        for action in plan.first + plan.then:
            self._act(ftj, action, outcome, None, None)
        outcome.phase, outcome.retry_after = plan.phase, plan.retry_after
        return outcome

    def _plan(self, ftj: dict[str, Any], live_spec: dict[str, Any]) -> tuple[Estimate, bool]:
        """The planner's estimate of this generation (cached: hub reads and the search run once per change);
        True when made now (the plan announces its changed fields once)."""
        meta = ftj["metadata"]
        key = (meta["namespace"], meta["name"])
        stamp = (meta.get("uid"), meta.get("generation"))
        cached = self._estimates.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1], False
        planned = estimate_for(FineTuneJobSpec.model_validate(live_spec), self.settings)
        self._estimates[key] = (stamp, planned)
        return planned, True

    def _blocked(self, ftj: dict[str, Any], now: datetime, reason: str, message: str) -> Outcome:
        return self._finish(ftj, plan_mod.blocked(ftj, now, reason, message))

    def _create_children(self, ftj: dict[str, Any], action: plan_mod.CreateChildren, now: datetime,
                         outcome: Outcome) -> Outcome | None:
        """Create the ConfigMap and the Job, or nothing: both objects are created with dryRun=All (validation and
        admission, nothing stored), and only then for real. A refusal is a condition with the API server's
        message and one Warning event; it is tried again with backoff (10 s doubling to 10 min) while the spec
        is unchanged, at once after a change. Returns the Outcome to end the reconcile with when refused, None
        when the Job exists."""
        meta = ftj["metadata"]
        key = (meta["namespace"], meta["name"])
        pause = self._backoff.get(key)
        # (kind, verb, call, body). Compared by verb, not `call is self.api.create_job`: a bound method is a new
        # object at each attribute access, so that test was always false (no 409 recovery on the real create, and
        # a replaced ConfigMap reported as "created").
        steps: list[tuple[str, str, Any, dict[str, Any]]] = []
        if action.configmap is not None and not action.configmap_replace:
            steps.append(("ConfigMap", "created", self.api.create_configmap, action.configmap))
        elif action.configmap is not None:
            steps.append(("ConfigMap", "replaced", self.api.replace_configmap, action.configmap))
        steps.append(("Job", "created", self.api.create_job, action.job))
        try:
            for dry_run in (True, False):
                current = "Job"
                for kind, verb, call, body in steps:
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
                                held = self._exists(kind, body, ftj, now)
                                if held is not None:
                                    return held
                        continue
                    if verb == "replaced":
                        call(body)
                    else:
                        read = self.api.get_job if kind == "Job" else self.api.get_configmap
                        self._create(call, body, lambda ns, n, read=read: read(ns, n, fresh=True))
                    outcome.actions.append(f"{verb} {kind}")
        except ApiException as err:
            if err.status in TRANSIENT_HTTP or err.status is None or err.status < 400:
                raise  # the API server's trouble, not the object's: the handler's retry
            failures = (pause[1] + 1) if pause and pause[0] == meta.get("generation") else 1
            delay = min(10.0 * 2 ** (failures - 1), 600.0)
            self._backoff[key] = (meta.get("generation"), failures, time.monotonic() + delay)
            name = next(b["metadata"]["name"] for k, _, _, b in steps if k == current)
            message = (f"{current} {name} refused by the API server ({err.status}): {_api_message(err)}; "
                       f"nothing was created; trying again in {delay:.0f}s, or at once when the spec changes")
            blocked = self._blocked(ftj, now, f"{current}Refused", message)
            blocked.retry_after = delay
            return blocked
        self._backoff.pop(key, None)
        return None

    def _exists(self, kind: str, body: dict[str, Any], ftj: dict[str, Any], now: datetime) -> Outcome | None:
        """A child the cache did not have exists (a dry-run create said 409): not ours -> NameConflict, nothing
        created; ours (the watch has not brought it yet) -> stop here and reconcile again in a moment."""
        meta = body["metadata"]
        read = self.api.get_job if kind == "Job" else self.api.get_configmap
        existing = read(meta["namespace"], meta["name"], fresh=True)
        if existing is None:
            return None  # gone again since: go on
        if not plan_mod.owned_by(existing, ftj):
            return self._blocked(ftj, now, "NameConflict", (
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


# The plan's pure helpers, under the names other modules and tests used.
operator_refusal = plan_mod.operator_refusal
dropped_fields = plan_mod.dropped_fields
BEST_EFFORT_STATUS = plan_mod.BEST_EFFORT_STATUS


def _api_message(err: ApiException) -> str:
    try:
        return str(json.loads(err.body).get("message") or err.reason)
    except (TypeError, ValueError, AttributeError):
        return str(err.body or err.reason)


def _spec_in(configmap: dict[str, Any] | None) -> dict[str, Any] | None:
    if configmap is None:
        return None
    text = (configmap.get("data") or {}).get(contract.CONFIG_FILE_NAME)
    return (yaml.safe_load(text) or {}).get("spec") if text else None


_differs = plan_mod.differs
