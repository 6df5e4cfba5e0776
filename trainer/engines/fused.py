"""The fused engine: the optimizer step runs inside backward, one parameter at a time.

Each parameter gets its own optimizer, stepped as soon as its gradient is complete; the gradient is then dropped,
so the full set of gradients (16 GB for an 8B model in bf16) never exists. The engine is small wiring:
- how the model is loaded: engines/loading.py (Unsloth's FastLanguageModel on a GPU, the float32 transformers
  model on CPU: the same functions as the unsloth and cpu engines);
- what runs: the planner's plan as this engine runs it (`FusedPlan`: placement, sequences, layers kept, cap);
- the optimizer core: engines/fused_optim.py (`FusedOptimizer`, `HostStateStore`, the per-parameter factories);
- how a step runs and a run of steps: engines/fused_loop.py (`train_steps`, `StepResult`, `run`, checkpoint files);
- step arithmetic: base.py (steps per epoch, total, warm-up: the same numbers as the HF engines).

Semantics that differ from the `unsloth`/`cpu` engines (stated in docs/benchmarks.md too):
- **No gradient accumulation.** A step is one forward/backward over perDeviceBatchSize x gradientAccumulationSteps
  sequences at once, with the loss averaged over all label tokens of the step - the same objective as accumulation
  with a token-mean loss, paid for with the activation memory of the larger micro-batch.
- **Gradient clipping is per parameter** (fused_optim.py says how; the global pre-clip norm is still logged).
- The learning-rate schedule is the same transformers scheduler as the other engines, stepped after each step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from kubesloth.trainer.engines.base import merge_batch_semantics, planned_steps, steps_per_epoch
from kubesloth.trainer.engines.fused_loop import (  # noqa: F401  (the loop's public names, as before the split)
    StepResult,
    compute_loss,
    has_checkpoint_files,
    read_checkpoint_files,
    run,
    train_steps,
    write_checkpoint_files,
)
from kubesloth.trainer.engines.fused_optim import (  # noqa: F401  (the core's public names, as before the split)
    HOST_STATE_MIN_NUMEL,
    FusedOptimizer,
    FusedStepError,
    HostStateStore,
    bnb_adamw8bit_factory,
    bnb_direct_update,
    fused_optimizer_for,
    no_decay,
    torch_adamw_factory,
)

# --- the plan as this engine runs it (the planner decided it once: trainer/profiles.resolve_run) ------------------

PLACEMENTS = ("paged", "device", "host", "torch")
# The benchmark's knobs (bench/gpu_bench.py sweeps them): override the plan's placement / layers kept. Not part
# of the pod contract; a run with them logs that its plan was overridden.
TUNING_ENV = "KUBESLOTH_FUSED_TUNING"


@dataclass
class FusedPlan:
    """What this engine runs, taken from the memory planner's plan (kubesloth.planner; logged at start)."""

    device: str  # cuda | cpu
    placement: str  # paged | device | host | torch
    sequences_per_step: int
    checkpointing: str  # unsloth | true | false
    uncheckpointed_layers: int = 0
    budget_bytes: Optional[int] = None  # torch's cap (set_per_process_memory_fraction), if any
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        cap = f", torch memory cap {self.budget_bytes / 2**30:.1f} GiB" if self.budget_bytes else ""
        layers = (f", {self.uncheckpointed_layers} decoder layers without checkpointing"
                  if self.uncheckpointed_layers else "")
        return (f"fused step on {self.device}: optimizer states {self.placement}, {self.sequences_per_step} "
                f"sequences per step (no accumulation), checkpointing {self.checkpointing}{layers}{cap}")


def _tuning() -> dict:
    import json
    import os

    raw = os.environ.get(TUNING_ENV)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        from kubesloth.trainer.errors import BadConfig
        raise BadConfig(f"{TUNING_ENV} must be a JSON object, got {raw[:80]!r}") from None
    return value if isinstance(value, dict) else {}


# The placement each optimizer asks for when the run has no plan (CPU tests, a model the planner cannot shape).
OPTIMIZER_PLACEMENTS = {"paged_adamw_8bit": "paged", "adamw_8bit": "device", "adamw_torch": "torch",
                        "adamw_torch_fused": "torch"}


