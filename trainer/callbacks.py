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


LOG_FORMAT_ENV = "KUBESLOTH_LOG_FORMAT"  # json: one JSON object a line (time, level, message, step fields)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"


def emit(line: str, stream=None, level: str = "info", stamp: bool = False, **fields) -> None:
    """One trainer log line: `[trainer] LINE` (with a UTC time stamp in front when `stamp`), or with
    KUBESLOTH_LOG_FORMAT=json `{"time", "level", "message", **fields}` on one line."""
    import json
    import os

    stream = stream or sys.stdout
    if os.environ.get(LOG_FORMAT_ENV, "").lower() == "json":
        record = {"time": _now(), "level": level, "logger": "kubesloth.trainer", "message": line}
        record.update({k: v for k, v in fields.items() if v is not None and (not isinstance(v, float)
                                                                           or math.isfinite(v))})
        print(json.dumps(record), file=stream, flush=True)
    else:
        print(f"{_now()} [trainer] {line}" if stamp else f"[trainer] {line}", file=stream, flush=True)


class ProgressLog(Callback):
    """One line per logging step, greppable: `TIME [trainer] step 12/30 loss 2.3456 lr 3.00e-03 tok/s 1234 mem ...`
    (KUBESLOTH_LOG_FORMAT=json: a JSON object with the step's numbers)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def _print(self, line: str, **fields) -> None:
        emit(line, self.stream, **fields)

    def on_train_start(self, event):
        resumed = f", resumed at step {event.start_step}" if event.start_step else ""
        self._print(f"training: engine {event.engine}, profile {event.profile}, {event.total_steps} steps, "
                    f"{event.examples} examples in {event.rows} rows{resumed}")

    def on_step(self, event):
        mem = event.memory
        memory = (f"gpu reserved {_gib(mem.get('gpu_reserved'))} peak {_gib(mem.get('gpu_peak'))} "
                  f"device {_gib(mem.get('device_used'))} allocated peak {_gib(mem.get('gpu_peak_allocated'))}"
                  if "gpu_reserved" in mem
                  else f"rss {_gib(mem.get('host_rss'))}")
        loss = f"{event.loss:.4f}" if math.isfinite(event.loss) else str(event.loss)
        self._print(f"step {event.step}/{event.total_steps} loss {loss} lr {event.learning_rate:.3e} "
                    f"tok/s {event.tokens_per_second:.0f} epoch {event.epoch:.2f} eta {event.eta_seconds:.0f}s "
                    f"mem {memory}", stamp=True, step=event.step, totalSteps=event.total_steps, loss=event.loss,
                    learningRate=event.learning_rate, tokensPerSecond=round(event.tokens_per_second, 2),
                    epoch=round(event.epoch, 4), etaSeconds=round(event.eta_seconds, 1),
                    gradNorm=event.grad_norm, memory=dict(event.memory) or None)

    def on_checkpoint(self, step, path):
        self._print(f"checkpoint step {step} -> {path}", step=step, checkpoint=str(path))


# --- experiment tracking (spec.training.reportTo) ---------------------------------------------------------------
# One callback for every engine: the HF engines' Bridge and the fused loop both drive the callback bus, so the
# trackers see the same step events as the progress line and the metrics (HF's own report_to stays "none").
TRACKER_PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}
TENSORBOARD_DIR = "tensorboard"
TRACKING_STATE = "tracking.json"  # run ids, so a resumed pod continues the same wandb/mlflow run


def tracker_names(report_to) -> list[str]:
    return [str(getattr(name, "value", name)) for name in report_to or []]


def check_trackers(report_to) -> None:
    """At config time: every tracker's package is importable, else a bad config naming what to install."""
    import importlib.util

    from kubesloth.trainer.errors import BadConfig

    for name in tracker_names(report_to):
        package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise BadConfig(f"spec.training.reportTo: {name} needs the Python package {package!r}, which is not "
                            f"installed in this trainer image (add it to the image, or drop {name} from "
                            f"reportTo)")


def step_scalars(event: StepEvent) -> dict[str, float]:
    scalars = {"train/loss": event.loss, "train/learning_rate": event.learning_rate,
               "train/epoch": event.epoch, "train/tokens_total": float(event.tokens_total),
               "train/tokens_per_second": event.tokens_per_second}
    if event.grad_norm is not None:
        scalars["train/grad_norm"] = event.grad_norm
    for key, value in event.memory.items():
        if isinstance(value, (int, float)):
            scalars[f"memory/{key}_bytes"] = float(value)
    return {k: v for k, v in scalars.items() if isinstance(v, (int, float)) and math.isfinite(v)}


