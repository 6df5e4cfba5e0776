"""The trainer's own metrics registry (kubesloth.trainer.metrics), served over HTTP: promtool's linter accepts it
and the operator's parser turns it into status.progress. No GPU here: the GPU case feeds the same class the
figures a CUDA step event carries, and an NVML monitor's readings."""

from __future__ import annotations

import urllib.request
from datetime import datetime, timezone

import pytest

from kubesloth.api import contract
from kubesloth.local.cluster import free_port
from kubesloth.operator import progress as prog
from kubesloth.trainer.callbacks import StartEvent, StepEvent
from kubesloth.trainer.metrics import TrainingMetrics

from .helpers import run_promtool

NOW = datetime(2026, 11, 29, 2, 0, tzinfo=timezone.utc)


class NvmlReadings:
    """What kubesloth.trainer.memory.DeviceMonitor exposes after sampling a GPU (this machine has none)."""

    available = True
    used = 30 * 2**30
    peak = 35862976512
    utilization = 0.97


def served_text(metrics: TrainingMetrics) -> str:
    port = free_port()
    metrics.serve("127.0.0.1", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()
    finally:
        metrics.shutdown()


def drive(metrics: TrainingMetrics, memory: dict[str, int]) -> None:
    metrics.on_train_start(StartEvent(engine="cpu", profile="custom", total_steps=30, start_step=0, tokens_seen=0,
                                      examples=64, rows=64))
    for step in (1, 2, 3):
        metrics.on_step(StepEvent(step=step, total_steps=30, epoch=step / 8, loss=3.0 / step, learning_rate=3e-3,
                                  tokens_total=1000 * step, tokens_per_second=500.0, eta_seconds=54.0 - step,
                                  memory=memory))


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_trainer_endpoint_passes_promtool_and_parses_into_progress(promtool, device):
    if device == "cpu":
        metrics = TrainingMetrics("ml", "tiny", monitor=None)
        drive(metrics, memory={"host_rss": 2**30, "host_rss_peak": 2**30})
    else:
        metrics = TrainingMetrics("ml", "tiny", monitor=NvmlReadings())
        drive(metrics, memory={"gpu_allocated": 20 * 2**30, "gpu_reserved": 28 * 2**30, "gpu_peak": 31 * 2**30})
    text = served_text(metrics)

    proc = run_promtool(promtool, "check", "metrics", input=text)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr

    sample = prog.parse_trainer_metrics(text, namespace="ml", name="tiny")
    progress = prog.build_progress(sample, NOW)
    assert progress["display"] == "3/30" and progress["loss"] == 1.0 and progress["tokensPerSecond"] == 500.0
    assert progress["etaSeconds"] == 51.0 and progress["epoch"] == 0.375
    assert sample.get(contract.METRIC_TOKENS) == 3000
    if device == "cpu":
        assert "peakGpuMemoryBytes" not in progress  # no GPU series on CPU, and no made-up 0
    else:
        assert progress["peakGpuMemory"] == "33.4Gi"  # NVML's peak, above torch's 31Gi


def test_per_step_series_appear_only_after_the_first_step():
    metrics = TrainingMetrics("ns", "job")
    metrics.on_train_start(StartEvent(engine="cpu", profile="custom", total_steps=30, start_step=0, tokens_seen=0,
                                      examples=64, rows=64))
    before = served_text(metrics)
    assert 'kubesloth_train_step{finetunejob="job",namespace="ns"} 0.0' in before
    for name in (contract.METRIC_LOSS, contract.METRIC_TOKENS_PER_SECOND, contract.METRIC_ETA):
        assert f"{name}{{" not in before, f"{name} exported before any step"
    metrics.on_step(StepEvent(step=1, total_steps=30, epoch=0.1, loss=2.5, learning_rate=3e-3, tokens_total=100,
                              tokens_per_second=50.0, eta_seconds=29.0, memory={}))
    after = served_text(metrics)
    assert 'kubesloth_train_loss{finetunejob="job",namespace="ns"} 2.5' in after
