"""Shared helpers: a trainer-shaped registry with the contract's metric names, and promtool invocation."""

from __future__ import annotations

import subprocess
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from kubesloth.api import contract

LABELS = ["namespace", "finetunejob"]


def trainer_like_registry(namespace: str, name: str, values: dict[str, float]) -> CollectorRegistry:
    """A real prometheus-client registry exposing `values` (contract metric name -> value) the way a trainer
    would: gauges, and a counter for the tokens total. Independent of the trainer's own code, so the parser is
    pinned to the contract, not to one implementation."""
    registry = CollectorRegistry()
    for metric, value in values.items():
        if metric.endswith("_total") and metric == contract.METRIC_TOKENS:
            counter = Counter(metric[: -len("_total")], "tokens trained", LABELS, registry=registry)
            counter.labels(namespace, name).inc(value)
        else:
            gauge = Gauge(metric, metric.replace("_", " "), LABELS, registry=registry)
            gauge.labels(namespace, name).set(value)
    return registry


def run_promtool(promtool: Path, *args: str, input: str | None = None,
                 cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(promtool), *args], input=input, capture_output=True, text=True, timeout=120,
                          cwd=cwd)
