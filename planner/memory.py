"""The memory and speed model of one training layout: what a step holds on the device, in pinned host memory and
on disk, and how fast it runs. Pure arithmetic over a ModelShape and the constants in calibration.json (each
with the bench rows it was fitted on); no torch, so the operator, the trainer and the CLI share it.

Engines modelled:
- `fused` (the lean/fast/auto profiles on a GPU): one parameter's gradient at a time; 8-bit AdamW states on the
  device, in CUDA managed memory (`paged`: NVML sees them, torch does not) or in pinned host memory streamed per
  tensor (`host`); Unsloth's offloaded checkpointing with `uncheckpointed_layers` layers keeping their activations.
- `unsloth` (profile custom): transformers' Trainer under Unsloth, a full bf16 gradient set, the optimizer as named.
  Fitted on two rows only (docs/benchmarks.md); `calibrated` says so.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from .shapes import ModelShape, eight_bit_state_bytes

GIB = 2**30
CALIBRATION_FILE = Path(__file__).with_name("calibration.json")

PLACEMENTS = ("device", "paged", "host", "torch")  # torch: 32-bit torch AdamW states on the device
# Where each optimizer keeps its states by default (fused engine), and the optimizers it can run.
OPTIMIZER_PLACEMENT = {"adamw_8bit": "device", "paged_adamw_8bit": "paged", "adamw_torch": "torch",
                       "adamw_torch_fused": "torch"}
PLACEMENT_OPTIMIZER = {"device": "adamw_8bit", "paged": "paged_adamw_8bit", "host": "adamw_8bit",
                       "torch": "adamw_torch_fused"}


@lru_cache(maxsize=1)
def calibration() -> dict[str, Any]:
    return json.loads(CALIBRATION_FILE.read_text())


def _value(key: str) -> float:
    entry = calibration()[key]
    return float(entry["value"] if isinstance(entry, dict) else entry)


@dataclass(frozen=True)
class Layout:
    """How a step runs: the decisions a plan makes."""

    engine: str = "fused"  # fused | unsloth
    placement: str = "paged"  # see PLACEMENTS (fused); unsloth: where its optimizer keeps states
    sequences_per_step: int = 8
    seq_len: int = 2048
    uncheckpointed_layers: int = 0
    checkpointing: str = "unsloth"  # unsloth | true | false
    optimizer: str = "paged_adamw_8bit"

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.seq_len


@dataclass(frozen=True)
class Breakdown:
    """Bytes, each part on its own, and the totals the budget is checked against."""

    weights: int
    optimizer_states: int  # wherever they live
    activations: int  # the step's working set with checkpointing (recomputed layer, loss, gradients)
    kept_layer_activations: int  # layers that skip checkpointing
    gradients: int  # unsloth engine: the full bf16 gradient set; fused: 0 (one tensor at a time)
    stream_buffers: int  # host placement: device copies of the states in flight
    outside_torch: int  # CUDA context, kernels, workspaces
    torch_reserved: int  # torch's pool peak (torch.cuda.max_memory_reserved)
    device_peak: int  # what NVML sees: torch's pool + paged states + outside torch
    host_pinned: int  # pinned host memory: host-placed states + offloaded checkpoints
    host_total: int  # the trainer process's host memory, roughly (host_base_bytes + pinned)
    checkpoint_bytes: int  # one resumable checkpoint on disk
    tokens_per_second: float  # on the reference GPU (calibration speed.reference_peak_flops)
    calibrated: bool  # False where the constants were not fitted on this engine/placement

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def optimizer_state_bytes(shape: ModelShape, placement: str) -> int:
    if placement == "torch":
        return 8 * shape.parameters  # two fp32 moments a parameter
    return _eight_bit_states(shape)


@lru_cache(maxsize=256)
def _eight_bit_states(shape: ModelShape) -> int:
    return sum(eight_bit_state_bytes(n) for n in shape.tensor_sizes())


def _activations(shape: ModelShape, tokens: int) -> int:
    act = {**calibration()["activation"], **calibration()["activation"].get("by_model_type", {}).get(
        shape.model_type, {})}
    per_token = 2 * (act["mlp_factor"] * shape.intermediate_size + act["hidden_factor"] * shape.hidden_size)
    return int(per_token * tokens + act["fixed_bytes"])


def kept_layer_bytes(shape: ModelShape, tokens: int) -> int:
    """Device bytes one more uncheckpointed layer costs at this many tokens per step."""
    return int(_value("kept_layer_factor") * shape.layer_activation_per_token() * tokens)


def flops_per_token(shape: ModelShape, seq_len: int, uncheckpointed_layers: int) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward + backward), +2 x decoder parameters of each
    recomputed layer, and causal attention (2 x seq x q-width per layer forward)."""
    layers = shape.num_layers
    recomputed = (layers - min(uncheckpointed_layers, layers)) / layers
    decoder = shape.decoder_parameters
    head = shape.vocab_size * shape.hidden_size
    attention_forward = 2 * seq_len * shape.num_heads * shape.head_dim * layers
    return (6 + 2 * recomputed) * decoder + 6 * head + (3 + recomputed) * attention_forward


