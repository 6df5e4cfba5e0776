"""Live progress of a running FineTuneJob, read from its trainer's Prometheus endpoint (pull, not push).

Why pull: the operator already owns `status`, so it is the one writer; the trainer pod needs no API credentials
(`automountServiceAccountToken: false`) and no RBAC; and Prometheus scrapes the very same endpoint, so `kubectl get
ftj` and Grafana show the same numbers. The cost is one HTTP GET per running job every few seconds.

The pure part (`parse_trainer_metrics`, `build_progress`, `build_cost`, `human_bytes`) is unit-tested on exposition
text from a real prometheus-client registry; `scrape` and `read_live_status` are the thin I/O around it.
Metric names come from `kubesloth.api.contract`; nothing here hard-codes them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Optional

from prometheus_client.parser import text_string_to_metric_families

from kubesloth.api import contract
from kubesloth.api.v1alpha1 import Phase

from . import status as status_mod
from .builders import LABEL_GPU_PRODUCT
from .status import parse_time, rfc3339  # the operator's one RFC 3339 format

log = logging.getLogger("kubesloth.operator.progress")

SCRAPE_TIMEOUT_SECONDS = 2.0  # inside the job's reconcile: a hung pod must not hold it long
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
            values[sample.name] = float(sample.value)
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


def _finite(value: Optional[float], digits: int) -> Optional[float]:
    return None if value is None else round(value, digits)


def build_progress(sample: TrainerSample, now: datetime,
                   previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """status.progress (camelCase wire form) from one sample.

    ETA: the trainer's own estimate when it exports one; else the step rate since the previous reading.
    """
    step, total = sample.step, sample.total_steps
    progress: dict[str, Any] = {"updatedAt": rfc3339(now)}
    if step is not None:
        progress["step"] = step
    if total is not None:
        progress["totalSteps"] = total
    if step is not None:
        progress["display"] = f"{step}/{total if total is not None else '?'}"
    if step:  # before the first step there is no loss or throughput reading (the trainer exports none yet)
        optional = {
            "epoch": _finite(sample.get(contract.METRIC_EPOCH), 4),
            "loss": _finite(sample.get(contract.METRIC_LOSS), 6),
            "tokensPerSecond": _finite(sample.get(contract.METRIC_TOKENS_PER_SECOND), 2),
        }
        progress.update({key: value for key, value in optional.items() if value is not None})
    peak = sample.peak_gpu_memory_bytes
    if peak is not None:
        progress["peakGpuMemoryBytes"] = peak
        progress["peakGpuMemory"] = human_bytes(peak)
    eta = sample.get(contract.METRIC_ETA)
    if eta is None and step is not None and total is not None:
        eta = _eta_from_rate(step, total, now, previous)
    if eta is not None:
        progress["etaSeconds"] = round(max(eta, 0.0), 1)
    return progress


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
               tokens_trained: float | None) -> Optional[dict[str, Any]]:
    """status.cost: GPU time from the trainer's first start to `now` (or the completion time), at the table's
    price; None when the price is unknown."""
    started = parse_time(start_time)
    if hourly_price is None or started is None:
        return None
    hours = max((now - started).total_seconds(), 0.0) / 3600.0
    dollars = hourly_price * hours
    cost: dict[str, Any] = {"gpuHourlyPrice": hourly_price, "dollars": round(dollars, 4)}
    if tokens_trained and dollars > 0:
        cost["tokensPerDollar"] = round(tokens_trained / dollars, 1)
    return cost


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


def scrape(url: str, timeout: float = SCRAPE_TIMEOUT_SECONDS) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - a pod IP we built
            return response.read().decode("utf-8")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ScrapeError(f"cannot read {url}: {exc}") from exc


def read_live_status(pod: Mapping[str, Any], namespace: str, name: str, status: Mapping[str, Any] | None,
                     hourly_price: float | None = None, now: datetime | None = None) -> dict[str, Any]:
    """The status patch {progress[, cost]} for a running job's pod; `status` is the job's current one (previous
    progress for the ETA, startTime for the cost). Raises ScrapeError when the pod can't be read (the caller keeps
    the previous progress and tries again at the next reconcile)."""
    now = now or datetime.now(timezone.utc)
    status = status or {}
    url = metrics_url(pod)
    if url is None:
        raise ScrapeError("the trainer pod has no IP yet or its metrics are off")
    sample = parse_trainer_metrics(scrape(url), namespace=namespace, name=name)
    patch: dict[str, Any] = {"progress": build_progress(sample, now, status.get("progress"))}
    cost = build_cost(hourly_price, status.get("startTime"), now, sample.get(contract.METRIC_TOKENS))
    if cost is not None:
        patch["cost"] = cost
    return patch


# --- the Reconciler's enricher hook -------------------------------------------------------------------------------
PRICES: PriceTable | None = None


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
            progress = {"step": figures["step"], "totalSteps": figures["total_steps"],
                        "display": f"{figures['step']}/{figures['total_steps']}", "loss": figures["loss"],
                        "etaSeconds": 0.0, "updatedAt": rfc3339(now)}
            if figures["tokens_per_second"]:
                progress["tokensPerSecond"] = figures["tokens_per_second"]
            return progress
    return None


def _failed_pods(pods: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    """(uid, reason, finishedAt) of failed trainer pods, classified as status.py does (OOMKilled, exit codes)."""
    failures = []
    for pod in pods:
        failure = status_mod.pod_failure(pod) if (pod.get("status") or {}).get("phase") == "Failed" else None
        if failure:
            states = (pod.get("status") or {}).get("containerStatuses") or [{}]
            finished = ((states[0].get("state") or {}).get("terminated") or {}).get("finishedAt")
            failures.append((pod["metadata"].get("uid") or pod["metadata"]["name"], failure[0], finished))
    return failures


def enrich_status(ftj: dict[str, Any], job: Optional[dict[str, Any]], pods: list[dict[str, Any]],
                  status: dict[str, Any], now: datetime | None = None,
                  prices: PriceTable | None = None) -> dict[str, Any]:
    """The Reconciler's enricher (operator/reconcile.py calls it on every reconcile, at least every
    `resync_seconds`): adds status.progress read from the running trainer, and status.cost.

    Running: scrape the pod; a pod that does not answer yet (model loading) keeps the previous progress.
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
        try:
            status.update(read_live_status(pod, namespace, name, merged, price, now))
        except ScrapeError as exc:
            log.debug("progress of %s/%s not readable yet: %s", namespace, name, exc)
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
        cost = build_cost(price, merged.get("startTime"), end, tokens or None)
        if cost is not None:
            status["cost"] = cost
    return status
