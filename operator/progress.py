"""Live progress of a running FineTuneJob, read from its trainer's Prometheus endpoint (pull, not push).

Why pull: the operator already owns `status`, so it is the one writer; the trainer pod needs no API credentials
(`automountServiceAccountToken: false`) and no RBAC; and Prometheus scrapes the very same endpoint, so `kubectl get
ftj` and Grafana show the same numbers. The cost is one HTTP GET per running job every few seconds.

The pure part (`parse_trainer_metrics`, `build_progress`, `build_cost`, `human_bytes`) is unit-tested on exposition
text from a real prometheus-client registry; `scrape` (a bounded HTTP GET: one deadline for the whole answer, a
size cap) and `BackgroundScraper` (scrapes off the reconcile, a few at a time) are the I/O around it. Every value
that goes into status.progress / status.cost passes `within_limits` first: one the API server would refuse (an int
beyond int64, NaN) or that means nothing (a negative step) is left out with a log line, never patched.
Metric names come from `kubesloth.api.contract`; nothing here hard-codes them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Optional

from prometheus_client.parser import text_string_to_metric_families

from kubesloth.api import contract
from kubesloth.api.v1alpha1 import Phase

from . import status as status_mod
from .builders import LABEL_GPU_PRODUCT
from .status import parse_time, rfc3339  # the operator's one RFC 3339 format

log = logging.getLogger("kubesloth.operator.progress")

# One scrape, all of it (connect, request, every byte of the answer): a trainer that drips its answer or never
# ends it holds one scrape worker this long, never a reconcile.
SCRAPE_TIMEOUT_SECONDS = 2.0
# The whole answer, headers included. A trainer's exposition is a few KiB; Prometheus text of 1 MiB already takes
# the parser about a second of the operator's CPU, and a 300 MB body once took the operator to 5 GB.
SCRAPE_MAX_BYTES = 1024 * 1024
SCRAPE_WORKERS = 4  # scrapes at once; more slow pods than this only delay other pods' progress, never a reconcile
READING_MAX_AGE_SECONDS = 60.0  # an older reading is not shown as progress (its pod stopped answering)
INT64_MAX = 2**63 - 1  # integer fields of the CRD are int64: a larger value fails the whole status patch
# The chart's price table (configmap gpu-prices.json) and its fallback price; 0 = cost not reported.
PRICES_ENV = "KUBESLOTH_GPU_PRICES"
DEFAULT_PRICE_ENV = "KUBESLOTH_DEFAULT_GPU_HOURLY_PRICE"
LABEL_NAMESPACE = "namespace"
LABEL_FINETUNEJOB = "finetunejob"


class ScrapeError(RuntimeError):
    """The trainer's metrics endpoint could not be read (not up yet, gone, or not Prometheus text)."""


@dataclass(frozen=True)
class TrainerSample:
    """One reading of the trainer's gauges; None where the trainer did not (yet) export a value."""

    values: Mapping[str, float] = field(default_factory=dict)

    def get(self, name: str) -> Optional[float]:
        value = self.values.get(name)
        if value is None or math.isnan(value) or math.isinf(value):
            return None
        return value

    @property
    def step(self) -> Optional[int]:
        value = self.get(contract.METRIC_STEP)
        return None if value is None else int(value)

    @property
    def total_steps(self) -> Optional[int]:
        value = self.get(contract.METRIC_STEPS_PLANNED)
        return int(value) if value else None  # 0 = not known yet (dataset still loading)

    @property
    def peak_gpu_memory_bytes(self) -> Optional[int]:
        """NVML's device peak where there is one (it sees paged optimizer states torch does not), else torch's."""
        for name in (contract.METRIC_GPU_DEVICE_PEAK, contract.METRIC_GPU_PEAK, contract.METRIC_GPU_RESERVED):
            value = self.get(name)
            if value:  # 0 means "no GPU" (the CPU engine), not "used nothing"
                return int(value)
        return None


