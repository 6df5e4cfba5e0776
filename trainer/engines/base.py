"""What an engine gets (RunContext), what it returns (TrainResult), and the protocol it implements.

An engine owns the model, the optimizer and the step loop. Everything else it reuses: data (trainer.data),
checkpoint layout and atomicity (trainer.checkpoints), callbacks/throughput (trainer.callbacks), memory readings
(trainer.memory), the final save and its check (trainer.save, run by the recipe with engine.model/tokenizer).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

from kubesloth.api.v1alpha1 import FineTuneJob
from kubesloth.trainer.callbacks import Callback
from kubesloth.trainer.checkpoints import Checkpoint, CheckpointManager
from kubesloth.trainer.memory import DeviceMonitor
from kubesloth.planner import Plan
from kubesloth.trainer.profiles import Hyperparameters


@dataclass
class RunContext:
    job: FineTuneJob
    hp: Hyperparameters
    model_path: Path
    dataset_files: list[Path]
    destination: Path
    checkpoints: CheckpointManager
    resume_from: Optional[Checkpoint]
    callbacks: Callback
    stop: threading.Event  # set by SIGTERM/SIGINT: checkpoint after the current step and return interrupted
    monitor: DeviceMonitor
    checkpoint_every: int
    log: Any = print  # log(str): one line to the pod log
    plan: Optional[Plan] = None  # the memory planner's plan (None: a shape the planner does not model)
    data_stats: Optional[dict] = None  # set by training_data(): records, examples, empty, truncated, median tokens
    data_warnings: list = field(default_factory=list)

    def training_data(self, tokenizer: Any):
        """The job's dataset rendered and tokenized as every engine trains on it (trainer.data)."""
        from kubesloth.trainer.data import build_training_data

        spec = self.job.spec
        data = build_training_data(self.dataset_files, fmt=str(spec.dataset.format),
                                   text_field=spec.dataset.text_field, max_samples=spec.dataset.max_samples,
                                   tokenizer=tokenizer, max_seq_length=self.hp.max_seq_length,
                                   packing=self.hp.packing)
        self.data_stats, self.data_warnings = data.stats.as_dict(), list(data.warnings)  # for summary.json
        for warning in data.warnings:
            self.log(f"WARNING data: {warning}")
        return data


@dataclass
class TrainResult:
    step: int  # optimizer steps done, resumed ones included
    start_step: int
    total_steps: int
    epoch: float
    tokens_total: int
    tokens_trained: int  # by this process
    final_loss: float
    train_seconds: float  # training only: checkpoint writes are in checkpoint_seconds
    interrupted: bool
    last_checkpoint: Optional[Checkpoint] = None
    checkpoint_seconds: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    steady_tokens_per_second: Optional[float] = None  # Throughput.steady_tokens_per_second()


class Engine(Protocol):
    name: str
    model: Any  # after setup: the trained model (a transformers PreTrainedModel)
    tokenizer: Any
    probe_ids: list[int]  # a short real example for the save check

    def setup(self, ctx: RunContext) -> None: ...

    def train(self) -> TrainResult: ...


class TrainerEngine:
    """The two transformers-Trainer engines (cpu, unsloth): setup() loads the model and hands a Trainer to
    hf.attach_trainer; train() runs it (hf.run). Importing this imports no transformers (unsloth goes first)."""

    name = ""

    def __init__(self):
        self.model: Any = None
        self.tokenizer: Any = None
        self.probe_ids: list[int] = []
        self._trainer = None
        self._bridge = None
        self._ctx = None

    def train(self) -> TrainResult:
        from kubesloth.trainer.engines import hf

        return hf.run(self._trainer, self._bridge, self._ctx)


# --- step arithmetic (every engine) ------------------------------------------------------------------------------
# A step trains perDeviceBatchSize x gradientAccumulationSteps rows; the last step of an epoch may take fewer. The
# one difference between engines is how a step takes them: the HF engines run gradientAccumulationSteps
# micro-batches of perDeviceBatchSize and accumulate; the fused engine (its optimizer steps inside backward) cannot
# accumulate and runs them as one batch of merge_batch_semantics(...) rows (same token-mean loss, the larger
# batch's activation memory). Steps per epoch, total steps and warm-up are the same numbers for all:
# ceil(ceil(rows / batch) / accumulation) == ceil(rows / (batch x accumulation)).

def merge_batch_semantics(per_device_batch_size: int, gradient_accumulation_steps: int) -> int:
    """Rows one optimizer step trains (the fused engine's batch: accumulation folded into one pass)."""
    return per_device_batch_size * gradient_accumulation_steps


def steps_per_epoch(rows: int, hp: Hyperparameters) -> int:
    """Optimizer steps in one pass over the rows (the same arithmetic as transformers' Trainer)."""
    batches = math.ceil(rows / hp.per_device_batch_size)
    return max(math.ceil(batches / hp.gradient_accumulation_steps), 1)


def planned_steps(rows: int, hp: Hyperparameters) -> int:
    """Optimizer steps the run will take: maxSteps, else epochs x steps_per_epoch."""
    if hp.max_steps:
        return hp.max_steps
    return hp.epochs * steps_per_epoch(rows, hp)


def warmup_steps(total: int, ratio: float) -> int:
    return math.ceil(total * ratio)
