"""A FineTuneJob spec as a plan request: the budget it names, the fields the user set, and the plan's figures for
status (the operator writes `estimate_status`; the trainer logs `Plan.summary()` from the same plan)."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from kubesloth.api.v1alpha1 import FineTuneJobSpec

from .fit import Plan, PlanRequest, plan
from .gpus import gpu_class
from .memory import GIB, calibration
from .shapes import ModelShape

BUDGET_FIELD = "spec.resources.gpuMemoryGiB"
PRODUCT_FIELD = "spec.resources.gpuProduct"


def budget_for(spec: FineTuneJobSpec, memory_table: Optional[Mapping[str, float]] = None,
               card_bytes: Optional[int] = None) -> tuple[Optional[int], str]:
    """The GPU memory to plan against and the field it came from: resources.gpuMemoryGiB, else the memory of
    resources.gpuProduct (the chart's table), else the card the pod runs on (card_bytes), else unknown."""
    resources = spec.resources
    if resources.gpu_memory_gi_b:
        return int(resources.gpu_memory_gi_b * GIB), BUDGET_FIELD
    gpu = gpu_class(resources.gpu_product, dict(memory_table or {}))
    if gpu is not None and gpu.memory_gib > 0:
        return gpu.memory_bytes, PRODUCT_FIELD
    if card_bytes:
        return card_bytes, "the GPU's memory"
    return None, ""


def request_for(spec: FineTuneJobSpec, shape: ModelShape, budget_bytes: Optional[int],
                budget_source: str) -> PlanRequest:
    training = spec.training
    return PlanRequest(
        shape=shape, seq_len=spec.model.max_seq_length, profile=str(training.profile), budget_bytes=budget_bytes,
        budget_source=budget_source, per_device_batch_size=training.per_device_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        optimizer=None if training.optimizer is None else str(training.optimizer),
        gradient_checkpointing=None if training.gradient_checkpointing is None else str(
            training.gradient_checkpointing),
        max_grad_norm=training.max_grad_norm)


def plan_job(spec: FineTuneJobSpec, shape: ModelShape, memory_table: Optional[Mapping[str, float]] = None,
             card_bytes: Optional[int] = None) -> Plan:
    budget, source = budget_for(spec, memory_table, card_bytes)
    return plan(request_for(spec, shape, budget, source))


def _human(count: Optional[int]) -> Optional[str]:
    if count is None:
        return None
    return f"{count / GIB:.1f}Gi"


def estimate_status(result: Plan, spec: FineTuneJobSpec, shape_note: str,
                    hourly_price: Optional[float] = None, speed_ratio: float = 1.0) -> dict[str, Any]:
    """status.estimate (camelCase, as the CRD declares it)."""
    b, layout = result.breakdown, result.layout
    rate = b.tokens_per_second * speed_ratio if speed_ratio > 0 else None
    eta = None
    if spec.training.max_steps and rate:
        eta = round(spec.training.max_steps * layout.tokens_per_step / rate, 1)
    out: dict[str, Any] = {
        "gpuMemoryBytes": b.device_peak, "gpuMemory": _human(b.device_peak), "torchReservedBytes": b.torch_reserved,
        "hostMemoryBytes": b.host_total, "checkpointBytes": b.checkpoint_bytes,
        "budgetBytes": result.request.budget_bytes, "budgetSource": result.request.budget_source or None,
        "fits": result.fits, "profile": result.profile,
        "plan": {"engine": layout.engine, "placement": layout.placement, "optimizer": layout.optimizer,
                 "checkpointing": layout.checkpointing, "sequencesPerStep": layout.sequences_per_step,
                 "maxSeqLength": layout.seq_len, "uncheckpointedLayers": layout.uncheckpointed_layers,
                 "torchCapBytes": result.torch_cap_bytes},
        "breakdown": {"weightsBytes": b.weights, "optimizerStatesBytes": b.optimizer_states,
                      "activationsBytes": b.activations + b.kept_layer_activations, "gradientsBytes": b.gradients,
                      "streamBuffersBytes": b.stream_buffers, "outsideTorchBytes": b.outside_torch},
        "tokensPerSecond": round(rate, 1) if rate else None, "etaSeconds": eta,
        "dollars": round(eta / 3600 * hourly_price, 2) if eta and hourly_price else None,
        "changes": [{**c.as_dict(), "value": str(c.value)} for c in result.changes] or None,
        "shape": shape_note, "calibration": calibration()["version"],
        "message": result.reason or None,
    }
    return {k: v for k, v in out.items() if v is not None}
