"""Live progress of a running FineTuneJob, read from its trainer's Prometheus endpoint (pull, not push).

Why pull: the operator already owns `status`, so it is the one writer; the trainer pod needs no API credentials
(`automountServiceAccountToken: false`) and no RBAC; and Prometheus scrapes the very same endpoint, so `kubectl get
ftj` and Grafana show the same numbers. The cost is one HTTP GET per running job every few seconds.

The pure part (`parse_trainer_metrics`, `build_progress`, `build_cost`, `human_bytes`) is unit-tested on exposition
text from a real prometheus-client registry; `scrape` and `read_live_status` are the thin I/O around it.
Metric names come from `kubesloth.api.contract`; nothing here hard-codes them.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Optional

from prometheus_client.parser import text_string_to_metric_families

from kubesloth.api import contract

# How often the operator should read a running job's metrics; status.progress must never be older than 30 s.
POLL_INTERVAL_SECONDS = 10.0
SCRAPE_TIMEOUT_SECONDS = 3.0
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


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_time(text: str | None) -> Optional[datetime]:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


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


def gpu_hourly_price(price_table: Mapping[str, float] | None, gpu_product: str | None) -> Optional[float]:
    """$/hour for a GPU product (node label nvidia.com/gpu.product), case-insensitive; None when unknown."""
    if not price_table or not gpu_product:
        return None
    by_name = {str(key).lower(): value for key, value in price_table.items()}
    price = by_name.get(gpu_product.lower())
    return None if price is None else float(price)


def build_cost(hourly_price: float | None, start_time: str | None, now: datetime,
               tokens_trained: float | None) -> Optional[dict[str, Any]]:
    """status.cost: GPU time since the trainer first started, at the table's price; None when the price is unknown."""
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
                     gpu_product: str | None = None, price_table: Mapping[str, float] | None = None,
                     now: datetime | None = None) -> dict[str, Any]:
    """The status patch {progress, cost} for a running job's pod. Raises ScrapeError when the pod can't be read
    (the caller keeps the previous progress and tries again at the next tick)."""
    now = now or datetime.now(timezone.utc)
    status = status or {}
    url = metrics_url(pod)
    if url is None:
        raise ScrapeError("the trainer pod has no IP yet or its metrics are off")
    sample = parse_trainer_metrics(scrape(url), namespace=namespace, name=name)
    patch: dict[str, Any] = {"progress": build_progress(sample, now, status.get("progress"))}
    cost = build_cost(gpu_hourly_price(price_table, gpu_product), status.get("startTime"), now,
                      sample.get(contract.METRIC_TOKENS))
    if cost is not None:
        patch["cost"] = cost
    return patch
