"""Grafana dashboards (charts/kubesloth/files/dashboards/*.json): structure, and every panel query run against a
real Prometheus that scrapes the operator's registry and the trainer's registry (GPU-fed: this machine has no
GPU, and the GPU panels must be shown to work too). The end-to-end test repeats the query check on a real run."""

from __future__ import annotations

import json
import re
import time

import pytest

from kubesloth.local.cluster import free_port
from kubesloth.operator import metrics as m
from kubesloth.trainer.callbacks import StartEvent, StepEvent
from kubesloth.trainer.metrics import TrainingMetrics

from .conftest import DASHBOARDS_DIR
from .helpers import PrometheusServer, dashboard_queries, substitute
from .test_trainer_metrics import NvmlReadings

DASHBOARDS = sorted(DASHBOARDS_DIR.glob("*.json"))
JOB_VARIABLES = ("namespace", "finetunejob")


def load(path):
    return json.loads(path.read_text())


def variables(dashboard) -> dict[str, dict]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def all_panels(dashboard):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels") or []


def test_there_is_a_fleet_and_a_per_job_dashboard():
    uids = {load(path)["uid"] for path in DASHBOARDS}
    assert uids == {"kubesloth-fleet", "kubesloth-job"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path):
    dashboard = load(path)
    panels = list(all_panels(dashboard))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"

    variable = variables(dashboard)
    assert variable["datasource"]["type"] == "datasource" and variable["datasource"]["query"] == "prometheus"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        exprs = [t.get("expr", "").strip() for t in panel.get("targets") or []]
        assert exprs and all(exprs), f"panel {panel['title']!r} has no query"
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    # Panels must not overlap on the grid.
    cells = set()
    for panel in panels:
        pos = panel["gridPos"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & mine and pos["x"] + pos["w"] <= 24, f"panel {panel['title']!r} overlaps"
        cells |= mine


def test_per_job_dashboard_selects_a_job_and_filters_every_query_by_it():
    dashboard = load(DASHBOARDS_DIR / "kubesloth-finetunejob.json")
    variable = variables(dashboard)
    assert set(JOB_VARIABLES) <= set(variable)
    assert "$namespace" in variable["finetunejob"]["query"]["query"]  # job list follows the namespace
    for _, title, expr in dashboard_queries(dashboard):
        for selector in re.findall(r"kubesloth_\w+\{([^}]*)\}", expr):
            assert 'namespace="$namespace"' in selector and 'finetunejob="$finetunejob"' in selector, title
        assert re.findall(r"kubesloth_\w+", expr) == re.findall(r"kubesloth_\w+(?=\{)", expr), \
            f"unfiltered metric in {title!r}: {expr}"


def test_fleet_dashboard_has_the_fleet_views():
    dashboard = load(DASHBOARDS_DIR / "kubesloth-fleet.json")
    text = json.dumps([expr for _, _, expr in dashboard_queries(dashboard)])
    for needed in ("sum by (phase) (kubesloth_finetunejobs)", "kubesloth_job_tokens_per_second",
                   "kubesloth_job_failures_total", 'kubesloth_finetunejobs{phase=\\"Running\\"}'):
        assert needed in text, needed


# --- every query against a real Prometheus ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def scraped_gpu_run(prometheus_bin, tmp_path_factory):
    """Prometheus scraping the operator's registry (one running job with GPU progress, one failure, one OOM
    attempt) and the trainer's registry fed with GPU figures; yields (server, variables)."""
    namespace, name = "ml", "llama"
    operator = m.OperatorMetrics()
    running = {"phase": "Running", "restarts": 1, "startTime": "2026-11-29T01:00:00Z",
               "progress": {"step": 3, "totalSteps": 30, "tokensPerSecond": 500.0, "peakGpuMemoryBytes": 35862976512,
                            "etaSeconds": 51.0},
               "cost": {"dollars": 0.12}}
    operator.observe_job(namespace, name, running, {"resources": {"gpuMemoryGiB": 48}})
    operator.observe_job(namespace, "broken", {"phase": "Failed", "conditions": [
        {"type": "Failed", "status": "True", "reason": "SourceNotFound"}]})
    operator.observe_failed_pods(namespace, [("uid-oom", "OutOfMemory", None)])
    operator.observe_reconcile(namespace, name, running, {"resources": {"gpuMemoryGiB": 48}}, "ok", 0.02)
    operator_port = free_port()
    operator_server, _ = operator.serve(operator_port, addr="127.0.0.1")

    trainer = TrainingMetrics(namespace, name, monitor=NvmlReadings())
    trainer.on_train_start(StartEvent(engine="unsloth", profile="auto", total_steps=30, start_step=0, tokens_seen=0,
                                      examples=64, rows=64))
    trainer_port = free_port()
    trainer.serve("127.0.0.1", trainer_port)

    prometheus = PrometheusServer(prometheus_bin, tmp_path_factory.mktemp("prometheus"),
                                  {"kubesloth-operator": [f"127.0.0.1:{operator_port}"],
                                   "kubesloth-trainer": [f"127.0.0.1:{trainer_port}"]})
    try:
        # A few steps over a few seconds, so counters and rates have more than one sample.
        for step in range(1, 7):
            trainer.on_step(StepEvent(step=step, total_steps=30, epoch=step / 8, loss=3.0 / step,
                                      learning_rate=3e-3, tokens_total=1000 * step, tokens_per_second=500.0,
                                      eta_seconds=60.0 - step, memory={"gpu_allocated": 20 * 2**30,
                                                                       "gpu_reserved": 28 * 2**30,
                                                                       "gpu_peak": 31 * 2**30}))
            if step == 4:
                operator.observe_job(namespace, "broken2", {"phase": "Running"})
                operator.observe_job(namespace, "broken2", {"phase": "Failed", "conditions": [
                    {"type": "Failed", "status": "True", "reason": "SourceNotFound"}]})
                operator.observe_failed_pods(namespace, [("uid-oom-2", "OutOfMemory", None)])
            time.sleep(1.0)
        prometheus.wait_for('count(up == 1) == 2', timeout=30)
        prometheus.wait_for('count_over_time(kubesloth_train_step[1m]) > 4', timeout=30)
        yield prometheus, {"namespace": namespace, "finetunejob": name}
    finally:
        prometheus.stop()
        trainer.shutdown()
        operator_server.shutdown()


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_query_returns_data_from_a_real_prometheus(scraped_gpu_run, path):
    prometheus, values = scraped_gpu_run
    dashboard = load(path)
    empty = []
    for panel_id, title, expr in dashboard_queries(dashboard):
        query = substitute(expr, values, range_seconds=600)
        result = prometheus.query(query)  # raises with Prometheus' message on a PromQL error
        if not result:
            empty.append(f"panel {panel_id} {title!r}: {query}")
    assert not empty, "queries without data:\n" + "\n".join(empty)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_variable_queries_find_the_job(scraped_gpu_run, path):
    prometheus, values = scraped_gpu_run
    for variable in load(path)["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
        assert match, variable["query"]
        selector, label = substitute(match.group(1), values), match.group(2)
        found = prometheus.api(f"label/{label}/values", **{"match[]": selector})
        assert values[label] in found, (variable["name"], found)
