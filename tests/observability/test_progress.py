"""status.progress and status.cost from the trainer's real Prometheus exposition text (no cluster)."""

from __future__ import annotations

import http.server
import threading
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client import generate_latest

from kubesloth.api import contract
from kubesloth.api.v1alpha1 import Progress
from kubesloth.local.cluster import free_port
from kubesloth.operator import progress as prog

from .helpers import trainer_like_registry

NOW = datetime(2026, 11, 29, 2, 0, 0, tzinfo=timezone.utc)
GPU_RUN = {
    contract.METRIC_STEP: 120,
    contract.METRIC_STEPS_PLANNED: 400,
    contract.METRIC_EPOCH: 0.3,
    contract.METRIC_LOSS: 1.2345678,
    contract.METRIC_LR: 2e-5,
    contract.METRIC_TOKENS: 491520,
    contract.METRIC_TOKENS_PER_SECOND: 4096.25,
    contract.METRIC_GPU_ALLOCATED: 20 * 2**30,
    contract.METRIC_GPU_RESERVED: 30 * 2**30,
    contract.METRIC_GPU_PEAK: 31 * 2**30,
    contract.METRIC_GPU_DEVICE_USED: 33 * 2**30,
    contract.METRIC_GPU_DEVICE_PEAK: 35862976512,  # 33.4Gi
}


def exposition(values: dict[str, float], namespace: str = "ml", name: str = "llama") -> str:
    return generate_latest(trainer_like_registry(namespace, name, values)).decode()


def test_progress_from_a_gpu_run_prefers_the_device_peak():
    sample = prog.parse_trainer_metrics(exposition(GPU_RUN), namespace="ml", name="llama")
    progress = prog.build_progress(sample, NOW)

    assert progress["step"] == 120 and progress["totalSteps"] == 400 and progress["display"] == "120/400"
    assert progress["epoch"] == 0.3 and progress["loss"] == pytest.approx(1.234568)
    assert progress["tokensPerSecond"] == 4096.25
    # NVML's device peak (sees paged optimizer states), not torch's 31Gi.
    assert progress["peakGpuMemoryBytes"] == 35862976512 and progress["peakGpuMemory"] == "33.4Gi"
    assert progress["updatedAt"] == "2026-11-29T02:00:00Z"
    # The wire form is what the API type (and so the CRD schema) accepts.
    Progress.model_validate(progress)


def test_peak_falls_back_to_torch_when_there_is_no_nvml_and_to_nothing_on_cpu():
    no_nvml = {k: v for k, v in GPU_RUN.items() if k != contract.METRIC_GPU_DEVICE_PEAK}
    assert prog.parse_trainer_metrics(exposition(no_nvml)).peak_gpu_memory_bytes == 31 * 2**30
    cpu = {**GPU_RUN, contract.METRIC_GPU_DEVICE_PEAK: 0, contract.METRIC_GPU_PEAK: 0,
           contract.METRIC_GPU_RESERVED: 0}
    progress = prog.build_progress(prog.parse_trainer_metrics(exposition(cpu)), NOW)
    assert "peakGpuMemoryBytes" not in progress and "peakGpuMemory" not in progress


def test_eta_from_the_trainer_or_from_the_step_rate_between_readings():
    with_eta = prog.build_progress(prog.parse_trainer_metrics(exposition({**GPU_RUN, contract.METRIC_ETA: 321.0})),
                                   NOW)
    assert with_eta["etaSeconds"] == 321.0

    sample = prog.parse_trainer_metrics(exposition(GPU_RUN))
    assert "etaSeconds" not in prog.build_progress(sample, NOW)  # one reading: no rate yet
    previous = {"step": 100, "updatedAt": prog.rfc3339(NOW - timedelta(seconds=40))}
    # 20 steps in 40 s, 280 to go -> 560 s.
    assert prog.build_progress(sample, NOW, previous)["etaSeconds"] == 560.0


def test_samples_of_another_job_and_garbage_are_not_progress():
    text = exposition(GPU_RUN, namespace="ml", name="other")
    assert prog.parse_trainer_metrics(text, namespace="ml", name="llama").step is None
    with pytest.raises(prog.ScrapeError):
        prog.parse_trainer_metrics("<html>502 Bad Gateway</html>\n{{{")


def test_before_the_first_step_progress_says_what_it_knows():
    # A trainer still loading: its gauges exist at their initial 0 (prometheus-client's default).
    sample = prog.parse_trainer_metrics(exposition({contract.METRIC_STEP: 0, contract.METRIC_STEPS_PLANNED: 0,
                                                    contract.METRIC_LOSS: 0, contract.METRIC_TOKENS_PER_SECOND: 0}))
    progress = prog.build_progress(sample, NOW)
    assert progress["display"] == "0/?" and "totalSteps" not in progress
    assert "loss" not in progress and "tokensPerSecond" not in progress  # a 0 that was never measured


