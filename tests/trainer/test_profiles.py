"""Profile resolution is a pure function of the spec and the device."""

from __future__ import annotations

import pytest

from kubesloth.api.v1alpha1 import FineTuneJobSpec
from kubesloth.trainer.profiles import AUTO_LEAN_BELOW_GIB, PRESETS, resolve_hyperparameters, resolve_profile


def spec(training=None, resources=None) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({
        "model": {"source": "file:///m"}, "dataset": {"source": "file:///d.jsonl"},
        "output": {"destination": "file:///o"}, "training": training or {}, "resources": resources or {}})


@pytest.mark.parametrize("requested,gib,on_gpu,expected", [
    ("auto", 48, True, "lean"),
    ("auto", AUTO_LEAN_BELOW_GIB - 0.5, True, "lean"),
    ("auto", AUTO_LEAN_BELOW_GIB, True, "fast"),
    ("auto", 141, True, "fast"),
    ("auto", None, True, "fast"),
    ("auto", 24, False, "custom"),
    ("lean", 141, True, "lean"),
    ("fast", 24, True, "fast"),
    ("custom", None, True, "custom"),
])
def test_resolve_profile(requested, gib, on_gpu, expected):
    assert resolve_profile(requested, gib, on_gpu) == expected


def test_lean_preset_on_gpu_and_spec_fields_kept_elsewhere():
    hp = resolve_hyperparameters(spec({"profile": "lean", "learningRate": 1e-4, "maxSteps": 7}), on_gpu=True)
    lean = PRESETS["lean"]
    assert (hp.optimizer, hp.gradient_checkpointing, hp.per_device_batch_size, hp.gradient_accumulation_steps) == (
        lean["optimizer"], lean["gradient_checkpointing"], lean["per_device_batch_size"],
        lean["gradient_accumulation_steps"])
    assert hp.learning_rate == 1e-4 and hp.max_steps == 7 and hp.profile == "lean"


def test_fast_preset_overrides_explicit_fields_and_says_so():
    fast = PRESETS["fast"]
    explicit = fast["per_device_batch_size"] + 1
    hp = resolve_hyperparameters(spec({"profile": "fast", "perDeviceBatchSize": explicit}), on_gpu=True)
    assert hp.per_device_batch_size == fast["per_device_batch_size"]
    assert hp.optimizer == fast["optimizer"] and hp.gradient_checkpointing == fast["gradient_checkpointing"]
    assert any(f"perDeviceBatchSize={fast['per_device_batch_size']}" in note and f"spec's {explicit}" in note
               and "custom" in note for note in hp.notes)


def test_custom_takes_fields_as_given():
    fields = {"profile": "custom", "perDeviceBatchSize": 3, "gradientAccumulationSteps": 5,
              "optimizer": "adafactor", "gradientCheckpointing": "false", "lrScheduler": "cosine",
              "warmupRatio": 0.2, "weightDecay": 0.1, "maxGradNorm": 0.5, "epochs": 2, "seed": 1, "loggingSteps": 3}
    hp = resolve_hyperparameters(spec(fields), on_gpu=True)
    assert (hp.per_device_batch_size, hp.gradient_accumulation_steps, hp.optimizer, hp.gradient_checkpointing,
            hp.lr_scheduler, hp.warmup_ratio, hp.weight_decay, hp.max_grad_norm, hp.epochs, hp.seed,
            hp.logging_steps) == (3, 5, "adafactor", "false", "cosine", 0.2, 0.1, 0.5, 2, 1, 3)
    assert hp.notes == ()


def test_cpu_maps_gpu_only_choices_with_a_note():
    hp = resolve_hyperparameters(spec({"profile": "lean"}), on_gpu=False)
    assert PRESETS["lean"]["optimizer"] == "paged_adamw_8bit"
    assert hp.optimizer == "adamw_torch" and hp.gradient_checkpointing == "true"
    assert any("paged_adamw_8bit needs a GPU" in note for note in hp.notes)
    # The defaults (paged 8-bit, unsloth checkpointing) under auto on CPU: custom, mapped the same way.
    hp = resolve_hyperparameters(spec(), on_gpu=False)
    assert hp.profile == "custom" and hp.optimizer == "adamw_torch" and hp.gradient_checkpointing == "true"
    assert resolve_hyperparameters(spec({"optimizer": "adamw_torch_fused"}), on_gpu=False).optimizer == \
        "adamw_torch_fused"


def test_auto_on_gpu_explains_its_choice():
    hp = resolve_hyperparameters(spec(resources={"gpuMemoryGiB": 48}), on_gpu=True)
    assert hp.profile == "lean" and hp.requested_profile == "auto"
    assert hp.notes[0].startswith("profile auto -> lean (resources.gpuMemoryGiB=48")
