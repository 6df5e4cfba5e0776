"""Training profiles: named presets of the settings that trade memory for speed, resolved by a pure function.

Tune the presets here; nothing else hard-codes them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from kubesloth.api.v1alpha1 import FineTuneJobSpec

# The fields a preset decides. Values are spec (wire) values.
PRESETS: dict[str, dict[str, Any]] = {
    # On a GPU both run on the fused engine (optimizer step inside backward, no accumulation: 8 sequences a
    # step); measured in docs/benchmarks.md.
    # The memory-lean setting: 8-bit paged AdamW per parameter, Unsloth's offloaded checkpointing; with a
    # resources.gpuMemoryGiB too small for the states beside the weights they stream from pinned host memory.
    "lean": {"optimizer": "paged_adamw_8bit", "gradient_checkpointing": "unsloth",
             "per_device_batch_size": 8, "gradient_accumulation_steps": 1},
    # Throughput within the budget: 8-bit AdamW states in plain device memory, and as many decoder layers as fit
    # keep their activations instead of recomputing them (the fused engine decides the count).
    "fast": {"optimizer": "adamw_8bit", "gradient_checkpointing": "unsloth",
             "per_device_batch_size": 8, "gradient_accumulation_steps": 1},
}
# profile auto picks lean when the GPU budget (resources.gpuMemoryGiB) is below this, else fast.
AUTO_LEAN_BELOW_GIB = 80.0

# On CPU: bitsandbytes' 8-bit / paged optimizers need a GPU; Unsloth's offloaded checkpointing is GPU-only.
CPU_OPTIMIZER_MAP = {"paged_adamw_8bit": "adamw_torch", "adamw_8bit": "adamw_torch",
                     "paged_adamw_32bit": "adamw_torch"}
CPU_CHECKPOINTING_MAP = {"unsloth": "true"}

_SPEC_NAMES = {"per_device_batch_size": "perDeviceBatchSize",
               "gradient_accumulation_steps": "gradientAccumulationSteps",
               "optimizer": "optimizer", "gradient_checkpointing": "gradientCheckpointing"}


@dataclass(frozen=True)
class Hyperparameters:
    """Everything an engine needs to train, after the profile and the device are taken into account."""

    profile: str  # the resolved profile: lean | fast | custom
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
    notes: tuple[str, ...] = field(default=())  # what was mapped or overridden, for the log

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("notes")
        return data


def resolve_profile(requested: str, gpu_memory_gib: Optional[float], on_gpu: bool) -> str:
    """auto -> lean below AUTO_LEAN_BELOW_GIB of GPU budget, else fast; on CPU auto means custom."""
    if requested != "auto":
        return requested
    if not on_gpu:
        return "custom"
    if gpu_memory_gib is not None and gpu_memory_gib < AUTO_LEAN_BELOW_GIB:
        return "lean"
    return "fast"


def resolve_hyperparameters(spec: FineTuneJobSpec, on_gpu: bool) -> Hyperparameters:
    training = spec.training
    requested = str(training.profile)
    profile = resolve_profile(requested, spec.resources.gpu_memory_gi_b, on_gpu)
    notes: list[str] = []
    if requested == "auto":
        budget = spec.resources.gpu_memory_gi_b
        why = ("no GPU: the spec's fields are used as given" if not on_gpu else
               f"resources.gpuMemoryGiB={budget} < {AUTO_LEAN_BELOW_GIB:g}" if profile == "lean" else
               f"resources.gpuMemoryGiB={budget}, not below {AUTO_LEAN_BELOW_GIB:g}")
        notes.append(f"profile auto -> {profile} ({why})")
    chosen = {name: getattr(training, name) for name in _SPEC_NAMES}
    for name, value in PRESETS.get(profile, {}).items():
        if name in training.model_fields_set and chosen[name] != value:
            notes.append(f"profile {profile} sets {_SPEC_NAMES[name]}={value} (the spec's {chosen[name]} is "
                         f"used only with profile custom)")
        chosen[name] = value
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
        profile=profile,
        requested_profile=requested,
        per_device_batch_size=chosen["per_device_batch_size"],
        gradient_accumulation_steps=chosen["gradient_accumulation_steps"],
        optimizer=str(chosen["optimizer"]),
        gradient_checkpointing=str(chosen["gradient_checkpointing"]),
        learning_rate=training.learning_rate,
        lr_scheduler=str(training.lr_scheduler),
        warmup_ratio=training.warmup_ratio,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        epochs=training.epochs,
        max_steps=training.max_steps,
        seed=training.seed,
        logging_steps=training.logging_steps,
        max_seq_length=spec.model.max_seq_length,
        packing=spec.dataset.packing,
        notes=tuple(notes),
    )