def parse_trainer_metrics(text: str, namespace: str | None = None, name: str | None = None) -> TrainerSample:
    """Prometheus text exposition -> the trainer's values, keyed by sample name (counters keep `_total`).

    Samples labelled for another FineTuneJob are skipped, so a misrouted scrape never shows someone else's run.
    """
    wanted = {}
    if namespace is not None:
        wanted[LABEL_NAMESPACE] = namespace
    if name is not None:
        wanted[LABEL_FINETUNEJOB] = name
    values: dict[str, float] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:  # the parser raises ValueError/IndexError/KeyError on garbage
        raise ScrapeError(f"not Prometheus text exposition: {exc}") from exc
    for family in families:
        for sample in family.samples:
            if not sample.name.startswith("kubesloth_"):
                continue
            if any(sample.labels.get(key, value) != value for key, value in wanted.items()):
                continue
            value = float(sample.value)
            if not math.isfinite(value):  # no status field can hold NaN or inf (JSON has neither)
                log.warning("trainer of %s/%s exports %s = %s: not a finite number, left out of status",
                            namespace, name, sample.name, value)
                continue
            values[sample.name] = value
    return TrainerSample(values)


def human_bytes(count: int | float | None) -> Optional[str]:
    """Binary units with one decimal, like kubectl quantities: 35862976512 -> '33.4Gi'."""
    if count is None:
        return None
    value = float(count)
    for unit in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(value) < 1024 or unit == "Ti":
            return f"{int(value)}" if unit == "" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: int | float | None) -> Optional[str]:
    """kubectl's duration format (HumanDuration, as in its AGE column): 37s, 4m12s, 42m, 2h5m, 30h, 3d4h."""
    if seconds is None or not math.isfinite(seconds):
        return None
    total = max(int(seconds), 0)
    minutes, hours = total // 60, total // 3600
    if total < 120:
        return f"{total}s"
    if minutes < 10:
        return f"{minutes}m{total % 60}s" if total % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    days = hours // 24
    if hours < 24 * 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if days < 365 * 2:
        return f"{days}d"
    return f"{days // 365}y{days % 365}d" if days < 365 * 8 else f"{days // 365}y"


def _finite(value: Optional[float], digits: int) -> Optional[float]:
    return None if value is None else round(value, digits)


COUNT, NON_NEGATIVE, FINITE = "an integer in 0..2**63-1", "a finite number >= 0", "a finite number"
# What each number in status may be: what the API server accepts (int64, float64 and no NaN) and what makes sense.
STATUS_LIMITS: dict[str, dict[str, str]] = {
    "progress": {"step": COUNT, "totalSteps": COUNT, "epoch": NON_NEGATIVE, "loss": FINITE,
                 "tokensPerSecond": NON_NEGATIVE, "peakGpuMemoryBytes": COUNT, "etaSeconds": NON_NEGATIVE},
    "cost": {"gpuHourlyPrice": NON_NEGATIVE, "dollars": NON_NEGATIVE, "tokensPerDollar": NON_NEGATIVE},
}


def _fits(value: Any, rule: str) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if rule == COUNT:
        return isinstance(value, int) and 0 <= value <= INT64_MAX
    if not math.isfinite(value):
        return False
    return value >= 0 if rule == NON_NEGATIVE else True


def within_limits(section: str, values: Mapping[str, Any], job: str = "") -> dict[str, Any]:
    """`values` without the numbers status.<section> must not hold, each left out with a log line: one bad
    number would make the API server refuse the whole patch."""
    kept = {}
    for key, value in values.items():
        rule = STATUS_LIMITS[section].get(key)
        if rule is None or _fits(value, rule):
            kept[key] = value
        else:
            text = repr(value)
            if len(text) > 24:  # int(1e308) has 309 digits
                text = f"{text[:10]}...({len(text)} digits)"
            log.warning("%s: status.%s.%s = %s left out: not %s", job or "trainer", section, key, text, rule)
    return kept


def _with_display(progress: dict[str, Any]) -> dict[str, Any]:
    """The human forms of step/totalSteps and the peak, from the numbers that passed `within_limits`."""
    step, total, peak = progress.get("step"), progress.get("totalSteps"), progress.get("peakGpuMemoryBytes")
    if step is not None:
        progress["display"] = f"{step}/{total if total is not None else '?'}"
    if peak is not None:
        progress["peakGpuMemory"] = human_bytes(peak)
    if progress.get("etaSeconds") is not None:
        progress["eta"] = human_duration(progress["etaSeconds"])
    return progress