def memory_cap(ctx, tuning: Optional[dict] = None) -> Optional[int]:
    """torch's cap from the plan: the budget less the safety margin, the paged states (NVML counts them,
    torch does not) and what the process holds outside torch, so the device peak stays inside the budget.
    The tuning key `torch_cap: 0` (bench only) runs without the cap, to measure what the cap itself costs."""
    from kubesloth.trainer.memory import set_cuda_allocator_settings

    set_cuda_allocator_settings()  # CUDA starts here, before Unsloth's import would set them
    plan = ctx.plan
    cap = plan.torch_cap_bytes if plan is not None else None
    if tuning and "torch_cap" in tuning:
        cap = int(tuning["torch_cap"]) or None
        ctx.log(f"{TUNING_ENV}: torch cap {cap or 'off'}")
    if not cap:
        return None
    torch.cuda.init()
    total = torch.cuda.get_device_properties(0).total_memory
    cap = min(cap, total)
    torch.cuda.set_per_process_memory_fraction(max(cap, 1 << 30) / total)
    ctx.log(f"GPU budget {plan.request.budget_bytes / 2**30:.2f} GiB ({plan.request.budget_source}): torch "
            f"capped at {cap / 2**30:.2f} GiB")
    return cap


def skip_checkpointing(model: torch.nn.Module, count: int) -> None:
    """Selective checkpointing: the last `count` decoder layers keep their activations (no recompute)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules()
              if isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False)]
    for layer in layers[len(layers) - count:]:
        layer.gradient_checkpointing = False


def fused_plan(ctx, on_gpu: bool, budget: Optional[int], tuning: dict, sequences: int) -> FusedPlan:
    """The planner's layout, as this engine runs it (the plan was made once, in trainer.profiles)."""
    from kubesloth.trainer.errors import BadConfig

    hp = ctx.hp
    layout = ctx.plan.layout if ctx.plan is not None else None
    placement = layout.placement if layout is not None else OPTIMIZER_PLACEMENTS.get(hp.optimizer)
    plan = FusedPlan(device="cuda" if on_gpu else "cpu", placement="torch", sequences_per_step=sequences,
                     checkpointing=hp.gradient_checkpointing, budget_bytes=budget)
    if layout is None or layout.engine != "fused":
        # Forced onto this engine (KUBESLOTH_ENGINE=fused) without a fused plan: say what runs differently.
        if hp.gradient_accumulation_steps > 1:
            plan.notes.append(f"fused engine: gradientAccumulationSteps {hp.gradient_accumulation_steps} x "
                              f"perDeviceBatchSize {hp.per_device_batch_size} run as one batch of {sequences} "
                              "sequences per step (same token-mean loss, no accumulation)")
        if hp.max_grad_norm > 0:
            plan.notes.append(f"fused engine: maxGradNorm {hp.max_grad_norm:g} clips each parameter's "
                              "gradient on its own (per-parameter clipping)")
    if not on_gpu:
        return plan  # torch AdamW per parameter
    if placement is None:
        raise BadConfig(f"spec.training.optimizer: {hp.optimizer} is not supported by the fused engine "
                        f"(allowed: {', '.join(OPTIMIZER_PLACEMENTS)})")
    plan.placement = tuning.get("placement") or placement
    plan.uncheckpointed_layers = int(tuning.get("uncheckpointed_layers",
                                                layout.uncheckpointed_layers if layout is not None else 0))
    if tuning:
        plan.notes.append(f"{TUNING_ENV} overrides the plan: {tuning}")
    return plan


# --- the engine (the trainer's entry point runs this) -------------------------------------------------------------

