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


def planned_steps(rows: int, hp: Hyperparameters) -> int:
    """Optimizer steps the run will take (the same arithmetic as transformers' Trainer)."""
    if hp.max_steps:
        return hp.max_steps
    batches = math.ceil(rows / hp.per_device_batch_size)
    per_epoch = max(math.ceil(batches / hp.gradient_accumulation_steps), 1)
    return hp.epochs * per_epoch


def warmup_steps(total: int, ratio: float) -> int:
    return math.ceil(total * ratio)
