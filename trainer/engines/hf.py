"""What the two transformers-Trainer based engines (cpu, unsloth) share: TrainingArguments from the resolved
hyperparameters, the bridge from HF's callback events to ours (progress, checkpoints, SIGTERM), and a resume
that survives a changed optimizer layout.

Checkpoints: HF writes its usual files (weights, optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json)
into checkpoints/.staging/checkpoint-N; the bridge's on_save then commits that dir through the shared
CheckpointManager (metadata, rename to step-NNNNNNNN, COMPLETE marker, retention). Resume hands the newest
complete one to `trainer.train(resume_from_checkpoint=...)`, which restores model, optimizer, scheduler, RNG,
step and data position (it skips the batches already trained in the epoch).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from kubesloth.trainer.callbacks import StartEvent, StepEvent, Throughput
from kubesloth.trainer.checkpoints import METADATA_FILE
from kubesloth.trainer.data import CausalLMCollator
from kubesloth.trainer.engines.base import RunContext, TrainResult, planned_steps, warmup_steps
from kubesloth.trainer.memory import snapshot

# Test-only: sleep this long after every optimizer step, so an end-to-end test can signal a tiny CPU run mid-run
# on a fast or a loaded machine alike (the steps, losses and checkpoints are the same).
TEST_STEP_DELAY_ENV = "KUBESLOTH_TEST_STEP_DELAY_SECONDS"


def training_arguments(ctx: RunContext, rows: int, **device: Any) -> dict[str, Any]:
    """Keyword arguments for TrainingArguments/SFTConfig; `device` adds engine-specific ones (use_cpu, bf16)."""
    hp = ctx.hp
    total = planned_steps(rows, hp)
    return dict(
        output_dir=str(ctx.checkpoints.staging_root),
        per_device_train_batch_size=hp.per_device_batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        learning_rate=hp.learning_rate,
        lr_scheduler_type=hp.lr_scheduler,
        warmup_steps=warmup_steps(total, hp.warmup_ratio),
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps or -1,
        seed=hp.seed,
        optim=hp.optimizer,
        gradient_checkpointing=hp.gradient_checkpointing == "true",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=hp.logging_steps,
        save_strategy="no",  # the bridge decides when (checkpointEverySteps, SIGTERM)
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,  # our collator reads "segments"
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        **device,
    )


def optimizer_signature(model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer class and which named parameters each param group holds (order matters to torch)."""
    names = {id(p): name for name, p in model.named_parameters()}
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    return {"class": type(inner).__name__,
            "groups": [[names.get(id(p), f"?{i}") for i, p in enumerate(g["params"])] for g in inner.param_groups]}


def adapt_optimizer_state(saved: dict, saved_sig: Optional[dict], current_sig: dict,
                          current_groups: list[dict]) -> tuple[Optional[dict], Optional[str]]:
    """The saved optimizer state in a form the current optimizer can load.

    Returns (state, None) when the layout is unchanged; (remapped state, note) when the same parameters sit in
    different groups (each parameter's moments follow it by name: loading as-is would raise "loaded state dict
    contains a parameter group that doesn't match the size of optimizer's group" or, worse, pair moments with
    the wrong tensors); (None, note) when the optimizer or the parameters differ and the state cannot apply.
    """
    if saved_sig == current_sig:
        return saved, None
    if saved_sig is None:
        sizes = [len(g["params"]) for g in saved.get("param_groups", [])]
        if sizes == [len(g) for g in current_sig["groups"]]:
            return saved, None
        return None, "the checkpoint has no optimizer layout and its param groups differ: optimizer state reset"
    if saved_sig["class"] != current_sig["class"]:
        return None, (f"optimizer changed from {saved_sig['class']} to {current_sig['class']}: "
                      f"optimizer state reset (weights, step and schedule resumed)")
    saved_names = [n for group in saved_sig["groups"] for n in group]
    current_names = [n for group in current_sig["groups"] for n in group]
    if sorted(saved_names) != sorted(current_names) or len(set(saved_names)) != len(saved_names):
        return None, "the trained parameters differ from the checkpoint's: optimizer state reset"
    old_index = {name: i for i, name in enumerate(saved_names)}
    state = {new: saved["state"][old_index[name]] for new, name in enumerate(current_names)
             if old_index[name] in saved["state"]}
    return {"state": state, "param_groups": current_groups}, (
        f"optimizer param groups changed ({[len(g) for g in saved_sig['groups']]} -> "
        f"{[len(g) for g in current_sig['groups']]} parameters): state remapped by parameter name")


