"""Decide once: the spec + shape + budget + device -> one Run (plan and hyperparameters), a pure function."""

from __future__ import annotations

import pytest

from kubesloth.api.v1alpha1 import FineTuneJobSpec
from kubesloth.planner import GIB, KNOWN_SHAPES
from kubesloth.trainer.profiles import CUSTOM_DEFAULTS, hyperparameters, resolve_run

LLAMA_8B = KNOWN_SHAPES["llama-3.1-8b"]


def spec(training=None, resources=None, seq=2048) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({
        "model": {"source": "file:///m", "maxSeqLength": seq}, "dataset": {"source": "file:///d.jsonl"},
        "output": {"destination": "file:///o"}, "training": training or {}, "resources": resources or {}})


def test_the_engine_trains_the_plans_layout():
    run = resolve_run(spec({"learningRate": 1e-4, "maxSteps": 7}, {"gpuMemoryGiB": 24}, seq=8192), LLAMA_8B,
                      "fused", on_gpu=True)
    layout = run.plan.layout
    assert (layout.placement, layout.sequences_per_step) == ("host", 2)
    hp = run.hp
    assert (hp.per_device_batch_size, hp.gradient_accumulation_steps, hp.optimizer) == (2, 1, "adamw_8bit")
    assert hp.learning_rate == 1e-4 and hp.max_steps == 7 and hp.profile == "auto"


def test_a_set_batch_is_kept_as_sequences_per_step():
    run = resolve_run(spec({"profile": "lean", "perDeviceBatchSize": 2, "gradientAccumulationSteps": 3},
                           {"gpuMemoryGiB": 80}), LLAMA_8B, "fused", on_gpu=True)
    assert run.plan.layout.sequences_per_step == 6 and run.hp.per_device_batch_size == 6
    assert [c.field for c in run.plan.changes if "Accumulation" in c.field] == \
        ["spec.training.gradientAccumulationSteps"]


def test_custom_takes_fields_as_given_and_defaults_the_rest():
    fields = {"profile": "custom", "perDeviceBatchSize": 3, "gradientAccumulationSteps": 5,
              "optimizer": "adafactor", "gradientCheckpointing": "false", "lrScheduler": "cosine",
              "warmupRatio": 0.2, "weightDecay": 0.1, "maxGradNorm": 0.5, "epochs": 2, "seed": 1, "loggingSteps": 3}
    hp = resolve_run(spec(fields), LLAMA_8B, "unsloth", on_gpu=True).hp
    assert (hp.per_device_batch_size, hp.gradient_accumulation_steps, hp.optimizer, hp.gradient_checkpointing,
            hp.lr_scheduler, hp.warmup_ratio, hp.weight_decay, hp.max_grad_norm, hp.epochs, hp.seed,
            hp.logging_steps) == (3, 5, "adafactor", "false", "cosine", 0.2, 0.1, 0.5, 2, 1, 3)
    assert hp.notes == ()
    defaults = hyperparameters(spec({"profile": "custom"}), None, on_gpu=True)
    assert (defaults.per_device_batch_size, defaults.gradient_accumulation_steps, defaults.optimizer,
            defaults.gradient_checkpointing) == tuple(CUSTOM_DEFAULTS.values())


def test_cpu_maps_gpu_only_choices_with_a_note():
    hp = resolve_run(spec({"profile": "lean"}), LLAMA_8B, "cpu", on_gpu=False).hp
    assert hp.optimizer == "adamw_torch" and hp.gradient_checkpointing == "true"
    # No budget here: lean's leanest layout (host-placed 8-bit states), mapped to torch AdamW on CPU.
    assert any("adamw_8bit needs a GPU (bitsandbytes): using adamw_torch on CPU" in note for note in hp.notes)
    assert resolve_run(spec({"profile": "custom", "optimizer": "adamw_torch_fused"}), None, "cpu",
                       on_gpu=False).hp.optimizer == "adamw_torch_fused"


def test_a_card_with_less_free_memory_than_the_budget_is_planned_as_it_is():
    run = resolve_run(spec(resources={"gpuMemoryGiB": 80}), LLAMA_8B, "fused", on_gpu=True,
                      card_free_bytes=30 * GIB)
    assert run.plan.request.budget_bytes == 30 * GIB and run.plan.fits
    assert any("30.0 GiB free" in note for note in run.hp.notes)


def test_no_budget_on_a_gpu_plans_for_the_cards_free_memory():
    run = resolve_run(spec(), LLAMA_8B, "fused", on_gpu=True, card_free_bytes=int(139 * GIB))
    assert run.plan.fits and run.plan.request.budget_source == "the GPU's memory"
    assert run.plan.layout.placement == "device" and run.plan.layout.uncheckpointed_layers > 0


@pytest.mark.parametrize("operator_budget", [48 * GIB])
def test_the_operators_table_budget_wins_over_the_card(operator_budget):
    run = resolve_run(spec(resources={"gpuProduct": "NVIDIA-L40S"}), LLAMA_8B, "fused", on_gpu=True,
                      budget_bytes=operator_budget, card_free_bytes=int(139 * GIB))
    assert run.plan.request.budget_bytes == operator_budget
    assert run.plan.request.budget_source == "spec.resources.gpuProduct"


def test_the_allocator_settings_are_set_before_cuda_first_initialises(monkeypatch):
    """torch reads PYTORCH_ALLOC_CONF once, when CUDA initialises; the free-memory probe is the trainer's first
    CUDA call (before Unsloth's import sets it), so the probe must set it (without: 1.1 GiB more reserved on the
    H200's lean 8B row)."""
    import torch

    from kubesloth.trainer import main

    seen = {}
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda *a: (seen.setdefault("conf", __import__("os").environ.get("PYTORCH_ALLOC_CONF")),
                                    (5 << 30, 8 << 30))[1])
    assert main.card_free_bytes() == 5 << 30
    assert seen["conf"] == "expandable_segments:True"


def test_a_users_allocator_settings_are_kept(monkeypatch):
    import torch

    from kubesloth.trainer import main

    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:512")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (1, 2))
    main.card_free_bytes()
    assert __import__("os").environ["PYTORCH_ALLOC_CONF"] == "max_split_size_mb:512"
