"""The operator's metrics registry: real prometheus-client exposition, parsed back, and promtool's linter."""

from __future__ import annotations

import urllib.request
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubesloth.local.cluster import free_port
from kubesloth.operator import metrics as m

from .helpers import run_promtool

RUNNING = {"phase": "Running", "restarts": 1,
           "progress": {"step": 30, "totalSteps": 120, "tokensPerSecond": 812.5, "peakGpuMemoryBytes": 2**34,
                        "etaSeconds": 90.0},
           "cost": {"dollars": 0.42}}


def samples(metrics: m.OperatorMetrics) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.exposition()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def job_series(metrics: m.OperatorMetrics, namespace: str, name: str) -> dict[str, float]:
    want = {("namespace", namespace), ("finetunejob", name)}
    return {metric: value for (metric, labels), value in samples(metrics).items()
            if want <= labels and metric.startswith("kubesloth_job_") and "reason" not in dict(labels)}


def test_per_job_gauges_while_running():
    metrics = m.OperatorMetrics()
    metrics.observe_job("ml", "llama", RUNNING)
    assert job_series(metrics, "ml", "llama") == {
        "kubesloth_job_progress_ratio": 0.25,
        "kubesloth_job_step": 30,
        "kubesloth_job_tokens_per_second": 812.5,
        "kubesloth_job_peak_gpu_memory_bytes": 2**34,
        "kubesloth_job_eta_seconds": 90.0,
        "kubesloth_job_restarts": 1,
        "kubesloth_job_cost_dollars": 0.42,
    }


@pytest.mark.parametrize("end", ["Succeeded", "Failed", "deleted"])
def test_a_finished_or_deleted_job_leaves_no_series(end):
    metrics = m.OperatorMetrics()
    metrics.observe_job("ml", "llama", RUNNING)
    metrics.observe_job("ml", "other", RUNNING)
    if end == "deleted":
        metrics.forget_job("ml", "llama")
    else:
        metrics.observe_job("ml", "llama", {**RUNNING, "phase": end})
    assert job_series(metrics, "ml", "llama") == {}
    assert job_series(metrics, "ml", "other")["kubesloth_job_step"] == 30  # the other job is untouched
    text = metrics.exposition()
    assert 'finetunejob="llama"' not in text


def test_jobs_by_phase_counts_every_phase_and_follows_transitions():
    metrics = m.OperatorMetrics()
    metrics.observe_job("a", "one", {"phase": "Pending"})
    metrics.observe_job("a", "two", RUNNING)
    metrics.observe_job("b", "one", RUNNING)
    metrics.observe_job("b", "one", {"phase": "Succeeded"})
    by_phase = {dict(labels)["phase"]: value for (name, labels), value in samples(metrics).items()
                if name == "kubesloth_finetunejobs"}
    assert by_phase == {"Pending": 1, "Queued": 0, "Running": 1, "Succeeded": 1, "Failed": 0, "Suspended": 0}
    metrics.forget_job("b", "one")
    assert samples(metrics)[("kubesloth_finetunejobs", frozenset({("phase", "Succeeded")}))] == 0


def test_failures_are_counted_once_by_reason():
    metrics = m.OperatorMetrics()
    failed = {"phase": "Failed", "conditions": [{"type": "Failed", "status": "True", "reason": "OutOfMemory"}]}
    metrics.observe_job("ml", "llama", RUNNING)
    metrics.observe_job("ml", "llama", failed)
    metrics.observe_job("ml", "llama", failed)  # the same failure seen again: still one
    key = ("kubesloth_job_failures_total", frozenset({("namespace", "ml"), ("reason", "OutOfMemory")}))
    assert samples(metrics)[key] == 1

    # After an operator restart an old failure is not counted again; a fresh one is.
    restarted = m.OperatorMetrics()
    now = datetime(2026, 11, 29, 2, 0, tzinfo=timezone.utc)
    old = {**failed, "completionTime": (now - timedelta(hours=3)).isoformat()}
    restarted.observe_job("ml", "old", old, now=now)
    assert key not in samples(restarted)
    restarted.observe_job("ml", "new", {**failed, "completionTime": now.isoformat()}, now=now)
    assert samples(restarted)[key] == 1