class FusedEngine:
    """Engine `fused`: a manual loop with the optimizer step fused into backward (see the module docstring).

    On a GPU the model is Unsloth's FastLanguageModel (full fine-tuning, bf16) with its offloaded checkpointing
    and its fused cross-entropy (the loss through `labels=`); on CPU it is the float32 transformers model with
    torch AdamW per parameter (CI). Data, callbacks, checkpoint layout, metrics and the save are the shared ones.
    """

    name = "fused"

    def __init__(self):
        self.model = None
        self.tokenizer = None
        self.probe_ids: list[int] = []
        self.plan: Optional[FusedPlan] = None
        self.fused: Optional[FusedOptimizer] = None

    # --- setup: plan -> loader -> optimizer -> resume ---------------------------------------------------------
    def setup(self, ctx) -> None:
        from kubesloth.trainer.data import CausalLMCollator, ensure_pad_token
        from kubesloth.trainer.engines import loading

        self.ctx = ctx
        hp = ctx.hp
        on_gpu = torch.cuda.is_available()
        tuning = _tuning()
        if on_gpu:
            budget = memory_cap(ctx, tuning)
            self.model, self.tokenizer = loading.load_unsloth(ctx, uses_trl=False)  # its own loop
        else:
            budget = None
            checkpointing = hp.gradient_checkpointing != "false"
            self.model, self.tokenizer = loading.load_transformers(ctx, checkpointing=checkpointing)
        self.model.train()
        pad_id = ensure_pad_token(self.tokenizer)
        self.data = ctx.training_data(self.tokenizer)
        self.probe_ids = self.data.rows[0][0][:32]
        self.collate = CausalLMCollator(pad_id, hp.packing)
        self.batch = merge_batch_semantics(hp.per_device_batch_size, hp.gradient_accumulation_steps)
        self.steps_per_epoch = steps_per_epoch(len(self.data), hp)
        self.total_steps = planned_steps(len(self.data), hp)
        self.plan = fused_plan(ctx, on_gpu, budget, tuning, self.batch)
        ctx.log(self.plan.describe())
        for note in self.plan.notes:
            ctx.log(note)
        if on_gpu and self.plan.uncheckpointed_layers:
            skip_checkpointing(self.model, self.plan.uncheckpointed_layers)
        self.fused = fused_optimizer_for(self.model, hp, self.plan.device, self.plan.placement, self.total_steps)
        self.start_tokens = 0
        self.last_loss = math.nan
        if ctx.resume_from is not None:
            self._resume(ctx.resume_from)

    # --- data ---------------------------------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        """The rows of an epoch in a seeded order; a function of (seed, epoch) only, so resume needs no state."""
        generator = torch.Generator().manual_seed(self.ctx.hp.seed + epoch)
        return torch.randperm(len(self.data), generator=generator).tolist()

    def batches_from(self, step: int) -> Iterator[dict]:
        """The batches of steps step+1, step+2, ... (the last batch of an epoch may be short)."""
        while True:
            epoch, index = divmod(step, self.steps_per_epoch)
            order = self._order(epoch)
            rows = order[index * self.batch:(index + 1) * self.batch]
            yield self.collate([self.data[i] for i in rows])
            step += 1

    # --- checkpoints (the shared layout; the files are fused_loop's) --------------------------------------------
    def _save_checkpoint(self, step: int, tokens_total: int, loss: float):
        meta = {"engine": self.name, "profile": self.ctx.hp.profile, "epoch": step / self.steps_per_epoch,
                "tokens_seen": tokens_total, "loss": loss, "hyperparameters": self.ctx.hp.as_dict(),
                "fused_plan": {"placement": self.plan.placement, "sequences_per_step": self.batch}}
        with self.ctx.checkpoints.writing(step, meta) as folder:
            write_checkpoint_files(folder, self.model, self.fused)
        checkpoint = self.ctx.checkpoints.latest()
        self.ctx.callbacks.on_checkpoint(step, str(checkpoint.path))
        return checkpoint

    def _resume(self, checkpoint) -> None:
        from kubesloth.trainer.errors import BadConfig

        folder = checkpoint.path
        if not has_checkpoint_files(folder):
            raise BadConfig(f"checkpoint {folder} was not written by the fused engine (no optimizer.pt/"
                            "model.safetensors); resume it with the engine that wrote it")
        read_checkpoint_files(folder, self.model, self.fused)
        meta = checkpoint.metadata()
        self.start_tokens = int(meta.get("tokens_seen", 0))
        self.last_loss = float(meta.get("loss", math.nan))
        self.ctx.log(f"fused: resumed model, {len(self.fused.optimizers)} optimizer states, schedule and RNG at "
                     f"step {self.fused.step}")

    # --- train --------------------------------------------------------------------------------------------------
    def train(self):
        from kubesloth.trainer.callbacks import StartEvent
        from kubesloth.trainer.engines.base import TrainResult

        ctx, hp = self.ctx, self.ctx.hp
        start_step = self.fused.step
        if start_step >= self.total_steps:  # resumed at the last step (killed while saving): nothing to train
            return TrainResult(step=start_step, start_step=start_step, total_steps=self.total_steps,
                               epoch=start_step / self.steps_per_epoch, tokens_total=self.start_tokens,
                               tokens_trained=0, final_loss=self.last_loss, train_seconds=0.0,
                               interrupted=False, last_checkpoint=ctx.resume_from)
        start = StartEvent(engine=self.name, profile=hp.profile, total_steps=self.total_steps,
                           start_step=start_step, tokens_seen=self.start_tokens, examples=self.data.examples,
                           rows=len(self.data))
        return run(ctx, start, self.model, self.fused, self.batches_from(start_step), total_steps=self.total_steps,
                   steps_per_epoch=self.steps_per_epoch, last_loss=self.last_loss, save=self._save_checkpoint,
                   device=torch.device("cuda") if self.plan.device == "cuda" else None)
