"""The run, torchtune-style: setup (checkpoints, metrics, engine) -> train -> save (verified) + summary."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from kubesloth.api.v1alpha1 import FineTuneJob
from kubesloth.trainer.callbacks import Callback, CallbackList, ProgressLog, StartEvent, StepEvent
from kubesloth.trainer.checkpoints import CheckpointManager, Deadline, InterruptCheckpointSkipped
from kubesloth.trainer.engines import create_engine
from kubesloth.trainer.engines.base import RunContext, TrainResult
from kubesloth.trainer.memory import DeviceMonitor, snapshot
from kubesloth.trainer.metrics import TrainingMetrics, metrics_from_env
from kubesloth.planner import Plan
from kubesloth.trainer.profiles import Hyperparameters
from kubesloth.trainer.errors import OutputUnwritable
from kubesloth.trainer.save import SavedModel, push_to_hub, save_final_model, write_model_card, write_summary


class RunState(Callback):
    """What the error path needs to say where the run was (step, memory peaks)."""

    def __init__(self):
        self.step = 0
        self.total_steps = 0
        self.last_checkpoint: Optional[str] = None

    def on_train_start(self, event: StartEvent):
        self.step, self.total_steps = event.start_step, event.total_steps

    def on_step(self, event: StepEvent):
        self.step, self.total_steps = event.step, event.total_steps

    def on_checkpoint(self, step, path):
        self.step, self.last_checkpoint = max(self.step, step), path


def out_of_memory_advice(plan: Optional[Plan]) -> str:
    """What to change after an out-of-memory: the planner's own suggestions for the same request with less room
    (the budget less 15 %: what the run needed beyond the plan), so each is a change it will honour."""
    if plan is None or not plan.request.budget_bytes:
        return ("set spec.resources.gpuMemoryGiB so the memory planner can fit the run "
                "(`kubesloth plan FILE` shows what fits)")
    from dataclasses import replace

    from kubesloth.planner.fit import plan as make_plan

    tighter = make_plan(replace(plan.request, budget_bytes=int(plan.request.budget_bytes * 0.85)))
    ideas = [s.message for s in tighter.suggestions if s.field != "spec.resources.gpuMemoryGiB"]
    bigger = [s for s in tighter.suggestions if s.field == "spec.resources.gpuMemoryGiB"]
    if bigger:
        ideas.append(f"a GPU budget of {round(bigger[0].value / 0.85)} GiB")
    if tighter.fits:
        ideas.insert(0, f"the plan for 85 % of the budget ({tighter.describe()}): set "
                        f"spec.resources.gpuMemoryGiB: {plan.request.budget_bytes * 0.85 / 2**30:.0f}")
    return "the planner suggests: " + "; or ".join(ideas) if ideas else "no smaller plan fits this model"


class Recipe:
    def __init__(self, job: FineTuneJob, hp: Hyperparameters, engine_name: str, model_path: Path,
                 dataset_files: list[Path], destination: Path, stop: threading.Event,
                 log: Callable[[str], None], plan: Optional[Plan] = None,
                 run_identity: Optional[dict] = None, lock: Any = None, deadline: Optional[Deadline] = None,
                 on_interrupt_write: Optional[Callable[..., None]] = None):
        self.job, self.hp, self.engine_name, self.plan = job, hp, engine_name, plan
        self.run_identity, self.lock, self.deadline = run_identity, lock, deadline
        self.on_interrupt_write = on_interrupt_write
        self.model_path, self.dataset_files, self.destination = model_path, dataset_files, destination
        self.stop, self.log = stop, log
        self.run_state = RunState()
        self.monitor: Optional[DeviceMonitor] = None
        self.metrics: Optional[TrainingMetrics] = None
        self.engine: Any = None
        self.ctx: Optional[RunContext] = None
        self.started = time.time()

    def setup(self) -> None:
        spec = self.job.spec
        checkpoints = CheckpointManager(
            self.destination, spec.output.checkpoints_to_keep, run=self.run_identity, lock=self.lock,
            # Every engine's checkpoint holds its optimizer state and safetensors weights: one without is not
            # committed (a writer whose staging dir was deleted under it).
            required=("optimizer.pt", "*.safetensors") if self.lock is not None else (),
            deadline=self.deadline, expected_bytes=self.expected_checkpoint_bytes(), log=self.log, stop=self.stop,
            on_interrupt_write=self.on_interrupt_write)
        self.checkpoints = checkpoints
        for path in checkpoints.remove_partial():
            self.log(f"removed staging leftovers {path}" if path == checkpoints.staging_root
                     else f"removed partial checkpoint {path} (no COMPLETE marker)")
        resume_from = checkpoints.latest()
        if resume_from:
            self.log(f"resuming from {resume_from.path} (step {resume_from.step})")
        self.monitor = DeviceMonitor().start()
        meta = self.job.metadata or {}
        self.metrics = metrics_from_env(meta.get("namespace", ""), meta.get("name", ""), self.monitor)
        callbacks = CallbackList([ProgressLog(), self.metrics, self.run_state])
        if spec.training.report_to:  # experiment trackers: the same step events, every engine
            from kubesloth.trainer.callbacks import Trackers
            self.trackers = Trackers(spec.training.report_to, self.destination, meta.get("name") or "kubesloth",
                                     {"hyperparameters": self.hp.as_dict(), "model": spec.model.source,
                                      "dataset": spec.dataset.source, "engine": self.engine_name}, log=self.log)
            callbacks.callbacks.append(self.trackers)
        self.ctx = RunContext(job=self.job, hp=self.hp, model_path=self.model_path,
                              dataset_files=self.dataset_files, destination=self.destination,
                              checkpoints=checkpoints, resume_from=resume_from, callbacks=callbacks,
                              stop=self.stop, monitor=self.monitor,
                              checkpoint_every=spec.output.checkpoint_every_steps, log=self.log, plan=self.plan)
        self.engine = create_engine(self.engine_name)
        self.engine.setup(self.ctx)

    def expected_checkpoint_bytes(self) -> Optional[int]:
        """The planner's checkpoint size, else the weights + two optimizer moments of their size."""
        predicted = ((self.plan.summary() if self.plan is not None else {}).get("predicted") or {})
        if predicted.get("checkpoint_bytes"):
            return int(predicted["checkpoint_bytes"])
        from kubesloth.trainer.save import weights_bytes

        try:
            return 3 * weights_bytes(self.model_path) or None
        except OSError:
            return None

    def train(self) -> TrainResult:
        try:
            result = self.engine.train()
        except InterruptCheckpointSkipped as skipped:  # an engine checkpointing through writing(): it stopped
            state = self.run_state
            result = TrainResult(step=skipped.step, start_step=0, total_steps=state.total_steps, epoch=0.0,
                                 tokens_total=0, tokens_trained=0, final_loss=math.nan, train_seconds=0.0,
                                 interrupted=True, last_checkpoint=self.ctx.checkpoints.latest())
        if math.isnan(result.final_loss) and self.ctx.resume_from:
            result.final_loss = float(self.ctx.resume_from.metadata().get("loss", math.nan))
        return result

    def save(self, result: TrainResult) -> tuple[SavedModel, dict]:
        self.log(f"saving the model to {self.destination}")
        saved = save_final_model(self.engine.model, self.engine.tokenizer, self.destination,
                                 probe_ids=self.engine.probe_ids, check_logits=self.engine_name == "cpu")
        check = (f"{saved.tensors_checked} tensors equal on disk" +
                 (f", reloaded logits max diff {saved.max_logit_diff:.2g}" if saved.max_logit_diff is not None
                  else ""))
        self.log(f"saved {saved.files} files ({saved.bytes / 2**20:.1f} MiB) to {saved.path}: {check}")
        summary = self.summary(result, saved)
        card = write_model_card(saved.path, self.job, summary)
        saved.files, saved.bytes = saved.files + 1, saved.bytes + card.stat().st_size  # status.output counts it
        summary["model"].update(files=saved.files, bytes=saved.bytes)
        summary["model_card"] = str(card)
        self.log(f"model card {summary['model_card']}")
        push = self.job.spec.output.push_to_hub
        if push is not None:
            try:
                summary["pushed_to_hub"] = push_to_hub(saved.path, push, self.log)
            except OutputUnwritable as exc:
                summary["pushed_to_hub"] = {"repository": push.repository, "error": exc.message}
                write_summary(self.destination, summary)
                raise
        write_summary(self.destination, summary)
        self.ctx.callbacks.on_train_end(summary)
        return saved, summary

    def summary(self, result: TrainResult, saved: SavedModel) -> dict:
        memory = snapshot(self.monitor)
        return {
            "engine": self.engine_name,
            "profile": self.hp.profile,
            "requested_profile": self.hp.requested_profile,
            "steps": result.step,
            "planned_steps": result.total_steps,
            "resumed_from_step": result.start_step or None,
            "epoch": result.epoch,
            "tokens": result.tokens_total,
            "tokens_this_run": result.tokens_trained,
            "train_seconds": round(result.train_seconds, 3),
            "checkpoint_seconds": round(result.checkpoint_seconds, 3),
            "wall_seconds": round(time.time() - self.started, 3),
            "tokens_per_second": round(result.tokens_trained / result.train_seconds, 1)
            if result.train_seconds > 0 else None,
            "steady_tokens_per_second": round(result.steady_tokens_per_second, 1)
            if result.steady_tokens_per_second else None,
            "final_loss": result.final_loss,
            "peak_memory": {
                "gpu_reserved_peak_bytes": memory.get("gpu_peak"),
                "gpu_allocated_peak_bytes": memory.get("gpu_peak_allocated"),
                "gpu_device_peak_bytes": memory.get("device_peak"),
                "host_rss_peak_bytes": memory.get("host_rss_peak"),
            },
            "model": {"path": str(saved.path), "files": saved.files, "bytes": saved.bytes,
                      "tensors_checked": saved.tensors_checked, "max_logit_diff": saved.max_logit_diff},
            "hyperparameters": self.hp.as_dict(),
            "plan": self.plan.summary() if self.plan is not None else None,
            "run": self.run_identity,
            "data": getattr(self.ctx, "data_stats", None),
            "data_warnings": list(getattr(self.ctx, "data_warnings", None) or []),
            "report_to": [str(getattr(t, "value", t)) for t in self.job.spec.training.report_to or []],
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def memory_peaks(self) -> str:
        memory = snapshot(self.monitor)
        parts = []
        if "gpu_peak" in memory:
            parts.append(f"torch reserved peak {memory['gpu_peak'] / 2**30:.2f} GiB")
        if "device_peak" in memory:
            parts.append(f"NVML device peak {memory['device_peak'] / 2**30:.2f} GiB")
        parts.append(f"host RSS peak {memory['host_rss_peak'] / 2**30:.2f} GiB")
        return ", ".join(parts)

    def close(self) -> None:
        if getattr(self, "trackers", None) is not None:
            self.trackers.close()  # an interrupted run flushes its event files too
        if self.metrics:
            self.metrics.shutdown()
        if self.monitor:
            self.monitor.stop()
