"""End to end on the local control plane: the real operator (kopf, as `kubesloth operator`), the node agent
running the real CPU trainer as a local process on 127.0.0.N, and Debian's Prometheus scraping both.

One module-scoped run (a failing job, then a tiny training of a few hundred steps) feeds every test here:
Prometheus sees the series with sane values, status.progress moves while the job runs, both endpoints pass
`promtool check metrics`, every dashboard query returns data, and a finished job's per-job series go away.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
import urllib.request
from dataclasses import dataclass, field

import pytest

from kubesloth.api import contract
from kubesloth.local.cluster import REPO_ROOT, free_port

from .conftest import ALERTS_DIR, DASHBOARDS_DIR
from .helpers import PrometheusServer, dashboard_queries, run_promtool, substitute

ALPACA_TINY = REPO_ROOT / "examples" / "data" / "alpaca-tiny.jsonl"
GPU_PRODUCT = "Local-CPU"  # the node agent's nvidia.com/gpu.product label
PRICE_PER_HOUR = 3.6  # $/h for that product in the operator's price table: 0.1 cent a second
MAIN, BROKEN = "obs-main", "obs-broken"
STEPS = 1500  # 4-60 s of training on 2 cores (measured: 400 steps in 3.4 s on an idle machine); Prometheus needs a few seconds of it
# Trainer-only GPU series: absent on a CPU run by design (no made-up zeros); test_dashboards.py shows every
# dashboard query returning data from a Prometheus scraping a GPU-fed trainer registry.
GPU_ONLY = {contract.METRIC_GPU_ALLOCATED, contract.METRIC_GPU_RESERVED, contract.METRIC_GPU_PEAK,
            contract.METRIC_GPU_DEVICE_USED, contract.METRIC_GPU_DEVICE_PEAK, contract.METRIC_GPU_UTILIZATION,
            "kubesloth_job_peak_gpu_memory_bytes"}


def finetunejob(name: str, dataset: str, steps: int) -> dict:
    """The operator e2e tests' tiny FineTuneJob, with this GPU product (priced) and size, and `steps` steps."""
    from e2e.stack import finetunejob as tiny_finetunejob

    return tiny_finetunejob(name, dataset={"source": dataset}, training={"maxSteps": steps, "perDeviceBatchSize": 8},
                            output={"checkpointEverySteps": 100},
                            resources={"gpuProduct": GPU_PRODUCT, "gpuMemoryGiB": 1})


@dataclass
class Run:
    namespace: str
    prometheus: PrometheusServer
    trainer_target: str
    progress_seen: list = field(default_factory=list)  # status.progress readings while Running
    live_text: dict = field(default_factory=dict)  # endpoint -> /metrics text read during the run
    dashboard_results: dict = field(default_factory=dict)  # (dashboard, panel, expr) -> result or error
    label_values: dict = field(default_factory=dict)
    final: dict = field(default_factory=dict)
    operator_text_after: str = ""
    operator_text_after_delete: str = ""
    live_at: float | None = None  # a moment during the run when Prometheus held enough of it
    kubectl_get: str = ""  # `kubectl get ftj` while running
    alerts: list = field(default_factory=list)  # ALERTS series while the main job runs


T0 = time.monotonic()


def _log(what: str) -> None:
    print(f"[obs-e2e {time.monotonic() - T0:6.1f}s] {what}", file=sys.stderr, flush=True)