def build_progress(sample: TrainerSample, now: datetime,
                   previous: Mapping[str, Any] | None = None, job: str = "") -> dict[str, Any]:
    """status.progress (camelCase wire form) from one sample; `job` ("namespace/name") names it in log lines.

    ETA: the trainer's own estimate when it exports one; else the step rate since the previous reading.
    """
    numbers = {"step": sample.step, "totalSteps": sample.total_steps,
               "peakGpuMemoryBytes": sample.peak_gpu_memory_bytes}
    if sample.step:  # before the first step there is no loss or throughput reading (the trainer exports none yet)
        numbers.update(epoch=_finite(sample.get(contract.METRIC_EPOCH), 4),
                       loss=_finite(sample.get(contract.METRIC_LOSS), 6),
                       tokensPerSecond=_finite(sample.get(contract.METRIC_TOKENS_PER_SECOND), 2))
    progress = within_limits("progress", {k: v for k, v in numbers.items() if v is not None}, job)
    step, total = progress.get("step"), progress.get("totalSteps")
    eta = sample.get(contract.METRIC_ETA)
    if eta is None and step is not None and total:
        eta = _eta_from_rate(step, total, now, previous)
    if eta is not None:
        progress.update(within_limits("progress", {"etaSeconds": round(eta, 1)}, job))
    return {"updatedAt": rfc3339(now), **_with_display(progress)}


def _eta_from_rate(step: int, total: int, now: datetime, previous: Mapping[str, Any] | None) -> Optional[float]:
    if step >= total:
        return 0.0
    if not previous or previous.get("step") is None or not previous.get("updatedAt"):
        return None
    done = step - int(previous["step"])
    elapsed = (now - parse_time(previous["updatedAt"])).total_seconds()
    if done <= 0 or elapsed <= 0:
        return previous.get("etaSeconds")  # no new step since: keep the last estimate rather than guess
    return (total - step) * elapsed / done


def gpu_hourly_price(price_table: Mapping[str, float] | None, gpu_product: str | None,
                     default: float | None = None) -> Optional[float]:
    """$/hour for a GPU product (node label nvidia.com/gpu.product), case-insensitive; else `default`; None (not
    0) when unknown, so no made-up cost is reported."""
    by_name = {str(key).lower(): value for key, value in (price_table or {}).items()}
    price = by_name.get(gpu_product.lower()) if gpu_product else None
    if price is None:
        price = default
    return float(price) if price else None


@dataclass(frozen=True)
class PriceTable:
    prices: Mapping[str, float] = field(default_factory=dict)
    default: float = 0.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "PriceTable":
        """KUBESLOTH_GPU_PRICES (a JSON object: product -> $/GPU-hour) and KUBESLOTH_DEFAULT_GPU_HOURLY_PRICE."""
        env = os.environ if env is None else env
        raw = env.get(PRICES_ENV) or "{}"
        try:
            prices = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{PRICES_ENV}: not valid JSON ({exc}); expected an object like "
                             '{"NVIDIA-L40S": 1.03}') from None
        if not isinstance(prices, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in prices.values()):
            raise ValueError(f"{PRICES_ENV}: expected a JSON object of GPU product -> dollars per hour (>= 0), "
                             'like {"NVIDIA-L40S": 1.03}')
        raw_default = env.get(DEFAULT_PRICE_ENV) or "0"
        try:
            default = float(raw_default)
        except ValueError:
            raise ValueError(f"{DEFAULT_PRICE_ENV}={raw_default!r}: expected dollars per hour (>= 0)") from None
        if default < 0 or math.isnan(default):
            raise ValueError(f"{DEFAULT_PRICE_ENV}={raw_default!r}: expected dollars per hour (>= 0)")
        return cls({str(k): float(v) for k, v in prices.items()}, default)

    def price(self, gpu_product: str | None) -> Optional[float]:
        return gpu_hourly_price(self.prices, gpu_product, self.default)


def build_cost(hourly_price: float | None, start_time: str | None, now: datetime,
               tokens_trained: float | None, job: str = "") -> Optional[dict[str, Any]]:
    """status.cost: GPU time from the trainer's first start to `now` (or the completion time), at the table's
    price; None when the price is unknown."""
    started = parse_time(start_time)
    if hourly_price is None or started is None:
        return None
    hours = max((now - started).total_seconds(), 0.0) / 3600.0
    dollars = hourly_price * hours
    cost: dict[str, Any] = {"gpuHourlyPrice": hourly_price, "dollars": round(dollars, 4)}
    if tokens_trained and dollars > 0:
        cost["tokensPerDollar"] = round(tokens_trained / dollars, 1)  # inf for a trainer claiming 1e308 tokens
    return within_limits("cost", cost, job)


