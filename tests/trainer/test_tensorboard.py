"""Issue 14 must-show: TensorBoard event files written by the fused engine's CPU path and by the HF engine (the
cpu engine: transformers' Trainer), read back: one train/loss per logged step, equal to the step line's, under
<destination>/tensorboard/. The real entry point as a subprocess, as in a pod."""

from __future__ import annotations

import json

import pytest

from .conftest import run_trainer, write_job
from .test_results import read_events


@pytest.mark.parametrize("engine,runs", [("fused", "engine fused"), ("cpu", "engine cpu")],
                         ids=["fused-cpu-path", "hf-trainer"])
def test_tensorboard_event_files(tiny_model, tmp_path, engine, runs):
    config = write_job(tmp_path, tiny_model, {
        "dataset": {"maxSamples": 32},
        "training": {"maxSteps": 4, "perDeviceBatchSize": 4, "reportTo": ["tensorboard"]},
        "output": {"checkpointEverySteps": 100}})
    run = run_trainer(config, tmp_path, KUBESLOTH_ENGINE=engine)
    assert run.returncode == 0, run.output[-3000:]
    assert runs in run.output, run.output[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["engine"] == engine and summary["report_to"] == ["tensorboard"]
    files = list((tmp_path / "out" / "tensorboard").rglob("events.out.tfevents.*"))
    assert files, "no TensorBoard event file"
    events = read_events(tmp_path / "out" / "tensorboard")
    losses = run.losses()
    assert sorted(losses) == [1, 2, 3, 4] and sorted(events["train/loss"]) == [1, 2, 3, 4]
    for step, loss in losses.items():  # the log prints 4 decimals
        assert abs(events["train/loss"][step] - loss) < 1e-4
    assert sorted(events["train/learning_rate"]) == [1, 2, 3, 4]
    assert events["train/tokens_total"][4] > events["train/tokens_total"][1] > 0
    assert "summary/final_loss" in events