@pytest.mark.parametrize("count,text", [(0, "0"), (1023, "1023"), (1536, "1.5Ki"), (80 * 2**30, "80.0Gi"),
                                        (3 * 2**40, "3.0Ti")])
def test_human_bytes(count, text):
    assert prog.human_bytes(count) == text


def test_cost_from_the_price_table_only_when_the_gpu_is_known():
    table = {"NVIDIA-L40S": 1.2, "NVIDIA-H100-80GB-HBM3": 3.0}
    price = prog.gpu_hourly_price(table, "nvidia-l40s")
    assert price == 1.2
    start = prog.rfc3339(NOW - timedelta(minutes=30))
    cost = prog.build_cost(price, start, NOW, tokens_trained=1_200_000)
    assert cost == {"gpuHourlyPrice": 1.2, "dollars": 0.6, "tokensPerDollar": 2_000_000.0}
    assert prog.gpu_hourly_price(table, "Tesla-T4") is None
    assert prog.build_cost(None, start, NOW, 1) is None


def test_metrics_url_from_the_pod():
    pod = {"status": {"podIP": "127.0.0.7"},
           "spec": {"containers": [{"env": [{"name": contract.Env.METRICS_PORT.value, "value": "9555"}]}]}}
    assert prog.metrics_url(pod) == "http://127.0.0.7:9555/metrics"
    assert prog.metrics_url({"status": {"podIP": "10.1.2.3"}, "spec": {"containers": [{}]}}) == \
        f"http://10.1.2.3:{contract.METRICS_PORT}/metrics"
    assert prog.metrics_url({"status": {}}) is None
    pod["spec"]["containers"][0]["env"][0]["value"] = "0"
    assert prog.metrics_url(pod) is None


@pytest.fixture
def trainer_endpoint():
    """A real HTTP server answering /metrics with a trainer registry's exposition; yields a pod pointing at it."""
    body = exposition(GPU_RUN).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"metadata": {"name": "llama-abcde", "uid": "u1", "creationTimestamp": "2026-11-29T01:00:00Z"},
           "status": {"phase": "Running", "podIP": "127.0.0.1"},
           "spec": {"containers": [{"env": [{"name": contract.Env.METRICS_PORT.value,
                                             "value": str(server.server_address[1])}]}]}}
    server.shutdown()


def test_read_live_status_scrapes_a_real_http_endpoint(trainer_endpoint):
    pod = trainer_endpoint
    status = {"startTime": prog.rfc3339(NOW - timedelta(hours=2))}
    price = prog.gpu_hourly_price({"NVIDIA-L40S": 1.0}, "NVIDIA-L40S")
    patch = prog.read_live_status(pod, "ml", "llama", status, hourly_price=price, now=NOW)
    assert patch["progress"]["display"] == "120/400"
    assert patch["cost"]["dollars"] == 2.0 and patch["cost"]["tokensPerDollar"] == 245760.0


def test_an_unreachable_trainer_is_a_scrape_error():
    pod = {"status": {"podIP": "127.0.0.1"},
           "spec": {"containers": [{"env": [{"name": contract.Env.METRICS_PORT.value, "value": str(free_port())}]}]}}
    with pytest.raises(prog.ScrapeError):
        prog.read_live_status(pod, "ml", "llama", {})


FTJ = {"metadata": {"namespace": "ml", "name": "llama"},
       "spec": {"resources": {"gpuProduct": "NVIDIA-L40S"}},
       "status": {"phase": "Running", "startTime": "2026-11-29T01:00:00Z",
                  "progress": {"step": 100, "updatedAt": "2026-11-29T01:59:20Z"}}}


def scraper_at(now: datetime) -> prog.BackgroundScraper:
    """A background scraper whose readings are dated `now`."""
    return prog.BackgroundScraper(clock=lambda: now)


def test_enricher_adds_progress_and_cost_of_a_running_job(trainer_endpoint):
    prices = prog.PriceTable.from_env({prog.PRICES_ENV: '{"NVIDIA-L40S": 1.5}'})
    status = prog.enrich_status(FTJ, None, [trainer_endpoint], {"phase": "Running"}, now=NOW, prices=prices,
                                scraper=scraper_at(NOW), scrape_wait=5)
    assert status["progress"]["display"] == "120/400" and status["progress"]["peakGpuMemory"] == "33.4Gi"
    assert status["progress"]["etaSeconds"] == 560.0  # from the trainer-less rate: 20 steps in 40 s
    assert status["cost"]["gpuHourlyPrice"] == 1.5 and status["cost"]["dollars"] == 1.5


def test_enricher_keeps_old_progress_while_the_trainer_does_not_answer(trainer_endpoint):
    pod = {**trainer_endpoint, "status": {"phase": "Running"}}  # no pod IP yet
    status = prog.enrich_status(FTJ, None, [pod], {"phase": "Running"}, now=NOW, prices=prog.PriceTable(),
                                scraper=scraper_at(NOW), scrape_wait=5)
    assert "progress" not in status and "cost" not in status  # the merge patch leaves the old values


