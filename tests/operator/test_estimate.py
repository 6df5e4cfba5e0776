"""The operator's estimate before scheduling, without a cluster: where the shape comes from, refusals, deferral."""

from __future__ import annotations

import json

from kubesloth.api.v1alpha1 import FineTuneJobSpec
from kubesloth.operator.estimate import estimate_for
from kubesloth.operator.settings import OperatorSettings

LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}


def spec(source="hf://meta-llama/Llama-3.1-8B", resources=None, **model) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({
        "model": {"source": source, **model}, "dataset": {"source": "file:///d.jsonl"},
        "output": {"destination": "pvc://out/x"}, "resources": resources or {}})


def no_hub(repo, revision):
    return None


def test_hub_config_json_is_used_when_the_hub_answers(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_8B))
    seen = []

    def hub(repo, revision):
        seen.append((repo, revision))
        return path

    result = estimate_for(spec("hf://acme/my-8b@v2", {"gpuMemoryGiB": 24}), OperatorSettings(), hub)
    assert seen == [("acme/my-8b", "v2")]
    assert result.condition["status"] == "True" and result.status["shape"].endswith("(config.json from the hub)")
    assert result.status["plan"]["placement"] == "host" and result.refusal is None


def test_offline_falls_back_to_a_known_shape_then_defers():
    known = estimate_for(spec(resources={"gpuMemoryGiB": 80}), OperatorSettings(), no_hub)
    assert known.status["shape"] == "llama-3.1-8b (known shape of meta-llama/Llama-3.1-8B)"
    unknown = estimate_for(spec("hf://acme/mystery", {"gpuMemoryGiB": 80}), OperatorSettings(), no_hub)
    assert unknown.status is None and unknown.refusal is None
    assert unknown.condition["status"] == "Unknown" and unknown.condition["reason"] == "EstimateDeferred"
    assert "spec.model.architecture" in unknown.condition["message"]
    named = estimate_for(spec("pvc://models/mine", {"gpuMemoryGiB": 80}, architecture="qwen2.5-7b"),
                         OperatorSettings(), no_hub)
    assert named.status["shape"] == "qwen2.5-7b (spec.model.architecture)"


def test_a_gpu_product_gives_the_budget_and_is_passed_to_the_pod():
    result = estimate_for(spec(resources={"gpuProduct": "NVIDIA-L40S"}), OperatorSettings(), no_hub)
    assert result.status["budgetSource"] == "spec.resources.gpuProduct"
    assert result.budget_bytes == result.status["budgetBytes"] == int(45.0 * 2**30)
    chart = estimate_for(spec(resources={"gpuProduct": "NVIDIA-L40S"}),
                         OperatorSettings(gpu_memory={"NVIDIA-L40S": 44.0}), no_hub)
    assert chart.budget_bytes == int(44.0 * 2**30)  # the chart's table wins over the planner's copy


def test_a_gpu_without_bf16_is_refused_naming_the_field():
    result = estimate_for(spec(resources={"gpuProduct": "Tesla-T4"}), OperatorSettings(), no_hub)
    assert result.refusal_field == "spec.resources.gpuProduct" and result.condition["reason"] == "GpuUnsupported"


def test_no_budget_is_fits_unknown_with_the_least_it_needs():
    result = estimate_for(spec(), OperatorSettings(), no_hub)
    assert result.refusal is None and result.condition["reason"] == "NoBudget"
    assert "GiB" in result.condition["message"] and "fits" not in result.status
