"""The planner's rules, as pure functions: set fields are honoured or refused with the field named, unset ones are
chosen to fit, every suggestion fits when applied, and the shapes and GPU tables agree with their other copies."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from kubesloth.api.v1alpha1 import ModelArchitecture
from kubesloth.planner import GIB, KNOWN_SHAPES, ModelShape, PlanError, PlanRequest, ShapeError, gpu_classes, plan
from kubesloth.planner.fit import planned_sequences

ROOT = Path(__file__).resolve().parents[2]
LLAMA_8B = KNOWN_SHAPES["llama-3.1-8b"]
QWEN_7B = KNOWN_SHAPES["qwen2.5-7b"]


def request(shape=LLAMA_8B, seq=2048, budget=None, **fields) -> PlanRequest:
    return PlanRequest(shape, seq, fields.pop("profile", "auto"), budget * GIB if budget else None,
                       "spec.resources.gpuMemoryGiB", **fields)


def test_unset_batch_is_about_16k_tokens_a_step():
    assert [planned_sequences(seq) for seq in (128, 2048, 4096, 8192, 16384, 32768)] == [8, 8, 4, 2, 1, 1]
    assert plan(request(seq=8192, budget=24)).layout.sequences_per_step == 2


def test_long_context_on_24_gib_fits_with_host_states_inside_the_budget():
    for seq, count in ((8192, 2), (16384, 1)):
        result = plan(request(seq=seq, budget=24))
        assert result.fits and result.layout.placement == "host" and result.layout.sequences_per_step == count
        assert result.breakdown.device_peak <= 24 * GIB - result.request.budget_bytes * 0.03
        assert result.torch_cap_bytes + result.breakdown.outside_torch <= 24 * GIB


def test_paged_states_count_against_the_budget():
    # The 48 GiB / 16384 case that once peaked at 57.2 GiB: paged states beside a torch cap of the whole budget.
    result = plan(request(seq=16384, budget=48, optimizer="paged_adamw_8bit",
                          per_device_batch_size=8, gradient_accumulation_steps=1))
    # Paged states (15.2 GiB) beside 8 x 16384 tokens of activations do not fit 48 GiB: the states go to host
    # memory, listed as a change of spec.training.optimizer.
    assert result.fits and result.layout.placement == "host"
    assert any(c.field == "spec.training.optimizer" for c in result.changes)
    fitting = plan(request(seq=16384, budget=48, optimizer="paged_adamw_8bit"))
    assert fitting.fits and fitting.layout.placement == "paged"
    assert fitting.torch_cap_bytes == 48 * GIB - fitting.breakdown.optimizer_states - fitting.breakdown.outside_torch


def test_a_set_batch_and_optimizer_are_honoured_or_refused_never_replaced():
    # The example: 1 x 16 with 32-bit AdamW under auto, 80 GiB: 16 sequences of 32-bit states do not fit.
    result = plan(request(budget=80, per_device_batch_size=1, gradient_accumulation_steps=16,
                          optimizer="adamw_torch"))
    assert result.fits is False
    assert result.layout.optimizer == "adamw_torch" and result.layout.sequences_per_step == 16
    fields = {s.field for s in result.suggestions}
    assert "spec.training.optimizer" in fields and "spec.resources.gpuMemoryGiB" in fields
    assert [c.field for c in result.changes][0] == "spec.training.gradientAccumulationSteps"


def test_an_optimizer_the_fused_engine_cannot_run_names_the_field():
    with pytest.raises(PlanError) as err:
        plan(request(budget=80, optimizer="adafactor"))
    assert err.value.field == "spec.training.optimizer" and "profile custom" in err.value.message


def test_lean_prefers_paged_and_falls_back_to_host_with_a_change_listed():
    assert plan(request(budget=48, profile="lean")).layout.placement == "paged"
    tight = plan(request(budget=24, profile="lean", optimizer="paged_adamw_8bit"))
    assert tight.fits and tight.layout.placement == "host"
    assert any(c.field == "spec.training.optimizer" for c in tight.changes)


def test_set_checkpointing_is_honoured():
    assert plan(request(budget=80, gradient_checkpointing="unsloth")).layout.uncheckpointed_layers == 0
    off = plan(request(budget=139, gradient_checkpointing="false", per_device_batch_size=1))
    assert off.layout.uncheckpointed_layers == LLAMA_8B.num_layers


def test_a_budget_below_the_weights_says_so():
    result = plan(request(budget=8))
    assert result.fits is False and result.reason_field == "spec.resources.gpuMemoryGiB"
    assert "below the model's bf16 weights" in result.reason


@pytest.mark.parametrize("shape,seq,budget", [(LLAMA_8B, 16384, 20), (QWEN_7B, 32768, 24), (LLAMA_8B, 2048, 16)])
def test_every_suggestion_fits_when_applied(shape, seq, budget):
    req = request(shape, seq, budget)
    result = plan(req)
    assert result.fits is False and result.suggestions
    for suggestion in result.suggestions:
        if suggestion.field == "spec.model.maxSeqLength":
            batch = {"per_device_batch_size": 1} if "perDeviceBatchSize: 1" in suggestion.message else {}
            changed = replace(req, seq_len=suggestion.value, **batch)
        elif suggestion.field == "spec.resources.gpuMemoryGiB":
            changed = replace(req, budget_bytes=suggestion.value * GIB)
            assert not plan(replace(req, budget_bytes=(suggestion.value - 1) * GIB)).fits  # the smallest
        else:
            continue
        assert plan(changed).fits, suggestion


def test_no_budget_reports_the_leanest_layout():
    result = plan(request())
    assert result.fits is None and result.layout.placement == "host" and result.torch_cap_bytes is None


def test_shapes_from_config_json_equal_the_known_shapes(tmp_path):
    config = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
              "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
              "tie_word_embeddings": False, "max_position_embeddings": 32768}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = ModelShape.from_file(tmp_path / "config.json")
    assert shape.parameters == QWEN_7B.parameters == 7_615_616_512
    assert LLAMA_8B.parameters == 8_030_261_248


@pytest.mark.parametrize("content,words", [(None, "does not exist"), ("{not json", "not readable JSON"),
                                           ('{"model_type": "bert"}', "'bert' is not supported"),
                                           ('{"model_type": "llama"}', "lacks a usable")])
def test_unusable_config_json_is_a_clear_error(tmp_path, content, words):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(ShapeError, match=words):
        ModelShape.from_file(tmp_path / "config.json")


def test_the_api_lists_exactly_the_known_shapes():
    assert sorted(a.value for a in ModelArchitecture) == sorted(KNOWN_SHAPES)


def test_the_charts_gpu_tables_are_the_planners():
    values = yaml.safe_load((ROOT / "charts" / "kubesloth" / "values.yaml").read_text())
    gpus = gpu_classes()
    assert values["gpuMemoryGiB"] == {name: gpu.memory_gib for name, gpu in gpus.items()}
    assert values["gpuPrices"] == {name: gpu.hourly_price for name, gpu in gpus.items()}


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("finetunejob-*.yaml")))
def test_kubesloth_plan_on_every_example(example, capsys, monkeypatch, tmp_path):
    from kubesloth.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["plan", str(ROOT / "examples" / example), "--offline"]
    if example == "finetunejob-tiny.yaml":  # a pvc:// model: its config.json given by hand
        from kubesloth.trainer.tiny import make_tiny_model
        args += ["--model-config", str(make_tiny_model(tmp_path / "tiny") / "config.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "budget:" in out and "NVIDIA-H200" in out
    if "24gb" in example or "long-context" in example:
        assert "(spec.resources.gpuMemoryGiB): fits" in out
