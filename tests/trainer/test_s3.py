"""s3:// model sources and a whole training run from S3, against a real S3-compatible HTTP server (moto's) on
127.0.0.1 (tests/trainer/s3.py; the dataset cases are in test_datasets.py). Never skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubesloth.api.contract import ExitCode
from kubesloth.trainer.errors import SourceNotFound
from kubesloth.trainer.sources import resolve_model

from .conftest import ALPACA_TINY, trainer_env, write_job
from .s3 import s3, s3_server  # noqa: F401  (fixtures)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_model_is_read_from_an_s3_prefix(s3, tiny_model, tmp_path, monkeypatch):
    fs, bucket = s3
    monkeypatch.setenv("KUBESLOTH_CACHE_DIR", str(tmp_path / "cache"))
    fs.put(str(tiny_model) + "/", f"{bucket}/models/tiny-llama/", recursive=True)
    fs.put(str(ALPACA_TINY), f"{bucket}/not-a-model/data.jsonl")
    path = resolve_model(f"s3://{bucket}/models/tiny-llama")
    assert _tree(path) == _tree(tiny_model)  # every file, byte for byte, at the top of the returned directory
    with pytest.raises(SourceNotFound, match="spec.model.source: s3://.*/absent does not exist"):
        resolve_model(f"s3://{bucket}/absent")
    with pytest.raises(SourceNotFound, match="not a model directory: it has no config.json"):
        resolve_model(f"s3://{bucket}/not-a-model")


def test_the_trainer_trains_from_s3(s3, s3_server, tiny_model, tmp_path):
    """The real entry point (the code path a pod runs), model and data from S3, offline for the hub as in an
    air-gapped pod: it trains, saves and verifies."""
    fs, bucket = s3
    fs.put(str(tiny_model) + "/", f"{bucket}/models/tiny-llama/", recursive=True)
    fs.put(str(ALPACA_TINY), f"{bucket}/data/train.jsonl")
    config = write_job(tmp_path, tiny_model, {
        "model": {"source": f"s3://{bucket}/models/tiny-llama"},
        "dataset": {"source": f"s3://{bucket}/data/train.jsonl", "maxSamples": 32},
        "training": {"maxSteps": 3}, "output": {"checkpointEverySteps": 100}})
    env = trainer_env(tmp_path, KUBESLOTH_CACHE_DIR=str(tmp_path / "cache"), **s3_server)
    # The s3 client as this process has it (tests/trainer/s3.py may have appended its folder to sys.path).
    env["KUBESLOTH_TEST_SYS_PATH"] = json.dumps(sys.path)
    entry = ("import json, os, runpy, sys; sys.path[:] = json.loads(os.environ['KUBESLOTH_TEST_SYS_PATH']); "
             "sys.argv = ['kubesloth.trainer', '--config', sys.argv[1]]; "
             "runpy.run_module('kubesloth.trainer', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", entry, str(config)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=400)
    output = proc.stdout + proc.stderr
    assert proc.returncode == ExitCode.OK, output[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 3, summary
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    assert os.listdir(tmp_path / "cache" / "s3")  # the model came through the s3 cache, not the local copy


def test_an_air_gapped_pod_reads_s3_data_and_stays_offline_for_the_hub(s3, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 (the operator's extra env on an air-gapped cluster) is about the hub: datasets applied it to
    s3:// data files too and refused them. The s3 load runs with it off; the hub stays offline after."""
    import datasets

    from kubesloth.api.v1alpha1 import DatasetSpec
    from kubesloth.trainer.data import load_records
    from kubesloth.trainer.sources import resolve_dataset

    fs, bucket = s3
    fs.put(str(ALPACA_TINY), f"{bucket}/data/train.jsonl")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    for max_samples in (None, 3):  # read whole, and streamed
        records = load_records(resolve_dataset(DatasetSpec(source=f"s3://{bucket}/data/train.jsonl")), max_samples)
        assert len(records) == (max_samples or len(ALPACA_TINY.read_text().splitlines()))
        assert datasets.config.HF_HUB_OFFLINE is True