def metrics_url(pod: Mapping[str, Any]) -> Optional[str]:
    """http://POD_IP:PORT/metrics of a trainer pod, or None while it has no IP or metrics are off (port 0)."""
    pod_ip = (pod.get("status") or {}).get("podIP")
    if not pod_ip:
        return None
    port = contract.METRICS_PORT
    for container in (pod.get("spec") or {}).get("containers") or []:
        for declared in container.get("ports") or []:
            if declared.get("name") == "metrics" and declared.get("containerPort"):
                port = int(declared["containerPort"])
        for env in container.get("env") or []:
            if env.get("name") == contract.Env.METRICS_PORT.value and env.get("value") not in (None, ""):
                port = int(env["value"])
    if port == 0:
        return None
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return f"http://{host}:{port}/metrics"


def scrape(url: str, timeout: float = SCRAPE_TIMEOUT_SECONDS, max_bytes: int = SCRAPE_MAX_BYTES) -> str:
    """GET `url` (plain HTTP/1.0, so the answer is never chunked and ends when the trainer closes it): the body as
    text. ScrapeError when it is not all there within `timeout` seconds in total (not per read: a trainer that
    drips a byte a second must not hold a scrape for ever), when the answer passes `max_bytes` (reading stops
    there), or when it is not a 200."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ScrapeError(f"cannot read {url}: only http://host:port/path")
    deadline = time.monotonic() + timeout

    def time_left() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ScrapeError(f"cannot read {url}: no complete answer within the {timeout:g} s deadline")
        return left

    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    request = (f"GET {parts.path or '/'} HTTP/1.0\r\nHost: {host}:{parts.port or 80}\r\n"
               "Accept: text/plain\r\nConnection: close\r\n\r\n").encode("ascii")
    chunks, size = [], 0
    try:
        with socket.create_connection((parts.hostname, parts.port or 80), timeout=time_left()) as sock:
            sock.settimeout(time_left())
            sock.sendall(request)
            while True:
                sock.settimeout(time_left())
                chunk = sock.recv(min(65536, max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise ScrapeError(f"cannot read {url}: the answer is larger than the {max_bytes} byte cap")
    except socket.timeout:
        raise ScrapeError(f"cannot read {url}: no complete answer within the {timeout:g} s deadline") from None
    except OSError as exc:
        raise ScrapeError(f"cannot read {url}: {exc}") from exc
    head, separator, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    fields = status_line.split(" ", 2)
    if not separator or len(fields) < 2 or not fields[0].startswith("HTTP/"):
        raise ScrapeError(f"cannot read {url}: not an HTTP answer ({status_line[:80]!r})")
    if fields[1] != "200":
        raise ScrapeError(f"cannot read {url}: HTTP {status_line[len(fields[0]) + 1:][:80]}")
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length" and value.strip().isdigit() and len(body) < int(value):
            raise ScrapeError(f"cannot read {url}: the answer ended after {len(body)} of {int(value)} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScrapeError(f"cannot read {url}: not UTF-8 text ({exc})") from None


def read_sample(pod: Mapping[str, Any], namespace: str, name: str) -> TrainerSample:
    """Scrape a trainer pod and keep this job's values. Raises ScrapeError when it can't be read."""
    url = metrics_url(pod)
    if url is None:
        raise ScrapeError("the trainer pod has no IP yet or its metrics are off")
    return parse_trainer_metrics(scrape(url), namespace=namespace, name=name)


def live_status(sample: TrainerSample, read_at: datetime, namespace: str, name: str,
                status: Mapping[str, Any] | None, hourly_price: float | None = None,
                now: datetime | None = None) -> dict[str, Any]:
    """The status patch {progress[, cost]} from a sample read at `read_at` (progress.updatedAt); `status` is the
    job's current one (previous progress for the ETA, startTime for the cost, which runs to `now`)."""
    status, job = status or {}, f"{namespace}/{name}"
    patch: dict[str, Any] = {"progress": build_progress(sample, read_at, status.get("progress"), job=job)}
    cost = build_cost(hourly_price, status.get("startTime"), now or read_at, sample.get(contract.METRIC_TOKENS),
                      job=job)
    if cost is not None:
        patch["cost"] = cost
    return patch


def read_live_status(pod: Mapping[str, Any], namespace: str, name: str, status: Mapping[str, Any] | None,
                     hourly_price: float | None = None, now: datetime | None = None) -> dict[str, Any]:
    """Scrape now and return the status patch (live_status). Raises ScrapeError when the pod can't be read."""
    now = now or datetime.now(timezone.utc)
    return live_status(read_sample(pod, namespace, name), now, namespace, name, status, hourly_price, now)


@dataclass(frozen=True)
class Reading:
    """What the latest finished scrape of one pod gave: a sample or the ScrapeError, and when it was read."""

    sample: Optional[TrainerSample]
    error: Optional[ScrapeError]
    read_at: datetime
    read_at_monotonic: float


