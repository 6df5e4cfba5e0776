"""The memory planner before a Job exists: the model's shape, the plan for the spec's budget, status.estimate and
the Fits condition. A spec that cannot fit is refused here, with the smallest changes that would fit, and nothing
is created (reconcile.py calls `estimate_for` before it creates children).

Where the shape comes from, first match wins (the note in status.estimate.shape says which):
  1. spec.model.architecture (a known shape by name);
  2. the model's config.json where the operator can read it: hf:// through the Hugging Face hub client (cached
     under HF_HOME, honours HF_HUB_OFFLINE; no token: gated repos fall through), pvc://CLAIM/path under the
     operator's volume root (the local control plane sets KUBESLOTH_OPERATOR_VOLUME_ROOT), file:// on the
     operator's own filesystem when the volume root is set (the local control plane: one machine);
  3. a known hub name (meta-llama/Llama-3.1-8B, Qwen/Qwen2.5-7B-Instruct, ...);
  4. otherwise the estimate is deferred to the pod (Fits=Unknown, reason EstimateDeferred): the trainer plans with
     the card it gets.
A config.json the operator reads and cannot use (missing, not JSON, an architecture the planner does not model)
refuses the job, naming spec.model.source.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from kubesloth.api.v1alpha1 import FineTuneJobSpec
from kubesloth.planner import KNOWN_SHAPES, GIB, ModelShape, PlanError, ShapeError, gpu_class, known_shape_for_repo
from kubesloth.planner.jobs import PRODUCT_FIELD, estimate_status, plan_job

from .progress import _prices
from .settings import OperatorSettings

log = logging.getLogger("kubesloth.operator.estimate")
FITS = "Fits"


@dataclass
class Estimate:
    """What the planner said about one generation of a FineTuneJob."""

    status: Optional[dict[str, Any]]  # status.estimate (None: deferred)
    condition: dict[str, Any]  # the Fits condition
    refusal_field: Optional[str] = None  # set: refuse, nothing created
    refusal: Optional[str] = None
    changes: list[dict[str, Any]] = field(default_factory=list)
    budget_bytes: Optional[int] = None  # for the pod, when it came from the operator's GPU table
    parameters: Optional[int] = None


def _hub_config(repo_id: str, revision: Optional[str]) -> Optional[Path]:
    """config.json of a hub repository, downloaded or from the cache; None when it cannot be had."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    try:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision))
    except Exception as err:  # offline, gated, missing, network: the next source is tried
        log.info("config.json of %s not read from the hub: %s", repo_id, str(err).splitlines()[0][:200])
        return None


def resolve_shape(spec: FineTuneJobSpec, settings: OperatorSettings,
                  hub: Callable[[str, Optional[str]], Optional[Path]] = _hub_config
                  ) -> tuple[Optional[ModelShape], str]:
    """(shape or None, where it came from / why not). Raises ShapeError for a config.json that was read and is
    not usable."""
    model = spec.model
    if model.architecture:
        return KNOWN_SHAPES[str(model.architecture)], f"{model.architecture} (spec.model.architecture)"
    source = model.source
    local: Optional[Path] = None
    if source.startswith("pvc://") and settings.volume_root:
        local = Path(settings.volume_root) / source[len("pvc://"):]
    elif source.startswith("file://") and settings.volume_root:
        local = Path(source[len("file://"):])
    if local is not None:
        shape = ModelShape.from_file(local / "config.json")
        return shape, f"{shape.model_type}, {shape.parameters / 1e9:.2f}B parameters (config.json)"
    if source.startswith("hf://"):
        repo, _, revision = source[len("hf://"):].partition("@")
        path = hub(repo, revision or None) if settings.hub_configs else None
        if path is not None:
            shape = ModelShape.from_file(path)
            return shape, f"{shape.model_type}, {shape.parameters / 1e9:.2f}B parameters (config.json from the hub)"
        known = known_shape_for_repo(repo)
        if known is not None:
            return known, f"{known.name} (known shape of {repo})"
        return None, (f"the operator could not read config.json of {repo} (offline, gated or missing) and it is "
                      "not a known shape; set spec.model.architecture to plan before scheduling")
    return None, (f"the operator cannot read {source.split('://')[0]}:// models; set spec.model.architecture to "
                  "plan before scheduling")


def _condition(status: str, reason: str, message: str) -> dict[str, Any]:
    return {"type": FITS, "status": status, "reason": reason, "message": message}


def estimate_for(spec: FineTuneJobSpec, settings: OperatorSettings,
                 hub: Callable[[str, Optional[str]], Optional[Path]] = _hub_config) -> Estimate:
    try:
        shape, note = resolve_shape(spec, settings, hub)
    except ShapeError as err:
        message = f"spec.model.source: {err}"
        return Estimate(None, _condition("False", "ModelConfigUnusable", message), "spec.model.source", message)
    if shape is None:
        return Estimate(None, _condition("Unknown", "EstimateDeferred", f"{note}; the pod plans for its GPU"))
    if spec.resources.gpu_product:
        known = gpu_class(spec.resources.gpu_product)
        if known is not None and known.bf16_tflops == 0:  # a class the planner's table knows lacks bf16
            message = (f"{PRODUCT_FIELD}: {known.product} has no bf16 tensor cores; full fine-tuning runs in bf16 "
                       "(choose another GPU)")
            return Estimate(None, _condition("False", "GpuUnsupported", message), PRODUCT_FIELD, message)
    try:
        plan = plan_job(spec, shape, memory_table=settings.gpu_memory)
    except PlanError as err:
        return Estimate(None, _condition("False", "InvalidSpec", str(err)), err.field, str(err))
    gpu = gpu_class(spec.resources.gpu_product, dict(settings.gpu_memory))
    ratio = gpu.speed_ratio() if gpu is not None and gpu.bf16_tflops else 1.0
    price = _prices().price(spec.resources.gpu_product)  # the chart's table, as status.cost uses it
    status = estimate_status(plan, spec, note, hourly_price=price, speed_ratio=ratio)
    status["parameters"] = shape.parameters
    budget_for_pod = plan.request.budget_bytes if plan.request.budget_source == PRODUCT_FIELD else None
    if plan.fits is None:
        condition = _condition("Unknown", "NoBudget", (
            f"no GPU budget (spec.resources.gpuMemoryGiB or a known gpuProduct): the pod plans for its card; "
            f"the leanest plan needs {plan.breakdown.device_peak / GIB:.1f} GiB"))
    elif plan.fits:
        condition = _condition("True", "Fits", f"{plan.describe()}")
    else:
        advice = "; or ".join(s.message for s in plan.suggestions) or "no change of this spec fits"
        message = f"{plan.reason_field}: {plan.reason}. What fits: {advice}"
        status["suggestions"] = [s.as_dict() for s in plan.suggestions]
        return Estimate(status, _condition("False", "DoesNotFit", message), plan.reason_field, message,
                        parameters=shape.parameters)
    return Estimate(status, condition, changes=status.get("changes") or [], budget_bytes=budget_for_pod,
                    parameters=shape.parameters)

