"""kopf handlers: decorators and two-line adapters over `Reconciler` (run: `kubesloth operator`).

Triggers, all calling the same level-triggered reconcile of one FineTuneJob:
  * the FineTuneJob's create/update/resume (retried with backoff, bounded: `handler_retries`),
  * watch events of its Job and Pods (label kubesloth.io/finetunejob): status follows the pod within a second,
  * a resync thread every `resync_seconds` (pods change without any event reaching us while the operator was
    down; TTLs expire with no event at all).
No handler needs a finalizer (children go by ownerReferences; no timers/daemons, which would add one), so a
stopped operator never blocks `kubectl delete ftj`.
"""

from __future__ import annotations

import logging
import threading

import kopf
import urllib3
from kubernetes import client as kube_client
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from kubesloth.api.v1alpha1 import GROUP, PLURAL, VERSION

from . import metrics, progress
from .builders import ANNOTATION_FTJ, LABEL_FTJ
from .kube import KubeApi
from .reconcile import Reconciler
from .settings import OperatorSettings

log = logging.getLogger("kubesloth.operator")
SETTINGS = OperatorSettings.from_env()  # read once, at import by `kopf run`
RECONCILER: Reconciler | None = None
_stop = threading.Event()
TRANSIENT_HTTP = {409, 429, 500, 502, 503, 504}


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


def _resync_loop() -> None:
    while not _stop.wait(SETTINGS.resync_seconds):
        try:
            items = ([ftj for ns in SETTINGS.namespaces for ftj in RECONCILER.api.list_ftjs(ns)]
                     if SETTINGS.namespaces else RECONCILER.api.list_ftjs())
        except Exception as err:  # the API server may be briefly away; the next round tries again
            log.warning("resync: cannot list FineTuneJobs: %s", err)
            continue
        for ftj in items:
            try:
                RECONCILER.reconcile(ftj["metadata"]["namespace"], ftj["metadata"]["name"])
            except Exception as err:
                log.warning("resync of %s/%s failed: %s", ftj["metadata"]["namespace"], ftj["metadata"]["name"], err)


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_) -> None:
    global RECONCILER
    # kopf's bookkeeping in annotations under our own prefix: status stays ours alone (and the CRD schema
    # cannot prune it), and the markers survive a status reset.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubesloth.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kubesloth.io", key="last-handled-configuration")
    settings.persistence.finalizer = "kubesloth.io/finalizer"  # only used if a deletion handler is ever added
    # Events are posted explicitly on phase transitions; kopf posts only its own warnings (handler failures).
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 8
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30
    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    if not kube_client.Configuration.get_default_copy().verify_ssl:
        # The kubeconfig itself says insecure-skip-tls-verify (the local control plane): one warning per
        # request would drown the log.
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    _serve_metrics()
    RECONCILER = Reconciler(KubeApi(), SETTINGS, enrichers=[progress.enrich_status],
                            observers=[metrics.observe_reconcile])
    _stop.clear()
    threading.Thread(target=_resync_loop, name="kubesloth-resync", daemon=True).start()


@kopf.on.cleanup()
def cleanup(**_) -> None:
    _stop.set()


RETRY = {"retries": SETTINGS.handler_retries, "backoff": SETTINGS.handler_backoff_seconds}


@kopf.on.resume(GROUP, VERSION, PLURAL, **RETRY)
@kopf.on.create(GROUP, VERSION, PLURAL, **RETRY)
@kopf.on.update(GROUP, VERSION, PLURAL, **RETRY)
def finetunejob_changed(namespace: str, name: str, **_) -> None:
    reconcile_or_retry(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_FTJ: kopf.PRESENT})
@kopf.on.event("v1", "pods", labels={LABEL_FTJ: kopf.PRESENT})
def child_changed(namespace: str, annotations: kopf.Annotations, **_) -> None:
    if annotations.get(ANNOTATION_FTJ):
        RECONCILER.reconcile(namespace, annotations[ANNOTATION_FTJ])