class Trackers(Callback):
    """Step events -> TensorBoard (tensorboardX event files under <destination>/tensorboard/), Weights & Biases
    and MLflow, each configured by its own environment (WANDB_MODE/WANDB_PROJECT/WANDB_API_KEY, MLFLOW_TRACKING_URI,
    MLFLOW_EXPERIMENT_NAME). A tracker that fails mid-run is logged and dropped: tracking never fails training."""

    def __init__(self, report_to, destination, run_name: str, config: dict, log=print):
        from pathlib import Path

        self.names = tracker_names(report_to)
        self.destination = Path(destination)
        self.run_name = run_name
        self.config = config
        self.log = log
        self.tb = None
        self.wandb = None
        self.mlflow = None

    def _state(self) -> dict:
        import json
        try:
            return json.loads((self.destination / TRACKING_STATE).read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self, state: dict) -> None:
        import json
        import os
        path = self.destination / TRACKING_STATE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, path)

    def _drop(self, name: str, exc: BaseException) -> None:
        self.log(f"WARNING tracking: {name} failed ({type(exc).__name__}: {str(exc)[:200]}); it is turned off "
                 f"for the rest of the run")
        setattr(self, {"tensorboard": "tb"}.get(name, name), None)

    def on_train_start(self, event: StartEvent) -> None:
        state = self._state()
        if "tensorboard" in self.names:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(logdir=str(self.destination / TENSORBOARD_DIR), flush_secs=10)
            self.tb.add_text("run/config", "```\n" + __import__("json").dumps(self.config, indent=2,
                                                                                default=str) + "\n```",
                             global_step=event.start_step)
            self.log(f"tracking: tensorboard event files in {self.destination / TENSORBOARD_DIR}")
        if "wandb" in self.names:
            try:
                import wandb
                import os
                import uuid
                run_id = state.get("wandb_id") or uuid.uuid4().hex[:12]
                self.wandb = wandb.init(id=run_id, resume="allow", name=self.run_name, config=self.config,
                                        dir=os.environ.get("WANDB_DIR") or str(self.destination),
                                        reinit="create_new")
                state["wandb_id"] = run_id
                self.log(f"tracking: wandb run {run_id} (mode {self.wandb.settings.mode})")
            except Exception as exc:
                self._drop("wandb", exc)
        if "mlflow" in self.names:
            try:
                import mlflow
                run = mlflow.start_run(run_id=state.get("mlflow_run_id"),
                                       run_name=None if state.get("mlflow_run_id") else self.run_name)
                if not state.get("mlflow_run_id"):
                    mlflow.log_params(_flat(self.config))
                state["mlflow_run_id"] = run.info.run_id
                self.mlflow = mlflow
                self.log(f"tracking: mlflow run {run.info.run_id} at {mlflow.get_tracking_uri()}")
            except Exception as exc:
                self._drop("mlflow", exc)
        if {"wandb_id", "mlflow_run_id"} & state.keys():
            self._save_state(state)

    def on_step(self, event: StepEvent) -> None:
        scalars = step_scalars(event)
        if self.tb is not None:
            try:
                for key, value in scalars.items():
                    self.tb.add_scalar(key, value, global_step=event.step)
            except Exception as exc:
                self._drop("tensorboard", exc)
        if self.wandb is not None:
            try:
                self.wandb.log(scalars, step=event.step)
            except Exception as exc:
                self._drop("wandb", exc)
        if self.mlflow is not None:
            try:
                self.mlflow.log_metrics({k.replace("/", "."): v for k, v in scalars.items()}, step=event.step)
            except Exception as exc:
                self._drop("mlflow", exc)

    def on_train_end(self, summary: dict) -> None:
        final = {f"summary/{key}": float(summary[key]) for key in
                 ("final_loss", "tokens", "train_seconds", "tokens_per_second", "steady_tokens_per_second")
                 if isinstance(summary.get(key), (int, float)) and math.isfinite(summary[key])}
        if self.tb is not None:
            for key, value in final.items():
                self.tb.add_scalar(key, value, global_step=summary.get("steps") or 0)
        if self.wandb is not None:
            self.wandb.summary.update({k.split("/", 1)[1]: v for k, v in final.items()})
            if summary.get("data_warnings"):
                self.wandb.summary["data_warnings"] = summary["data_warnings"]
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "."): v for k, v in final.items()})
        self.close()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.mlflow is not None:
            self.mlflow.end_run()
            self.mlflow = None


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested hyperparameters -> MLflow params (strings, <= 6000 characters each)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = str(value)[:6000]
    return out
