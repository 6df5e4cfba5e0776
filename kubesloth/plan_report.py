"""`kubesloth plan FILE.yaml`: the memory planner's breakdown for a FineTuneJob, and the same job planned on every
GPU class of the price table (fits?, plan, predicted tokens/s, $ per million tokens, $ for the job) — the GPU
performance-per-dollar comparison as a tool. Pure: the planner's numbers, formatted."""

from __future__ import annotations

from typing import Optional

from kubesloth.api.v1alpha1 import FineTuneJobSpec
from kubesloth.planner import GIB, ModelShape, Plan, PlanError, gpu_classes
from kubesloth.planner.fit import plan as make_plan
from kubesloth.planner.jobs import PRODUCT_FIELD, plan_job, request_for


def _gib(count: Optional[int]) -> str:
    return "-" if count is None else f"{count / GIB:.1f}"


def breakdown_lines(result: Plan) -> list[str]:
    b = result.breakdown
    rows = [("weights (bf16)", b.weights), (f"optimizer states ({result.layout.placement})", b.optimizer_states),
            ("activations", b.activations), ("kept-layer activations", b.kept_layer_activations),
            ("gradients", b.gradients), ("host-state stream buffers", b.stream_buffers),
            ("outside torch (CUDA context, kernels)", b.outside_torch), ("= torch reserved peak", b.torch_reserved),
            ("= device peak (NVML)", b.device_peak), ("pinned host memory", b.host_pinned),
            ("trainer host memory (approx.)", b.host_total), ("one checkpoint on disk", b.checkpoint_bytes)]
    return [f"  {label:<40} {_gib(value):>8} GiB" for label, value in rows]


def job_tokens(spec: FineTuneJobSpec, result: Plan) -> Optional[int]:
    steps = spec.training.max_steps
    return steps * result.layout.tokens_per_step if steps else None


def report(spec: FineTuneJobSpec, shape: ModelShape, shape_note: str) -> str:
    lines = [f"model: {shape_note}; {spec.model.max_seq_length} tokens a sequence, profile {spec.training.profile}"]
    try:
        main = plan_job(spec, shape)
    except PlanError as err:
        return "\n".join(lines + [f"refused: {err}"])
    budget, source = main.request.budget_bytes, main.request.budget_source
    fits = {True: "fits", False: "DOES NOT FIT", None: "no budget set: the leanest plan"}[main.fits]
    lines += [f"budget: {_gib(budget)} GiB ({source or 'none'}): {fits}", f"plan: {main.describe()}"]
    lines += breakdown_lines(main)
    for change in main.changes:
        lines.append(f"  changed: {change.field}={change.value}: {change.planned} ({change.reason})")
    if main.fits is False:
        lines.append(f"why: {main.reason_field}: {main.reason}")
        lines += [f"  fits: {s.message}" for s in main.suggestions]
    tokens = job_tokens(spec, main)
    lines += ["", f"on each GPU class (gpuMemoryGiB = the card's memory; $ from the price table"
                  f"{'' if tokens else '; the job total needs training.maxSteps'}):",
              f"  {'GPU':<24} {'GiB':>6}  {'fits':<5} {'plan':<34} {'tokens/s':>9} {'$/M tokens':>10} {'$ job':>8}"]
    for gpu in sorted(gpu_classes().values(), key=lambda g: -g.memory_gib):
        if gpu.bf16_tflops == 0:
            lines.append(f"  {gpu.product:<24} {gpu.memory_gib:>6.1f}  {'no':<5} {'no bf16 tensor cores':<34}")
            continue
        request = request_for(spec, shape, gpu.memory_bytes, PRODUCT_FIELD)
        try:
            result = make_plan(request, suggest=False)
        except PlanError as err:
            lines.append(f"  {gpu.product:<24} {gpu.memory_gib:>6.1f}  {'no':<5} {str(err)[:34]}")
            continue
        if not result.fits:
            lines.append(f"  {gpu.product:<24} {gpu.memory_gib:>6.1f}  {'no':<5} "
                         f"{'needs ' + _gib(result.breakdown.device_peak) + ' GiB':<34}")
            continue
        layout = result.layout
        kept = f", {layout.uncheckpointed_layers} kept" if layout.uncheckpointed_layers else ""
        plan_text = f"{layout.sequences_per_step}x{layout.seq_len}, {layout.placement}{kept}"
        rate = result.breakdown.tokens_per_second * gpu.speed_ratio()
        per_million = gpu.hourly_price / (rate * 3600) * 1e6 if gpu.hourly_price else None
        total = per_million * tokens / 1e6 if per_million is not None and tokens else None
        lines.append(f"  {gpu.product:<24} {gpu.memory_gib:>6.1f}  {'yes':<5} {plan_text:<34} {rate:>9.0f} "
                     f"{'-' if per_million is None else f'{per_million:.3f}':>10} "
                     f"{'-' if total is None else f'{total:.2f}':>8}")
    lines.append("  (tokens/s: calibrated on the H200, scaled by each class's bf16 rate; see docs/planning.md)")
    return "\n".join(lines)

