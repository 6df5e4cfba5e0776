"""What a run leaves besides the weights: tracking (TensorBoard event files read back, MLflow's file store, wandb
offline), data warnings in the log and summary.json, the model card, and the hub push (against a local fake of
the hub's write API: no real hub can serve a test). The entry point runs as a subprocess, as in a pod."""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
from pathlib import Path

import pytest

from kubesloth.trainer.errors import BadConfig
from .conftest import run_trainer, write_job
from .fake_hub import FakeHub
from .test_datasets import COMMIT, RECORDS, build_hub_cache

HAS = {name: importlib.util.find_spec(name) is not None for name in ("wandb", "mlflow")}


def read_events(directory: Path) -> dict[str, dict[int, float]]:
    """Scalars of every TensorBoard event file under `directory` (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def hub_model(tiny_model: Path, root: Path) -> Path:
    """The tiny model as hf://acme/tiny-llama in an offline hub cache (refs/main -> snapshots/COMMIT)."""
    repo = root / "hub" / "models--acme--tiny-llama"
    shutil.copytree(tiny_model, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return root / "hub"


def test_hub_data_tracking_and_model_card(tiny_model, tmp_path, monkeypatch):
    """hf:// model and dataset (config name) from offline caches; every tracker installed gets the step events;
    the saved model has a model card that names the base model and the data."""
    hub_cache = hub_model(tiny_model, tmp_path)
    build_hub_cache(tmp_path / "datasets", "acme/alpaca", {"small": RECORDS * 3, "other": RECORDS[:2]})
    trackers = ["tensorboard"] + [name for name in ("mlflow", "wandb") if HAS[name]]
    config = write_job(tmp_path, tiny_model, {
        "model": {"source": "hf://acme/tiny-llama"},
        "dataset": {"source": "hf://acme/alpaca", "config": "small", "maxSamples": 24},
        "training": {"maxSteps": 6, "reportTo": trackers}})
    run = run_trainer(config, tmp_path, HF_HUB_CACHE=str(hub_cache), HF_DATASETS_CACHE=str(tmp_path / "datasets"),
                      MLFLOW_TRACKING_URI=f"file:{tmp_path / 'mlruns'}", MLFLOW_ALLOW_FILE_STORE="true",
                      WANDB_MODE="offline",
                      WANDB_DIR=str(tmp_path / "wandb"), WANDB_SILENT="true")
    assert run.returncode == 0, run.output[-3000:]
    assert "hf://acme/alpaca (split train, config small): 24 records" in run.output
    assert "WARNING tracking" not in run.output, run.output[-3000:]
    losses = run.losses()
    assert sorted(losses) == list(range(1, 7))
    out = tmp_path / "out"
    events = read_events(out / "tensorboard")
    assert sorted(events["train/loss"]) == list(range(1, 7))
    for step, loss in losses.items():  # the log prints 4 decimals
        assert abs(events["train/loss"][step] - loss) < 1e-4
    assert events["train/tokens_total"][6] > events["train/tokens_total"][1] > 0
    assert "summary/final_loss" in events
    summary = json.loads((out / "summary.json").read_text())
    assert summary["report_to"] == trackers and summary["data_warnings"] == []
    assert summary["data"]["records"] == 24 and summary["data"]["examples"] == 24
    if HAS["mlflow"]:
        from mlflow.tracking import MlflowClient
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        run_id = json.loads((out / "tracking.json").read_text())["mlflow_run_id"]
        history = MlflowClient(f"file:{tmp_path / 'mlruns'}").get_metric_history(run_id, "train.loss")
        assert sorted(m.step for m in history) == list(range(1, 7))
    if HAS["wandb"]:
        assert list((tmp_path / "wandb").rglob("*.wandb")), "no offline wandb run file"

    from huggingface_hub import ModelCard
    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.base_model == "acme/tiny-llama" and card.data.datasets == ["acme/alpaca"]
    assert "kubesloth" in card.data.tags
    assert f"| final loss | {summary['final_loss']:.6g} |" in card.text
    assert "config `small`" in card.text and "first 24 records" in card.text
    assert "## Hyperparameters" in card.text and "| learning_rate |" in card.text
    assert summary["model_card"] == str(out / "model" / "README.md")
    files = [p for p in (out / "model").iterdir() if p.is_file()]
    assert summary["model"]["files"] == len(files) and summary["model"]["bytes"] == sum(p.stat().st_size
                                                                                        for p in files)


def test_two_token_rows_warn_in_the_log_and_summary(tiny_model, tmp_path):
    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps({"text": "a"}) + "\n" for _ in range(16)))
    config = write_job(tmp_path, tiny_model, {"dataset": {"format": "text"}, "training": {"maxSteps": 2}},
                       dataset=data)
    run = run_trainer(config, tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    assert "[trainer] WARNING data: the median example has 3 tokens" in run.output, run.output[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(summary["data_warnings"]) == 1 and "median example has 3 tokens" in summary["data_warnings"][0]
    assert summary["data"]["median_tokens"] == 3


def test_push_to_hub(tiny_model, tmp_path):
    with FakeHub(tmp_path / "hub-store", token="hf_write_secret") as hub:
        config = write_job(tmp_path, tiny_model, {
            "training": {"maxSteps": 2},
            "output": {"pushToHub": {"repository": "acme/tuned", "tokenSecretRef": {"name": "hub-write"}}}})
        run = run_trainer(config, tmp_path, HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0",
                          KUBESLOTH_HUB_PUSH_TOKEN="hf_write_secret")
        assert run.returncode == 0, run.output[-3000:]
        assert "hf_write_secret" not in run.output
        pushed = tmp_path / "hub-store" / "acme" / "tuned"
        saved = tmp_path / "out" / "model"
        assert sorted(p.name for p in pushed.iterdir()) == sorted(p.name for p in saved.iterdir())
        for path in saved.iterdir():
            assert (pushed / path.name).read_bytes() == path.read_bytes()
        assert hub.repos["acme/tuned"]["private"] is True
        assert hub.validated and "kubesloth" in hub.validated[0]  # the card's metadata went through the check
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert summary["pushed_to_hub"]["repository"] == "acme/tuned"
        # A wrong token: exit 4 (OutputUnwritable), the verified model kept, the summary says why.
        shutil.rmtree(tmp_path / "out")
        run = run_trainer(config, tmp_path, HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0",
                          KUBESLOTH_HUB_PUSH_TOKEN="hf_wrong")
        assert run.returncode == 4, run.output[-3000:]
        assert "spec.output.pushToHub: uploading" in run.termination and "hf_wrong" not in run.termination
        assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
        assert "error" in json.loads((tmp_path / "out" / "summary.json").read_text())["pushed_to_hub"]


def test_push_without_a_token_and_missing_trackers_are_refused_at_config_time(tiny_model, tmp_path, monkeypatch):
    config = write_job(tmp_path, tiny_model, {
        "output": {"pushToHub": {"repository": "acme/tuned", "tokenSecretRef": {"name": "hub-write"}}}})
    run = run_trainer(config, tmp_path, HF_TOKEN="", KUBESLOTH_HUB_PUSH_TOKEN="")
    assert run.returncode == 2 and "spec.output.pushToHub: no token" in run.termination, run.output[-2000:]
    from kubesloth.trainer import callbacks
    monkeypatch.setitem(callbacks.TRACKER_PACKAGES, "wandb", "kubesloth_no_such_package")
    with pytest.raises(BadConfig, match="spec.training.reportTo: wandb needs the Python package"):
        callbacks.check_trackers(["wandb"])
    callbacks.check_trackers(["tensorboard"])


def test_trackers_take_any_engines_step_events(tmp_path):
    """The callback bus is what every engine drives (the fused loop calls ctx.callbacks.on_step directly): the
    tracker needs nothing but StartEvent/StepEvent, and an interrupted run's close() flushes the files."""
    from kubesloth.trainer.callbacks import CallbackList, StartEvent, StepEvent, Trackers

    trackers = Trackers(["tensorboard"], tmp_path, "unit", {"hyperparameters": {"learning_rate": 1e-3}},
                        log=lambda line: None)
    bus = CallbackList([trackers])
    bus.on_train_start(StartEvent(engine="fused", profile="auto", total_steps=3, start_step=0, tokens_seen=0,
                                  examples=4, rows=4))
    for step in (1, 2, 3):
        bus.on_step(StepEvent(step=step, total_steps=3, epoch=step / 3, loss=4.0 - step, learning_rate=1e-3,
                              tokens_total=100 * step, tokens_per_second=50.0, eta_seconds=0.0,
                              grad_norm=float("nan"), memory={"gpu_peak": 2**30}))
    trackers.close()
    events = read_events(tmp_path / "tensorboard")
    assert events["train/loss"] == {1: 3.0, 2: 2.0, 3: 1.0}
    assert events["memory/gpu_peak_bytes"][3] == 2**30 and "train/grad_norm" not in events  # NaN left out
