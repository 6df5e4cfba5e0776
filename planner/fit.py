"""Auto-fit: the fastest layout whose device peak stays inside the budget, honouring every field the user set.

A field the user set is a constraint, never a suggestion: the optimizer decides where states may live, a batch
(perDeviceBatchSize x gradientAccumulationSteps) fixes the sequences per step, gradientCheckpointing fixes the
layers kept. What the fused engine runs differently from what a field says (one pass instead of accumulation,
per-parameter clipping, host-placed states) is listed in `Plan.changes`. When nothing fits, `Plan.suggestions`
holds the smallest changes that would, each checked by planning again with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

from .memory import GIB, PLACEMENT_OPTIMIZER, Breakdown, Layout, estimate, kept_layer_bytes
from .shapes import ModelShape

# Kept free below the budget: the plan's predicted device peak stays this far under it, and torch's cap leaves the
# margin to torch as headroom (allocator rounding, prediction error). Layers kept uncheckpointed add one layer's
# activations of headroom: on the H200 (2026-12-01 run1) 8B plans predicted 0.1-0.4 GiB under a cap with no such
# headroom ran two steps at the cap and ran out of memory at the third.
SAFETY_MARGIN_FRACTION = 0.03
SAFETY_MARGIN_MIN_BYTES = GIB // 2
# Sequences per step when the spec leaves the batch to the planner: about 16k tokens (the 8 x 2048 the engine
# was benchmarked at), never more than 8 sequences.
TARGET_TOKENS_PER_STEP = 16384
MAX_PLANNED_SEQUENCES = 8
FUSED_OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "adamw_torch", "adamw_torch_fused")
FUSED_PROFILES = ("auto", "lean", "fast")


class PlanError(ValueError):
    """The request cannot be planned at all (a field the engine cannot honour); `field` names it."""

    def __init__(self, field_path: str, message: str):
        super().__init__(f"{field_path}: {message}")
        self.field = field_path
        self.message = message


@dataclass(frozen=True)
class PlanRequest:
    shape: ModelShape
    seq_len: int
    profile: str = "auto"  # auto | lean | fast | custom
    budget_bytes: Optional[int] = None  # None: unknown here (the pod plans for its card)
    budget_source: str = ""  # which spec field or table gave the budget
    # Fields the user set (None: the planner's to choose).
    per_device_batch_size: Optional[int] = None
    gradient_accumulation_steps: Optional[int] = None
    optimizer: Optional[str] = None
    gradient_checkpointing: Optional[str] = None
    max_grad_norm: float = 0.0


@dataclass(frozen=True)
class Change:
    """A field the run honours differently from its literal meaning, and why (shown in status and an event)."""

    field: str
    value: Any
    planned: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "value": self.value, "planned": self.planned, "reason": self.reason}


@dataclass(frozen=True)
class Suggestion:
    field: str
    value: Any
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "value": self.value, "message": self.message}


@dataclass
class Plan:
    request: PlanRequest
    layout: Layout
    breakdown: Breakdown
    fits: Optional[bool]  # None: no budget known here
    limit_bytes: Optional[int]  # budget less the safety margin: the device peak must stay under it
    reason: str = ""  # why it does not fit
    reason_field: str = ""
    changes: list[Change] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)

    @property
    def profile(self) -> str:
        return self.request.profile

    @property
    def torch_cap_bytes(self) -> Optional[int]:
        """torch's memory cap: the budget less the paged states and what CUDA holds outside torch, so the device
        peak stays inside the budget even when torch uses the margin the plan left it."""
        budget = self.request.budget_bytes
        if budget is None:
            return None
        paged = self.breakdown.optimizer_states if self.layout.placement == "paged" else 0
        return budget - paged - self.breakdown.outside_torch

    def summary(self) -> dict[str, Any]:
        """The plan as the trainer logs it and the operator writes it (same keys on both sides)."""
        b = self.breakdown
        return {
            "profile": self.profile, "engine": self.layout.engine, "placement": self.layout.placement,
            "optimizer": self.layout.optimizer, "checkpointing": self.layout.checkpointing,
            "sequences_per_step": self.layout.sequences_per_step, "seq_len": self.layout.seq_len,
            "uncheckpointed_layers": self.layout.uncheckpointed_layers,
            "budget_bytes": self.request.budget_bytes, "budget_source": self.request.budget_source,
            "torch_cap_bytes": self.torch_cap_bytes, "fits": self.fits,
            "predicted": {"torch_reserved_bytes": b.torch_reserved, "device_bytes": b.device_peak,
                          "host_bytes": b.host_total, "checkpoint_bytes": b.checkpoint_bytes,
                          "tokens_per_second": round(b.tokens_per_second, 1)},
        }

    def describe(self) -> str:
        b = self.breakdown
        gib = lambda n: f"{n / GIB:.1f}"  # noqa: E731
        budget = (f"{gib(self.request.budget_bytes)} GiB ({self.request.budget_source})"
                  if self.request.budget_bytes else "none")
        kept = f", {self.layout.uncheckpointed_layers} layers not checkpointed" \
            if self.layout.uncheckpointed_layers else ""
        return (f"{self.layout.engine} engine, {self.layout.sequences_per_step} x {self.layout.seq_len} tokens a "
                f"step, {self.layout.optimizer} states {self.layout.placement}{kept}; device {gib(b.device_peak)} "
                f"GiB (weights {gib(b.weights)}, states {gib(b.optimizer_states)}, activations "
                f"{gib(b.activations + b.kept_layer_activations)}, stream {gib(b.stream_buffers)}, outside torch "
                f"{gib(b.outside_torch)}), torch reserved {gib(b.torch_reserved)} GiB, budget {budget}, pinned host "
                f"{gib(b.host_pinned)} GiB, checkpoint {gib(b.checkpoint_bytes)} GiB, ~{b.tokens_per_second:.0f} "
                f"tokens/s")


def margin_bytes(budget: int) -> int:
    return max(SAFETY_MARGIN_MIN_BYTES, int(budget * SAFETY_MARGIN_FRACTION))


def planned_sequences(seq_len: int) -> int:
    return max(1, min(MAX_PLANNED_SEQUENCES, TARGET_TOKENS_PER_STEP // seq_len))


def _user_sequences(request: PlanRequest) -> Optional[int]:
    if request.per_device_batch_size is None and request.gradient_accumulation_steps is None:
        return None
    return (request.per_device_batch_size or 1) * (request.gradient_accumulation_steps or 1)


def _placements(request: PlanRequest) -> list[str]:
    optimizer = request.optimizer
    if optimizer is None:
        return ["paged", "host"] if request.profile == "lean" else ["device", "paged", "host"]
    if optimizer not in FUSED_OPTIMIZERS:
        raise PlanError("spec.training.optimizer", f"{optimizer} is not run by profile {request.profile} (the fused "
                        f"engine runs {', '.join(FUSED_OPTIMIZERS)}); use profile custom for {optimizer}")
    return {"adamw_8bit": ["device", "host"], "paged_adamw_8bit": ["paged", "host"]}.get(optimizer, ["torch"])


def _kept_range(request: PlanRequest) -> tuple[str, list[int]]:
    layers = request.shape.num_layers
    mode = request.gradient_checkpointing
    if mode == "false":
        return "false", [layers]
    if mode is not None or request.profile == "lean":
        return mode or "unsloth", [0]
    return "unsloth", list(range(layers, -1, -1))


def _candidates(request: PlanRequest) -> list[Layout]:
    user = _user_sequences(request)
    top = planned_sequences(request.seq_len)
    sequences = [user] if user else sorted({max(1, top >> i) for i in range(4)}, reverse=True)
    checkpointing, kept = _kept_range(request)
    layouts = []
    for placement in _placements(request):
        optimizer = request.optimizer or PLACEMENT_OPTIMIZER[placement]
        for count in sequences:
            for k in kept:
                layouts.append(Layout("fused", placement, count, request.seq_len, k, checkpointing, optimizer))
    return layouts


def _custom_layout(request: PlanRequest) -> Layout:
    return Layout("unsloth", "paged" if (request.optimizer or "paged_adamw_8bit").startswith("paged") else "device",
                  request.per_device_batch_size or 1, request.seq_len, 0,
                  request.gradient_checkpointing or "unsloth", request.optimizer or "paged_adamw_8bit")


def plan(request: PlanRequest, suggest: bool = True) -> Plan:
    """The plan for a request; raises PlanError for a field no plan can honour."""
    budget = request.budget_bytes
    limit = budget - margin_bytes(budget) if budget else None
    if request.profile == "custom":
        layout = _custom_layout(request)
        breakdown = estimate(request.shape, layout)
        result = Plan(request, layout, breakdown, None if limit is None else breakdown.device_peak <= limit, limit)
    else:
        scored = [(layout, estimate(request.shape, layout)) for layout in _candidates(request)]
        fitting = [(l, b) for l, b in scored if limit is None or _peak_with_headroom(request, l, b) <= limit]
        if limit is None:
            # No budget known here: report the leanest layout (what the job needs at least); the pod plans for
            # its own card.
            layout, breakdown = min(scored, key=lambda lb: (lb[1].device_peak, -lb[1].tokens_per_second))
            result = Plan(request, layout, breakdown, None, None)
        elif fitting:
            # The most sequences per step that fit (the planned batch is given up only as far as needed), then
            # the fastest layout at that batch.
            most = max(l.sequences_per_step for l, _ in fitting)
            layout, breakdown = max(((l, b) for l, b in fitting if l.sequences_per_step == most),
                                    key=lambda lb: (lb[1].tokens_per_second, -lb[1].device_peak))
            result = Plan(request, layout, breakdown, True, limit)
        else:
            layout, breakdown = min(scored, key=lambda lb: lb[1].device_peak)
            result = Plan(request, layout, breakdown, False, limit)
        result.changes = _changes(request, layout)
    if result.fits is False:
        result.reason_field, result.reason = _why_not(request, result)
        if suggest:
            result.suggestions = suggestions(request)
    return result


def _peak_with_headroom(request: PlanRequest, layout: Layout, breakdown: Breakdown) -> int:
    if not layout.uncheckpointed_layers:
        return breakdown.device_peak
    return breakdown.device_peak + kept_layer_bytes(request.shape, layout.tokens_per_step)


def _changes(request: PlanRequest, layout: Layout) -> list[Change]:
    changes = []
    accumulation = request.gradient_accumulation_steps
    if accumulation and accumulation > 1:
        changes.append(Change(
            "spec.training.gradientAccumulationSteps", accumulation,
            f"{layout.sequences_per_step} sequences in one forward/backward per step",
            "the fused engine steps the optimizer inside backward and cannot accumulate; one pass over the same "
            "sequences gives the same tokens per step and token-mean loss"))
    if request.optimizer and layout.placement == "host" and request.optimizer == "paged_adamw_8bit":
        changes.append(Change("spec.training.optimizer", request.optimizer, "8-bit AdamW states in pinned host "
                              "memory, streamed per tensor", "the paged states do not fit beside the weights "
                              "in the budget; host-placed states are the same 8-bit AdamW"))
    if request.optimizer == "adamw_8bit" and layout.placement == "host":
        changes.append(Change("spec.training.optimizer", request.optimizer, "8-bit AdamW states in pinned host "
                              "memory, streamed per tensor", "the states do not fit on the device in the budget"))
    if request.max_grad_norm > 0:
        changes.append(Change("spec.training.maxGradNorm", request.max_grad_norm, "each parameter's gradient "
                              "clipped to this norm on its own", "the global norm is known only after backward, "
                              "when the fused steps have consumed the gradients"))
    return changes


def _why_not(request: PlanRequest, result: Plan) -> tuple[str, str]:
    gib = lambda n: f"{n / GIB:.1f} GiB"  # noqa: E731
    b = result.breakdown
    budget = request.budget_bytes or 0
    floor = b.weights + b.outside_torch
    field_path = request.budget_source or "spec.resources.gpuMemoryGiB"
    if budget < floor:
        return field_path, (f"the budget ({gib(budget)}) is below the model's bf16 weights ({gib(b.weights)}) plus "
                            f"what CUDA holds outside torch ({gib(b.outside_torch)})")
    layout = result.layout
    return field_path, (f"the leanest layout this spec allows ({layout.sequences_per_step} x {layout.seq_len} tokens "
                        f"a step, {layout.optimizer} states {layout.placement}) needs {gib(b.device_peak)} on the "
                        f"device; the budget is {gib(budget)} with a {gib(budget - result.limit_bytes)} margin")


def _fits(request: PlanRequest) -> Optional[Plan]:
    try:
        candidate = plan(request, suggest=False)
    except PlanError:
        return None
    return candidate if candidate.fits else None


def suggestions(request: PlanRequest) -> list[Suggestion]:
    """The smallest changes that make the request fit, each verified by planning with it."""
    found: list[Suggestion] = []
    # A shorter maxSeqLength (the largest that fits; multiples of 256 from 512 up). With the batch left to the
    # planner a shorter sequence only means more of them a step: then one sequence a step is part of the change.
    for fixed in ([{}] if _user_sequences(request) else [{}, {"per_device_batch_size": 1,
                                                             "gradient_accumulation_steps": 1}]):
        best = _longest_fitting_seq(replace(request, **fixed))
        if best:
            extra = " with perDeviceBatchSize: 1" if fixed else ""
            found.append(Suggestion("spec.model.maxSeqLength", best, f"spec.model.maxSeqLength: {best}{extra} fits"))
            break
    # Fewer sequences per step, where the user set the batch.
    user = _user_sequences(request)
    if user and user > 1:
        for count in range(user - 1, 0, -1):
            if _fits(replace(request, per_device_batch_size=count, gradient_accumulation_steps=1)):
                found.append(Suggestion("spec.training.perDeviceBatchSize", count,
                                        f"perDeviceBatchSize: {count} with gradientAccumulationSteps: 1 fits"))
                break
    # An optimizer whose states can leave the device.
    if request.optimizer in ("adamw_torch", "adamw_torch_fused") and request.profile != "custom":
        if _fits(replace(request, optimizer="adamw_8bit")):
            found.append(Suggestion("spec.training.optimizer", "adamw_8bit", "optimizer: adamw_8bit (8-bit states, "
                                    "streamed from host memory when needed) fits"))
    if request.profile == "custom":
        if _fits(replace(request, profile="auto", optimizer=None, gradient_checkpointing=None,
                         per_device_batch_size=None, gradient_accumulation_steps=None)):
            found.append(Suggestion("spec.training.profile", "auto", "profile: auto (the fused engine, planned to "
                                    "the budget) fits"))
    # A bigger budget: the least the leanest allowed layout needs.
    needed = _least_budget(request)
    if needed:
        found.append(Suggestion("spec.resources.gpuMemoryGiB", needed, f"a GPU budget of {needed} GiB fits"))
    return found


def _longest_fitting_seq(request: PlanRequest) -> Optional[int]:
    low, high, best = 16, request.seq_len - 1, None
    while low <= high:
        mid = (low + high) // 2
        seq = mid - mid % 256 if mid >= 512 else mid
        if _fits(replace(request, seq_len=seq)):
            best, low = seq, mid + 1
        else:
            high = mid - 1
    return best


def _least_budget(request: PlanRequest) -> Optional[int]:
    """The smallest whole GiB budget that fits (fitting only grows with the budget: a bisection)."""
    def fits(gib: int) -> bool:
        return _fits(replace(request, budget_bytes=gib * GIB, budget_source="spec.resources.gpuMemoryGiB")) is not None

    low, high = 1, 4096
    if not fits(high):
        return None
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid + 1, high)
    return low
