"""Prometheus metrics of the run (names from api.contract), served from a private registry on
$KUBESLOTH_METRICS_ADDR:$KUBESLOTH_METRICS_PORT. GPU series exist only where there is a GPU: on CPU they are
absent, not 0 (a 0 would read as "measured: nothing used")."""

from __future__ import annotations

import os
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from kubesloth.api import contract
from kubesloth.api.contract import Env
from kubesloth.trainer.callbacks import Callback, StartEvent, StepEvent
from kubesloth.trainer.memory import DeviceMonitor

LABELS = ("namespace", "finetunejob")


def _counter_base(name: str) -> str:
    # prometheus_client appends _total to counters itself.
    return name[: -len("_total")] if name.endswith("_total") else name


class TrainingMetrics(Callback):
    def __init__(self, namespace: str, job: str, monitor: Optional[DeviceMonitor] = None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {"namespace": namespace, "finetunejob": job}
        self.monitor = monitor

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=self.registry)

        self.step = gauge(contract.METRIC_STEP, "Optimizer steps done.").labels(**self.labels)
        self.planned = gauge(contract.METRIC_STEPS_PLANNED, "Optimizer steps planned.").labels(**self.labels)
        # Series that only mean something once a step is done are created at the first step: a loss or rate of
        # 0 before it would plot as a real reading (the loss curve starting at 0).
        self._per_step = {
            "epoch": gauge(contract.METRIC_EPOCH, "Fractional epoch."),
            "loss": gauge(contract.METRIC_LOSS, "Training loss of the latest logging step."),
            "lr": gauge(contract.METRIC_LR, "Current learning rate."),
            "tokens_per_second": gauge(contract.METRIC_TOKENS_PER_SECOND,
                                       "Training throughput over the latest logging interval."),
            "eta": gauge(contract.METRIC_ETA, "Estimated seconds to the last step."),
        }
        self.tokens = Counter(_counter_base(contract.METRIC_TOKENS), "Tokens trained (resumed runs included).",
                              LABELS, registry=self.registry).labels(**self.labels)
        self._gpu = {
            "gpu_allocated": gauge(contract.METRIC_GPU_ALLOCATED, "torch.cuda.memory_allocated()."),
            "gpu_reserved": gauge(contract.METRIC_GPU_RESERVED, "torch.cuda.memory_reserved()."),
            "gpu_peak": gauge(contract.METRIC_GPU_PEAK, "torch.cuda.max_memory_reserved()."),
        }
        if monitor is not None and monitor.available:
            device = {"used": contract.METRIC_GPU_DEVICE_USED, "peak": contract.METRIC_GPU_DEVICE_PEAK}
            gauge(device["used"], "NVML device memory used (includes paged optimizer states)."
                  ).labels(**self.labels).set_function(lambda: monitor.used or 0)
            gauge(device["peak"], "Peak NVML device memory used, sampled every 10 ms."
                  ).labels(**self.labels).set_function(lambda: monitor.peak or 0)
            gauge(contract.METRIC_GPU_UTILIZATION, "NVML GPU utilisation, 0 to 1."
                  ).labels(**self.labels).set_function(lambda: monitor.utilization or 0.0)
        self._tokens_reported = 0
        self.server = None

    def serve(self, addr: str, port: int) -> None:
        self.server, _thread = start_http_server(port, addr=addr, registry=self.registry)

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def on_train_start(self, event: StartEvent):
        self.planned.set(event.total_steps)
        self.step.set(event.start_step)
        if event.tokens_seen > self._tokens_reported:
            self.tokens.inc(event.tokens_seen - self._tokens_reported)
            self._tokens_reported = event.tokens_seen

    def on_step(self, event: StepEvent):
        self.step.set(event.step)
        self.planned.set(event.total_steps)
        values = {"epoch": event.epoch, "loss": event.loss, "lr": event.learning_rate,
                  "tokens_per_second": event.tokens_per_second, "eta": event.eta_seconds}
        for key, value in values.items():
            self._per_step[key].labels(**self.labels).set(value)
        if event.tokens_total > self._tokens_reported:
            self.tokens.inc(event.tokens_total - self._tokens_reported)
            self._tokens_reported = event.tokens_total
        for key, gauge in self._gpu.items():
            if key in event.memory:
                gauge.labels(**self.labels).set(event.memory[key])

    def on_train_end(self, summary: dict):
        self._per_step["eta"].labels(**self.labels).set(0)


def metrics_from_env(job_namespace: str, job_name: str, monitor: Optional[DeviceMonitor]) -> TrainingMetrics:
    """Labels from the pod's env (the operator sets them), falling back to the FineTuneJob's metadata; the
    server starts unless the port is 0."""
    metrics = TrainingMetrics(os.environ.get(Env.NAMESPACE.value) or job_namespace,
                              os.environ.get(Env.JOB_NAME.value) or job_name, monitor)
    port = int(os.environ.get(Env.METRICS_PORT.value) or contract.METRICS_PORT)
    if port:
        metrics.serve(os.environ.get(Env.METRICS_ADDR.value) or "0.0.0.0", port)
    return metrics