class SafeResumeMixin:
    """Mixed into the HF trainer class: loads optimizer/scheduler state through adapt_optimizer_state."""

    kubesloth_log = staticmethod(print)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        folder = Path(checkpoint)
        optimizer_file, scheduler_file = folder / "optimizer.pt", folder / "scheduler.pt"
        if not optimizer_file.is_file() or not scheduler_file.is_file():
            return super()._load_optimizer_and_scheduler(checkpoint)
        saved = torch.load(optimizer_file, map_location="cpu", weights_only=True)
        try:
            saved_sig = json.loads((folder / METADATA_FILE).read_text()).get("optimizer")
        except (OSError, ValueError):
            saved_sig = None
        current_sig = optimizer_signature(self.model, self.optimizer)
        current_groups = self.optimizer.state_dict()["param_groups"]
        state, note = adapt_optimizer_state(saved, saved_sig, current_sig, current_groups)
        if note is None:
            self.optimizer.load_state_dict(state)
            self.lr_scheduler.load_state_dict(torch.load(scheduler_file, weights_only=True))
            return
        self.kubesloth_log(f"resume: {note}")
        if state is not None:
            self.optimizer.load_state_dict(state)
        # The scheduler's state is per group too: replay it to the checkpoint's step instead.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(self.state.global_step):
                self.lr_scheduler.step()


class Bridge(TrainerCallback):
    """HF Trainer events -> kubesloth callbacks; decides when to checkpoint; stops on SIGTERM."""

    def __init__(self, ctx: RunContext, engine_name: str, rows: int, examples: int):
        self.ctx = ctx
        self.engine_name = engine_name
        self.rows = rows
        self.examples = examples
        self.trainer: Any = None  # set once the trainer exists (for the optimizer layout)
        self.started = False
        self.start_step = 0
        self.start_tokens = 0
        self.throughput: Optional[Throughput] = None
        self.interrupted = False
        self.last_loss = math.nan
        self.losses: list[tuple[int, float]] = []
        self.last_checkpoint = None
        self.train_started_at = 0.0
        self.checkpoint_seconds = 0.0
        self._save_started: Optional[float] = None
        try:
            self._test_step_delay = max(0.0, float(os.environ.get(TEST_STEP_DELAY_ENV) or 0))
        except ValueError:
            self._test_step_delay = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.started:  # here, not in on_train_begin: a resumed state is loaded after that event
            self.started = True
            self.start_step = state.global_step
            self.start_tokens = int(state.num_input_tokens_seen or 0)
            self.train_started_at = time.monotonic()
            self.throughput = Throughput(self.start_step, self.start_tokens)
            self.ctx.callbacks.on_train_start(StartEvent(
                engine=self.engine_name, profile=self.ctx.hp.profile, total_steps=state.max_steps,
                start_step=self.start_step, tokens_seen=self.start_tokens, examples=self.examples,
                rows=self.rows))

    def on_step_end(self, args, state, control, **kwargs):
        if self._test_step_delay:
            time.sleep(self._test_step_delay)
        if self.ctx.stop.is_set() and state.global_step < state.max_steps:  # at the last step: just finish
            self.interrupted = True
            # Only if it can be written before SIGKILL (else stop without starting it: the newest stays whole).
            control.should_save = self.ctx.checkpoints.interrupt_checkpoint_fits(state.global_step)
            control.should_training_stop = True
        elif state.global_step % self.ctx.checkpoint_every == 0:
            control.should_save = True
        if control.should_save:
            self._save_started = time.monotonic()  # HF writes the files between here and on_save

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or self.throughput is None:
            return
        tokens = int(state.num_input_tokens_seen or 0)
        rate, eta = self.throughput.update(state.global_step, tokens, state.max_steps)
        self.last_loss = float(logs["loss"])
        self.losses.append((state.global_step, self.last_loss))
        self.ctx.callbacks.on_step(StepEvent(
            step=state.global_step, total_steps=state.max_steps, epoch=float(state.epoch or 0.0),
            loss=self.last_loss, learning_rate=float(logs.get("learning_rate", 0.0)), tokens_total=tokens,
            tokens_per_second=rate, eta_seconds=eta,
            grad_norm=float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None,
            memory=snapshot(self.ctx.monitor)))

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        staging = Path(args.output_dir) / f"checkpoint-{step}"
        metadata = {
            "engine": self.engine_name, "profile": self.ctx.hp.profile, "epoch": state.epoch,
            "tokens_seen": int(state.num_input_tokens_seen or 0), "loss": self.last_loss,
            "hyperparameters": self.ctx.hp.as_dict(),
            "optimizer": optimizer_signature(self.trainer.model, self.trainer.optimizer),
        }
        self.last_checkpoint = self.ctx.checkpoints.commit(staging, step, metadata, started=self._save_started)
        if self._save_started is not None:
            self.checkpoint_seconds += time.monotonic() - self._save_started
            self._save_started = None
        if self.throughput is not None:
            self.throughput.restart_interval()
        self.ctx.callbacks.on_checkpoint(step, str(self.last_checkpoint.path))


