"""A trainer's /metrics is written by code the user runs: the operator's scrape of it is bounded (one deadline for
the whole answer, a size cap), off the reconcile, and no value it reads reaches status unless the API server can
take it. Each case against a real HTTP server on 127.0.0.1 (no cluster)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import tracemalloc
from datetime import datetime, timezone

import pytest
from prometheus_client import generate_latest

from kubesloth.api import contract
from kubesloth.operator import progress as prog

from .helpers import trainer_like_registry

NOW = datetime(2026, 11, 29, 2, 0, 0, tzinfo=timezone.utc)
GOOD_RUN = {contract.METRIC_STEP: 120, contract.METRIC_STEPS_PLANNED: 400, contract.METRIC_LOSS: 1.25,
            contract.METRIC_TOKENS_PER_SECOND: 4096.0, contract.METRIC_TOKENS: 491520,
            contract.METRIC_GPU_DEVICE_PEAK: 35862976512, contract.METRIC_ETA: 321.0}
DRIP_FOR_SECONDS = 15.0  # a drip ends by itself after this, so a scrape without a deadline fails, not hangs


def exposition(values: dict[str, float], namespace: str = "ml", name: str = "llama") -> bytes:
    return generate_latest(trainer_like_registry(namespace, name, values))


class HostileTrainer:
    """A TCP server on 127.0.0.1 answering each connection with `answer(conn)`, the raw bytes a trainer might send
    (so it can also send what no HTTP library would: a dripped status line, no HTTP at all)."""

    def __init__(self, answer):
        self.answer = answer
        self.connections = 0
        self.stopping = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def pod(self, uid: str = "pod-uid") -> dict:
        return {"metadata": {"name": f"trainer-{uid}", "uid": uid, "creationTimestamp": "2026-11-29T01:00:00Z"},
                "status": {"phase": "Running", "podIP": "127.0.0.1"},
                "spec": {"containers": [{"env": [{"name": contract.Env.METRICS_PORT.value,
                                                  "value": str(self.port)}]}]}}

    def _accept(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            try:
                conn.recv(4096)  # the request
                self.answer(conn, self.stopping)
            except OSError:  # the operator hung up (deadline, cap): what it should do
                pass

    def stop(self):
        self.stopping.set()
        self.sock.close()


@pytest.fixture
def serve():
    servers = []

    def start(answer) -> HostileTrainer:
        servers.append(HostileTrainer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def http_answer(body: bytes, status: str = "200 OK", content_length: int | None = None):
    def answer(conn, stopping):
        length = len(body) if content_length is None else content_length
        conn.sendall(f"HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n"
                     f"Content-Length: {length}\r\n\r\n".encode() + body)
    return answer


def drip(prefix: bytes = b""):
    """Send `prefix`, then one byte every 0.1 s until the drip ends (a per-read timeout never fires)."""
    def answer(conn, stopping):
        conn.sendall(prefix)
        ends = time.monotonic() + DRIP_FOR_SECONDS
        while time.monotonic() < ends and not stopping.wait(0.1):
            conn.sendall(b"#")
    return answer


@pytest.mark.parametrize("what,prefix", [
    ("body", b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n"),
    ("status line and headers", b"HTTP/1.0 200"),
])
def test_a_dripping_trainer_is_cut_off_at_the_deadline(serve, what, prefix):
    trainer = serve(drip(prefix))
    started = time.monotonic()
    with pytest.raises(prog.ScrapeError, match=r"within the 1 s deadline"):
        prog.scrape(trainer.url, timeout=1.0)
    assert time.monotonic() - started < 1.5, f"a dripped {what} held the scrape past its deadline"


def test_a_huge_answer_is_cut_off_at_the_size_cap_without_holding_it_in_memory(serve):
    megabyte = b"#" * 2**20

    def endless(conn, stopping):  # about what the fault campaign sent (300 MB), as fast as loopback takes it
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for _ in range(300):
            if stopping.is_set():
                return
            conn.sendall(megabyte)

    trainer = serve(endless)
    tracemalloc.start()
    try:
        with pytest.raises(prog.ScrapeError, match=rf"larger than the {prog.SCRAPE_MAX_BYTES} byte cap"):
            prog.scrape(trainer.url, timeout=30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * prog.SCRAPE_MAX_BYTES, f"the scrape held {peak} bytes"


def test_an_answer_under_the_cap_is_read_whole(serve):
    body = exposition(GOOD_RUN) + b"# " + b"x" * (prog.SCRAPE_MAX_BYTES - 4096) + b"\n"
    trainer = serve(http_answer(body))
    assert prog.scrape(trainer.url).encode() == body


@pytest.mark.parametrize("answer,error", [
    (http_answer(b"\x89PNG\r\n\x1a\n\x00\xff\xfe garbage"), "not UTF-8"),
    (http_answer(b"<html>502 Bad Gateway</html>\n{{{"), "not Prometheus text"),
    (http_answer(b"oops", status="500 Internal Server Error"), "HTTP 500"),
    (lambda conn, stopping: conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n"), "not an HTTP answer"),
    (http_answer(exposition(GOOD_RUN)[:40], content_length=4000), "ended after 40 of 4000 bytes"),
])
def test_garbage_is_a_scrape_error_that_says_what(serve, answer, error):
    trainer = serve(answer)
    with pytest.raises(prog.ScrapeError, match=error):
        prog.read_sample(trainer.pod(), "ml", "llama")


def assert_patchable(patch: dict) -> None:
    """What the API server takes: JSON without NaN/inf, every integer an int64."""
    json.dumps(patch, allow_nan=False)
    for section in patch.values():
        for key, value in section.items():
            if isinstance(value, int):
                assert 0 <= value < 2**63, (key, value)


@pytest.mark.parametrize("bad", [1e308, -5, float("nan"), float("inf")])
def test_an_out_of_range_step_is_left_out_of_status_with_a_log_line(serve, caplog, bad):
    trainer = serve(http_answer(exposition({**GOOD_RUN, contract.METRIC_STEP: bad})))
    with caplog.at_level(logging.WARNING, logger="kubesloth.operator.progress"):
        patch = prog.read_live_status(trainer.pod(), "ml", "llama", {}, now=NOW)
    assert_patchable(patch)
    progress = patch["progress"]
    assert "step" not in progress and "display" not in progress
    assert progress["totalSteps"] == 400 and progress["peakGpuMemory"] == "33.4Gi"  # the good values stay
    assert any("kubesloth_train_step" in r.message or "progress.step" in r.message for r in caplog.records), \
        caplog.text


def test_out_of_range_floats_and_counts_are_left_out_of_progress_and_cost(serve, caplog):
    trainer = serve(http_answer(exposition({
        **GOOD_RUN, contract.METRIC_STEPS_PLANNED: 1e308, contract.METRIC_LOSS: float("nan"),
        contract.METRIC_TOKENS_PER_SECOND: float("inf"), contract.METRIC_GPU_DEVICE_PEAK: 1e308,
        contract.METRIC_ETA: -5, contract.METRIC_TOKENS: 1e308})))
    status = {"startTime": prog.rfc3339(NOW.replace(hour=1, minute=30))}  # half an hour at $1/h: $0.50
    with caplog.at_level(logging.WARNING, logger="kubesloth.operator.progress"):
        patch = prog.read_live_status(trainer.pod(), "ml", "llama", status, hourly_price=1.0, now=NOW)
    assert_patchable(patch)
    progress, cost = patch["progress"], patch["cost"]
    assert progress["step"] == 120 and progress["display"] == "120/?"
    for left_out in ("totalSteps", "loss", "tokensPerSecond", "peakGpuMemoryBytes", "peakGpuMemory", "etaSeconds"):
        assert left_out not in progress, left_out
    assert cost == {"gpuHourlyPrice": 1.0, "dollars": 0.5}  # 1e308 tokens / $0.50 = inf tokens per dollar
    for field in ("totalSteps", "peakGpuMemoryBytes", "etaSeconds", "cost.tokensPerDollar"):
        assert field in caplog.text, field
    for metric in (contract.METRIC_LOSS, contract.METRIC_TOKENS_PER_SECOND):
        assert f"{metric} = " in caplog.text, metric


def test_a_dripping_trainer_delays_no_reconcile_and_no_other_job(serve):
    """The enricher reads the background scraper's latest reading: a pod that drips costs its scrape worker the
    deadline, never the caller; a steady pod's progress appears as soon as its scrape is done."""
    dripping, steady = serve(drip(b"HTTP/1.0 200 OK\r\n\r\n")), serve(http_answer(exposition(GOOD_RUN)))
    scraper = prog.BackgroundScraper(clock=lambda: NOW)
    ftj = {"metadata": {"namespace": "ml", "name": "llama"}, "spec": {}, "status": {"phase": "Running"}}

    def enrich(pod, wait=0.0):
        started = time.monotonic()
        status = prog.enrich_status(ftj, None, [pod], {"phase": "Running"}, now=NOW, prices=prog.PriceTable(),
                                    scraper=scraper, scrape_wait=wait)
        return status, time.monotonic() - started

    for _ in range(3):  # three reconciles of the dripping job: none waits, one scrape of it at a time
        status, seconds = enrich(dripping.pod("drip"))
        assert "progress" not in status and seconds < 0.2, seconds
    time.sleep(0.3)
    assert dripping.connections == 1
    status, seconds = enrich(steady.pod("steady"), wait=5)
    assert status["progress"]["display"] == "120/400" and seconds < 1.0, seconds
    # Its deadline passed: the dripping pod's scrape gave up, and the next reconcile starts a new one.
    time.sleep(prog.SCRAPE_TIMEOUT_SECONDS + 0.3)
    status, _ = enrich(dripping.pod("drip"))
    assert "progress" not in status
    time.sleep(0.2)
    assert dripping.connections == 2


def test_a_reading_older_than_max_age_is_not_progress(serve):
    steady = serve(http_answer(exposition(GOOD_RUN)))
    scraper = prog.BackgroundScraper(max_age=0.3)
    pod = steady.pod()
    assert scraper.latest("pod", lambda: prog.read_sample(pod, "ml", "llama"), wait=5).sample.step == 120
    time.sleep(0.4)
    hung = threading.Event()
    try:  # the pod stopped answering: the old reading is not shown as if it were current
        assert scraper.latest("pod", lambda: hung.wait(10) and None) is None
    finally:
        hung.set()
