"""Decide once: the spec, the model's shape, the budget and the device become one `Run` (the plan and the
hyperparameters every engine trains with). Nothing else resolves profiles, batches or optimizers.

The memory planner (kubesloth.planner) chooses what the spec leaves open (sequences per step, where optimizer
states live, layers kept uncheckpointed) and honours what it sets; the operator ran the same planner with the same
inputs before the pod was scheduled. On CPU the GPU-only choices are mapped (bitsandbytes optimizers ->
adamw_torch, Unsloth's offloaded checkpointing -> plain checkpointing) and each mapping is a note in the log.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from kubesloth.api.v1alpha1 import FineTuneJobSpec
from kubesloth.planner import ModelShape, Plan

# Engines: auto/lean/fast run the fused engine on a GPU (optimizer step inside backward); custom runs the
# transformers Trainer under Unsloth; without a GPU everything runs on the cpu engine.
FUSED_PROFILES = frozenset({"auto", "lean", "fast"})
# What profile custom takes for fields the spec leaves unset (the Unsloth article's settings).
CUSTOM_DEFAULTS = {"per_device_batch_size": 1, "gradient_accumulation_steps": 4, "optimizer": "paged_adamw_8bit",
                   "gradient_checkpointing": "unsloth"}
# On CPU: bitsandbytes' 8-bit / paged optimizers need a GPU; Unsloth's offloaded checkpointing is GPU-only.
CPU_OPTIMIZER_MAP = {"paged_adamw_8bit": "adamw_torch", "adamw_8bit": "adamw_torch",
                     "paged_adamw_32bit": "adamw_torch"}
CPU_CHECKPOINTING_MAP = {"unsloth": "true"}


@dataclass(frozen=True)
class Hyperparameters:
    """Everything an engine needs to train, after the plan and the device are taken into account."""

    profile: str  # auto | lean | fast | custom (as the spec says: the plan says what it chose)
    requested_profile: str
    per_device_batch_size: int
    gradient_accumulation_steps: int
    optimizer: str
    gradient_checkpointing: str  # unsloth | true | false
    learning_rate: float
    lr_scheduler: str
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    epochs: int
    max_steps: Optional[int]
    seed: int
    logging_steps: int
    max_seq_length: int
    packing: bool
    notes: tuple[str, ...] = field(default=())  # what was mapped, for the log

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("notes")
        return data


def hyperparameters(spec: FineTuneJobSpec, plan: Optional[Plan], on_gpu: bool) -> Hyperparameters:
    """The engine's hyperparameters: from the plan's layout under auto/lean/fast, from the spec (with
    CUSTOM_DEFAULTS) under custom or without a plan."""
    training = spec.training
    profile = str(training.profile)
    notes: list[str] = []
    if plan is not None and profile in FUSED_PROFILES:
        layout = plan.layout
        chosen = {"per_device_batch_size": layout.sequences_per_step, "gradient_accumulation_steps": 1,
                  "optimizer": layout.optimizer, "gradient_checkpointing": layout.checkpointing}
    else:
        chosen = {name: (getattr(training, name) if getattr(training, name) is not None else default)
                  for name, default in CUSTOM_DEFAULTS.items()}
    if not on_gpu:
        optimizer = CPU_OPTIMIZER_MAP.get(chosen["optimizer"])
        if optimizer:
            notes.append(f"optimizer {chosen['optimizer']} needs a GPU (bitsandbytes): using {optimizer} on CPU")
            chosen["optimizer"] = optimizer
        checkpointing = CPU_CHECKPOINTING_MAP.get(chosen["gradient_checkpointing"])
        if checkpointing:
            notes.append(f"gradientCheckpointing {chosen['gradient_checkpointing']} is GPU-only: using "
                         f"{checkpointing} (plain activation checkpointing) on CPU")
            chosen["gradient_checkpointing"] = checkpointing
    return Hyperparameters(
        profile=profile, requested_profile=profile,
        per_device_batch_size=int(chosen["per_device_batch_size"]),
        gradient_accumulation_steps=int(chosen["gradient_accumulation_steps"]),
        optimizer=str(chosen["optimizer"]), gradient_checkpointing=str(chosen["gradient_checkpointing"]),
        learning_rate=training.learning_rate, lr_scheduler=str(training.lr_scheduler),
        warmup_ratio=training.warmup_ratio, weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm, epochs=training.epochs, max_steps=training.max_steps,
        seed=training.seed, logging_steps=training.logging_steps, max_seq_length=spec.model.max_seq_length,
        packing=spec.dataset.packing, notes=tuple(notes))


@dataclass(frozen=True)
class Run:
    """The one decision every engine consumes."""

    engine: str
    plan: Optional[Plan]  # None: the model's shape is not one the planner models (custom/cpu only)
    hp: Hyperparameters


def resolve_run(spec: FineTuneJobSpec, shape: Optional[ModelShape], engine: str, on_gpu: bool,
                budget_bytes: Optional[int] = None, card_free_bytes: Optional[int] = None) -> Run:
    """Plan the job (budget: `budget_bytes` when the operator passed one from its GPU table, else the spec's,
    else the card's free memory) and derive the hyperparameters. A budget above what the card has free is planned
    against the free memory instead (paged states must never ask for more managed memory than is free)."""
    from dataclasses import replace

    from kubesloth.planner.fit import plan as make_plan
    from kubesloth.planner.jobs import PRODUCT_FIELD, budget_for, request_for

    plan = None
    notes: list[str] = []
    if shape is not None:
        if budget_bytes:
            request = request_for(spec, shape, budget_bytes, PRODUCT_FIELD)
        else:
            request = request_for(spec, shape, *budget_for(spec, card_bytes=card_free_bytes))
        if card_free_bytes and request.budget_bytes and card_free_bytes < request.budget_bytes:
            notes.append(f"the GPU has {card_free_bytes / 2**30:.1f} GiB free, less than the budget "
                         f"({request.budget_bytes / 2**30:.1f} GiB, {request.budget_source}): planned against "
                         "the free memory")
            request = replace(request, budget_bytes=card_free_bytes,
                              budget_source=f"{request.budget_source} (capped at the GPU's free memory)")
        plan = make_plan(request)
    hp = hyperparameters(spec, plan, on_gpu)
    return Run(engine=engine, plan=plan, hp=replace(hp, notes=tuple(notes) + hp.notes))