def attach_trainer(engine: Any, ctx: RunContext, trainer_base: type, args: Any, data: Any, pad_id: int) -> None:
    """engine's trainer: `trainer_base` (Trainer, SFTTrainer) with the resume guard, our collator and the Bridge."""
    trainer_cls = type(f"{engine.name.capitalize()}Trainer", (SafeResumeMixin, trainer_base),
                       {"kubesloth_log": staticmethod(ctx.log)})
    engine._ctx = ctx
    engine._bridge = Bridge(ctx, engine.name, rows=len(data), examples=data.examples)
    engine._trainer = trainer_cls(model=engine.model, args=args, train_dataset=data.as_hf_dataset(),
                                  data_collator=CausalLMCollator(pad_id, ctx.hp.packing),
                                  processing_class=engine.tokenizer, callbacks=[engine._bridge])


def quiet_transformers() -> None:
    """Our progress lines replace HF's progress bars and printed log dicts."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


def _resumed_at_the_end(trainer: Any, ctx: RunContext, total: int) -> bool:
    """A checkpoint at the run's last step (killed after it, while saving the model): load its weights and
    state without training. HF's `train(resume_from_checkpoint=...)` at global_step == max_steps in the middle of
    an epoch takes one more optimizer step before its stop check (step 31/30)."""
    from transformers.trainer_callback import TrainerState

    state_file = ctx.resume_from.path / "trainer_state.json"
    try:
        step = int(json.loads(state_file.read_text()).get("global_step") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        return False
    if total <= 0 or step < total:
        return False
    trainer._load_from_checkpoint(str(ctx.resume_from.path))
    trainer.state = TrainerState.load_from_json(str(state_file))
    trainer.state.max_steps = total
    ctx.log(f"resume: the checkpoint at step {step} holds the run's last step ({total}): nothing left to train; "
            "saving its weights")
    return True


def run(trainer: Any, bridge: Bridge, ctx: RunContext) -> TrainResult:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    bridge.trainer = trainer
    resume = str(ctx.resume_from.path) if ctx.resume_from else None
    if resume and _resumed_at_the_end(trainer, ctx, planned_steps(bridge.rows, ctx.hp)):
        pass  # the checkpoint holds the last step: weights and state loaded, nothing left to train
    else:
        trainer.train(resume_from_checkpoint=resume)
    state = trainer.state
    tokens = int(state.num_input_tokens_seen or 0)
    if not bridge.started:  # resumed at the last step (killed while saving): nothing left to train
        bridge.start_step, bridge.start_tokens = state.global_step, tokens
    return TrainResult(
        step=state.global_step, start_step=bridge.start_step, total_steps=state.max_steps,
        epoch=float(state.epoch or 0.0), tokens_total=tokens, tokens_trained=tokens - bridge.start_tokens,
        final_loss=bridge.last_loss,
        train_seconds=(time.monotonic() - bridge.train_started_at - bridge.checkpoint_seconds
                       if bridge.started else 0.0),
        interrupted=bridge.interrupted, last_checkpoint=bridge.last_checkpoint, losses=bridge.losses,
        checkpoint_seconds=bridge.checkpoint_seconds,
        steady_tokens_per_second=bridge.throughput.steady_tokens_per_second() if bridge.throughput else None)