class BackgroundScraper:
    """Scrapes trainer pods off the reconcile. `latest(key, read)` starts a scrape of that pod unless one is under
    way and returns at once the latest finished reading (waiting at most `wait` seconds for the new one).

    A reconcile never waits on a pod's HTTP answer (it used to, under the job's lock, in the one resync thread:
    a trainer dripping its /metrics stopped status updates of every job). At most one scrape per pod is queued
    and `workers` run at once, each for at most SCRAPE_TIMEOUT_SECONDS, so slow pods hold workers, not reconciles.
    """

    def __init__(self, workers: int = SCRAPE_WORKERS, max_age: float = READING_MAX_AGE_SECONDS,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)):
        self.max_age = max_age
        self.clock = clock  # the readings' read_at (progress.updatedAt)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kubesloth-scrape")
        self._guard = threading.Lock()
        self._readings: dict[str, Reading] = {}
        self._in_flight: dict[str, Future] = {}

    def latest(self, key: str, read: Callable[[], TrainerSample], wait: float = 0.0) -> Optional[Reading]:
        """The newest reading of `key` not older than `max_age`, or None."""
        with self._guard:
            future = self._in_flight.get(key)
            if future is None:
                future = self._in_flight[key] = self._pool.submit(self._scrape, key, read)
        if wait > 0:
            wait_for_futures([future], timeout=wait)
        with self._guard:
            now = time.monotonic()
            for old in [k for k, r in self._readings.items()  # pods gone: forget them
                        if now - r.read_at_monotonic > self.max_age and k not in self._in_flight]:
                del self._readings[old]
            reading = self._readings.get(key)
        return reading if reading is not None and now - reading.read_at_monotonic <= self.max_age else None

    def prune(self) -> int:
        """Forget readings older than `max_age` (their pods stopped or went); `latest` does it too, but is only
        called while some pod runs. Returns how many went."""
        with self._guard:
            now = time.monotonic()
            old = [k for k, r in self._readings.items()
                   if now - r.read_at_monotonic > self.max_age and k not in self._in_flight]
            for key in old:
                del self._readings[key]
        return len(old)

    def _scrape(self, key: str, read: Callable[[], TrainerSample]) -> None:
        sample, error = None, None
        try:
            sample = read()
        except ScrapeError as exc:
            error = exc
        except Exception as exc:  # a parser bug must not kill the worker or leave the pod marked in flight
            log.exception("scrape of %s failed", key)
            error = ScrapeError(str(exc))
        with self._guard:
            self._readings[key] = Reading(sample, error, self.clock(), time.monotonic())
            del self._in_flight[key]


# --- the Reconciler's enricher hook -------------------------------------------------------------------------------
PRICES: PriceTable | None = None
SCRAPER: BackgroundScraper | None = None
_scraper_guard = threading.Lock()


def _scraper() -> BackgroundScraper:
    global SCRAPER
    with _scraper_guard:  # reconciles run in several threads (kopf's workers and the resync)
        if SCRAPER is None:
            SCRAPER = BackgroundScraper()
        return SCRAPER


def _prices() -> PriceTable:
    global PRICES
    if PRICES is None:
        try:
            PRICES = PriceTable.from_env()
        except ValueError as exc:  # a bad table must not stop progress: say so once, report no cost
            log.error("%s; cost is not reported", exc)
            PRICES = PriceTable()
    return PRICES


def gpu_product_of(spec: Mapping[str, Any], pod: Mapping[str, Any] | None) -> Optional[str]:
    """The GPU the job runs on: spec.resources.gpuProduct, else the pod's nodeSelector on the GPU label."""
    product = (spec.get("resources") or {}).get("gpuProduct")
    if not product and pod is not None:
        product = ((pod.get("spec") or {}).get("nodeSelector") or {}).get(LABEL_GPU_PRODUCT)
    return product


