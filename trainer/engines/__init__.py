"""Engines: one module each, chosen by name. Importing this package imports no torch and no unsloth; an engine's
module is imported only when that engine runs (unsloth must be imported before transformers/trl, in its own
process)."""

from __future__ import annotations

import importlib
import os
from typing import Callable, Optional

from kubesloth.api.contract import Env
from kubesloth.trainer.errors import BadConfig

# name -> (module, class). A GPU-only engine is refused on a machine without CUDA.
ENGINES = {
    "cpu": ("kubesloth.trainer.engines.cpu", "CpuEngine"),
    "unsloth": ("kubesloth.trainer.engines.unsloth", "UnslothEngine"),
    "fused": ("kubesloth.trainer.engines.fused", "FusedEngine"),
}
GPU_ONLY = {"unsloth"}
# Engines that run on either device and take the GPU when one is visible (fused: CI tests its loop on CPU).
EITHER_DEVICE = {"fused"}
# On a GPU these profiles run on the fused engine (optimizer step inside backward; docs/benchmarks.md).
FUSED_PROFILES = {"auto", "lean", "fast"}


def requested_engine() -> str:
    value = (os.environ.get(Env.ENGINE.value) or "auto").strip().lower()
    if value != "auto" and value not in ENGINES:
        raise BadConfig(f"{Env.ENGINE.value}={value!r} is not an engine (allowed: auto, {', '.join(ENGINES)})")
    return value


def _torch_cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def choose_engine(requested: str, cuda_available: Optional[Callable[[], bool]] = None,
                  profile: Optional[str] = None) -> str:
    """auto -> on a GPU: fused for the auto/lean/fast profiles, else (custom) unsloth; without one: cpu."""
    cuda_available = cuda_available or _torch_cuda_available
    if requested == "auto":
        if not cuda_available():
            return "cpu"
        return "fused" if profile in FUSED_PROFILES else "unsloth"
    if requested in GPU_ONLY and not cuda_available():
        raise BadConfig(f"{Env.ENGINE.value}={requested} needs a CUDA GPU and none is visible")
    return requested


def runs_on_gpu(name: str, cuda_available: Optional[Callable[[], bool]] = None) -> bool:
    """Whether this engine will train on the GPU (decides the CPU mapping of GPU-only settings)."""
    return name in GPU_ONLY or (name in EITHER_DEVICE and (cuda_available or _torch_cuda_available)())


def create_engine(name: str):
    module_name, class_name = ENGINES[name]
    return getattr(importlib.import_module(module_name), class_name)()