def test_enricher_closes_progress_and_cost_when_the_job_succeeds():
    ftj = {**FTJ, "status": {**FTJ["status"], "progress": {"step": 29, "totalSteps": 30, "etaSeconds": 4.0},
                             "cost": {"dollars": 0.5, "tokensPerDollar": 1000.0}}}
    succeeded = {"phase": "Succeeded", "completionTime": "2026-11-29T02:00:00Z"}
    status = prog.enrich_status(ftj, None, [], succeeded, now=NOW + timedelta(hours=1),
                                prices=prog.PriceTable({"NVIDIA-L40S": 2.0}))
    assert status["progress"]["display"] == "30/30" and status["progress"]["etaSeconds"] == 0.0
    # One hour from start to completion (not to `now`), at $2/h; tokens carried over (500 tokens).
    assert status["cost"] == {"gpuHourlyPrice": 2.0, "dollars": 2.0, "tokensPerDollar": 250.0}


def test_a_run_that_ended_before_any_scrape_gets_its_progress_from_the_termination_message():
    message = contract.success_message(30, 30, 61440, 1748.4, 2.11413, "/mnt/pvc/outputs/tiny/model")
    pod = {"metadata": {"name": "tiny-trainer-x", "uid": "u1"},
           "status": {"phase": "Succeeded", "containerStatuses": [{"state": {"terminated": {
               "exitCode": 0, "reason": "Completed", "message": message}}}]}}
    status = prog.enrich_status(FTJ, None, [pod], {"phase": "Succeeded"}, now=NOW, prices=prog.PriceTable())
    progress = status["progress"]
    assert progress["display"] == "30/30" and progress["step"] == progress["totalSteps"] == 30
    assert progress["loss"] == pytest.approx(2.1141) and progress["tokensPerSecond"] == 1748.0
    assert progress["etaSeconds"] == 0.0
    # Anything else in the message (a failure's words, a log tail) is not read as progress.
    pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = "Traceback (most recent call last)"
    assert "progress" not in prog.enrich_status(FTJ, None, [pod], {"phase": "Succeeded"}, now=NOW,
                                                prices=prog.PriceTable())


def test_success_message_round_trips():
    text = contract.success_message(7, 24, 57344, None, float("nan"), "/out/model")
    figures = contract.parse_success_message(text)
    assert figures["step"] == 7 and figures["total_steps"] == 24 and figures["tokens"] == 57344
    assert figures["tokens_per_second"] is None and figures["loss"] != figures["loss"]  # nan survives
    assert contract.parse_success_message("InvalidConfig: spec.training.epochs") is None


def test_enricher_counts_failed_trainer_pods():
    from kubesloth.operator import metrics

    oom_pod = {"metadata": {"name": "llama-x", "uid": f"uid-{NOW.timestamp()}"},
               "status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {
                   "exitCode": 137, "reason": "OOMKilled", "finishedAt": prog.rfc3339(datetime.now(timezone.utc))}}}]}}
    key = ("kubesloth_trainer_failures_total", (("namespace", "oom-ns"), ("reason", "OutOfMemory")))

    def count():
        for family in metrics.METRICS.registry.collect():
            for sample in family.samples:
                if (sample.name, tuple(sorted(sample.labels.items()))) == key:
                    return sample.value
        return 0

    ftj = {**FTJ, "metadata": {"namespace": "oom-ns", "name": "llama"}}
    prog.enrich_status(ftj, None, [oom_pod], {"phase": "Pending"}, prices=prog.PriceTable())
    prog.enrich_status(ftj, None, [oom_pod], {"phase": "Pending"}, prices=prog.PriceTable())
    assert count() == 1


def test_price_table_from_env_names_the_bad_variable():
    table = prog.PriceTable.from_env({prog.PRICES_ENV: '{"NVIDIA-L4": 0.48}', prog.DEFAULT_PRICE_ENV: "0.2"})
    assert table.price("nvidia-l4") == 0.48 and table.price("Tesla-T4") == 0.2 and table.price(None) == 0.2
    assert prog.PriceTable.from_env({}).price("NVIDIA-L4") is None  # nothing configured: no cost, not $0
    with pytest.raises(ValueError, match=prog.PRICES_ENV):
        prog.PriceTable.from_env({prog.PRICES_ENV: "[1, 2]"})
    with pytest.raises(ValueError, match=prog.DEFAULT_PRICE_ENV):
        prog.PriceTable.from_env({prog.DEFAULT_PRICE_ENV: "cheap"})


def test_the_operator_reads_progress_often_enough():
    """status.progress must never be more than 30 s old while the trainer answers: the enricher runs on every
    reconcile, and the operator's resync reconciles every running job at least every resync_seconds; each
    reconcile writes the reading the previous one started, so a reading is at most two resyncs old."""
    from kubesloth.operator.settings import OperatorSettings

    assert OperatorSettings().resync_seconds <= 15
    assert prog.SCRAPE_TIMEOUT_SECONDS <= 5
