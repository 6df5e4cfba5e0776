"""The small event interface every engine drives: train start, a step event per logging step, checkpoints,
train end. Log lines, Prometheus metrics and the run's bookkeeping are callbacks."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class StartEvent:
    engine: str
    profile: str
    total_steps: int
    start_step: int  # > 0 when resumed
    tokens_seen: int  # tokens already trained before this process (resume)
    examples: int
    rows: int


@dataclass
class StepEvent:
    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    tokens_total: int  # trained tokens since the run began (resume included)
    tokens_per_second: float  # over the last logging interval
    eta_seconds: float
    grad_norm: Optional[float] = None
    memory: dict[str, int] = field(default_factory=dict)  # from memory.snapshot()


class Callback:
    def on_train_start(self, event: StartEvent) -> None: ...

    def on_step(self, event: StepEvent) -> None: ...

    def on_checkpoint(self, step: int, path: str) -> None: ...

    def on_train_end(self, summary: dict) -> None: ...


class CallbackList(Callback):
    def __init__(self, callbacks: list[Callback]):
        self.callbacks = list(callbacks)

    def on_train_start(self, event):
        for cb in self.callbacks:
            cb.on_train_start(event)

    def on_step(self, event):
        for cb in self.callbacks:
            cb.on_step(event)

    def on_checkpoint(self, step, path):
        for cb in self.callbacks:
            cb.on_checkpoint(step, path)

    def on_train_end(self, summary):
        for cb in self.callbacks:
            cb.on_train_end(summary)


class Throughput:
    """Turns (step, tokens_total) readings into tokens/s over the last interval and an ETA; engine-neutral."""

    def __init__(self, start_step: int, start_tokens: int, clock=time.monotonic):
        self.clock = clock
        self.started = clock()
        self.start_step = start_step
        self.start_tokens = start_tokens
        self.last = (self.started, start_step, start_tokens)
        # Every interval but the first (compilation, allocator warm-up): the rate a run settles at.
        self.intervals = 0
        self.steady_tokens = 0
        self.steady_seconds = 0.0

    def update(self, step: int, tokens_total: int, total_steps: int) -> tuple[float, float]:
        now = self.clock()
        last_time, _last_step, last_tokens = self.last
        self.last = (now, step, tokens_total)
        interval = max(now - last_time, 1e-9)
        rate = (tokens_total - last_tokens) / interval
        self.intervals += 1
        if self.intervals > 1:
            self.steady_tokens += tokens_total - last_tokens
            self.steady_seconds += interval
        done = step - self.start_step
        per_step = (now - self.started) / done if done > 0 else 0.0
        return rate, max(total_steps - step, 0) * per_step

    def restart_interval(self) -> None:
        """After a pause that is not training (a checkpoint write): the next rate starts from now."""
        _time, step, tokens = self.last
        self.last = (self.clock(), step, tokens)

    def steady_tokens_per_second(self) -> Optional[float]:
        """Tokens/s over every logging interval after the first, checkpoint writes left out; None before two."""
        return self.steady_tokens / self.steady_seconds if self.steady_seconds > 0 else None

    def average_tokens_per_second(self) -> float:
        elapsed = self.clock() - self.started
        return (self.last[2] - self.start_tokens) / elapsed if elapsed > 0 else 0.0


def _gib(value: Optional[int]) -> str:
    return f"{value / 2**30:.2f}GiB" if value else "-"


class ProgressLog(Callback):
    """One line per logging step, greppable: `step 12/30 loss 2.3456 lr 3.00e-03 tok/s 1234 mem ...`."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def _print(self, line: str) -> None:
        print(f"[trainer] {line}", file=self.stream, flush=True)

    def on_train_start(self, event):
        resumed = f", resumed at step {event.start_step}" if event.start_step else ""
        self._print(f"training: engine {event.engine}, profile {event.profile}, {event.total_steps} steps, "
                    f"{event.examples} examples in {event.rows} rows{resumed}")

    def on_step(self, event):
        mem = event.memory
        memory = (f"gpu reserved {_gib(mem.get('gpu_reserved'))} peak {_gib(mem.get('gpu_peak'))} "
                  f"device {_gib(mem.get('device_used'))}" if "gpu_reserved" in mem
                  else f"rss {_gib(mem.get('host_rss'))}")
        loss = f"{event.loss:.4f}" if math.isfinite(event.loss) else str(event.loss)
        self._print(f"step {event.step}/{event.total_steps} loss {loss} lr {event.learning_rate:.3e} "
                    f"tok/s {event.tokens_per_second:.0f} epoch {event.epoch:.2f} eta {event.eta_seconds:.0f}s "
                    f"mem {memory}")

    def on_checkpoint(self, step, path):
        self._print(f"checkpoint step {step} -> {path}")
