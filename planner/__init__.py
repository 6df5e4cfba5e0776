"""kubesloth's memory planner: one model of a training step's memory and speed, shared by the operator (before a
Job exists), the trainer (with the real card) and `kubesloth plan`. Pure Python, no torch (tests/test_layers.py).
"""

from .fit import Change, Plan, PlanError, PlanRequest, Suggestion, plan
from .gpus import GpuClass, gpu_class, gpu_classes
from .memory import GIB, Breakdown, Layout, calibration, checkpoint_write_seconds, estimate
from .shapes import KNOWN_SHAPES, ModelShape, ShapeError, known_shape_for_repo

__all__ = ["Breakdown", "Change", "GIB", "GpuClass", "KNOWN_SHAPES", "Layout", "ModelShape", "Plan", "PlanError",
           "PlanRequest", "ShapeError", "Suggestion", "calibration", "checkpoint_write_seconds", "estimate",
           "gpu_class", "gpu_classes", "known_shape_for_repo", "plan"]
