"""The Prometheus endpoint during a real run, then SIGTERM (pod deletion / suspend): a checkpoint is written at
the step reached and the trainer exits INTERRUPTED; a restart resumes there."""

from __future__ import annotations

import math
import signal
import socket
import subprocess
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from kubesloth.api import contract
from kubesloth.api.contract import CHECKPOINTS_DIR, COMPLETE_MARKER, ExitCode

from .conftest import trainer_command, trainer_env, write_job


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[str, dict]:
    """name -> {"labels": ..., "value": ...} of each sample."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        text = response.read().decode()
    return {s.name: {"labels": s.labels, "value": s.value}
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_served_during_a_run_and_sigterm_checkpoints(tiny_model, tmp_path):
    port = free_port()
    # Long enough to be scraped mid-run; SIGTERM ends it early.
    config = write_job(tmp_path, tiny_model, {"training": {"maxSteps": 5000, "perDeviceBatchSize": 2},
                                              "output": {"checkpointEverySteps": 1000}})
    env = trainer_env(tmp_path, KUBESLOTH_METRICS_PORT=str(port), KUBESLOTH_METRICS_ADDR="127.0.0.1",
                      KUBESLOTH_NAMESPACE="ml", KUBESLOTH_FINETUNEJOB="tiny-alpaca")
    proc = subprocess.Popen(trainer_command(config), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        samples = {}
        deadline = time.monotonic() + 120
        while samples.get(contract.METRIC_STEP, {}).get("value", 0) < 5:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline
            try:
                samples = scrape(port)
            except OSError:
                pass
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]

    def value(name):
        assert samples[name]["labels"] == {"namespace": "ml", "finetunejob": "tiny-alpaca"}, name
        return samples[name]["value"]

    step = value(contract.METRIC_STEP)
    assert value(contract.METRIC_STEPS_PLANNED) == 5000
    assert 0 < value(contract.METRIC_LOSS) < 10 and math.isfinite(value(contract.METRIC_LOSS))
    assert value(contract.METRIC_LR) == 3.0e-3
    assert value(contract.METRIC_TOKENS) >= step * 2 * 10  # 2 sequences of > 10 tokens per step
    assert value(contract.METRIC_TOKENS_PER_SECOND) > 0
    assert 0 < value(contract.METRIC_EPOCH) < 5000
    assert value(contract.METRIC_ETA) > 0
    # No GPU here: the GPU series are absent rather than a misleading 0.
    assert contract.METRIC_GPU_RESERVED not in samples and contract.METRIC_GPU_DEVICE_USED not in samples

    assert proc.returncode == ExitCode.INTERRUPTED, output[-3000:]
    checkpoints = tmp_path / "out" / CHECKPOINTS_DIR
    complete = [p for p in checkpoints.iterdir() if (p / COMPLETE_MARKER).exists()]
    assert len(complete) == 1, "SIGTERM writes a checkpoint at the step reached"
    stopped_at = int(complete[0].name.split("-")[1])
    assert step <= stopped_at < 5000
    termination = (tmp_path / "termination-log").read_text()
    assert termination.startswith(f"Interrupted: interrupted at step {stopped_at}/5000")
    assert "resumable" in termination