def _running_pod(pods: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    return max(running, key=lambda p: p["metadata"].get("creationTimestamp") or "") if running else None


def _final_progress(pods: list[dict[str, Any]], now: datetime) -> Optional[dict[str, Any]]:
    """status.progress from the succeeded trainer's termination message (api.contract.success_message)."""
    for pod in pods:
        if (pod.get("status") or {}).get("phase") != "Succeeded":
            continue
        states = (pod.get("status") or {}).get("containerStatuses") or [{}]
        message = ((states[0].get("state") or {}).get("terminated") or {}).get("message") or ""
        figures = contract.parse_success_message(message.strip())
        if figures:
            numbers = {"step": figures["step"], "totalSteps": figures["total_steps"], "loss": figures["loss"],
                       "etaSeconds": 0.0}
            if figures["tokens_per_second"]:
                numbers["tokensPerSecond"] = figures["tokens_per_second"]
            job = f"{pod['metadata'].get('namespace')}/{pod['metadata'].get('name')}"
            return {"updatedAt": rfc3339(now), **_with_display(within_limits("progress", numbers, job))}
    return None


def _failed_pods(pods: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    """(uid, reason, finishedAt) of failed trainer pods, classified as status.py does (OOMKilled, exit codes).
    Interruptions (preemption, eviction, a deleted pod, exit 6) are not failures, as in status.failures: a
    replacement pod that the stop of a failed run deletes is not one more failed attempt."""
    failures = []
    for pod in pods:
        attempt = status_mod.classify_pod(pod) if (pod.get("status") or {}).get("phase") == "Failed" else None
        if attempt and attempt.kind != status_mod.INTERRUPTION:
            states = (pod.get("status") or {}).get("containerStatuses") or [{}]
            finished = ((states[0].get("state") or {}).get("terminated") or {}).get("finishedAt")
            failures.append((pod["metadata"].get("uid") or pod["metadata"]["name"], attempt.reason, finished))
    return failures


def enrich_status(ftj: dict[str, Any], job: Optional[dict[str, Any]], pods: list[dict[str, Any]],
                  status: dict[str, Any], now: datetime | None = None,
                  prices: PriceTable | None = None, scraper: BackgroundScraper | None = None,
                  scrape_wait: float = 0.0) -> dict[str, Any]:
    """The Reconciler's enricher (operator/reconcile.py calls it on every reconcile, at least every
    `resync_seconds`): adds status.progress read from the running trainer, and status.cost.

    Running: the pod's latest background scrape (this reconcile starts the next one; `scrape_wait` > 0 waits that
    long for it, for tests); a pod that does not answer yet (model loading) keeps the previous progress.
    Succeeded: the last progress is closed (step = totalSteps, ETA 0), cost computed to the completion time.
    """
    from . import metrics  # failed attempts are counted here, where the pods are at hand

    now = now or datetime.now(timezone.utc)
    prices = prices or _prices()
    meta, spec = ftj.get("metadata") or {}, ftj.get("spec") or {}
    namespace, name = meta.get("namespace"), meta.get("name")
    old = ftj.get("status") or {}
    merged = {**old, **status}
    phase = status.get("phase")
    failures = _failed_pods(pods)
    if failures:
        metrics.METRICS.observe_failed_pods(namespace, failures, now)
    pod = _running_pod(pods)
    price = prices.price(gpu_product_of(spec, pod or (pods[-1] if pods else None)))

    if phase == Phase.Running.value and pod is not None:
        # The latest reading from the background scraper, never an HTTP call here: a reconcile holds the job's
        # lock, and the resync thread reconciles every job in turn.
        key = f"{pod['metadata'].get('uid') or pod['metadata'].get('name')} {metrics_url(pod)}"
        reading = (scraper or _scraper()).latest(key, lambda: read_sample(pod, namespace, name), wait=scrape_wait)
        if reading is not None and reading.sample is not None:
            status.update(live_status(reading.sample, reading.read_at, namespace, name, merged, price, now))
        elif reading is not None:
            log.debug("progress of %s/%s not readable yet: %s", namespace, name, reading.error)
    elif phase == Phase.Succeeded.value and old.get("phase") != Phase.Succeeded.value:
        progress = dict(old.get("progress") or {})
        if progress.get("totalSteps"):
            progress.update(step=progress["totalSteps"], display=f"{progress['totalSteps']}/{progress['totalSteps']}",
                            etaSeconds=0.0, updatedAt=rfc3339(now))
            status["progress"] = progress
        else:  # the run ended before any scrape: its own last words say how far it got
            final = _final_progress(pods, now)
            if final:
                status["progress"] = final
    if phase in (Phase.Succeeded.value, Phase.Failed.value) and old.get("phase") != phase:
        end = parse_time(status.get("completionTime")) or now
        previous = old.get("cost") or {}
        tokens = (previous.get("tokensPerDollar") or 0) * (previous.get("dollars") or 0)
        cost = build_cost(price, merged.get("startTime"), end, tokens or None, job=f"{namespace}/{name}")
        if cost is not None:
            status["cost"] = cost
    return status
