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
}
GPU_ONLY = {"unsloth"}


def requested_engine() -> str:
    value = (os.environ.get(Env.ENGINE.value) or "auto").strip().lower()
    if value != "auto" and value not in ENGINES:
        raise BadConfig(f"{Env.ENGINE.value}={value!r} is not an engine (allowed: auto, {', '.join(ENGINES)})")
    return value


def choose_engine(requested: str, cuda_available: Optional[Callable[[], bool]] = None) -> str:
    """auto -> unsloth when CUDA is available, else cpu."""
    if cuda_available is None:
        def cuda_available() -> bool:
            import torch
            return torch.cuda.is_available()
    if requested == "auto":
        return "unsloth" if cuda_available() else "cpu"
    if requested in GPU_ONLY and not cuda_available():
        raise BadConfig(f"{Env.ENGINE.value}={requested} needs a CUDA GPU and none is visible")
    return requested


def create_engine(name: str):
    module_name, class_name = ENGINES[name]
    return getattr(importlib.import_module(module_name), class_name)()