def tokens_per_second(shape: ModelShape, layout: Layout, peak_flops: Optional[float] = None) -> float:
    speed = calibration()["speed"]
    peak = peak_flops or float(speed["reference_peak_flops"])
    tokens = layout.tokens_per_step
    efficiency = speed["matmul_efficiency"] * min(1.0, (shape.hidden_size / 4096) ** speed["hidden_exponent"])
    compute = tokens * flops_per_token(shape, layout.seq_len, layout.uncheckpointed_layers) / (peak * efficiency)
    overhead = shape.parameters * speed["step_overhead_seconds_per_parameter"].get(layout.placement, 2.0e-11)
    if layout.engine == "unsloth":
        overhead *= 2  # a separate optimizer pass over the full gradient set
    return tokens / (compute + overhead)


def estimate(shape: ModelShape, layout: Layout) -> Breakdown:
    """The breakdown of one layout (no budget here: fit.py decides what fits)."""
    tokens = layout.tokens_per_step
    weights = 2 * shape.parameters  # bf16
    checkpointing = layout.checkpointing != "false"
    kept = layout.uncheckpointed_layers if checkpointing else shape.num_layers
    kept_bytes = kept * kept_layer_bytes(shape, tokens)
    activations = _activations(shape, tokens)
    outside = int(_value("outside_torch_bytes"))
    offloaded = (shape.num_layers - kept) * tokens * shape.hidden_size * 2 if layout.checkpointing == "unsloth" \
        else 0
    if layout.engine == "unsloth":
        return _estimate_unsloth(shape, layout, weights, activations, kept_bytes, outside, offloaded)
    states = optimizer_state_bytes(shape, layout.placement)
    stream = int(_value("host_stream_buffers") * eight_bit_state_bytes(shape.largest_tensor)) \
        if layout.placement == "host" else 0
    on_device = states if layout.placement in ("device", "torch") else 0
    torch_reserved = weights + on_device + activations + kept_bytes + stream
    device = torch_reserved + (states if layout.placement == "paged" else 0) + outside
    pinned = (states if layout.placement == "host" else 0) + offloaded
    return Breakdown(
        weights=weights, optimizer_states=states, activations=activations, kept_layer_activations=kept_bytes,
        gradients=0, stream_buffers=stream, outside_torch=outside, torch_reserved=torch_reserved,
        device_peak=device, host_pinned=pinned, host_total=int(_value("host_base_bytes")) + pinned,
        checkpoint_bytes=weights + states, tokens_per_second=tokens_per_second(shape, layout),
        calibrated=layout.placement != "torch")


def _estimate_unsloth(shape, layout, weights, activations, kept_bytes, outside, offloaded) -> Breakdown:
    # transformers' Trainer with bitsandbytes keeps the input embedding's states in 32-bit (8B: 17.9 GiB of
    # "8-bit" states, not 15).
    if layout.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        states = optimizer_state_bytes(shape, "device") + 6 * shape.vocab_size * shape.hidden_size
    else:
        states = 8 * shape.parameters
    paged = layout.optimizer.startswith("paged")
    gradients = 2 * shape.parameters
    torch_reserved = weights + gradients + activations + kept_bytes + (0 if paged else states)
    device = torch_reserved + (states if paged else 0) + outside
    return Breakdown(
        weights=weights, optimizer_states=states, activations=activations, kept_layer_activations=kept_bytes,
        gradients=gradients, stream_buffers=0, outside_torch=outside, torch_reserved=torch_reserved,
        device_peak=device, host_pinned=offloaded, host_total=int(_value("host_base_bytes")) + offloaded,
        checkpoint_bytes=weights + states, tokens_per_second=tokens_per_second(shape, layout), calibrated=False)


def checkpoint_write_seconds(checkpoint_bytes: int) -> float:
    """Seconds one checkpoint takes to write at the measured bandwidth (the grace period is built on it)."""
    return checkpoint_bytes / _value("checkpoint_write_bytes_per_second")