def test_a_late_older_reading_does_not_reopen_a_finished_job_or_count_its_failure_twice():
    metrics = m.OperatorMetrics()
    failed = {"phase": "Failed", "conditions": [{"type": "Failed", "status": "True", "reason": "TrainerError"}]}
    metrics.observe_job("ml", "llama", RUNNING, uid="u1")
    metrics.observe_job("ml", "llama", failed, uid="u1")
    metrics.observe_job("ml", "llama", RUNNING, uid="u1")  # an older reconcile's observer ran last
    metrics.observe_job("ml", "llama", failed, uid="u1")
    key = ("kubesloth_job_failures_total", frozenset({("namespace", "ml"), ("reason", "TrainerError")}))
    assert samples(metrics)[key] == 1 and job_series(metrics, "ml", "llama") == {}
    # The same name for a new object (deleted and re-created) is a new job.
    metrics.observe_job("ml", "llama", RUNNING, uid="u2")
    assert job_series(metrics, "ml", "llama")["kubesloth_job_step"] == 30


def test_reconcile_observer_counts_results_and_forgets_gone_jobs():
    metrics = m.OperatorMetrics()
    ftj = {"metadata": {"namespace": "ml", "name": "llama"}, "spec": {"resources": {"gpuMemoryGiB": 48}}}
    metrics.observe_reconcile("ml", "llama", RUNNING, ftj["spec"], "ok", 0.02)
    metrics.observe_reconcile("ml", "llama", RUNNING, ftj["spec"], "requeue", 0.03)
    metrics.observe_reconcile(None, None, None, None, "error", 0.5)
    assert job_series(metrics, "ml", "llama")["kubesloth_job_gpu_memory_capacity_bytes"] == 48 * 2**30
    metrics.observe_reconcile("ml", "llama", None, None, "gone", 0.01)
    values = samples(metrics)
    for result, count in (("ok", 1), ("requeue", 1), ("error", 1), ("gone", 1)):
        assert values[("kubesloth_reconcile_total", frozenset({("result", result)}))] == count
    assert values[("kubesloth_reconcile_duration_seconds_count", frozenset())] == 4
    assert job_series(metrics, "ml", "llama") == {}


def test_progress_gauges_only_while_running_so_a_suspended_job_never_looks_stalled():
    metrics = m.OperatorMetrics()
    metrics.observe_job("ml", "llama", {**RUNNING, "phase": "Suspended"})
    assert set(job_series(metrics, "ml", "llama")) == {"kubesloth_job_restarts", "kubesloth_job_cost_dollars"}


def test_a_job_no_reconcile_has_seen_for_a_while_is_dropped():
    clock = [1000.0]
    metrics = m.OperatorMetrics(stale_after_seconds=60, clock=lambda: clock[0])
    metrics.observe_job("ml", "llama", RUNNING)
    clock[0] += 59
    assert job_series(metrics, "ml", "llama")
    clock[0] += 2
    assert job_series(metrics, "ml", "llama") == {}


def test_each_failed_trainer_pod_is_counted_once():
    metrics = m.OperatorMetrics()
    now = datetime(2026, 11, 29, 2, 0, tzinfo=timezone.utc)
    fresh, old = now.isoformat(), (now - timedelta(hours=1)).isoformat()
    metrics.observe_failed_pods("ml", [("uid-1", "OutOfMemory", fresh), ("uid-0", "OutOfMemory", old)], now)
    metrics.observe_failed_pods("ml", [("uid-1", "OutOfMemory", fresh), ("uid-2", "TrainerError", fresh)], now)
    values = samples(metrics)
    assert values[("kubesloth_trainer_failures_total",
                   frozenset({("namespace", "ml"), ("reason", "OutOfMemory")}))] == 1
    assert values[("kubesloth_trainer_failures_total",
                   frozenset({("namespace", "ml"), ("reason", "TrainerError")}))] == 1


def test_settings_from_env_rejects_a_bad_port_naming_the_variable():
    assert m.settings_from_env({}) == (m.DEFAULT_ADDR, m.DEFAULT_PORT)
    assert m.settings_from_env({m.PORT_ENV: "0", m.ADDR_ENV: "127.0.0.1"}) == ("127.0.0.1", 0)
    for bad in ("http", "70000"):
        with pytest.raises(ValueError, match=m.PORT_ENV):
            m.settings_from_env({m.PORT_ENV: bad})


def test_served_endpoint_passes_promtool_check_metrics(promtool):
    metrics = m.OperatorMetrics()
    metrics.observe_job("ml", "llama", RUNNING)
    metrics.observe_job("ml", "done", {"phase": "Failed", "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]})
    metrics.observe_reconcile("ml", "llama", RUNNING, {}, "ok", 0.01)
    metrics.observe_failed_pods("ml", [("uid", "OutOfMemory", None)])
    port = free_port()
    server, _thread = metrics.serve(port, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
    assert "kubesloth_job_tokens_per_second" in text
    proc = run_promtool(promtool, "check", "metrics", input=text)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr  # no lint warnings
