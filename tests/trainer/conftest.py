"""Trainer test helpers: one tiny model per session, FineTuneJob configs written to tmp, and the real entry point
run as a subprocess (the code path a pod runs)."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

from kubesloth.local.cluster import REPO_ROOT

ALPACA_TINY = REPO_ROOT / "examples" / "data" / "alpaca-tiny.jsonl"
STEP_LINE = re.compile(r"^(?:\S+ )?\[trainer\] step (\d+)/(\d+) loss ([0-9.]+|nan) lr ([0-9.e+-]+) ")

BASE_SPEC: dict[str, Any] = {
    "model": {"maxSeqLength": 128},
    "dataset": {"format": "alpaca"},
    "training": {"profile": "custom", "maxSteps": 30, "learningRate": 3.0e-3, "perDeviceBatchSize": 8,
                 "gradientAccumulationSteps": 1, "optimizer": "adamw_torch", "gradientCheckpointing": "false",
                 "lrScheduler": "constant", "warmupRatio": 0.0, "seed": 3407, "loggingSteps": 1},
    "output": {"checkpointEverySteps": 10, "checkpointsToKeep": 2},
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from kubesloth.trainer.tiny import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def write_job(directory: Path, model: Path, spec: Optional[dict] = None, dataset: Path = ALPACA_TINY,
              destination: Optional[Path] = None, metadata: Optional[dict] = None) -> Path:
    full = merge(BASE_SPEC, {"model": {"source": f"file://{model}"}, "dataset": {"source": f"file://{dataset}"},
                             "output": {"destination": f"file://{destination or directory / 'out'}"}})
    full = merge(full, spec or {})
    path = directory / "finetunejob.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "kubesloth.io/v1alpha1", "kind": "FineTuneJob",
                                    "metadata": {"name": "tiny", "namespace": "test", **(metadata or {})},
                                    "spec": full}))
    return path


def trainer_env(directory: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBESLOTH_")}
    env.update({"KUBESLOTH_ENGINE": "cpu", "KUBESLOTH_METRICS_PORT": "0", "CUDA_VISIBLE_DEVICES": "",
                "KUBESLOTH_TERMINATION_LOG": str(directory / "termination-log"),
                "KUBESLOTH_PVC_ROOT": str(directory / "pvc"), "HF_HUB_OFFLINE": "1",
                # datasets' arrow cache of the job's files: per test, not the machine's ~/.cache.
                "HF_DATASETS_CACHE": str(directory / "hf-datasets"),
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                # Tiny model: threads buy nothing and contend with the rest of a parallel test run.
                "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


@dataclass
class TrainerRun:
    returncode: int
    output: str
    termination: str

    def losses(self) -> dict[int, float]:
        found = {}
        for line in self.output.splitlines():
            match = STEP_LINE.match(line)
            if match:
                found[int(match[1])] = float(match[3])
        return found


def trainer_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "kubesloth.trainer", "--config", str(config)]


def run_trainer(config: Path, directory: Path, timeout: float = 400, **env: str) -> TrainerRun:
    proc = subprocess.run(trainer_command(config), env=trainer_env(directory, **env), cwd=directory,
                          capture_output=True, text=True, timeout=timeout)
    term = directory / "termination-log"
    return TrainerRun(proc.returncode, proc.stdout + proc.stderr, term.read_text() if term.exists() else "")
