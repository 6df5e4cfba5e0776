"""GPU classes: memory (the budget when a spec names only resources.gpuProduct), bf16 rate and an example price.
planner/gpus.json is the table; the chart's values.yaml carries the same numbers (a test keeps them equal)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

from .memory import calibration

GPUS_FILE = Path(__file__).with_name("gpus.json")


@dataclass(frozen=True)
class GpuClass:
    product: str  # the node label nvidia.com/gpu.product
    memory_gib: float
    bf16_tflops: float  # data-sheet dense rate; 0: no bf16 tensor cores (full fine-tuning in bf16 is refused)
    hourly_price: float

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    @property
    def effective_peak_flops(self) -> float:
        """The data-sheet rate scaled by what was measured against it on the H200 (790 of 989 TFLOP/s): the
        speed model's efficiency was fitted at that measured rate."""
        measured = gpu_table_raw()["measuredOn"]["NVIDIA-H200"]["bf16Tflops"]
        return self.bf16_tflops * 1e12 * measured / gpu_table_raw()["gpus"]["NVIDIA-H200"]["bf16Tflops"]

    def speed_ratio(self) -> float:
        """Tokens/s on this class relative to the calibration's reference GPU."""
        return self.effective_peak_flops / float(calibration()["speed"]["reference_peak_flops"])


@lru_cache(maxsize=1)
def gpu_table_raw() -> dict:
    return json.loads(GPUS_FILE.read_text())


def gpu_classes() -> dict[str, GpuClass]:
    return {name: GpuClass(name, float(v["memoryGiB"]), float(v["bf16Tflops"]), float(v["hourlyPrice"]))
            for name, v in gpu_table_raw()["gpus"].items()}


def gpu_class(product: Optional[str], memory_table: Optional[dict[str, float]] = None) -> Optional[GpuClass]:
    """The class of a node-label product (case-insensitive); memory_table (the chart's) overrides memory."""
    if not product:
        return None
    for name, gpu in gpu_classes().items():
        if name.lower() == product.lower():
            if memory_table:
                memory = {k.lower(): v for k, v in memory_table.items()}.get(name.lower())
                if memory:
                    return GpuClass(name, float(memory), gpu.bf16_tflops, gpu.hourly_price)
            return gpu
    if memory_table:
        memory = {k.lower(): v for k, v in memory_table.items()}.get(product.lower())
        if memory:
            return GpuClass(product, float(memory), 0.0, 0.0)
    return None