def _wait(predicate, timeout: float, what: str, interval: float = 0.5, on_timeout=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            _log(what)
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{on_timeout()}")


def _read(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


@pytest.fixture(scope="module")
def run(cluster, kubectl, prometheus_bin, tmp_path_factory) -> Run:
    # The operator and node agent exactly as the operator's own e2e tests start them (tests/e2e/stack.py):
    # `kubesloth operator` and `kubesloth dev nodeagent` subprocesses, stopped by pid.
    from e2e.stack import Cluster, Stack

    work = tmp_path_factory.mktemp("obs-e2e")
    namespace = f"obs-{os.getpid()}"
    kubectl("create", "namespace", namespace)
    k8s = Cluster(kubectl, namespace)
    operator_port = free_port()
    stack = Stack(cluster, work, {"KUBESLOTH_OPERATOR_PROMETHEUS_PORT": str(operator_port),
                                  "KUBESLOTH_OPERATOR_PROMETHEUS_ADDR": "127.0.0.1",
                                  "KUBESLOTH_OPERATOR_RESYNC_SECONDS": "2",
                                  "KUBESLOTH_OPERATOR_ENGINE": "cpu",
                                  "KUBESLOTH_GPU_PRICES": json.dumps({GPU_PRODUCT: PRICE_PER_HOUR})})
    stack.gpus = 2  # the failing job and the training run side by side
    (stack.volumes / "data").mkdir(parents=True)
    shutil.copy(ALPACA_TINY, stack.volumes / "data" / "alpaca-tiny.jsonl")
    from kubesloth.trainer.tiny import make_tiny_model
    make_tiny_model(stack.volumes / "models" / "tiny-llama")
    stack.start()
    logs = stack.logs
    prometheus = None
    try:
        operator_url = f"http://127.0.0.1:{operator_port}/metrics"
        _wait(lambda: _try_read(operator_url), 60, "the operator's metrics endpoint", on_timeout=logs)

        # A job whose dataset does not exist: the trainer exits SourceNotFound, the job ends Failed.
        k8s.apply(finetunejob(BROKEN, "pvc://data/missing.jsonl", 5))
        k8s.apply(finetunejob(MAIN, "pvc://data/alpaca-tiny.jsonl", STEPS))
        _wait(lambda: k8s.phase(BROKEN) == "Failed", 120,
              f"{BROKEN} to fail", on_timeout=logs)

        def trainer_pod_ip():
            status = k8s.status(MAIN)
            assert status.get("phase") not in ("Failed", "Succeeded"), status
            pod = k8s.get("pod", status["podName"]) if status.get("podName") else None
            return ((pod or {}).get("status") or {}).get("podIP")

        # Prometheus starts as soon as the trainer pod has its IP, while the trainer still loads torch: it is
        # scraping when the first step comes, however fast the machine trains.
        pod_ip = _wait(trainer_pod_ip, 180, f"{MAIN}'s trainer pod IP", on_timeout=logs)
        trainer_target = f"{pod_ip}:{contract.METRICS_PORT}"

        prometheus = PrometheusServer(prometheus_bin, work / "prometheus",
                                      {"kubesloth-operator": [f"127.0.0.1:{operator_port}"],
                                       "kubesloth-trainer": [trainer_target]},
                                      rule_files=sorted(ALERTS_DIR.glob("*.yaml")))
        result = Run(namespace, prometheus, trainer_target)
        selector = f'namespace="{namespace}", finetunejob="{MAIN}"'
        # Prometheus holds enough of the run: the step moved between its samples, and the operator has read
        # the trainer's plan and throughput a few times.
        enough = (f"(max_over_time(kubesloth_train_step{{{selector}}}[5m]) "
                  f"- min_over_time(kubesloth_train_step{{{selector}}}[5m]) >= 3) "
                  f"and on () (count_over_time(kubesloth_job_tokens_per_second{{{selector}}}[5m]) >= 2) "
                  f"and on () (kubesloth_job_progress_ratio{{{selector}}} > 0)")
        # Watch the run to its end: status.progress as kubectl sees it, and the moment Prometheus holds enough.
        # The live endpoints are read then; the dashboard queries are evaluated at that moment afterwards, so a
        # fast machine that finishes the run early changes nothing.
        deadline = time.monotonic() + 400
        while True:
            status = k8s.status(MAIN)
            if status.get("phase") in ("Succeeded", "Failed"):
                result.final = status
                break
            # Readings once the trainer knows its plan (before that, progress honestly says "0/?").
            if status.get("phase") == "Running" and (status.get("progress") or {}).get("totalSteps"):
                seen = result.progress_seen
                if not seen or seen[-1]["updatedAt"] != status["progress"]["updatedAt"]:
                    result.progress_seen.append(status["progress"])
                    if not result.kubectl_get:
                        shown = kubectl("get", "ftj", MAIN, "-n", namespace).stdout
                        result.kubectl_get = shown if " Running " in shown else ""
                if result.live_at is None and prometheus.query(enough):
                    try:
                        result.live_text = {"operator": _read(operator_url),
                                            "trainer": _read(f"http://{trainer_target}/metrics")}
                        result.live_at = time.time()
                        _log("Prometheus holds enough of the run")
                    except OSError:  # the trainer just ended
                        pass
            assert time.monotonic() < deadline, f"{MAIN} did not finish in time\n{logs()}"
            time.sleep(1.0)
        _log(f"{MAIN} finished {result.final['phase']}; status.progress seen {len(result.progress_seen)} times")
        assert result.live_at is not None, "the run ended before Prometheus had scraped enough of it"

        values = {"namespace": namespace, "finetunejob": MAIN}
        for path in sorted(DASHBOARDS_DIR.glob("*.json")):
            dashboard = json.loads(path.read_text())
            for panel_id, title, expr in dashboard_queries(dashboard):
                query = substitute(expr, values, range_seconds=600)
                try:
                    result.dashboard_results[(path.name, panel_id, title, query)] = prometheus.query(
                        query, at=result.live_at)
                except AssertionError as err:
                    result.dashboard_results[(path.name, panel_id, title, query)] = err
            for variable in dashboard["templating"]["list"]:
                if variable["type"] == "query":
                    query = substitute(variable["query"]["query"], values)
                    match = query[len("label_values("):-1].rsplit(", ", 1)
                    result.label_values[(path.name, variable["name"])] = prometheus.api(
                        f"label/{match[1]}/values", **{"match[]": match[0]})
        # The chart's alert rules, evaluated every second on the real series: the failed job's alert fires.
        result.alerts = prometheus.wait_for('ALERTS{alertname="KubeslothFineTuneJobFailed"}', timeout=30)

        time.sleep(2)  # one more scrape of the operator after the last reconcile
        result.operator_text_after = _read(operator_url)
        prometheus.wait_for(f'kubesloth_finetunejobs{{phase="{result.final["phase"]}"}} >= 1', timeout=30)
        # Deleting a job takes it out of the operator's counts (its per-job series went when it finished).
        kubectl("delete", "ftj", BROKEN, "-n", namespace, "--wait=true", "--timeout=60s")
        result.operator_text_after_delete = _wait(
            lambda: (lambda text: text if 'kubesloth_finetunejobs{phase="Failed"} 0.0' in text else None)(
                _read(operator_url)), 60, f"{BROKEN} gone from the operator's metrics", on_timeout=logs)
        yield result
    finally:
        if prometheus is not None:
            prometheus.stop()
        stack.stop()
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def _try_read(url: str) -> str | None:
    try:
        return _read(url)
    except OSError:
        return None


def test_prometheus_scrapes_trainer_series_with_sane_values(run):
    selector = f'namespace="{run.namespace}", finetunejob="{MAIN}"'
    steps = run.prometheus.query_range(f"kubesloth_train_step{{{selector}}}", seconds=600)
    values = [float(v) for _, v in steps[0]["values"]]
    assert values == sorted(values) and values[-1] > values[0], values  # step increasing, never back
    assert values[-1] <= STEPS
    assert run.prometheus.query(f"max_over_time(kubesloth_train_tokens_per_second{{{selector}}}[10m]) > 0")
    # From the first step on (before it, the trainer's gauges read their initial 0).
    losses = run.prometheus.query_range(f"kubesloth_train_loss{{{selector}}} and on (namespace, finetunejob) "
                                        f"kubesloth_train_step{{{selector}}} > 0", seconds=600)[0]["values"]
    assert all(math.isfinite(float(v)) and 0 < float(v) < 20 for _, v in losses), losses
    planned = run.prometheus.query(f"max_over_time(kubesloth_train_steps_total_planned{{{selector}}}[10m])")
    assert float(planned[0]["value"][1]) == STEPS
    assert run.prometheus.query(f"increase(kubesloth_train_tokens_total{{{selector}}}[10m]) > 0")


def test_prometheus_scrapes_operator_series(run):
    selector = f'namespace="{run.namespace}", finetunejob="{MAIN}"'
    query = run.prometheus.query
    assert query('max_over_time(kubesloth_finetunejobs{phase="Running"}[10m]) >= 1')
    ratios = run.prometheus.query_range(f"kubesloth_job_progress_ratio{{{selector}}}", seconds=600)[0]["values"]
    assert all(0 <= float(v) <= 1 for _, v in ratios) and float(ratios[-1][1]) > 0, ratios
    assert query(f"max_over_time(kubesloth_job_tokens_per_second{{{selector}}}[10m]) > 0")
    cost = query(f"max_over_time(kubesloth_job_cost_dollars{{{selector}}}[10m])")
    assert 0 < float(cost[0]["value"][1]) < 1  # a few minutes at $3.6/h
    assert query('kubesloth_reconcile_total{result="ok"} > 0')
    assert query("kubesloth_reconcile_duration_seconds_count > 0")
    failed = query(f'kubesloth_job_failures_total{{namespace="{run.namespace}", reason="SourceNotFound"}}')
    assert failed and float(failed[0]["value"][1]) == 1, failed
    attempts = query(f'kubesloth_trainer_failures_total{{namespace="{run.namespace}"}}')
    assert [a["metric"]["reason"] for a in attempts] == ["SourceNotFound"]


def test_status_progress_is_updated_while_running(run):
    seen = run.progress_seen
    assert len(seen) >= 2, seen
    assert all(p["totalSteps"] == STEPS and p["display"] == f"{p['step']}/{STEPS}" for p in seen)
    assert seen[-1]["step"] > seen[0]["step"], seen
    assert len({p["updatedAt"] for p in seen}) >= 2, seen  # re-read, not just kept
    for p in seen:
        if p["step"] == 0:  # read before the first step ended: no loss or throughput exists yet, none is invented
            assert "tokensPerSecond" not in p and "loss" not in p, p
        else:
            assert p["tokensPerSecond"] > 0 and math.isfinite(p["loss"]) and p["etaSeconds"] >= 0
        assert "peakGpuMemory" not in p  # CPU: no GPU figure is invented
    assert any(p["step"] > 0 for p in seen), seen


def test_chart_alert_rules_on_live_series(run):
    firing = {(a["metric"]["alertname"], a["metric"].get("namespace"), a["metric"].get("reason"),
               a["metric"]["alertstate"]) for a in run.alerts}
    assert firing == {("KubeslothFineTuneJobFailed", run.namespace, "SourceNotFound", "firing")}, run.alerts
    # The healthy run raises nothing else (no OOM, not stalled, throughput fine, operator up).
    others = run.prometheus.query('ALERTS{alertname!="KubeslothFineTuneJobFailed"}')
    assert others == [], others


def test_kubectl_get_shows_progress_and_throughput(run):
    header, row = run.kubectl_get.strip().splitlines()
    assert header.split()[:6] == ["NAME", "PHASE", "PROGRESS", "TOKENS/S", "ETA", "PEAK"], header
    name, phase, progress, tokens_per_second = row.split()[:4]
    assert (name, phase) == (MAIN, "Running") and progress.endswith(f"/{STEPS}") and float(tokens_per_second) > 0


def test_finished_job_status_and_series(run):
    assert run.final["phase"] == "Succeeded", run.final
    assert run.final["progress"]["display"] == f"{STEPS}/{STEPS}" and run.final["progress"]["etaSeconds"] == 0
    assert run.final["cost"]["gpuHourlyPrice"] == PRICE_PER_HOUR and run.final["cost"]["dollars"] > 0
    # Its per-job series are gone from the operator's endpoint; the fleet count has it as Succeeded.
    assert f'finetunejob="{MAIN}"' not in run.operator_text_after
    assert f'finetunejob="{BROKEN}"' not in run.operator_text_after
    assert 'kubesloth_finetunejobs{phase="Succeeded"} 1.0' in run.operator_text_after


def test_a_deleted_job_leaves_the_counts(run):
    text = run.operator_text_after_delete
    assert 'kubesloth_finetunejobs{phase="Failed"} 0.0' in text
    assert 'kubesloth_finetunejobs{phase="Succeeded"} 1.0' in text  # the main job is still there
    # The failure stays counted (a counter per namespace and reason, not per job).
    assert f'kubesloth_job_failures_total{{namespace="{run.namespace}",reason="SourceNotFound"}} 1.0' in text


@pytest.mark.parametrize("endpoint", ["operator", "trainer"])
def test_live_endpoints_pass_promtool_check_metrics(run, promtool, endpoint):
    text = run.live_text[endpoint]
    assert "kubesloth_" in text
    proc = run_promtool(promtool, "check", "metrics", input=text)
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr


def test_every_dashboard_query_runs_against_the_live_prometheus(run):
    errors, empty, skipped = [], [], []
    for (dashboard, panel_id, title, query), result in run.dashboard_results.items():
        where = f"{dashboard} panel {panel_id} {title!r}: {query}"
        if isinstance(result, Exception):
            errors.append(f"{where}: {result}")
        elif not result:
            metrics = set(re.findall(r"kubesloth_\w+", query))
            (skipped if metrics and metrics <= GPU_ONLY else empty).append(where)
    assert not errors, "PromQL errors:\n" + "\n".join(errors)
    assert not empty, "queries without data:\n" + "\n".join(empty)
    # Only the GPU-only panels may be empty on a CPU run, and there are just these few.
    assert len(skipped) <= 8, skipped
    assert len(run.dashboard_results) - len(skipped) >= 25


def test_dashboard_job_selectors_list_the_running_job(run):
    for (dashboard, variable), values in run.label_values.items():
        expected = run.namespace if variable == "namespace" else MAIN
        assert expected in values, (dashboard, variable, values)
